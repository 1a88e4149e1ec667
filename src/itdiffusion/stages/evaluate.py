"""Stage ``evaluate``: bits/dim of one model, or of an ensemble, on the test set.

``python -m itdiffusion.stages.evaluate model=iddpm_cifar10_vlb estimator.npoints=1000 data.num_images=512``
``torchrun --nproc_per_node=8 -m itdiffusion.stages.evaluate run_id=base ...`` (images sharded over ranks)

Estimates per test image (nats inside, bits/dim in the outputs):

- IDDPM's variational bound with its discretized decoder (``vlb``) and with the Gaussian density of
  x_0 instead (``vlb_continuous``), :func:`itdiffusion.variational.vlb`;
- the IT bound from the MMSE curves of :func:`itdiffusion.information.it_nll`: continuous density,
  discrete (x_hat raw or rounded to the pixel lattice, tails included; ``it_discrete_notails`` is
  ITD's table convention without them) and dequantized (images plus uniform noise of one bin, the
  continuous estimate plus d ln(1/delta): a discrete NLL).

Every image draws its log-SNR points, noise and dequantization noise from its own seeds
(``estimator.seed``, image index), so the curves do not depend on batching or on how many
processes share the work. The decoder choices inside the estimators (clamp to the Gaussian
decoder, rounding, ensemble member) are cross-fitted over the other images, so rank 0 recomputes
every estimate from the gathered curves (``*_nll_from_curve``): one process and many give the same
per-image numbers. Rank 0 writes ``per_image.npz`` and ``metrics.json`` (means and standard errors
over images) into the run dir and records the row in ``<paths.results_dir>/results.json``.

Masked-diffusion models (``model.kind=masked_pixels``, ``model.checkpoint=<finetune run>/model.pt``):
I-MDCE estimates of the discrete -log P(x) with ``estimator.num_masks`` masks per image, each image's
masks from its own seed: ``mdce_bpd`` (time integral) and ``mdce_timefree_bpd`` (time free), and two
examples, ``mdce_bottom_given_top_bpd`` (bits/dim of the bottom half of the image given the top half)
and ``mdce_corrupted_log_ratio_nats`` (log p(y) - log p(x) with y the image with a random
``estimator.corrupt_fraction`` of sub-pixels replaced by uniform values; coupled masks). The
Gaussian reference and the ``estimator.it`` / ``vlb`` switches do not apply.

Ensemble (``ensemble=[ckpt_a, ckpt_b, ...]``, checkpoints of ``model``): every member sees the same
log-SNR points and noise, and per log-SNR bin the estimate uses the member (or the Gaussian decoder)
with the lowest cross-fitted error: ITD's pointwise minimum of the MMSE curves, without its bias.
Since each image's points and noise come from its own seeds, the members' own evaluate runs already
hold those curves: ``ensemble_curves=[run_a, run_b, ...]`` (their run dirs or ``per_image.npz``, in
``ensemble`` order, ``estimator.vlb=false``) builds the ensemble from them with no network evaluation
(:func:`curves_from_member_runs`; ``metrics.json`` gets ``curves_from`` and ``network_evals`` 0). Runs
of other checkpoints, estimator settings, test images or log-SNR points are refused.
"""

from __future__ import annotations

import json
import logging
import math
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from itdiffusion import distributed
from itdiffusion.data import load_images, to_model_range
from itdiffusion.discrete import (
    bottom_given_top_nll,
    build_masked_pixel_model,
    corrupted_log_ratio,
    masked_pixel_metrics,
)
from itdiffusion.errors import CheckpointError, UserError
from itdiffusion.information import (
    GaussianReference,
    LogSNRProposal,
    continuous_nll_from_curve,
    discrete_nll_from_curve,
    image_draws,
    it_nll,
    left_tail,
    right_tail_bound,
)
from itdiffusion.io import atomic_savez, atomic_write_json
from itdiffusion.models.iddpm import (
    IDDPMDenoiser,
    build_model_and_diffusion,
    load_checkpoint,
    resolve_checkpoint,
)
from itdiffusion.results import ResultsStoreError, record_run
from itdiffusion.seeding import Stream, stream_seed
from itdiffusion.stages import CONFIG_DIR, config_dict, git_commit, launch, rank_zero_first, setup_device
from itdiffusion.stages.precision import select_fast_path
from itdiffusion.stages.stats import load_or_compute_reference
from itdiffusion.tracking import Tracker
from itdiffusion.units import PIXEL_BIN, mean_and_stderr, nats_to_bpd
from itdiffusion.variational import vlb

log = logging.getLogger(__name__)

