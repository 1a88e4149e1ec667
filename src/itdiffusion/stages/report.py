"""Stage ``report``: the results tables and figures from every evaluation and fine-tuning run.

``python -m itdiffusion.stages.report``

1. Every ``metrics.json`` under ``paths.output_dir`` is merged by run id into
   ``<paths.results_dir>/results.{json,csv,md}`` (see :mod:`itdiffusion.results`).
2. Figures in ``<paths.results_dir>/figures/``, per reproduction group: the MMSE gap
   mmse_G(a) - mmse(a) against log-SNR a for every evaluated model (from each run's
   ``per_image.npz``), and the fine-tuning loss curves (each finetune run's ``loss_curve.json``
   with records ``step, epoch, train_loss, heldout_loss``).
3. The same tables go to wandb as ``wandb.Table`` objects with the figures.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from itdiffusion import artifacts
from itdiffusion.artifacts import PerImage
from itdiffusion.errors import UserError
from itdiffusion.results import (
    CONTINUOUS_COLUMNS,
    DISCRETE_COLUMNS,
    groups,
    load_runs,
    record_runs,
    results_paths,
    table_headers,
    table_rows,
)
from itdiffusion.stages import CONFIG_DIR, config_dict, launch
from itdiffusion.tracking import Tracker

log = logging.getLogger(__name__)

def find_metrics(root: str | Path) -> list[dict]:
    """The metrics of every complete evaluation below ``root`` (incomplete or unreadable ones, or those of
    another format version: a warning each)."""
    found = []
    for path in sorted(Path(root).rglob(artifacts.METRICS)):
        try:
            metrics, _ = artifacts.read_evaluation(path.parent)
        except artifacts.ArtifactError as e:
            log.warning("skipping %s", e)
            continue
        if metrics.get("run_id"):
            found.append({**metrics, "metrics_path": str(path)})
    return found


def mmse_gap_curve(per_image: PerImage, bins: int = 50) -> tuple[np.ndarray, ...]:
    """Binned mean of mmse_G(a) - mmse(a) (eps units, summed over dimensions) against log-SNR a.

    Each image has its own log-SNR points, so the points of all images are pooled into ``bins``
    equal-count bins of a. With several models (an ensemble's members, evaluated on the same points),
    each bin shows the best of them or of the Gaussian decoder (gap 0): ITD's pointwise minimum of the
    MMSE curves. Returns (bin centre, mean gap, its standard error).
    """
    curves = per_image.curves
    logsnr = curves.logsnr.numpy().ravel()
    gaps = [(per_image.reference_mmse - mmse).numpy().ravel() for mmse in curves.mmse]
    order = np.argsort(logsnr)
    centres, means, errs = [], [], []
    for chunk in np.array_split(order, min(bins, len(order))):
        centres.append(logsnr[chunk].mean())
        candidates = [(gap[chunk].mean(), _sem(gap[chunk])) for gap in gaps]
        if len(gaps) > 1:
            candidates.append((0.0, 0.0))
        mean, err = max(candidates, key=lambda c: c[0])
        means.append(mean)
        errs.append(err)
    return np.array(centres), np.array(means), np.array(errs)


def _sem(values: np.ndarray) -> float:
    return values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else float("nan")


def plot_mmse_gap(runs: Sequence[Mapping], path: Path) -> Path | None:
    """One figure: a curve per evaluated model, and for an ensemble the best of its members per bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = []
    for run in runs:
        npz = Path(run["metrics_path"]).with_name(artifacts.PER_IMAGE) if run.get("metrics_path") else None
        if npz is None or not npz.is_file():
            continue
        try:
            per_image = artifacts.read_per_image(npz)
        except artifacts.ArtifactError as e:
            log.warning("no MMSE curve for %s: %s", run["run_id"], e)
            continue
        if per_image.curves is not None and per_image.reference_mmse is not None:
            curves.append((str(run.get("label") or run["run_id"]), mmse_gap_curve(per_image)))
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (a, gap, err) in curves:
        ax.plot(a, gap, label=label)
        ax.fill_between(a, gap - err, gap + err, alpha=0.2)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xlabel("log-SNR a")
    ax.set_ylabel(r"mmse$_G$(a) − mmse(a)   ($\epsilon$ units, summed over d)")
    ax.set_title("MMSE gap to the Gaussian reference (area/2 = nats below h_G)")
    ax.legend()
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return path


def find_loss_curves(*roots: str | Path) -> list[tuple[str, list[dict]]]:
    """(run name, points) for every ``loss_curve.json`` below ``roots``; the run name is its folder's name.

    A curve is a list of points ``{step, epoch, train_loss_<unit>, heldout_loss_<unit>}`` as the
    finetune stage writes them (``<unit>``: ``bpd`` and ``nats`` for the IT loss, the objective's
    name otherwise).
    """
    found = []
    for root in roots:
        for path in sorted(Path(root).rglob(artifacts.LOSS_CURVE)) if Path(root).is_dir() else []:
            try:
                points = artifacts.read_loss_curve(path)
            except artifacts.ArtifactError as e:
                log.warning("skipping %s", e)
                continue
            if points:
                found.append((path.parent.name, points))
    return found


def loss_series(points: Sequence[Mapping], kind: str) -> tuple[str, list[tuple[float, float]]] | None:
    """The ``kind`` ("train" or "heldout") loss of a curve as (unit, [(step, value)]), bits/dim preferred."""
    keys = sorted(
        {k for p in points for k in p if k.startswith(f"{kind}_loss")},
        key=lambda k: (not k.endswith("_bpd"), k),
    )
    for key in keys:
        series = [(p["step"], p[key]) for p in points if p.get(key) is not None]
        if series:
            unit = key[len(f"{kind}_loss") :].lstrip("_") or "loss"
            return unit, series
    return None


def plot_loss_curves(curves: Sequence[tuple[str, list[dict]]], path: Path) -> Path | None:
    """Train (solid) and held-out (dashed, markers) loss against optimizer step, a colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, (name, points) in enumerate(curves):
        for kind, style in (("train", "-"), ("heldout", "o--")):
            found = loss_series(points, kind)
            if found:
                unit, series = found
                steps, values = zip(*series, strict=True)
                ax.plot(steps, values, style, color=f"C{k % 10}", label=f"{name}: {kind} ({unit})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (bits/dim where available)")
    ax.set_title("Training and held-out loss")
    ax.legend(fontsize="small")
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return path


def _save_figure(fig, path: Path) -> None:
    from itdiffusion.io import atomic_write

    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Merge all metrics, draw the figures, write results.{json,csv,md} and log them to wandb."""
    results_dir = Path(cfg.paths.results_dir)
    found = find_metrics(cfg.paths.output_dir)
    if not found and not load_runs(results_dir):
        raise UserError(
            f"no metrics.json under {Path(cfg.paths.output_dir).resolve()}: run the evaluate stage first"
        )
    runs = record_runs(results_dir, found)
    figures: dict[str, list[str]] = {}
    figure_dir = results_dir / "figures"
    loss_curves = find_loss_curves(cfg.paths.output_dir, Path(cfg.paths.checkpoint_dir) / "finetune")
    for group, rows in groups(runs):
        slug = _slug(group)
        made = [plot_mmse_gap(rows, figure_dir / f"{slug}_mmse_gap.png")]
        group_curves = [c for c in loss_curves if _belongs(c[0], rows, group)]
        made.append(plot_loss_curves(group_curves, figure_dir / f"{slug}_loss.png"))
        figures[group] = [str(p.relative_to(results_dir)) for p in made if p is not None]
    runs = record_runs(results_dir, [], figures=figures)  # re-render the markdown with the figure links
    paths = results_paths(results_dir)
    with Tracker(cfg.logger, config_dict(cfg), job_type="report", name=f"report-{cfg.run_id}") as tracker:
        for group, rows in groups(runs):
            tracker.log_table(
                f"{group}/continuous",
                table_headers(CONTINUOUS_COLUMNS, ("Training objective",)),
                table_rows(rows, CONTINUOUS_COLUMNS, ("training_objective",)),
            )
            tracker.log_table(
                f"{group}/discrete", table_headers(DISCRETE_COLUMNS), table_rows(rows, DISCRETE_COLUMNS)
            )
            for fig in figures.get(group, []):
                tracker.log_image(f"{group}/{Path(fig).stem}", results_dir / fig)
    log.info("wrote %s (%d runs)", paths["md"], len(runs))
    return {
        "runs": len(runs),
        "figures": figures,
        "results": {k: str(v) for k, v in paths.items() if k != "lock"},
    }


def _belongs(curve_name: str, rows: Sequence[Mapping], group: str) -> bool:
    """Whether a loss curve belongs to a group: its name starts with the group or holds a row's checkpoint."""
    if curve_name.startswith(group):
        return True
    checkpoints = [
        c
        for r in rows
        for c in (r.get("checkpoint") if isinstance(r.get("checkpoint"), list) else [r.get("checkpoint")])
        if c
    ]
    return any(f"/{curve_name}/" in str(c) for c in checkpoints)


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    launch(run, cfg)


if __name__ == "__main__":
    main()
