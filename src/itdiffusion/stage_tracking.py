"""What each stage puts in its wandb run (rank 0), over :class:`itdiffusion.tracking.Tracker`.

- evaluate: the run opens when the stage starts (:func:`evaluation_tracker`); while it works, per finished
  chunk of images, ``progress/*`` and the running estimate ``running/<estimate>_bpd`` (+ ``_stderr``: the
  dataset means so far, by the function that writes metrics.json; :class:`RunningLog`), also printed on
  the console. Under ``estimator.budget=dataset``, each stderr check after the main run as it is made
  (:func:`log_top_up`: ``budget/check``, ``budget/it_blocks``, ``budget/vlb_blocks`` and per estimate
  ``budget/<estimate>/realized_stderr_bpd``, ``/target_stderr_bpd``, ``/met``: metrics.json's
  ``budget.top_ups`` entry). At the end (:func:`log_evaluation`): the settings and provenance as config; every
  estimate once, as numbers (``<estimate>_bpd``, ``_bpd_stderr``, ``_bpd_mc_stderr``; ensemble members
  as ``m<j>/...``); ``mmse_curve`` (binned mean MMSE per log-SNR of each model and of the Gaussian
  references, a table and a line plot); ``histogram/<estimate>`` (per-image bits/dim); ``per_image`` (a
  table of per-image bits/dim) with the IT-vs-VLB scatter plot; the artifact ``evaluate-<run_id>`` (type
  ``evaluation``: metrics.json, per_image.npz) that uses the checkpoint's ``model-<finetune run>`` artifact
  when it has one.
- finetune (:func:`log_model`): ``model.pt`` as the artifact ``model-<finetune.run_name>`` (type
  ``model``, alias ``sha256-<first 12>``), recorded next to the weights (:data:`ARTIFACT_RECORD`) so that
  an evaluation of those weights can name it.
- report: numeric tables and figures (:mod:`itdiffusion.stages.report`), using the evaluations'
  artifacts.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from itdiffusion import artifacts, figures, run_figures
from itdiffusion.artifacts import PerImage
from itdiffusion.config import stage_config
from itdiffusion.tracking import Tracker, run_tags

log = logging.getLogger(__name__)

TRACKING_ID = "wandb_run.json"  # in a run's folder: the wandb id a restart resumes
ARTIFACT_RECORD = "wandb_artifact.json"  # next to fine-tuned weights: the artifact they were logged as
MODEL_ARTIFACT_TYPE, EVALUATION_ARTIFACT_TYPE = "model", "evaluation"
_METRIC = re.compile(r"_(bpd|nats)(_stderr|_mc_stderr)?$")


def is_metric(key: str, value) -> bool:
    """Whether a metrics.json entry is a measured number (an estimate, its errors, the cost)."""
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return numeric and (bool(_METRIC.search(key)) or key == "network_evals")


def split_metrics(metrics: Mapping) -> tuple[dict, dict]:
    """(numbers to log, settings for the config) of a metrics.json; members' numbers as ``m<j>/<key>``."""
    numbers = {k: v for k, v in metrics.items() if is_metric(k, v) and k != "gaussian_entropy_bpd"}
    for j, member in enumerate(metrics.get("members") or []):
        numbers.update({f"m{j}/{k}": v for k, v in member.items() if is_metric(k, v)})
    settings = {k: v for k, v in metrics.items() if k not in numbers and k not in ("config", "members")}
    return numbers, settings


def evaluation_tags(cfg, metrics: Mapping) -> list[str]:
    """experiment, model, paper row, training objective (not for ensembles: their members' may differ)."""
    ensemble = isinstance(metrics.get("checkpoint"), list)
    return run_tags(cfg.experiment, cfg.model.name, cfg.paper_row,
                    None if ensemble else metrics.get("training_objective"), "ensemble" if ensemble else None)


