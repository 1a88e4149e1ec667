"""The frame every evaluation stage shares: load, shard, run, gather, write.

:func:`skip_done` (a complete run dir is kept), :func:`evaluate_sharded` (the test images split over
torchrun ranks, a per-chunk function under a progress bar, every rank's rows gathered on rank 0 in image
order), :func:`provenance` (who, what, which code) and :func:`finish` (check the numbers, commit the run dir
as a unit, record the results row, log to the tracker). Only rank 0 writes files and logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from itdiffusion import artifacts, distributed, stage_tracking
from itdiffusion.artifacts import PerImage
from itdiffusion.errors import Preempted, UserError
from itdiffusion.preemption import StopRequest, stop_requested
from itdiffusion.results import ResultsStoreError, record_run
from itdiffusion.stages import config_dict, git_commit
from itdiffusion.stages.partial import Partial, discard
from itdiffusion.sweeps import job_group
from itdiffusion.tracking import Tracker
from itdiffusion.units import ABSURD_BPD

log = logging.getLogger(__name__)



def skip_done(cfg: DictConfig, run_dir: Path) -> bool:
    """With ``skip_done=true``: True if ``run_dir`` holds a complete evaluation (its results row is
    recorded again, so the store and ``metrics.json`` agree); an incomplete one is evaluated again."""
    if not cfg.skip_done:
        return False
    if artifacts.is_complete(run_dir):
        metrics_path = run_dir / artifacts.METRICS
        metrics = artifacts.read_metrics(metrics_path)
        changed = settings_differences(metrics.get("config", {}), config_dict(cfg))
        if changed:
            raise UserError(f"skip_done: {run_dir} holds a complete evaluation with other settings "
                            f"({'; '.join(changed)}): use another run_id, or delete that run dir to redo it")
        log.info("skip_done: %s is complete, nothing to do", run_dir)
        if distributed.is_main():
            _record(cfg, metrics, metrics_path)
        return True
    if (run_dir / artifacts.METRICS).exists() or (run_dir / artifacts.PER_IMAGE).exists():
        log.warning("skip_done: %s holds an incomplete evaluation; evaluating again", run_dir)
    return False


# Settings that change how fast a run goes, never its numbers; and those a dataset budget fills in.
SPEED_ONLY = {"estimator.batch_size", "estimator.vlb_steps_per_batch"}
BUDGET_CHOSEN = {"estimator.npoints", "estimator.vlb_steps"}


def settings_differences(stored: dict, current: dict) -> list[str]:
    """``key: old -> new`` for each model, data and estimator setting that differs between a stored run's
    config and this one (speed-only settings, and under a dataset budget the values it chose, excepted)."""
    skip = SPEED_ONLY | (BUDGET_CHOSEN if current.get("estimator", {}).get("budget") == "dataset" else set())
    out = []
    for section in ("model", "data", "estimator"):
        old, new = stored.get(section, {}), current.get(section, {})
        for key in sorted(set(old) | set(new)):
            name = f"{section}.{key}"
            if name not in skip and old.get(key) != new.get(key):
                out.append(f"{name}: {old.get(key)!r} -> {new.get(key)!r}")
    return out


def evaluate_sharded(
    label: str,
    dataset,
    chunk: int,
    fn: Callable[[list[int], torch.Tensor], PerImage],
    partial: Partial | None = None,
    on_chunk: Callable[[list[PerImage]], None] | None = None,
) -> PerImage | None:
    """``fn(indices, uint8 images)`` on chunks of ``chunk`` images of ``dataset`` (global chunks dealt to
    the ranks in turn); the rows of every rank, in image order, on rank 0 (None on the other ranks). With
    ``partial``, finished chunks are kept and a rerun reuses them; SIGTERM (or submitit's signal) keeps the
    chunk in progress and raises :class:`~itdiffusion.errors.Preempted` (:mod:`itdiffusion.preemption`).
    ``on_chunk`` (rank 0, after each chunk): called with rank 0's parts so far (the live view,
    :class:`itdiffusion.stage_tracking.RunningLog`)."""
    starts = _rank_starts(len(dataset), chunk)
    if partial is not None:
        partial.open()
    parts = []
    with (
        tqdm(
            total=len(dataset),
            desc=f"evaluate {label}",
            unit="img",
            disable=not distributed.is_main(),
            dynamic_ncols=True,
        ) as bar,
        stop_requested() if partial is not None else contextlib.nullcontext(StopRequest()) as stop_request,
    ):
        for k, start in enumerate(starts):
            stop = min(start + chunk, len(dataset))
            part = None if partial is None else partial.load(start, stop)
            if part is None:
                idx = list(range(start, stop))
                part = fn(idx, torch.stack([dataset[i][0] for i in idx]))
                if partial is not None:
                    partial.save(start, stop, part)
            parts.append(part)
            bar.update((stop - start) * distributed.world_size())
            if on_chunk is not None and distributed.is_main():
                on_chunk(parts)
            if stop_request and k + 1 < len(starts):
                raise Preempted(
                    f"{stop_request.name}: {k + 1} of this rank's {len(starts)} chunks are kept in "
                    f"{partial.folder}; rerun the same command to resume"
                )
    gathered = distributed.gather_to_main(parts)
    if gathered is None:
        return None
    return PerImage.cat(
        sorted((p for rank_parts in gathered for p in rank_parts), key=lambda p: int(p.index[0]))
    )


def _rank_starts(num: int, chunk: int) -> list[int]:
    """The first image of each chunk this rank evaluates (global chunks dealt to the ranks in turn)."""
    return list(range(0, num, chunk))[distributed.rank() :: distributed.world_size()]


def rank_images(num: int, chunk: int) -> int:
    """How many of ``num`` images this rank evaluates in chunks of ``chunk`` (:func:`evaluate_sharded`)."""
    return sum(min(start + chunk, num) - start for start in _rank_starts(num, chunk))


def fingerprint(cfg: DictConfig, members: Sequence, **extra) -> dict:
    """Everything that decides an evaluation's per-image numbers (for resuming it): the model, data and
    estimator settings, the checkpoints' sha256 and ``extra`` (the log-SNR proposal, the U-Net's path)."""
    resolved = config_dict(cfg)
    return {
        "model": resolved["model"],
        "data": resolved["data"],
        "estimator": resolved["estimator"],
        "checkpoints": [m.sha256 for m in members],
        "per_image_version": artifacts.PER_IMAGE_VERSION,
        **{k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in extra.items()},
    }


def provenance(cfg: DictConfig, members: Sequence) -> dict:
    """Who and what produced a run: run id, label, model, checkpoints and their sha256, commit, config."""
    one = len(members) == 1
    return {
        "run_id": cfg.run_id,
        "stage": "evaluate",
        "label": cfg.label,
        "paper_row": cfg.paper_row,
        "experiment": cfg.experiment,
        "group": cfg.logger.group or job_group(),  # a sweep's jobs: one group per sweep
        "results": bool(cfg.results),
        "data": cfg.data.name,
        "model": _model_names(members) or cfg.model.name,
        **training_objective(cfg, members),
        "checkpoint": members[0].checkpoint if one else [m.checkpoint for m in members],
        "checkpoint_sha256": members[0].sha256 if one else [m.sha256 for m in members],
        "git_commit": git_commit(),
        "num_images_requested": cfg.data.num_images,  # num_images: those evaluated (fewer in a small set)
        "world_size": distributed.world_size(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config_dict(cfg),
    }


def training_objective(cfg: DictConfig, members: Sequence) -> dict:
    """The weights' training objective label: from the ``export.json`` finetune wrote beside them when it
    describes these weights (:func:`itdiffusion.artifacts.checkpoint_provenance`), else the model config's
    ``training_objective``; per member for an ensemble. ``training_objective_from`` says which."""
    found = [artifacts.checkpoint_provenance(m.checkpoint, m.sha256) if m.checkpoint else None
             for m in members]
    labels = [f["training_objective"] if f else cfg.model.training_objective for f in found]
    sources = ["checkpoint" if f else "model config" for f in found]
    one = len(members) == 1
    return {"training_objective": labels[0] if one else labels,
            "training_objective_from": sources[0] if one else sources}


def _model_names(members: Sequence) -> str | list[str] | None:
    """The members' model config name, or their names when they differ (ensembles across families)."""
    names = [m.model_cfg.name for m in members if getattr(m, "model_cfg", None) is not None]
    return None if not names else names[0] if len(set(names)) == 1 else names