XINTERVAL = (-1.0, 1.0)  # pixels scaled to [-1, 1]: the lattice is -1 + PIXEL_BIN * k
STREAM_POINTS, STREAM_DEQUANT, STREAM_VLB = Stream.POINTS, Stream.DEQUANT, Stream.VLB
STREAM_MASKS, STREAM_CONDITIONAL, STREAM_CORRUPT = Stream.MASKS, Stream.CONDITIONAL, Stream.CORRUPT
METRIC_KEYS = (
    "vlb_bpd",
    "vlb_continuous_bpd",
    "it_continuous_bpd",
    "it_discrete_bpd",
    "it_discrete_notails_bpd",
    "it_dequantized_bpd",
)


@dataclass
class Member:
    """One model under evaluation: the network, its diffusion, and where its weights came from."""

    model: torch.nn.Module
    diffusion: object
    denoiser: IDDPMDenoiser
    checkpoint: str
    sha256: str


def image_seed(seed: int, index: int, stream: int = STREAM_POINTS) -> int:
    """The seed of test image ``index`` for one random ``stream`` (:mod:`itdiffusion.seeding`)."""
    return stream_seed(seed, index, stream)


def dequantize(x: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
    """``x + delta (U - 1/2)`` with U ~ Uniform[0, 1)^d from each image's seed: uniform in the pixel bin."""
    u = torch.stack(
        [
            torch.rand(x.shape[1:], dtype=torch.float64, generator=torch.Generator().manual_seed(s))
            for s in seeds
        ]
    )
    return x.to(torch.float64) + PIXEL_BIN * (u.to(x.device) - 0.5)


def load_members(cfg: DictConfig, device: torch.device) -> list[Member]:
    """The model of ``cfg.model`` with its checkpoint, or one per ``cfg.ensemble`` checkpoint."""
    if len(cfg.ensemble) == 1:
        raise UserError(
            "ensemble= needs at least two checkpoints (leave it empty to evaluate model.checkpoint)"
        )
    try:
        with rank_zero_first():  # rank 0 downloads a missing official checkpoint, the others wait
            paths = [Path(p) for p in cfg.ensemble] or [
                resolve_checkpoint(cfg.model, cfg.paths.checkpoint_dir)
            ]
        members = []
        for path in paths:
            if not path.is_file():
                raise FileNotFoundError(f"checkpoint not found: {path.resolve()}")
            model, diffusion = build_model_and_diffusion(cfg.model)
            sha256 = load_checkpoint(model, path)
            model.to(device).eval()
            members.append(Member(model, diffusion, IDDPMDenoiser(model, cfg.model), str(path), sha256))
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        raise UserError(str(e)) from e
    return members


@torch.no_grad()
def evaluate_curves(
    members: Sequence[Member],
    images: torch.Tensor,
    indices: Sequence[int],
    reference: GaussianReference,
    proposal: LogSNRProposal,
    est_cfg,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Per-image MMSE curves and VLBs of ``images`` (uint8 ``[B, 3, H, W]`` with test indices ``indices``).

    Float64 CPU tensors, one row per image: ``index``; ``logsnr``, ``log_q`` ``[B, K]`` (shared by
    all members); the reference's decoder errors ``gaussian_mmse`` at x and ``gaussian_mmse_deq``
    at the dequantized x; per member j (prefix ``m{j}_``): eps-unit errors ``mmse`` (x_hat clamped
    to [-1, 1]), ``mmse_rounded`` (x_hat rounded to the lattice), ``mmse_deq`` (dequantized images),
    ``vlb_bpd`` and ``vlb_continuous_bpd``, and ``network_evals``.
    """
    x = to_model_range(images).to(device)
    point_seeds = [image_seed(est_cfg.seed, int(i), STREAM_POINTS) for i in indices]
    x_deq = dequantize(x, [image_seed(est_cfg.seed, int(i), STREAM_DEQUANT) for i in indices]).to(x.dtype)
    wide = (XINTERVAL[0] - PIXEL_BIN / 2, XINTERVAL[1] + PIXEL_BIN / 2)  # where dequantized pixels live
    out: dict[str, torch.Tensor] = {"index": torch.as_tensor(list(indices), dtype=torch.float64)}
    common = dict(
        npoints=est_cfg.npoints,
        logsnr_sampling=est_cfg.logsnr_sampling,
        proposal=proposal,
        image_seeds=point_seeds,
        batch_size=est_cfg.batch_size,
        control_variate=est_cfg.control_variate,
    )
    for j, member in enumerate(members):
        p = f"m{j}_"
        evals = torch.zeros(len(indices), dtype=torch.float64)
        if est_cfg.it:
            est = it_nll(
                member.denoiser,
                x,
                reference,
                delta=PIXEL_BIN,
                xinterval=XINTERVAL,
                rounding=est_cfg.rounding,
                **common,
            )
            deq = it_nll(member.denoiser, x_deq, reference, xinterval=wide, **common)  # same points and noise
            if "logsnr" not in out:
                out.update(
                    logsnr=_cpu(est.logsnr),
                    log_q=_cpu(est.log_q),
                    gaussian_mmse=_cpu(est.gaussian_mmse),
                    gaussian_mmse_deq=_cpu(deq.gaussian_mmse),
                )
                if est_cfg.control_variate:  # the reference decoder's errors on the shared noise
                    out.update(gaussian_errors=_cpu(est.gaussian_errors),
                               gaussian_errors_deq=_cpu(deq.gaussian_errors))
            for other in (est.logsnr, deq.logsnr):
                if not torch.equal(_cpu(other), out["logsnr"]):
                    raise RuntimeError("members / passes were evaluated at different log-SNR points")
            out[f"{p}mmse"], out[f"{p}mmse_deq"] = _cpu(est.mmse), _cpu(deq.mmse)
            if est.mmse_rounded is not None:
                out[f"{p}mmse_rounded"] = _cpu(est.mmse_rounded)
            evals += est.network_evals + deq.network_evals
        if est_cfg.vlb:  # one pass per image serves both decoders (discrete, continuous-density)
            rows = []
            for b, i in enumerate(indices):  # one image at a time: its noise comes from its own seed
                gen = torch.Generator(device=device).manual_seed(image_seed(est_cfg.seed, int(i), STREAM_VLB))
                res = vlb(
                    member.model,
                    member.diffusion,
                    x[b : b + 1],
                    steps_per_batch=est_cfg.vlb_steps_per_batch,
                    generator=gen,
                )
                rows.append((_cpu(res.total(False)), _cpu(res.total(True))))
                evals[b] += res.terms_bpd.shape[1]
            out[f"{p}vlb_bpd"] = torch.cat([r[0] for r in rows])
            out[f"{p}vlb_continuous_bpd"] = torch.cat([r[1] for r in rows])
        out[f"{p}network_evals"] = evals
    return out


CURVE_SETTINGS = ("seed", "npoints", "logsnr_sampling", "clip", "rounding")  # estimator keys behind a curve
REEVALUATE = "or drop ensemble_curves to evaluate the ensemble's networks here"


def curves_from_member_runs(
    runs: Sequence[str],
    members: Sequence[Member],
    test,
    reference: GaussianReference,
    proposal: LogSNRProposal,
    est_cfg,
    check_images: int = 4,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The ensemble's curves (as :func:`evaluate_curves` returns them) from its members' evaluate runs.

    ``runs[j]``: member j's run dir or its ``per_image.npz`` (with ``metrics.json`` beside it). Its
    ``m0_*`` curves become ``m{j}_*``; ``index``, ``logsnr``, ``log_q`` and ``gaussian_*`` come from the
    first run; ``m{j}_network_evals`` are 0. The runs must hold exactly the curves this run would
    evaluate: member j's checkpoint sha256, the estimator settings of ``CURVE_SETTINGS``, the test
    indices of ``test``, the same log-SNR points in every run, and on ``check_images`` images spread over
    the set the points of ``image_seed`` + ``proposal`` and the reference's errors ``gaussian_mmse`` at
    those images recomputed here (a different seed, proposal, reference or dataset fails). Anything
    else is a :class:`UserError`. Returns the curves (float64, CPU) and the ``per_image.npz`` paths.
    """
    if len(runs) != len(members):
        raise UserError(f"ensemble_curves has {len(runs)} runs for {len(members)} ensemble checkpoints: "
                        "give one evaluate run per checkpoint, in the order of ensemble=")
    shared = ["index", "logsnr", "log_q", "gaussian_mmse", "gaussian_mmse_deq"]
    shared += ["gaussian_errors", "gaussian_errors_deq"] if est_cfg.control_variate else []
    own = ["mmse", "mmse_deq"] + (["mmse_rounded"] if est_cfg.rounding != "none" else [])
    indices = np.arange(len(test))
    rows = np.unique(np.linspace(0, len(test) - 1, min(check_images, len(test))).round().astype(int))
    x = to_model_range(torch.stack([test[int(i)][0] for i in rows])).to(reference.mean.device, torch.float64)
    points = torch.stack([
        image_draws(image_seed(est_cfg.seed, int(i), STREAM_POINTS), proposal, est_cfg.npoints,
                    est_cfg.logsnr_sampling, test[int(i)][0].shape)[0]
        for i in rows
    ])
    expected = {"logsnr": points, "gaussian_mmse": _cpu(reference.pointwise_mmse(x, points))}
    out: dict[str, torch.Tensor] = {}
    sources = []
    for j, (run, member) in enumerate(zip(runs, members, strict=True)):
        npz = _read_member_run(run, member, est_cfg)
        sources.append(str(npz))

        def refuse(what: str, npz=npz) -> UserError:
            return UserError(f"ensemble_curves: {npz} cannot be the ensemble's curves: {what}. Evaluate the "
                             f"member with this run's settings, {REEVALUATE}")

        wanted = shared + [f"m0_{k}" for k in own]
        try:
            with np.load(npz) as f:
                stored = {k: f[k] for k in wanted if k in f.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise refuse(f"it cannot be read ({e})") from e
        missing = [k for k in wanted if k not in stored]
        if missing:
            raise refuse(f"it has no {', '.join(missing)} (this run needs estimator.it=true, "
                         f"control_variate={est_cfg.control_variate}, rounding={est_cfg.rounding})")
        if not np.array_equal(stored["index"], indices):
            raise refuse(f"it holds test images {_span(stored['index'])}, this run evaluates "
                         f"{_span(indices)} (data.num_images={len(test)})")
        if j == 0:
            out.update({k: _cpu(stored[k]) for k in shared})
        elif not np.array_equal(stored["logsnr"], out["logsnr"].numpy().astype(np.float32)):
            raise refuse(f"its log-SNR points differ from those of {sources[0]}")
        out.update({f"m{j}_{k}": _cpu(stored[f"m0_{k}"]) for k in own})
        for key, values in expected.items():  # float32 storage of the float64 values
            if not np.allclose(stored[key][rows], values.numpy(), rtol=1e-5, atol=0):
                raise refuse(f"its {key} at test images {rows.tolist()} differ from this run's (another "
                             "Gaussian reference, log-SNR proposal or dataset?)")
        out[f"m{j}_network_evals"] = torch.zeros(len(indices), dtype=torch.float64)
    return out, sources


def _read_member_run(run: str, member: Member, est_cfg) -> Path:
    """The ``per_image.npz`` of one member's evaluate run, after checking (its ``metrics.json``) that it
    evaluated ``member``'s checkpoint with this run's ``CURVE_SETTINGS``."""
    path = Path(run)
    npz = path / "per_image.npz" if path.is_dir() or path.suffix != ".npz" else path
    metrics_path = npz.with_name("metrics.json")
    for needed in (npz, metrics_path):
        if not needed.is_file():
            raise UserError(f"ensemble_curves: {needed} not found: evaluate {member.checkpoint} first "
                            f"(stage evaluate model.checkpoint={member.checkpoint} with this run's data and "
                            f"estimator settings), {REEVALUATE}")
    try:
        metrics = json.loads(metrics_path.read_text())
        estimator = metrics["config"]["estimator"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"ensemble_curves: cannot read the settings of {metrics_path}: {e}") from e
    if metrics.get("checkpoint_sha256") != member.sha256:
        raise UserError(f"ensemble_curves: {npz} evaluated {metrics.get('checkpoint')} (sha256 "
                        f"{metrics.get('checkpoint_sha256')}), not the ensemble member {member.checkpoint} "
                        f"(sha256 {member.sha256}): give the members' runs in the order of ensemble=, "
                        f"{REEVALUATE}")
    recorded = {k: estimator.get(k) for k in CURVE_SETTINGS}
    differ = [f"estimator.{k}={recorded[k]} there, {getattr(est_cfg, k)} here" for k in CURVE_SETTINGS
              if recorded[k] != getattr(est_cfg, k)]
    if differ:
        raise UserError(f"ensemble_curves: {npz} was evaluated with other settings ({'; '.join(differ)}): "
                        f"evaluate the member with this run's settings, {REEVALUATE}")
    return npz


def _span(indices) -> str:
    indices = np.asarray(indices)
    return f"{indices.min()}..{indices.max()} ({indices.size} images)" if indices.size else "no images"


def estimates_from_curves(
    curves: dict[str, torch.Tensor],
    members: Sequence[int],
    x: torch.Tensor,
    x_deq: torch.Tensor,
    reference: GaussianReference,
    proposal: LogSNRProposal,
    est_cfg,
) -> dict[str, torch.Tensor]:
    """Per-image IT estimates (nats) of the model ``members`` (one index; several: their ensemble).

    ``continuous``: -ln p(x) from the raw curves; ``discrete``: -ln P(x) with candidates the rounded
    (the default) and raw curves, tails included, and ``discrete_notails`` without them (ITD's table);
    ``dequantized``: the continuous estimate at the dequantized images plus d ln(1/delta). Each
    with ``<name>_mc_stderr``, the Monte Carlo standard error of that image's estimate.
    """
    dev = reference.mean.device
    logsnr, log_q = curves["logsnr"].to(dev), curves["log_q"].to(dev)
    common = dict(proposal=proposal, sampling=est_cfg.logsnr_sampling)

    def control(name: str) -> torch.Tensor | None:
        return curves[name].to(dev) if name in curves else None

    def stack(names: Sequence[str]) -> torch.Tensor:
        return torch.stack([curves[f"m{j}_{n}"] for j in members for n in names if f"m{j}_{n}" in curves]).to(
            dev
        )

    out = {}
    cont = continuous_nll_from_curve(
        stack(["mmse"]),
        logsnr,
        log_q,
        reference,
        True,
        x=x,
        gaussian_mmse=curves["gaussian_mmse"].to(dev),
        gaussian_errors=control("gaussian_errors"),
        **common,
    )
    disc = discrete_nll_from_curve(
        stack(["mmse_rounded", "mmse"]),
        logsnr,
        log_q,
        reference,
        PIXEL_BIN,
        True,
        x=x,
        gaussian_mmse=curves["gaussian_mmse"].to(dev),
        gaussian_errors=control("gaussian_errors"),
        **common,
    )
    deq = continuous_nll_from_curve(
        stack(["mmse_deq"]),
        logsnr,
        log_q,
        reference,
        True,
        x=x_deq,
        gaussian_mmse=curves["gaussian_mmse_deq"].to(dev),
        gaussian_errors=control("gaussian_errors_deq"),
        **common,
    )
    a_lo, a_hi = proposal.bounds
    tails = left_tail(reference, x, a_lo) + right_tail_bound(reference.dim, PIXEL_BIN, a_hi)
    for name, nll, stderr in (
        ("continuous", cont.nll, cont.stderr),
        ("discrete", disc.nll, disc.stderr),
        ("discrete_notails", disc.nll - tails, disc.stderr),
        ("dequantized", deq.nll + reference.dim * math.log(1.0 / PIXEL_BIN), deq.stderr),
    ):
        out[name], out[f"{name}_mc_stderr"] = _cpu(nll), _cpu(stderr)
    return out


def summarize(per_image: dict[str, torch.Tensor], prefix: str, dim: int) -> dict:
    """Means over images with standard errors (bits/dim) of the per-image values under ``prefix``."""
    out: dict = {}
    for name in ("continuous", "discrete", "discrete_notails", "dequantized"):
        if f"{prefix}it_{name}_nats" in per_image:
            values = nats_to_bpd(per_image[f"{prefix}it_{name}_nats"], dim)
            out[f"it_{name}_bpd"], out[f"it_{name}_bpd_stderr"] = mean_and_stderr(values)
            mc = nats_to_bpd(per_image[f"{prefix}it_{name}_mc_stderr_nats"], dim)
            out[f"it_{name}_bpd_mc_stderr"] = float(mc.square().sum().sqrt() / mc.numel())  # MC noise alone
    for key in ("vlb_bpd", "vlb_continuous_bpd"):
        if f"{prefix}{key}" in per_image:
            out[key], out[f"{key}_stderr"] = mean_and_stderr(per_image[f"{prefix}{key}"])
    if f"{prefix}network_evals" in per_image:
        out["network_evals"] = int(per_image[f"{prefix}network_evals"].sum().item())
    return out


def run(cfg: DictConfig, run_dir: Path) -> dict | None:
    """Evaluate ``cfg.model`` (or the ``cfg.ensemble``) on the test set; rank 0 writes the outputs."""
    metrics_path = run_dir / "metrics.json"
    if cfg.skip_done and metrics_path.is_file():
        log.info("skip_done: %s exists, nothing to do", metrics_path)
        return None
    est_cfg = cfg.estimator
    if cfg.model.kind == "masked_pixels":
        return run_masked(cfg, run_dir)
    _check_settings(cfg)
    started = time.time()
    device = setup_device(cfg)
    reference = load_or_compute_reference(cfg, device)
    # the upper end reaches the log-SNR that resolves the pixel lattice (the discrete right tail vanishes)
    proposal = LogSNRProposal.from_reference(reference, clip=est_cfg.clip, delta=PIXEL_BIN)
    with rank_zero_first():
        test = load_images(cfg.data, "test")
    members = load_members(cfg, device)
    sources = None
    if cfg.ensemble_curves:  # the members' stored curves: rank 0 reads them, no network runs anywhere
        per_image, sources = _on_rank_zero(
            lambda: curves_from_member_runs(cfg.ensemble_curves, members, test, reference, proposal, est_cfg)
        ) or (None, None)  # the other ranks hold nothing
        precision_check = {"checked": False, "used": None, "reason": "ensemble_curves: no network evaluation"}
    else:
        members, precision_check = select_fast_path(  # fp32 eager unless a fast path keeps the numbers
            members, est_cfg, cfg.model, device,
            lambda ms: _check_estimates(cfg, ms, test, reference, proposal, device),
        )
        per_image = _evaluate_shard(cfg, members, test, reference, proposal, device)
    if not distributed.is_main():
        distributed.barrier()
        return None
    metrics = _finish(cfg, per_image, members, test, reference, proposal)
    if sources is not None:
        metrics["curves_from"] = sources
    metrics["precision_check"] = precision_check
    metrics["elapsed_s"] = round(time.time() - started, 2)
    _write_outputs(cfg, run_dir, per_image, metrics)
    log.info(
        "%s: %s",
        cfg.label,
        ", ".join(
            f"{k} {metrics[k]:.4f} ± {metrics[k + '_stderr']:.4f}"
            for k in METRIC_KEYS
            if metrics.get(k) is not None
        ),
    )
    distributed.barrier()
    return metrics


def _evaluate_shard(
    cfg: DictConfig,
    members: Sequence[Member],
    test,
    reference: GaussianReference,
    proposal: LogSNRProposal,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """This rank's share of the test images through :func:`evaluate_curves`, then every rank's rows."""
    est_cfg = cfg.estimator
    mine = distributed.shard_indices(len(test))
    chunk = max(1, est_cfg.batch_size // est_cfg.npoints) if est_cfg.it else max(1, est_cfg.batch_size)
    parts = []
    with tqdm(
        total=len(test),
        desc=f"evaluate {cfg.label}",
        unit="img",
        disable=not distributed.is_main(),
        dynamic_ncols=True,
    ) as bar:
        for start in range(mine.start, mine.stop, chunk):
            idx = list(range(start, min(start + chunk, mine.stop)))
            images = torch.stack([test[i][0] for i in idx])
            parts.append(evaluate_curves(members, images, idx, reference, proposal, est_cfg, device))
            bar.update(len(idx) * distributed.world_size())
    return _gather(parts)


def _on_rank_zero(fn):
    """``fn()`` on rank 0 (None elsewhere); a :class:`UserError` there is raised on every rank."""
    result, error = None, None
    if distributed.is_main():
        try:
            result = fn()
        except UserError as e:
            error = e
    message = distributed.broadcast_object(None if error is None else str(error))
    if error is not None:
        raise error
    if message is not None:
        raise UserError(message)
    return result


def _write_outputs(cfg: DictConfig, run_dir: Path, per_image: dict[str, torch.Tensor], metrics: dict) -> None:
    """Rank 0: ``per_image.npz``, ``metrics.json``, the results-store row and the tracker summary."""
    metrics_path = run_dir / "metrics.json"
    atomic_savez(run_dir / "per_image.npz", **{k: _compact(k, v) for k, v in per_image.items()})
    atomic_write_json(metrics_path, metrics)
    try:
        record_run(cfg.paths.results_dir, {**metrics, "metrics_path": str(metrics_path)})
    except ResultsStoreError as e:  # an unreadable results store: keep metrics.json, say how to recover
        log.error("could not add this run to the results table (%s); its metrics are in %s", e, metrics_path)
    _log_to_tracker(cfg, metrics)


def load_masked_model(cfg: DictConfig, device: torch.device) -> Member:
    """The masked-pixel model of ``cfg.model`` with the weights of ``model.checkpoint``."""
    if cfg.ensemble or cfg.ensemble_curves:
        raise UserError("ensemble= (and ensemble_curves=) combine Gaussian MMSE curves; they do not apply to "
                        "masked_pixels models")
    if not cfg.model.checkpoint:
        raise UserError(f"model={cfg.model.name} has no official weights: set model.checkpoint=<path to the "
                        "finetune run's model.pt>")
    path = Path(cfg.model.checkpoint)
    model = build_masked_pixel_model(cfg.model)
    try:
        sha256 = load_checkpoint(model, path)
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        raise UserError(str(e)) from e
    model.to(device).eval()
    return Member(model, None, None, str(path), sha256)


@torch.no_grad()
def evaluate_masked(model, images: torch.Tensor, indices: Sequence[int], est_cfg) -> dict[str, torch.Tensor]:
    """Per-image I-MDCE estimates (float64 CPU [B]) of uint8 ``images`` with test indices ``indices``.

    ``mdce{,_timefree}_{nats,bpd}`` (+ ``_stderr``, Monte Carlo over the masks), the conditional example
    ``mdce_bottom_given_top_{nats,bpd}`` (+ ``_stderr``), the coupled example
    ``mdce_corrupted_log_ratio_nats`` (+ ``_stderr``) and ``network_evals``. Every image's masks and
    corruption come from its own seeds.
    """
    def seeds(stream: int) -> list[int]:
        return [image_seed(est_cfg.seed, int(i), stream) for i in indices]

    common = dict(num_masks=est_cfg.num_masks, batch_size=est_cfg.batch_size)
    out = {"index": torch.as_tensor(list(indices), dtype=torch.float64)}
    out.update(masked_pixel_metrics(model, images, image_seeds=seeds(STREAM_MASKS), **common))
    evals = out.pop("mdce_network_evals") + out.pop("mdce_timefree_network_evals")
    cond, dim = bottom_given_top_nll(model, images, image_seeds=seeds(STREAM_CONDITIONAL), **common)
    bpd, bpd_stderr = cond.bpd(dim)
    out.update(mdce_bottom_given_top_nats=cond.nats, mdce_bottom_given_top_nats_stderr=cond.stderr,
               mdce_bottom_given_top_bpd=bpd, mdce_bottom_given_top_bpd_stderr=bpd_stderr)
    evals = evals + cond.network_evals.cpu()
    ratios = []
    for b, seed in enumerate(seeds(STREAM_CORRUPT)):  # one image at a time: corruption, masks from its seed
        _, est = corrupted_log_ratio(model, images[b : b + 1], fraction=est_cfg.corrupt_fraction,
                                     generator=torch.Generator().manual_seed(seed), **common)
        ratios.append(est)
    out["mdce_corrupted_log_ratio_nats"] = torch.cat([e.nats.cpu() for e in ratios])
    out["mdce_corrupted_log_ratio_nats_stderr"] = torch.cat([e.stderr.cpu() for e in ratios])
    out["network_evals"] = evals + torch.cat([e.network_evals.cpu() for e in ratios])
    return {k: _cpu(v) for k, v in out.items()}


MASKED_METRICS = (
    "mdce_bpd",
    "mdce_timefree_bpd",
    "mdce_bottom_given_top_bpd",
    "mdce_corrupted_log_ratio_nats",
)


def run_masked(cfg: DictConfig, run_dir: Path) -> dict | None:
    """The evaluate stage for ``model.kind=masked_pixels``: I-MDCE bits/dim and the two examples."""
    est_cfg = cfg.estimator
    started = time.time()
    device = setup_device(cfg)
    with rank_zero_first():
        test = load_images(cfg.data, "test")
    member = load_masked_model(cfg, device)
    mine = distributed.shard_indices(len(test))
    chunk = max(1, est_cfg.batch_size // est_cfg.num_masks)
    parts = []
    for start in tqdm(range(mine.start, mine.stop, chunk), desc=f"evaluate {cfg.label}", unit="batch",
                      disable=not distributed.is_main(), dynamic_ncols=True):
        idx = list(range(start, min(start + chunk, mine.stop)))
        parts.append(evaluate_masked(member.model, torch.stack([test[i][0] for i in idx]), idx, est_cfg))
    per_image = _gather(parts)
    if not distributed.is_main():
        distributed.barrier()
        return None
    metrics: dict = {"num_images": int(per_image["index"].numel()), "num_masks": est_cfg.num_masks,
                     "npoints": None, "dim": member.model.length}
    for key in MASKED_METRICS:
        metrics[key], metrics[f"{key}_stderr"] = mean_and_stderr(per_image[key])
    metrics["network_evals"] = int(per_image["network_evals"].sum().item())
    metrics.update(_provenance(cfg, [member]))
    metrics["elapsed_s"] = round(time.time() - started, 2)
    _write_outputs(cfg, run_dir, per_image, metrics)
    log.info("%s: %s", cfg.label, ", ".join(
        f"{k} {metrics[k]:.4f} ± {metrics[k + '_stderr']:.4f}" for k in MASKED_METRICS))
    distributed.barrier()
    return metrics


def _check_settings(cfg: DictConfig) -> None:
    est_cfg = cfg.estimator
    if not (est_cfg.it or est_cfg.vlb):
        raise UserError("nothing to evaluate: estimator.it and estimator.vlb are both false")
    if cfg.ensemble and not est_cfg.it:
        raise UserError("an ensemble combines MMSE curves: it needs estimator.it=true")
    if cfg.ensemble_curves and not cfg.ensemble:
        raise UserError("ensemble_curves reuses the curves of an ensemble's members: give their checkpoints "
                        "in ensemble= too (same order)")
    if cfg.ensemble_curves and est_cfg.vlb:
        raise UserError("ensemble_curves reuses the members' MMSE curves and runs no network, so it cannot "
                        f"give a VLB (the VLB is per model, in the members' runs): set estimator.vlb=false, "
                        f"{REEVALUATE}")


def _finish(
    cfg: DictConfig,
    per_image: dict[str, torch.Tensor],
    members: Sequence[Member],
    test,
    reference: GaussianReference,
    proposal: LogSNRProposal,
) -> dict:
    """Rank 0: estimates from the gathered curves, then the metrics (single model or ensemble)."""
    est_cfg, dim = cfg.estimator, reference.dim
    groups = [[j] for j in range(len(members))] + ([list(range(len(members)))] if len(members) > 1 else [])
    if est_cfg.it:
        index = per_image["index"].long().tolist()
        x = to_model_range(torch.stack([test[i][0] for i in index]))  # float32, as the network saw them
        x_deq = dequantize(x, [image_seed(est_cfg.seed, i, STREAM_DEQUANT) for i in index]).to(x.dtype)
        x, x_deq = (t.to(reference.mean.device, torch.float64) for t in (x, x_deq))
        for group in groups:
            prefix = "ensemble_" if len(group) > 1 else f"m{group[0]}_"
            estimates = estimates_from_curves(per_image, group, x, x_deq, reference, proposal, est_cfg)
            per_image.update({f"{prefix}it_{name}_nats": values for name, values in estimates.items()})
        per_image["mmse_gaussian"] = _cpu(reference.mmse(per_image["logsnr"].to(reference.mean.device)))
    metrics: dict = {
        "num_images": int(per_image["index"].numel()),
        "npoints": est_cfg.npoints if est_cfg.it else None,
        "dim": dim,
        "gaussian_entropy_bpd": float(nats_to_bpd(float(reference.entropy), dim)),
        "logsnr_range": list(proposal.bounds),
    }
    if len(members) == 1:
        metrics.update(summarize(per_image, "m0_", dim))
    else:
        metrics["members"] = [
            {"checkpoint": m.checkpoint, "checkpoint_sha256": m.sha256, **summarize(per_image, f"m{j}_", dim)}
            for j, m in enumerate(members)
        ]
        metrics.update(summarize(per_image, "ensemble_", dim))
        metrics["network_evals"] = sum(m["network_evals"] for m in metrics["members"])
    metrics.update(_provenance(cfg, members))
    return metrics


def _check_estimates(
    cfg: DictConfig,
    members: Sequence[Member],
    test,
    reference: GaussianReference,
    proposal: LogSNRProposal,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Per-image bits/dim of every reported estimate on the first ``estimator.precision_check_images``
    test images, from the same seeds at every call (the paired check of :mod:`itdiffusion.stages.precision`).

    Keys as in metrics.json (``it_continuous_bpd``, ``vlb_bpd``, ...); ensembles: per member ``m{j}_...``
    and ``ensemble_...``.
    """
    idx = list(range(min(cfg.estimator.precision_check_images, len(test))))
    images = torch.stack([test[i][0] for i in idx])
    per_image = evaluate_curves(members, images, idx, reference, proposal, cfg.estimator, device)
    _finish(cfg, per_image, members, test, reference, proposal)
    out = {}
    for key, values in per_image.items():
        name = key.removeprefix("m0_") if len(members) == 1 else key
        if key.endswith("_nats") and "_mc_stderr" not in key:
            out[name.removesuffix("_nats") + "_bpd"] = nats_to_bpd(values, reference.dim)
        elif key.endswith(("vlb_bpd", "vlb_continuous_bpd")):
            out[name] = values
    return out


def _provenance(cfg: DictConfig, members: Sequence[Member]) -> dict:
    return {
        "run_id": cfg.run_id,
        "stage": "evaluate",
        "label": cfg.label,
        "paper_row": cfg.paper_row,
        "experiment": cfg.experiment,
        "group": cfg.logger.group,
        "model": cfg.model.name,
        "training_objective": cfg.model.training_objective,
        "checkpoint": members[0].checkpoint if len(members) == 1 else [m.checkpoint for m in members],
        "checkpoint_sha256": members[0].sha256 if len(members) == 1 else [m.sha256 for m in members],
        "git_commit": git_commit(),
        "world_size": distributed.world_size(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config_dict(cfg),
    }


def _log_to_tracker(cfg: DictConfig, metrics: dict) -> None:
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    with Tracker(
        cfg.logger, metrics["config"], job_type="evaluate", name=f"evaluate-{cfg.run_id}"
    ) as tracker:
        tracker.log({f"eval/{k}": v for k, v in scalars.items()})
        tracker.summary(scalars)


def _gather(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """This rank's rows, then (under torchrun) every rank's rows in rank order, which is image order."""
    local = [{k: torch.cat([p[k] for p in parts]) for k in parts[0]}] if parts else []
    if not distributed.is_distributed():
        return local[0]
    everyone: list[list[dict]] = [None] * distributed.world_size()  # type: ignore[list-item]
    torch.distributed.all_gather_object(everyone, local)  # ranks without images send an empty list
    rows = [d for per_rank in everyone for d in per_rank]
    return {k: torch.cat([d[k] for d in rows]) for k in rows[0]}


def _cpu(t) -> torch.Tensor:
    return torch.as_tensor(t).detach().to("cpu", torch.float64)


def _compact(key: str, value: torch.Tensor) -> np.ndarray:
    """Curves are stored as float32 (they are large), per-image estimates as float64."""
    array = value.numpy()
    if array.ndim == 2:
        return array.astype(np.float32)
    if key == "index":
        return array.astype(np.int64)
    return array


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    launch(run, cfg)


if __name__ == "__main__":
    main()