def evaluation_tracker(cfg, run_dir: Path) -> Tracker:
    """The evaluate run, opened when the stage starts (rank 0; a rerun of the run dir resumes it), with the
    config and the tags known before the work (:func:`log_evaluation` adds the rest)."""
    config = stage_config(OmegaConf.to_container(cfg, resolve=True), "evaluate")
    return Tracker(cfg.logger, config, job_type="evaluate", name=f"evaluate-{cfg.run_id}",
                   tags=run_tags(cfg.experiment, cfg.model.name, cfg.paper_row,
                                 "ensemble" if cfg.ensemble else None),
                   id_file=Path(run_dir) / TRACKING_ID)


def log_evaluation(cfg, run_dir: Path, per_image: PerImage, metrics: Mapping,
                   tracker: Tracker | None = None) -> None:
    """Rank 0, after the run dir is committed: the evaluate run's wandb content (see the module), into
    ``tracker`` (the run opened at the start) or a run opened now."""
    if tracker is None:
        with evaluation_tracker(cfg, run_dir) as own:
            log_evaluation(cfg, run_dir, per_image, metrics, own)
        return
    if not tracker.active:
        return
    numbers, settings = split_metrics(metrics)
    tracker.config_update({**stage_config(metrics.get("config") or {}, "evaluate"), "run": settings})
    tracker.add_tags(evaluation_tags(cfg, metrics))
    tracker.log(numbers)
    dim = int(metrics.get("dim") or 0)
    if per_image.curves is not None and per_image.reference_mmse is not None and dim:
        log_mmse_curves(tracker, per_image, dim)
    if dim:
        log_per_image(tracker, per_image, dim)
    uses = []
    for path, sha in _checkpoints(metrics):
        record = checkpoint_artifact(path, sha)
        if record is not None:
            tracker.use_artifact(record["name"], MODEL_ARTIFACT_TYPE, record["alias"])
            uses.append(f"{record['name']}:{record['alias']}")
    tracker.log_artifact(
        f"evaluate-{cfg.run_id}", EVALUATION_ARTIFACT_TYPE,
        [Path(run_dir) / artifacts.METRICS, Path(run_dir) / artifacts.PER_IMAGE],
        metadata={"run_id": cfg.run_id, "label": metrics.get("label"), "group": metrics.get("group"),
                  "uses": uses, "checkpoint_sha256": metrics.get("checkpoint_sha256"), **numbers})


class RunningLog:
    """The live view of an evaluation (rank 0), called after each finished chunk of images with the parts
    done so far: ``progress/images``, ``progress/fraction``, ``progress/elapsed_s`` every chunk, and the
    running estimate ``running/<key>`` for each number of ``summarize(parts)`` (the function that writes
    metrics.json, on the images done so far: dataset means in bits/dim with their standard errors), also
    printed on the console. The running estimate is formed at most every ``every_s`` seconds and at most
    every ten times its own cost (it estimates over every image done), so it takes under a tenth of the
    time; the last chunk has none (the final numbers follow at once). Under torchrun it covers rank 0's
    share of the images."""

    def __init__(self, tracker: Tracker, summarize: Callable[[Sequence[PerImage]], Mapping], total: int,
                 every_s: float, label: str = ""):
        self.tracker, self.summarize, self.total, self.every_s = tracker, summarize, total, every_s
        self.label = label
        self.started = self.last = time.time()
        self.cost = 0.0

    def __call__(self, parts: Sequence[PerImage]) -> None:
        done = sum(p.num_images for p in parts)
        now = time.time()
        row: dict = {"progress/images": done, "progress/fraction": done / max(self.total, 1),
                     "progress/elapsed_s": now - self.started}
        if done < self.total and now - self.last >= max(self.every_s, 10 * self.cost):
            numbers, _ = split_metrics(self.summarize(parts))
            self.last = time.time()
            self.cost = self.last - now
            row.update({f"running/{k}": v for k, v in numbers.items()})
            shown = [f"{k} {v:.4f} ± {numbers[k + '_stderr']:.4f}" for k, v in numbers.items()
                     if k + "_stderr" in numbers and math.isfinite(v)]
            log.info("%s running estimate over %d/%d images: %s", self.label, done, self.total,
                     ", ".join(shown))
        self.tracker.log(row)