def check_finite(per_image: PerImage, dim: int, run_dir: Path) -> None:
    """UserError naming the first image and estimate that is non-finite or absurd (> :data:`ABSURD_BPD`);
    the finished chunks of ``run_dir`` are then discarded (a rerun evaluates again, e.g. with new weights)."""
    named = {
        **{
            f"{g}.{k}": v
            for k, rows in per_image.estimates.items()
            for g, v in zip(per_image.groups, rows, strict=True)
        },
        **{f"m{j}.{k}": v for k, rows in per_image.member_values.items() for j, v in enumerate(rows)},
    }
    for name, values in named.items():
        if "stderr" in name:  # a Monte Carlo error is nan where it cannot be measured (too few terms)
            continue
        if name.endswith(".network_evals"):  # a count, not bits/dim (2 npoints + the VLB's steps per image)
            continue
        bpd = values / (dim * math.log(2)) if "_nats" in name else values
        bad = ~torch.isfinite(values) | (bpd.abs() > ABSURD_BPD)
        if bad.any():
            discard(run_dir)
            b = int(bad.nonzero()[0])
            raise UserError(
                f"evaluation stopped: {name} of test image {int(per_image.index[b])} is "
                f"{float(values[b]):.6g} (non-finite or beyond {ABSURD_BPD:g} bits/dim): check the "
                "model's weights (model.checkpoint) and the data"
            )


def finish(cfg: DictConfig, run_dir: Path, per_image: PerImage, metrics: dict, summary_keys: Sequence[str],
           tracker: Tracker | None = None):
    """Rank 0: commit the run dir (``per_image.npz``, then ``metrics.json``), record the results row, log
    to ``tracker`` (the run the stage opened at its start; None: one opened now). Returns the metrics
    written."""
    metrics = artifacts.commit_evaluation(run_dir, per_image, metrics)
    discard(run_dir)  # the finished chunks of a resumable run are in per_image.npz now
    _record(cfg, metrics, run_dir / artifacts.METRICS)
    stage_tracking.log_evaluation(cfg, run_dir, per_image, metrics, tracker)
    log.info(
        "%s: %s",
        cfg.label,
        ", ".join(
            f"{k} {metrics[k]:.4f} ± {metrics[k + '_stderr']:.4f}"
            for k in summary_keys
            if metrics.get(k) is not None
        ),
    )
    return metrics


def _record(cfg: DictConfig, metrics: dict, metrics_path: Path) -> None:
    if not cfg.results:
        log.info("results=false: %s stays out of the results tables (its metrics are in %s)", cfg.run_id,
                 metrics_path)
        return
    try:
        record_run(cfg.paths.results_dir, {**metrics, "metrics_path": str(metrics_path)})
    except ResultsStoreError as e:  # an unreadable results store: keep metrics.json, say how to recover
        log.error("could not add this run to the results table (%s); its metrics are in %s", e, metrics_path)
