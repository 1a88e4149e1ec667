"""The variational bound: ``itdiffusion.variational.vlb`` (several timesteps per forward pass) against
improved-diffusion's ``GaussianDiffusion.calc_bpd_loop`` (one timestep per pass), same model, images and
noise: the largest difference in bits/dim and the wall-time ratio, measured side by side in one run.

CPU default: the iddpm_tiny U-Net (random weights) with T steps. ``--model iddpm_cifar10_vlb --device cuda``
runs the CIFAR-10 flags (52M parameters, 4000 steps) on a GPU.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

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
        seed: int = 0) -> dict:
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(f"src/itdiffusion/conf/model/{model_name}.yaml"))
    cfg.pop("defaults", None)
    if steps is not None:
        cfg["diffusion_steps"] = steps
    torch.manual_seed(seed)
    model, diffusion = build_model_and_diffusion(cfg)
    dev = torch.device(device)
    model = model.to(dev).eval()
    g = torch.Generator().manual_seed(seed)
    x = (torch.randint(0, 256, (num_images, 3, 32, 32), generator=g).double() / 127.5 - 1).to(dev)

    _sync(dev)
    start = time.perf_counter()
    torch.manual_seed(seed + 1)  # calc_bpd_loop draws its noise from the global RNG
    with torch.no_grad():
        ref = diffusion.calc_bpd_loop(_Float32(model), x, clip_denoised=True)
    _sync(dev)
    t_ref = time.perf_counter() - start

    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    _sync(dev)
    start = time.perf_counter()
    ours = vlb(model, diffusion, x, generator=gen, steps_per_batch=steps_per_batch)
    _sync(dev)
    t_ours = time.perf_counter() - start
    diff = (ours.total_bpd.cpu() - ref["total_bpd"].cpu()).abs().max().item()
    return {"model": model_name, "steps": diffusion.num_timesteps, "images": num_images,
            "steps_per_batch": steps_per_batch, "ref_s": t_ref, "ours_s": t_ours, "max_abs_diff": diff,
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
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("bench_vlb: --device cuda but no CUDA device is available")
        return
    if not cuda:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    steps = args.steps if args.steps is not None else (None if cuda else 20)
    images = args.images or (64 if cuda else 2)
    per_batch = args.steps_per_batch or ([8, 32] if cuda else [20])
    print(f"\n### Variational bound: vlb (batched timesteps) vs calc_bpd_loop, {args.model}, {args.device}\n")
    print("| model | T | images | steps/pass | calc_bpd_loop s | vlb s | speed-up | max abs diff bpd | bpd |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k in per_batch:
        r = run(args.model, steps, images, k, args.device)
        print(f"| {r['model']} | {r['steps']} | {r['images']} | {r['steps_per_batch']} | {r['ref_s']:.2f} | "
              f"{r['ours_s']:.2f} | {r['ref_s'] / r['ours_s']:.2f}x | {r['max_abs_diff']:.1e} | "
              f"{r['bpd']:.4f} |")


if __name__ == "__main__":
    main()
