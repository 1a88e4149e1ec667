"""Stage ``evaluate``: bits/dim of one model, or of an ensemble, on the test set.

``python -m itdiffusion.stages.evaluate model=iddpm_cifar10_vlb estimator.npoints=1000 data.num_images=512``
``torchrun --nproc_per_node=8 -m itdiffusion.stages.evaluate run_id=base ...`` (images sharded over ranks)

Estimates per test image (all in nats inside, bits/dim in the outputs):

- IDDPM's variational bound with its discretized decoder (``vlb``) and with the continuous Gaussian
  density of x_0 instead (``vlb_continuous``), from :func:`itdiffusion.variational.vlb`;
- the IT bound (:func:`itdiffusion.information.it_nll`): continuous density, discrete (x_hat
  rounded to the pixel lattice) and dequantized (uniform noise of one bin, already a discrete NLL).

Every image draws its log-SNR points and noise from its own seed (``estimator.seed``, image index),
so the numbers do not depend on batching or on how many processes share the work. Rank 0 writes
``per_image.npz`` and ``metrics.json`` (means with standard errors over images) into the run dir
and records the row in ``<paths.results_dir>/results.json``.

Ensemble (``ensemble=[ckpt_a, ckpt_b, ...]``, checkpoints of ``model``): every member sees the
same log-SNR points and noise; in each stratum k of the log-SNR proposal the ensemble uses the
member (or the Gaussian reference) with the lowest mean MMSE over the test images, as ITD does with
its pointwise minimum of MMSE curves, and the NLL follows from that curve.
"""

from __future__ import annotations

import logging
import time
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
from itdiffusion.errors import UserError
from itdiffusion.information import GaussianReference, continuous_nll_from_curve, it_nll
from itdiffusion.io import atomic_savez, atomic_write_json
from itdiffusion.models.iddpm import (
    IDDPMDenoiser,
    build_model_and_diffusion,
    load_checkpoint,
    resolve_checkpoint,
)
from itdiffusion.results import record_run
from itdiffusion.stages import CONFIG_DIR, config_dict, git_commit, launch, rank_zero_first, setup_device
from itdiffusion.stages.stats import load_or_compute_reference
from itdiffusion.tracking import Tracker
from itdiffusion.units import PIXEL_BIN, mean_and_stderr, nats_to_bpd
from itdiffusion.variational import vlb

log = logging.getLogger(__name__)

IT_ESTIMATES = ("continuous", "discrete", "dequantized")
XINTERVAL = (-1.0, 1.0)


@dataclass
class Member:
    """One model under evaluation: the network, its diffusion, and where its weights came from."""

    model: torch.nn.Module
    diffusion: object
    denoiser: IDDPMDenoiser
    checkpoint: str
    sha256: str


def image_seed(seed: int, index: int) -> int:
    """The seed of test image ``index``: a 63-bit hash of (estimator seed, index)."""
    hi, lo = np.random.SeedSequence([seed, index]).generate_state(2)
    return ((int(hi) << 32) | int(lo)) & (2**63 - 1)


def load_members(cfg: DictConfig, device: torch.device) -> list[Member]:
    """The model of ``cfg.model`` with its checkpoint, or one per ``cfg.ensemble`` checkpoint."""
    if len(cfg.ensemble) == 1:
        raise UserError(
            "ensemble= needs at least two checkpoints (or leave it empty to evaluate model.checkpoint)"
        )
    with rank_zero_first():  # rank 0 downloads a missing official checkpoint, the others wait
        paths = [Path(p) for p in cfg.ensemble] or [resolve_checkpoint(cfg.model, cfg.paths.checkpoint_dir)]
    members = []
    for path in paths:
        if not path.is_file():
            raise UserError(f"checkpoint not found: {path.resolve()}")
        model, diffusion = build_model_and_diffusion(cfg.model)
        sha256 = load_checkpoint(model, path)
        model.to(device).eval()
        members.append(Member(model, diffusion, IDDPMDenoiser(model, cfg.model), str(path), sha256))
    return members


