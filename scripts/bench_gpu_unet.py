"""GPU throughput of the CIFAR-10 IDDPM U-Net (52M parameters, random weights), reference vs fast path.

- evaluation: images x network evaluations per second of ``IDDPMDenoiser`` (what ``it_nll`` spends);
- fine-tuning: images per second of a forward + backward + Adam step on the IT loss (``it_loss``);
- the continuous IT estimate (bits/dim) of a fixed batch on both paths (same points and noise): the fast
  path must stay within 0.002 bits/dim of fp32;
- peak memory, and the fraction of the H100's dense bf16 peak (989 TFLOP/s) reached, from the model's
  FLOPs per image counted by ``torch.utils.flop_counter.FlopCounterMode``.

Reference: fp32, eager, batch 128. Fast: the library's fast path (``itdiffusion.models.acceleration``,
what ``estimator.precision=auto estimator.channels_last=true estimator.compile=...`` runs in the evaluate
stage): bf16 autocast, channels_last inputs, ``torch.compile`` (``--compile-mode``, default ``max-autotune``,
which also captures CUDA graphs), larger batches.

    python scripts/bench_gpu_unet.py                       # on a CUDA machine (H100: a few minutes)
    python scripts/bench_gpu_unet.py --device cpu --tiny   # a quick CPU sanity pass of the same code

Without CUDA (and without ``--device cpu``) it says so and exits 0, so ``make bench`` passes on CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

H100_DENSE_BF16_FLOPS = 989e12


def _model_cfg(tiny: bool) -> dict:
    from omegaconf import OmegaConf

    from itdiffusion.config import CONFIG_DIR

    name = "iddpm_tiny" if tiny else "iddpm_cifar10_vlb"
    cfg = OmegaConf.to_container(OmegaConf.load(Path(CONFIG_DIR) / "model" / f"{name}.yaml"))
    cfg.pop("defaults", None)
    return cfg


def randomize_zero_layers(model: nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """improved-diffusion zero-initialises the last layer of every block and the output convolution, so a
    fresh U-Net predicts eps_hat = 0; give those weights small random values so that the outputs (and the
    bits/dim comparison of the fast path) exercise every layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def flops_per_image(denoiser: nn.Module, device, shape) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    z = torch.randn(2, *shape, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        denoiser(z, torch.zeros(2, device=device))
    return counter.get_total_flops() / 2


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="iddpm_tiny flags and small batches")
    parser.add_argument("--ref-batch", type=int, default=None)
    parser.add_argument("--fast-batch", type=int, default=None)
    parser.add_argument("--train-batch", type=int, default=None)
    parser.add_argument("--compile-mode", default="max-autotune",
                        help="torch.compile mode for the fast path; 'none' to skip compiling")
    parser.add_argument("--iters", type=int, default=None)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_gpu_unet: no CUDA device here; skipped. On a GPU machine run "
              "`python scripts/bench_gpu_unet.py` (or `--device cpu --tiny` for a CPU sanity pass).")
        return 0

    from itdiffusion.information import GaussianReference, it_loss, it_nll
    from itdiffusion.models.acceleration import AcceleratedUNet
    from itdiffusion.models.iddpm import IDDPMDenoiser, build_model_and_diffusion
    from itdiffusion.units import nats_to_bpd

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    tiny = args.tiny
    ref_batch = args.ref_batch or (4 if tiny else 128)
    fast_batch = args.fast_batch or (8 if tiny else 1024)
    train_batch = args.train_batch or (4 if tiny else 128)
    iters = args.iters or (2 if tiny else 20)
    fast_dtype = torch.bfloat16
    cfg = _model_cfg(tiny)
    torch.manual_seed(0)
    model, _ = build_model_and_diffusion(cfg)
    randomize_zero_layers(model)
    model = model.to(device).eval()
    shape = (3, cfg["image_size"], cfg["image_size"])
    denoiser = IDDPMDenoiser(model, cfg)
    params = sum(p.numel() for p in model.parameters())
    flops = flops_per_image(denoiser, device, shape)

    # the same weights on both paths: the fast U-Net wraps the reference one
    fast_unet = AcceleratedUNet(model, dtype=fast_dtype, channels_last=True, compile=args.compile_mode)
    fast = IDDPMDenoiser(fast_unet, cfg)
    reference = denoiser

    def eval_rate(den, batch):
        z = torch.randn(batch, *shape, device=device)
        a = torch.linspace(-8, 12, batch, device=device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            sec = _timed(lambda: den(z, a), device, warmup=3 if not tiny else 1, iters=iters)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        return batch / sec, peak

    rows = []
    for name, den, batch in (("fp32 eager (reference)", reference, ref_batch),
                             (f"bf16 + channels_last + compile({args.compile_mode})", fast, fast_batch)):
        rate, peak = eval_rate(den, batch)
        rows.append((name, batch, rate, peak))

    # Fine-tuning: forward + backward + Adam on the IT loss.
    g = torch.Generator().manual_seed(1)
    data = torch.rand(512 if not tiny else 16, *shape, generator=g) * 2 - 1
    ref_gauss = GaussianReference.from_data(data.double(), diagonal=True).to(device)
    train_rows = []
    for name, dtype, cl in (("fp32 eager (reference)", None, False),
                            ("bf16 + channels_last", fast_dtype, True)):
        torch.manual_seed(0)
        tmodel, _ = build_model_and_diffusion(cfg)
        randomize_zero_layers(tmodel)
        tmodel = tmodel.to(device).train()
        tden = IDDPMDenoiser(AcceleratedUNet(tmodel, dtype=dtype, channels_last=cl), cfg)
        opt = torch.optim.Adam(tmodel.parameters(), lr=2.5e-5)
        x = data[:train_batch].to(device)
        if len(x) < train_batch:
            x = x.repeat((train_batch + len(x) - 1) // len(x), 1, 1, 1)[:train_batch]

        def step(tden=tden, opt=opt, x=x):
            loss = it_loss(tden, x, ref_gauss).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sec = _timed(step, device, warmup=2 if not tiny else 1, iters=max(2, iters // 2))
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        train_rows.append((name, train_batch, train_batch / sec, peak))
        del tmodel, opt

    # Bits/dim of a fixed batch on both paths: same points and noise (image seeds).
    x = data[: (8 if not tiny else 2)].to(device)
    npoints = 16 if tiny else 128
    est = {}
    for name, den in (("fp32", reference), ("fast", fast)):
        out = it_nll(den, x, ref_gauss, npoints=npoints, image_seeds=list(range(len(x))), clamp=False,
                     batch_size=fast_batch)
        est[name] = nats_to_bpd(out.continuous, x[0].numel()).mean().item()

    dev_name = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"\n### U-Net throughput on {dev_name}: {'iddpm_tiny' if tiny else 'iddpm_cifar10_vlb'} "
          f"({params / 1e6:.1f}M parameters, {flops / 1e9:.2f} GFLOP per image forward)\n")
    print("| path | batch | images x evals / s | speed-up | peak memory GiB | model TFLOP/s "
          "| of H100 bf16 peak |")
    print("|---|---|---|---|---|---|---|")
    for name, batch, rate, peak in rows:
        tflops = rate * flops / 1e12
        print(f"| eval: {name} | {batch} | {rate:.1f} | {rate / rows[0][2]:.2f}x | {peak:.2f} | "
              f"{tflops:.1f} | "
              f"{tflops * 1e12 / H100_DENSE_BF16_FLOPS:.1%} |")
    for name, batch, rate, peak in train_rows:
        tflops = 3 * rate * flops / 1e12  # forward + backward ~ 3x forward
        print(f"| fine-tune: {name} | {batch} | {rate:.1f} images/s | {rate / train_rows[0][2]:.2f}x | "
              f"{peak:.2f} | {tflops:.1f} | {tflops * 1e12 / H100_DENSE_BF16_FLOPS:.1%} |")
    diff = abs(est["fast"] - est["fp32"])
    print(f"\nContinuous IT bits/dim of {len(x)} fixed images, {npoints} points, same points and noise: "
          f"fp32 {est['fp32']:.5f}, fast {est['fast']:.5f}, |diff| {diff:.5f} "
          f"({'within' if diff <= 0.002 else 'NOT within'} 0.002)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
