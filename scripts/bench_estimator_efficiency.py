"""Monte Carlo efficiency of the IT likelihood estimators: standard error against network evaluations.

Images and denoiser are fixed; each estimator is repeated with independent seeds and the standard error
of the dataset-mean bits/dim is measured from each image's spread over repeats, pooled over images (the
reported standard error is printed beside it). Efficiency is ``SE^2 x evaluations per image`` (the
evaluations needed for a given standard error scale with it), and ``ratio = reference / ours``: how many
times fewer network evaluations ours needs for the same standard error.

- reference style (ITD's estimator, written here from its formulas): a deterministic logistic grid of K
  log-SNRs shared by all images, importance weights 1/q, a separate network pass with fresh noise for the
  continuous, the rounded (discrete) and the dequantized estimate: 3 evaluations per point.
- ours (``itdiffusion.information.it_nll``): one pass serves continuous and discrete, stratified per-image
  log-SNRs, optionally the reference's linear decoder on the same noise as a zero-mean control variate
  for the channel noise (``control_variate=True``).

Denoisers: the exact posterior mean of a Gaussian mixture (d = 64; exact log-likelihoods give the bias),
and the tiny IDDPM U-Net that ``make smoke`` fine-tunes on the IT loss (32x32 photo crops; the tiny U-Net
part is skipped, saying so, when no smoke checkpoint exists). Prints markdown tables; a few minutes on 2
CPU cores at the default sizes (``--quick``: seconds).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from itdiffusion.denoisers import GaussianMixture, noisy_channel, x_from_eps
from itdiffusion.information import (
    GaussianReference,
    LogSNRProposal,
    it_nll,
    left_tail,
    proposal_for,
    round_to_lattice,
)
from itdiffusion.units import PIXEL_BIN, nats_to_bpd


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------
# The reference-style estimator (ITD): shared deterministic grid, one pass per estimate
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def reference_style(denoiser, x: torch.Tensor, reference: GaussianReference, npoints: int,
                    generator: torch.Generator, delta: float | None = None,
                    xinterval: tuple[float, float] | None = None, batch_size: int = 512) -> dict:
    """Per-image nats of ITD's estimator: ``h_G + 1/2 mean_k (mse_k - mmse_G(a_k)) / q(a_k)`` on the
    grid ``a_k = Q((k + 1/2) / K)`` (continuous), ``1/2 mean_k mse_round_k / q(a_k)`` + left tail on a
    second pass (discrete, hard rounding), and a third pass on ``x + delta (U - 1/2)`` (dequantized).
    Every pass draws its own noise. Returns ``{"continuous", "discrete", "dequantized", "evals"}``."""
    proposal = LogSNRProposal.from_reference(reference, delta=delta)
    grid = proposal.points(npoints, "grid")
    weight = torch.exp(-proposal.log_prob(grid))
    mmse_g = reference.mmse(grid)
    num = x.shape[0]
    x = x.to(torch.float64)

    def mse_curve(images: torch.Tensor, rounded: bool) -> torch.Tensor:
        curve = torch.empty(num, npoints, dtype=torch.float64)
        pairs = [(b, k) for b in range(num) for k in range(npoints)]
        for start in range(0, len(pairs), batch_size):
            chunk = torch.tensor(pairs[start:start + batch_size])
            a = grid[chunk[:, 1]]
            xb = images[chunk[:, 0]]
            eps = torch.randn(xb.shape, dtype=torch.float64, generator=generator)
            z = noisy_channel(xb, a, eps)
            eps_hat = denoiser(z.to(torch.float32 if is_net else torch.float64), a.float() if is_net else a)
            eps_hat = eps_hat.to(torch.float64)
            if xinterval is None:
                err = (eps - eps_hat).flatten(1).square().sum(1)
            else:
                x_hat = x_from_eps(z, a, eps_hat).clamp(*xinterval)
                if rounded:
                    x_hat = round_to_lattice(x_hat, delta, xinterval, "hard")
                err = a.exp() * (xb - x_hat).flatten(1).square().sum(1)
            curve[chunk[:, 0], chunk[:, 1]] = err
        return curve

    is_net = isinstance(denoiser, torch.nn.Module)
    out = {"continuous": reference.entropy + 0.5 * ((mse_curve(x, False) - mmse_g) * weight).mean(1),
           "evals": npoints}
    if delta is not None:
        tail = left_tail(reference, x, proposal.bounds[0])
        out["discrete"] = 0.5 * (mse_curve(x, True) * weight).mean(1) + tail
        x_deq = x + delta * (torch.rand(x.shape, dtype=torch.float64, generator=generator) - 0.5)
        deq = reference.entropy + 0.5 * ((mse_curve(x_deq, False) - mmse_g) * weight).mean(1)
        out["dequantized"] = deq + x[0].numel() * math.log(1 / delta)
        out["evals"] = 3 * npoints
    return out


# ----------------------------------------------------------------------------------------------------
# Repeats and the table
# ----------------------------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    evals: int
    mean_bpd: dict  # estimate -> mean over repeats of the dataset-mean bits/dim
    se_bpd: dict  # estimate -> standard error of the dataset mean, from the per-image spread over repeats
    reported_se_bpd: dict  # estimate -> mean reported standard error (ours only)
    seconds: float


def _repeat(name: str, fn, repeats: int, dim: int, keys: tuple[str, ...]) -> Row:
    """Runs ``fn`` with ``repeats`` seeds. The standard error of the dataset mean over B images is
    ``sqrt(mean_b Var_r[estimate_b] / B)``: each image's variance over repeats, pooled over images (B times
    more degrees of freedom than the spread of the B-image means themselves, same expectation)."""
    start = time.perf_counter()
    per_image = {k: [] for k in keys}
    reported = {k: [] for k in keys}
    evals = 0
    for r in range(repeats):
        out = fn(_gen(1000 + r))
        evals = out["evals"]
        for k in keys:
            per_image[k].append(nats_to_bpd(out[k], dim).to(torch.float64))
            if out.get(k + "_stderr") is not None:
                se = out[k + "_stderr"]
                reported[k].append(nats_to_bpd(se.square().sum().sqrt() / se.numel(), dim).item())
    t = {k: torch.stack(v) for k, v in per_image.items()}  # [repeats, B]
    return Row(name, evals, {k: v.mean().item() for k, v in t.items()},
               {k: (v.var(0).mean() / v.shape[1]).sqrt().item() for k, v in t.items()},
               {k: (sum(v) / len(v) if v else math.nan) for k, v in reported.items()},
               (time.perf_counter() - start) / repeats)


def _ours(denoiser, x, reference, npoints, **kw):
    def run(g):
        est = it_nll(denoiser, x, reference, npoints=npoints, generator=g, batch_size=512, **kw)
        return {"continuous": est.continuous, "continuous_stderr": est.continuous_stderr,
                "discrete": est.discrete, "discrete_stderr": est.discrete_stderr, "evals": est.network_evals}
    return run


class _Counted:
    """A denoiser that counts its evaluations (the pilot's cost)."""

    def __init__(self, denoiser):
        self.denoiser, self.evals = denoiser, 0

    def __call__(self, z, logsnr):
        self.evals += z.shape[0]
        return self.denoiser(z, logsnr)


def _ranges(denoiser, x, reference, **kw) -> dict:
    """The two log-SNR ranges compared: the reference's alone, and the pilot's (the stage's proposal)."""
    counted = _Counted(denoiser)
    pilot = proposal_for(reference, counted, x, **kw)
    print(f"\nPilot range {tuple(round(v, 2) for v in pilot.bounds)} (reference's core "
          f"{tuple(round(v, 2) for v in pilot.core_bounds)}), {counted.evals} pilot evaluations in all "
          f"({counted.evals / x.shape[0]:.1f} per image here; once per evaluation, whatever its size).")
    base = {k: v for k, v in kw.items() if k in ("clip", "delta")}  # what the reference's proposal takes
    return {"reference range": LogSNRProposal.from_reference(reference, **base), "pilot range": pilot}


def _table(title: str, rows: list[Row], key: str, truth_bpd: float | None = None):
    base = rows[0]
    print(f"\n### {title}: {key} bits/dim\n")
    head = ("| estimator | evals/image | mean bpd | SE (repeats) | SE (reported) | SE^2 x evals "
            "| ratio vs reference |")
    if truth_bpd is not None:
        head += " mean - exact |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for row in rows:
        cost = row.se_bpd[key] ** 2 * row.evals
        ratio = (base.se_bpd[key] ** 2 * base.evals) / cost if cost > 0 else math.inf
        line = (f"| {row.name} | {row.evals} | {row.mean_bpd[key]:.5f} | {row.se_bpd[key]:.2e} | "
                f"{row.reported_se_bpd[key]:.2e} | {cost:.2e} | {ratio:.1f}x |")
        if truth_bpd is not None:
            line += f" {row.mean_bpd[key] - truth_bpd:+.1e} |"
        print(line)


# ----------------------------------------------------------------------------------------------------
# Setups
# ----------------------------------------------------------------------------------------------------


def gaussian_mixture_setup(dim: int, num_images: int, seed: int = 0):
    g = _gen(seed)
    k = 8
    means = 1.2 * torch.randn(k, dim, dtype=torch.float64, generator=g)
    variances = 0.2 + 0.8 * torch.rand(k, dim, dtype=torch.float64, generator=g)
    mixture = GaussianMixture(means, variances, torch.arange(1, k + 1, dtype=torch.float64))
    reference = GaussianReference.from_data(mixture.sample(20_000, g))
    x = mixture.sample(num_images, g)
    return mixture, reference, x


def smoke_checkpoint() -> Path | None:
    """The newest IT fine-tuned tiny U-Net that ``make smoke`` left, if any."""
    found = sorted(Path("checkpoints/finetune").glob("smoke-*-tune/model.pt"),
                   key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def smoke_unet_setup(checkpoint: Path, num_images: int):
    """The smoke pipeline's model (iddpm_tiny, 20 steps) at ``checkpoint``, its Gaussian reference (the
    stats stage's, from 3,500 training crops) and the first ``num_images`` test crops (a photo not trained
    on), through the pipeline's own config and loaders."""
    from hydra import compose, initialize_config_dir

    from itdiffusion.data import load_images, to_model_range
    from itdiffusion.members import load_members
    from itdiffusion.stages import register_configs
    from itdiffusion.stages.stats import load_or_compute_reference

    register_configs()
    with initialize_config_dir(config_dir=str(Path("src/itdiffusion/conf").resolve()), version_base=None):
        cfg = compose("config", overrides=["experiment=smoke", f"model.checkpoint={checkpoint}",
                                           "logger=none", f"data.num_images={num_images}"])
    reference = load_or_compute_reference(cfg)
    test = load_images(cfg.data, "test")
    x = to_model_range(torch.stack([test[i][0] for i in range(len(test))]))
    return load_members(cfg, torch.device("cpu"))[0].denoiser, reference, x


# ----------------------------------------------------------------------------------------------------


def bench_gaussian_mixture(dim: int, num_images: int, repeats: int, ref_points: int, our_points: list[int]):
    mixture, reference, x = gaussian_mixture_setup(dim, num_images)
    truth = nats_to_bpd(-mixture.log_prob(x), dim).mean().item()
    key = ("continuous",)
    rows = [_repeat(f"reference style, grid K={ref_points}, 3 passes",
                    lambda g: reference_style(mixture, x, reference, ref_points, g)
                    | {"evals": 3 * ref_points},
                    repeats, dim, key)]
    ranges = _ranges(mixture, x, reference)
    for k in our_points:
        for label, proposal in ranges.items():
            rows.append(_repeat(f"ours, stratified K={k}, {label}",
                                _ours(mixture, x, reference, k, clamp=False, proposal=proposal),
                                repeats, dim, key))
            rows.append(_repeat(f"ours, stratified + control variate K={k}, {label}",
                                _ours(mixture, x, reference, k, control_variate=True, proposal=proposal),
                                repeats, dim, key))
    print(f"\nGaussian mixture (8 components, d={dim}), exact denoiser, {num_images} images, "
          f"{repeats} repeats; exact mean NLL {truth:.5f} bits/dim. The reference style spends 3 "
          "evaluations per point (continuous, rounded, dequantized passes); ours 1 (continuous and "
          "discrete from one pass). "
          "'reference range' truncates the log-SNR range at 4 scales as the reference style does (ours adds "
          "the Gaussian decoder's closed-form tails), so its 'mean - exact' includes that truncation; "
          "'pilot range' is the evaluate stage's proposal (proposal_for), exact for an exact denoiser. The "
          "control-variate rows use the stage's clamp.")
    _table("Exact Gaussian-mixture denoiser", rows, "continuous", truth)
    return rows


def bench_tiny_unet(checkpoint: Path, num_images: int, repeats: int, ref_points: int, our_points: list[int]):
    denoiser, reference, x = smoke_unet_setup(checkpoint, num_images)
    dim = x[0].numel()
    print(f"\nTiny IDDPM U-Net after the smoke fine-tune ({checkpoint}; "
          f"{sum(p.numel() for p in denoiser.parameters()) / 1e6:.2f}M parameters), {num_images} test crops, "
          f"{repeats} repeats, delta = 2/255 on [-1, 1].")
    disc = dict(delta=PIXEL_BIN, xinterval=(-1.0, 1.0))
    keys = ("continuous", "discrete")
    rows = [_repeat(f"reference style, grid K={ref_points}, 3 passes",
                    lambda g: reference_style(denoiser, x, reference, ref_points, g, **disc),
                    repeats, dim, keys)]
    ranges = _ranges(denoiser, x, reference, delta=PIXEL_BIN, xinterval=(-1.0, 1.0))
    for k in our_points:
        for label, proposal in ranges.items():
            rows.append(_repeat(f"ours, stratified K={k}, {label}",
                                _ours(denoiser, x, reference, k, proposal=proposal, **disc),
                                repeats, dim, keys))
            rows.append(_repeat(f"ours, stratified + control variate K={k}, {label}",
                                _ours(denoiser, x, reference, k, control_variate=True, proposal=proposal,
                                      **disc), repeats, dim, keys))
    for key in keys:
        _table("Tiny IDDPM U-Net", rows, key)
    print("\nSeconds per repeat: " + ", ".join(f"{r.name}: {r.seconds:.1f}" for r in rows))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run of the script)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="tiny U-Net weights (default: the newest "
                             "checkpoints/finetune/smoke-*-tune/model.pt)")
    parser.add_argument("--skip-unet", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    checkpoint = None if args.skip_unet else (args.checkpoint or smoke_checkpoint())
    if not args.skip_unet and checkpoint is None:
        print("\nTiny U-Net part skipped: no smoke fine-tuned checkpoint (checkpoints/finetune/smoke-*-tune/"
              "model.pt). Run `make smoke` first (about 2 minutes), or pass --checkpoint.")
    if args.quick:
        bench_gaussian_mixture(dim=16, num_images=8, repeats=3, ref_points=20, our_points=[4])
        if checkpoint is not None:
            bench_tiny_unet(checkpoint, num_images=4, repeats=2, ref_points=4, our_points=[4])
        return
    bench_gaussian_mixture(dim=64, num_images=64, repeats=8, ref_points=1000, our_points=[16, 64])
    if checkpoint is not None:
        bench_tiny_unet(checkpoint, num_images=16, repeats=3, ref_points=32, our_points=[16, 64])


if __name__ == "__main__":
    main()
