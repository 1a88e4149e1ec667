"""The variational bound: ``itdiffusion.variational.vlb`` (several timesteps per forward pass) against
improved-diffusion's ``GaussianDiffusion.calc_bpd_loop`` (one timestep per pass), same model, images and
noise: the largest difference in bits/dim and the wall-time ratio, measured side by side in one run:
``--rounds`` interleaved rounds (alternating which runs first, same torch threads), median and range of each,
and the machine's load average before and after (a loaded machine slows the reference's many small passes
most, which inflates the ratio: compare figures only at similar load).

CPU default: the iddpm_tiny U-Net (random weights) with T steps. ``--model iddpm_cifar10_vlb --device cuda``
runs the CIFAR-10 flags (52M parameters, 4000 steps) on a GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from itdiffusion.config import CONFIG_DIR
from itdiffusion.models.iddpm import build_model_and_diffusion
from itdiffusion.variational import vlb


class _Float32(nn.Module):
    """calc_bpd_loop hands the model float64 x_t; the U-Net runs in float32 (as vlb does)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, t, **kwargs):
        return self.model(x.float(), t, **kwargs).double()


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(model_name: str, steps: int | None, num_images: int, steps_per_batch: int, device: str,
        seed: int = 0, rounds: int = 5) -> dict:
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(Path(CONFIG_DIR) / "model" / f"{model_name}.yaml"))
    cfg.pop("defaults", None)
    if steps is not None:
        cfg["diffusion_steps"] = steps
    torch.manual_seed(seed)
    model, diffusion = build_model_and_diffusion(cfg)
    dev = torch.device(device)
    model = model.to(dev).eval()
    g = torch.Generator().manual_seed(seed)
    x = (torch.randint(0, 256, (num_images, 3, 32, 32), generator=g).double() / 127.5 - 1).to(dev)

    def reference_run():
        torch.manual_seed(seed + 1)  # calc_bpd_loop draws its noise from the global RNG
        with torch.no_grad():
            return diffusion.calc_bpd_loop(_Float32(model), x, clip_denoised=True)

    def our_run():
        gen = torch.Generator(device="cpu").manual_seed(seed + 1)
        return vlb(model, diffusion, x, generator=gen, steps_per_batch=steps_per_batch)

    # interleaved rounds, alternating which goes first, same threads: median and spread of each
    times: dict[str, list[float]] = {"ref": [], "ours": []}
    for r in range(rounds):
        order = [("ref", reference_run), ("ours", our_run)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            _sync(dev)
            start = time.perf_counter()
            out = fn()
            _sync(dev)
            times[name].append(time.perf_counter() - start)
            if name == "ref":
                ref = out
            else:
                ours = out
    diff = (ours.total_bpd.cpu() - ref["total_bpd"].cpu()).abs().max().item()
    return {"model": model_name, "steps": diffusion.num_timesteps, "images": num_images,
            "steps_per_batch": steps_per_batch, "ref_s": statistics.median(times["ref"]),
            "ours_s": statistics.median(times["ours"]), "times": times, "max_abs_diff": diff,
            "bpd": ours.total_bpd.mean().item()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="iddpm_tiny")
    parser.add_argument("--steps", type=int, default=None, help="diffusion steps (default: 20 on CPU, "
                                                               "the config's on CUDA)")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--steps-per-batch", type=int, nargs="+", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("bench_vlb: --device cuda but no CUDA device is available")
        return
    if not cuda:
        torch.set_num_threads(args.threads)
    steps = args.steps if args.steps is not None else (None if cuda else 20)
    images = args.images or (64 if cuda else 2)
    per_batch = args.steps_per_batch or ([8, 32] if cuda else [20])
    print(f"\n### Variational bound: vlb (batched timesteps) vs calc_bpd_loop, {args.model}, {args.device}\n")
    print(f"{_load()}; torch threads {torch.get_num_threads()}; {args.rounds} interleaved rounds\n")
    print("| model | T | images | steps/pass | calc_bpd_loop s (median, range) | vlb s (median, range) | "
          "speed-up (median ratio) | max abs diff bpd | bpd |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k in per_batch:
        r = run(args.model, steps, images, k, args.device, rounds=args.rounds)
        ref, ours = r["times"]["ref"], r["times"]["ours"]
        print(f"| {r['model']} | {r['steps']} | {r['images']} | {r['steps_per_batch']} | {r['ref_s']:.2f} "
              f"({min(ref):.2f}-{max(ref):.2f}) | {r['ours_s']:.2f} ({min(ours):.2f}-{max(ours):.2f}) | "
              f"{r['ref_s'] / r['ours_s']:.2f}x | {r['max_abs_diff']:.1e} | {r['bpd']:.4f} |")
    print(f"\n{_load()}")


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min) on {os.cpu_count()} CPUs"


if __name__ == "__main__":
    main()
