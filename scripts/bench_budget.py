"""The dataset budget side by side with the full-cost protocol, in one run (``make bench``).

For each setting: a pilot on a few images (their own seeds) chooses the log-SNR points and VLB timesteps per
image (``itdiffusion.budget``, target: ``--ratio`` times the full protocol's total stderr); then the same
test images are evaluated with the budget and with the full protocol (``--full-points`` points, the exact
T-step VLB), with the same decoder choice (fitted on the pilot). Printed per estimate: network evaluations
per image, dataset mean +- total stderr of each, and their difference in units of the combined stderr
(``|z| < 2`` expected: the budget does not change the estimand). Goal: >= 50x fewer evaluations for
<= 10% larger total stderr at the paper's sizes (the reduced sizes here give smaller ratios; the last table
projects the paper's from the pilot's variances).

Settings: the tiny U-Net ``make smoke`` trains (skipped, saying so, when its checkpoint is missing), through
the evaluate stage itself (:func:`stage_compare`: ``estimator.budget=per_image`` then ``dataset`` on the
same images, as ``experiment=paper_full`` and ``paper`` differ; the budgeted run checks its realized stderr
and tops up), and the CIFAR-10 architecture (iddpm_cifar10_vlb flags, random weights: its numbers are not
CIFAR-10's) with a reduced chain on the CPU. Prints the machine load it ran under. Minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from itdiffusion.budget import (
    IT_LADDER,
    VLB_LADDER,
    choose_k,
    estimate_with_choice,
    it_pilot,
    vlb_pilot,
)
from itdiffusion.config import CONFIG_DIR
from itdiffusion.information import GaussianReference, LogSNRProposal, sample_curves
from itdiffusion.units import PIXEL_BIN, XINTERVAL, mean_and_stderr, nats_to_bpd
from itdiffusion.variational import vlb_per_image, vlb_sampled


def load_line() -> str:
    load = os.getloadavg()
    return (f"machine load (1/5/15 min): {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} on {os.cpu_count()} "
            f"CPUs, torch threads {torch.get_num_threads()}")


def _curves(denoiser, x, reference, proposal, k, first_seed, batch_size=256):
    seeds = list(range(first_seed + 7919 * k, first_seed + 7919 * k + x.shape[0]))
    return sample_curves(denoiser, x, reference, npoints=k, proposal=proposal, seeds=seeds, delta=PIXEL_BIN,
                         xinterval=XINTERVAL, rounding="soft", dequantize=True, control_variate=True,
                         batch_size=batch_size)


def compare(name: str, denoiser, network, diffusion, reference: GaussianReference, pilot_x, x,
            full_points: int, ratio: float, paper_images: int = 10_000, paper_points: int = 1000,
            paper_steps: int = 4000) -> None:
    """Pilot, budgeted and full-cost evaluations of ``x``; prints the tables."""
    started = time.time()
    dim = reference.dim
    steps = diffusion.num_timesteps
    proposal = LogSNRProposal.from_reference(reference, delta=PIXEL_BIN)
    it_ladder = [k for k in IT_LADDER if k <= full_points]
    vlb_ladder = [k for k in VLB_LADDER if k < steps - 1]
    it_stats, choice, it_spent, _ = it_pilot(
        lambda k: _curves(denoiser, pilot_x, reference, proposal, k, 10**6), reference, it_ladder)
    vlb_stats, vlb_spent = vlb_pilot(
        lambda k: vlb_sampled(network, diffusion, pilot_x, list(range(10**7 + 1000 * k, 10**7 + 1000 * k
                                                                      + pilot_x.shape[0])), k), vlb_ladder)
    n = x.shape[0]
    k_it = choose_k(it_stats, n, full_points, target_ratio=ratio)
    k_vlb = choose_k(vlb_stats, n, steps - 1, target_ratio=ratio)
    # the main evaluations: the same images, the same decoder choice, budget vs full
    budget_it = estimate_with_choice(_curves(denoiser, x, reference, proposal, k_it.k, 0), reference, choice)
    full_curves = _curves(denoiser, x, reference, proposal, full_points, 0)
    full_it = estimate_with_choice(full_curves, reference, choice)
    seeds = list(range(5000, 5000 + n))
    sampled = vlb_sampled(network, diffusion, x, seeds, k_vlb.k) if k_vlb.k < steps - 1 else None
    exact = vlb_per_image(network, diffusion, x, seeds, steps_per_batch=min(steps, 64))
    rows = []
    for key in ("continuous", "discrete", "dequantized"):
        b = nats_to_bpd(getattr(budget_it, key), dim)
        f = nats_to_bpd(getattr(full_it, key), dim)
        rows.append((f"it_{key}", 2 * k_it.k, 2 * full_points, b, f))
    for key, cont in (("vlb", False), ("vlb_continuous", True)):
        b = sampled.total(cont) if sampled is not None else exact.total(cont)
        rows.append((key, (k_vlb.k + 1) if sampled is not None else steps, steps, b, exact.total(cont)))
    print(f"\n### {name}: {n} images, pilot {pilot_x.shape[0]} images; chosen {k_it.k} log-SNR points "
          f"(full {full_points}), {k_vlb.k} VLB strata + decoder (full T = {steps})\n")
    print("| estimate | evals/img budget | evals/img full | budget bpd | full bpd | |diff| / combined SE | "
          "SE ratio budget/full |")
    print("|---|---|---|---|---|---|---|")
    for key, eb, ef, b, f in rows:
        mb, sb = mean_and_stderr(b)
        mf, sf = mean_and_stderr(f)
        z = abs(mb - mf) / math.sqrt(sb**2 + sf**2)
        print(f"| {key} | {eb} | {ef} | {mb:.4f} ± {sb:.4f} | {mf:.4f} ± {sf:.4f} | {z:.2f} | "
              f"{sb / sf:.3f} |")
    total_b = 2 * k_it.k + (k_vlb.k + 1 if sampled is not None else steps)
    total_f = 2 * full_points + steps
    print(f"\nper image, IT + VLB: {total_b} vs {total_f} network evaluations "
          f"({total_f / total_b:.1f}x fewer); pilot {(it_spent + vlb_spent) * pilot_x.shape[0]} evaluations; "
          f"{time.time() - started:.0f} s")
    # the paper's sizes from this pilot's variances
    p_it = choose_k(it_stats, paper_images, paper_points, target_ratio=ratio)
    p_vlb = choose_k(vlb_stats, paper_images, paper_steps - 1, target_ratio=ratio)
    paper_b, paper_f = 2 * p_it.k + p_vlb.k + 1, 2 * paper_points + paper_steps
    print(f"projected for {paper_images} images (this model's variances; full {paper_points} points, "
          f"T = {paper_steps}): {p_it.k} points, {p_vlb.k} VLB strata: {paper_b} vs {paper_f} evaluations "
          f"per image per model ({paper_f / paper_b:.0f}x fewer)")


STAGE_ESTIMATES = ("it_continuous", "it_discrete", "it_dequantized", "vlb", "vlb_continuous")


def stage_compare(checkpoint: Path, num_images: int, full_points: int, ratio: float, pilot_images: int,
                  out: Path, vlb: bool = True, target_bpd: float | None = None) -> None:
    """The evaluate stage on the smoke U-Net's first ``num_images`` test crops: the full per-image protocol
    (``full_points`` log-SNR points, the exact VLB) and the dataset budget (target ``ratio`` times the
    full protocol's stderr as the pilot predicts it); prints the measured evaluations per image, each
    estimate's realized stderr against its target and the two protocols' agreement."""
    from hydra import compose, initialize_config_dir

    from itdiffusion.config import register_configs
    from itdiffusion.stages import CONFIG_DIR, evaluate

    register_configs()
    started = time.time()
    runs = {}
    for budget in ("per_image", "dataset"):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
            cfg = compose("config", overrides=[
                "experiment=smoke", f"model.checkpoint={checkpoint}", "logger=none",
                f"run_id=bench_{budget}", f"paths.output_dir={out}", f"data.num_images={num_images}",
                f"estimator.npoints={full_points}", "estimator.vlb_steps=all", f"estimator.budget={budget}",
                f"estimator.target_stderr_ratio={ratio}", f"estimator.pilot_images={pilot_images}",
                "estimator.batch_size=512", f"estimator.vlb={str(vlb).lower()}", "skip_done=true",
                *([f"estimator.target_stderr_bpd={target_bpd}"] if target_bpd and budget == "dataset"
                  else [])])
        evaluate.run(cfg, out / budget)  # skip_done: a complete run of the same settings is kept
        runs[budget] = json.loads((out / budget / "metrics.json").read_text())
    full, budgeted = runs["per_image"], runs["dataset"]
    plan = budgeted["budget"]
    print(f"\n### smoke U-Net through the evaluate stage: {num_images} images, pilot {pilot_images} images; "
          f"chosen {plan['chosen']} (full {plan['full']}); {len(plan['top_ups']) - 1} top-up(s); "
          f"{time.time() - started:.0f} s\n")
    print("| estimate | budget bpd | full bpd | \\|diff\\| / combined SE | target SE | predicted SE | "
          "realized SE | realized / target | SE ratio budget/full |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in STAGE_ESTIMATES if vlb else STAGE_ESTIMATES[:3]:
        b, sb, f, sf = (budgeted[f"{name}_bpd"], budgeted[f"{name}_bpd_stderr"], full[f"{name}_bpd"],
                        full[f"{name}_bpd_stderr"])
        check = plan["stderr_check"][name]
        print(f"| {name} | {b:.4f} ± {sb:.4f} | {f:.4f} ± {sf:.4f} | {abs(b - f) / math.hypot(sb, sf):.2f} | "
              f"{check['target']:.4f} | {check['predicted']:.4f} | {check['realized']:.4f} | "
              f"{check['realized'] / check['target']:.3f} | {sb / sf:.3f} |")
    evals = plan["network_evals_per_image"]
    print(f"\nnetwork evaluations per image, measured: {evals['budgeted']} (planned {evals['planned']}) vs "
          f"{full['network_evals'] / full['num_images']:g} ({evals['ratio']}x fewer); pilot "
          f"{plan['pilot']['network_evals']} once; every target met: {plan['target_met']}; the same decoder "
          f"per bin in both: {budgeted['decoder_choice']['groups'] == full['decoder_choice']['groups']}; "
          f"reference-only: {budgeted['it_reference_only']}")


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def cifar_architecture_setting(steps: int, num_images: int, pilot_images: int, seed: int = 0):
    """The CIFAR-10 U-Net (iddpm_cifar10_vlb flags, random weights) with a ``steps``-step chain; smooth
    synthetic images; a diagonal Gaussian reference from 512 more of them."""
    from omegaconf import OmegaConf

    from itdiffusion.models.iddpm import IDDPMDenoiser, build_model_and_diffusion

    cfg = OmegaConf.to_container(OmegaConf.load(Path(CONFIG_DIR) / "model" / "iddpm_cifar10_vlb.yaml"))
    cfg.pop("defaults", None)
    cfg.update(diffusion_steps=steps, dropout=0.0)
    torch.manual_seed(seed)
    model, diffusion = build_model_and_diffusion(cfg)
    model.eval()
    g = torch.Generator().manual_seed(seed)

    def images(n):
        u = torch.linspace(-1, 1, 32, dtype=torch.float64)
        base = torch.rand(n, 3, 1, 1, generator=g, dtype=torch.float64) * 1.2 - 0.6
        wave = torch.sin(3 * u)[None, None, :, None] * torch.cos(2 * u)[None, None, None, :]
        x = (base + 0.3 * torch.rand(n, 1, 1, 1, generator=g, dtype=torch.float64) * wave
             + 0.05 * torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64)).clamp(-1, 1)
        return torch.round((x + 1) * 127.5) / 127.5 - 1

    reference = GaussianReference.from_data(images(512), diagonal=True)
    denoiser = IDDPMDenoiser(model, cfg)
    return denoiser, model, diffusion, reference, images(pilot_images), images(num_images)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=1.1, help="target: this times the full protocol's SE")
    parser.add_argument("--smoke-images", type=int, default=48)
    parser.add_argument("--smoke-full-points", type=int, default=256)
    parser.add_argument("--cifar-steps", type=int, default=20)
    parser.add_argument("--cifar-images", type=int, default=4)
    parser.add_argument("--cifar-full-points", type=int, default=16)
    parser.add_argument("--pilot-images", type=int, default=8)
    parser.add_argument("--cifar-pilot-images", type=int, default=4)
    parser.add_argument("--skip-cifar", action="store_true")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="the smoke U-Net (default: the newest IT fine-tuned one of make smoke)")
    parser.add_argument("--it-only", action="store_true", help="the smoke U-Net without the VLB")
    parser.add_argument("--target-bpd", type=float, default=None, help="absolute target (bits/dim)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_budget"), help="the stage's run dirs")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    print(f"\n## Dataset budget vs full protocol ({time.strftime('%Y-%m-%d %H:%M')})\n{load_line()}")
    checkpoint = args.checkpoint or _load_script("bench_estimator_efficiency").smoke_checkpoint()
    if checkpoint is None:
        print("\n(smoke U-Net skipped: no checkpoints/finetune/smoke-*-tune/model.pt; "
              "`make smoke` trains it)")
    else:
        print(f"smoke U-Net: {checkpoint}")
        stage_compare(checkpoint, args.smoke_images, args.smoke_full_points, args.ratio, args.pilot_images,
                      args.out, vlb=not args.it_only, target_bpd=args.target_bpd)
    if not args.skip_cifar:
        denoiser, model, diffusion, reference, pilot_x, x = cifar_architecture_setting(
            args.cifar_steps, args.cifar_images, args.cifar_pilot_images)
        compare(f"CIFAR-10 architecture, random weights, T = {args.cifar_steps} (CPU)", denoiser, model,
                diffusion, reference, pilot_x, x, args.cifar_full_points, args.ratio)
    print(f"\n{load_line()}")


if __name__ == "__main__":
    main()