def log_top_up(tracker: Tracker, round_: int, entry: Mapping) -> None:
    """One stderr check of the dataset budget (``entry``: the ``budget.top_ups`` item metrics.json keeps)."""
    row: dict = {"budget/check": round_, "budget/it_blocks": entry["blocks"]["npoints"],
                 "budget/vlb_blocks": entry["blocks"]["vlb_steps"]}
    for name, found in entry["stderr_check"].items():
        row.update({f"budget/{name}/realized_stderr_bpd": found["realized"],
                    f"budget/{name}/target_stderr_bpd": found["target"],
                    f"budget/{name}/met": int(found["met"])})
    tracker.log(row)


def log_mmse_curves(tracker: Tracker, per_image: PerImage, dim: int) -> None:
    """``mmse_curve``: binned mean E||eps - eps_hat||^2 per log-SNR (``figures.mmse_data``)."""
    data = figures.mmse_data(per_image, dim, names=per_image.groups[: per_image.curves.num_models])
    series = {name: (data.centres, mean) for name, (mean, _) in {**data.continuous, **data.discrete}.items()}
    tracker.log_line_plot("mmse_curve", "logsnr", "mmse", series,
                          title="E||eps - eps_hat||^2 against log-SNR (binned means)")


def log_per_image(tracker: Tracker, per_image: PerImage, dim: int) -> None:
    """Histograms of the per-image bits/dim, their table and the IT-vs-VLB scatter."""
    values = run_figures.per_image_bpd(per_image, dim)
    if not values:
        return
    for key, v in values.items():
        tracker.log_histogram(f"histogram/{key}", v)
    columns = ["index", *values]
    rows = np.column_stack([per_image.index.numpy(), *values.values()]).tolist()
    rows = [[int(r[0]), *r[1:]] for r in rows]
    if "it_discrete_bpd" in values and "vlb_bpd" in values:
        tracker.log_scatter("per_image", columns, rows, "vlb_bpd", "it_discrete_bpd",
                            title="per image: IT discrete against the VLB (bits/dim)")
    else:
        tracker.log_table("per_image", columns, rows)


def _checkpoints(metrics: Mapping) -> list[tuple[str, str]]:
    paths, shas = metrics.get("checkpoint"), metrics.get("checkpoint_sha256")
    if not isinstance(paths, list):
        paths, shas = [paths], [shas]
    return [(p, s) for p, s in zip(paths, shas or [None] * len(paths), strict=False) if p and s]


def checkpoint_artifact(path: str | Path, sha256: str) -> dict | None:
    """The artifact record of fine-tuned weights (:data:`ARTIFACT_RECORD` next to them) if they are the
    weights it describes, else None."""
    record_path = Path(path).parent / ARTIFACT_RECORD
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return None
    entry = record.get(Path(path).name) if isinstance(record, dict) else None
    return entry if isinstance(entry, dict) and entry.get("sha256") == sha256 else None


def log_model(tracker: Tracker, run_name: str, model_path: Path, sha256: str, metadata: Mapping) -> None:
    """Finetune: the exported weights as the artifact ``model-<run_name>`` and its record next to them."""
    if not tracker.active:
        return
    name, alias = f"model-{run_name}", f"sha256-{sha256[:12]}"
    tracker.log_artifact(name, MODEL_ARTIFACT_TYPE, [model_path], metadata={"sha256": sha256, **metadata},
                         aliases=[alias])
    record_path = Path(model_path).parent / ARTIFACT_RECORD
    try:
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    except (OSError, ValueError):
        record = {}
    record[Path(model_path).name] = {"name": name, "alias": alias, "sha256": sha256}
    from itdiffusion.fsio import atomic_write_json

    try:
        atomic_write_json(record_path, record)
    except OSError as e:
        log.warning("could not write %s (%s): evaluations will not link to the artifact", record_path, e)