@torch.no_grad()
def evaluate_images(
    members: Sequence[Member],
    images: torch.Tensor,
    indices: Sequence[int],
    reference: GaussianReference,
    est_cfg,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Per-image estimates for ``images`` (uint8 ``[B, 3, H, W]``, global test indices ``indices``).

    Returns float64 tensors on the CPU, one row per image: ``index``; per member j (prefix
    ``m{j}_``) ``it_<estimate>_nats`` and ``it_<estimate>_mc_stderr_nats`` (Monte Carlo standard
    error of that image's estimate), ``vlb_bpd``, ``vlb_continuous_bpd``, ``network_evals``, and
    the MMSE curve ``mmse`` [B, K] (eps units) at ``logsnr`` [B, K] with log proposal density
    ``log_q`` and the reference's ``mmse_gaussian``; members share ``logsnr`` and the noise.
    """
    x = to_model_range(images).to(device)
    seeds = [image_seed(est_cfg.seed, int(i)) for i in indices]
    out: dict[str, torch.Tensor] = {"index": torch.as_tensor(list(indices), dtype=torch.float64)}
    for j, member in enumerate(members):
        p = f"m{j}_"
        evals = torch.zeros(len(seeds), dtype=torch.float64)
        if est_cfg.it:
            est = it_nll(
                member.denoiser,
                x,
                reference,
                npoints=est_cfg.npoints,
                delta=PIXEL_BIN,
                xinterval=XINTERVAL,
                rounding=est_cfg.rounding,
                dequantize=True,
                logsnr_sampling=est_cfg.logsnr_sampling,
                image_seeds=seeds,
                batch_size=est_cfg.batch_size,
            )
            for name in IT_ESTIMATES:
                out[f"{p}it_{name}_nats"] = _cpu(getattr(est, name))
                out[f"{p}it_{name}_mc_stderr_nats"] = _cpu(getattr(est, f"{name}_stderr"))
            out[f"{p}mmse"] = _cpu(est.mmse)
            if j == 0:
                out["logsnr"], out["log_q"] = _cpu(est.logsnr), _cpu(est.log_q)
                out["mmse_gaussian"] = _cpu(reference.mmse(est.logsnr.to(device)))
            elif not torch.equal(_cpu(est.logsnr), out["logsnr"]):
                raise RuntimeError("ensemble members were evaluated at different log-SNR points")
            evals += _cpu(torch.as_tensor(est.network_evals))
        if est_cfg.vlb:
            for key, continuous in (("vlb_bpd", False), ("vlb_continuous_bpd", True)):
                rows = []
                for b, seed in enumerate(seeds):  # one image at a time: its noise comes from its own seed
                    gen = torch.Generator(device=device).manual_seed(seed)
                    res = vlb(
                        member.model,
                        member.diffusion,
                        x[b : b + 1],
                        continuous_density=continuous,
                        steps_per_batch=est_cfg.vlb_steps_per_batch,
                        generator=gen,
                    )
                    rows.append(_cpu(res.total_bpd))
                    evals[b] += res.terms_bpd.shape[1]
                out[f"{p}{key}"] = torch.cat(rows)
        out[f"{p}network_evals"] = evals
    return out


def ensemble_mmse(
    member_mmse: Sequence[torch.Tensor], logsnr: torch.Tensor, mmse_gaussian: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image MMSE curve of the ensemble: in each log-SNR stratum, the curve with the lowest mean.

    ``member_mmse``: [N, K] per member at the shared points ``logsnr`` [N, K]. Within each image the
    points are ordered by log-SNR; point k of every image lies in stratum k of the proposal (with
    stratified sampling), so the ensemble picks, per k, the member or the Gaussian reference whose
    MMSE averaged over the N images is smallest. Returns the per-image curve [N, K] (in the
    original point order) and the choice per stratum [K] (index M means the Gaussian reference).
    """
    order = logsnr.argsort(dim=1)
    curves = torch.stack([m.gather(1, order) for m in (*member_mmse, mmse_gaussian)])  # [M+1, N, K]
    choice = curves.mean(dim=1).argmin(dim=0)  # [K]
    picked = curves.gather(0, choice.view(1, 1, -1).expand(1, *curves.shape[1:]))[0]
    return picked.scatter(1, order, picked.clone()), choice


def summarize(
    per_image: dict[str, torch.Tensor], n_members: int, reference: GaussianReference, est_cfg
) -> dict:
    """Means and standard errors over images, in bits/dim, for the metrics.json keys."""
    dim = reference.dim
    metrics: dict = {
        "num_images": int(per_image["index"].numel()),
        "npoints": est_cfg.npoints if est_cfg.it else None,
        "dim": dim,
    }
    members = []
    for j in range(n_members):
        p, m = f"m{j}_", {}
        for name in IT_ESTIMATES:
            if f"{p}it_{name}_nats" in per_image:
                _put(m, f"it_{name}_bpd", nats_to_bpd(per_image[f"{p}it_{name}_nats"], dim))
        for key in ("vlb_bpd", "vlb_continuous_bpd"):
            if f"{p}{key}" in per_image:
                _put(m, key, per_image[f"{p}{key}"])
        m["network_evals"] = int(per_image[f"{p}network_evals"].sum().item())
        members.append(m)
    if n_members == 1:
        metrics.update(members[0])
        return metrics
    metrics["members"] = members
    metrics["network_evals"] = sum(m["network_evals"] for m in members)
    if "ensemble_it_continuous_nats" in per_image:
        _put(metrics, "it_continuous_bpd", nats_to_bpd(per_image["ensemble_it_continuous_nats"], dim))
    return metrics


def run(cfg: DictConfig, run_dir: Path) -> dict | None:
    """Evaluate ``cfg.model`` (or the ``cfg.ensemble``) on the test set; rank 0 writes the outputs."""
    metrics_path = run_dir / "metrics.json"
    if cfg.skip_done and metrics_path.is_file():
        log.info("skip_done: %s exists, nothing to do", metrics_path)
        return None
    est_cfg = cfg.estimator
    if est_cfg.it and est_cfg.npoints < 2:
        raise UserError(f"estimator.npoints must be >= 2 (got {est_cfg.npoints})")
    if not (est_cfg.it or est_cfg.vlb):
        raise UserError("nothing to evaluate: estimator.it and estimator.vlb are both false")
    if cfg.ensemble and not est_cfg.it:
        raise UserError("an ensemble combines MMSE curves: it needs estimator.it=true")
    if cfg.ensemble and est_cfg.logsnr_sampling != "stratified":
        raise UserError(
            "an ensemble needs estimator.logsnr_sampling=stratified (strata align the members' curves)"
        )
    started = time.time()
    device = setup_device(cfg)
    reference = load_or_compute_reference(cfg, device)
    with rank_zero_first():
        test = load_images(cfg.data, "test")
    members = load_members(cfg, device)
    mine = distributed.shard_indices(len(test))
    chunk = max(1, est_cfg.batch_size // max(1, est_cfg.npoints if est_cfg.it else 1))
    parts = []
    bar = tqdm(
        total=len(test),
        desc=f"evaluate {cfg.label}",
        unit="img",
        disable=not distributed.is_main(),
        dynamic_ncols=True,
    )
    for start in range(mine.start, mine.stop, chunk):
        idx = list(range(start, min(start + chunk, mine.stop)))
        images = torch.stack([test[i][0] for i in idx])
        parts.append(evaluate_images(members, images, idx, reference, est_cfg, device))
        bar.update(len(idx) * distributed.world_size())
    bar.close()
    per_image = _gather(parts)
    if not distributed.is_main():
        distributed.barrier()
        return None
    if len(members) > 1:
        mmse, choice = ensemble_mmse(
            [per_image[f"m{j}_mmse"] for j in range(len(members))],
            per_image["logsnr"],
            per_image["mmse_gaussian"],
        )
        per_image["ensemble_mmse"], per_image["ensemble_choice"] = mmse, choice.double()
        per_image["ensemble_it_continuous_nats"] = _cpu(
            continuous_nll_from_curve(
                mmse.to(device), per_image["logsnr"].to(device), per_image["log_q"].to(device), reference
            )
        )
    metrics = summarize(per_image, len(members), reference, est_cfg)
    metrics.update(_provenance(cfg, members))
    metrics["elapsed_s"] = round(time.time() - started, 2)
    atomic_savez(run_dir / "per_image.npz", **{k: _compact(k, v) for k, v in per_image.items()})
    atomic_write_json(metrics_path, metrics)
    record_run(cfg.paths.results_dir, metrics)
    _log_to_tracker(cfg, metrics)
    log.info(
        "%s: %s",
        cfg.label,
        ", ".join(
            f"{k} {metrics[k]:.4f} ± {metrics[k + '_stderr']:.4f}"
            for k in _METRIC_KEYS
            if metrics.get(k) is not None
        ),
    )
    distributed.barrier()
    return metrics


_METRIC_KEYS = ("vlb_bpd", "vlb_continuous_bpd", "it_continuous_bpd", "it_discrete_bpd", "it_dequantized_bpd")


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
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}
    with Tracker(
        cfg.logger, metrics["config"], job_type="evaluate", name=f"evaluate-{cfg.run_id}"
    ) as tracker:
        tracker.log({f"eval/{k}": v for k, v in scalars.items()})
        tracker.summary(scalars)


def _put(target: dict, key: str, per_image_values: torch.Tensor) -> None:
    mean, stderr = mean_and_stderr(per_image_values)
    target[key], target[f"{key}_stderr"] = mean, stderr


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
