"""Stage ``report``: the results tables and figures from every evaluation and fine-tuning run.

``python -m itdiffusion.stages.report``

1. Every ``metrics.json`` under ``paths.output_dir`` is merged by run id into
   ``<paths.results_dir>/results.{json,csv,md}`` (see :mod:`itdiffusion.results`), once its numbers are
   recomputed from its ``per_image.npz`` (:mod:`itdiffusion.summary`). A stored row whose run dir no longer
   verifies (edited, truncated, swapped or deleted files) leaves the tables (results.md lists it apart with
   the reason) and the report ends with exit status 2 naming it, unless ``report.allow_invalid=true``
   (such rows are then dropped from the store).
2. Figures in ``<paths.results_dir>/figures/``, per reproduction group, from each run's
   ``per_image.npz`` (:mod:`itdiffusion.figures`: made from what the estimator integrates): the paper's
   MMSE figure (``<group>_mmse.png``), the MMSE gap the continuous estimate integrates
   (``_mmse_gap.png``; :func:`check_gap` stops the report if its numbers are not the table's), per-image
   histograms and the IT-vs-VLB scatter (``_per_image.png``), per-pixel information maps
   (``_pixel_maps.png``) and the fine-tuning losses, a row per run and a column per unit (``_loss.png``).
   The store keeps the figure links (results.md lists them whatever order runs finish in).
3. wandb: Table 1, Table 2 and the I-MDCE table as numbers (mean, stderr, the paper's value, the
   difference), the figures with captions, and the evaluations' artifacts as inputs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from itdiffusion import artifacts, distributed, figures, run_figures, summary
from itdiffusion.artifacts import PerImage
from itdiffusion.config import stage_config
from itdiffusion.errors import UserError
from itdiffusion.results import (
    CONTINUOUS_COLUMNS,
    DISCRETE_COLUMNS,
    INVALID,
    MDCE_COLUMNS,
    groups,
    load_runs,
    numeric_table,
    record_runs,
    results_paths,
    row_labels,
)
from itdiffusion.stage_tracking import EVALUATION_ARTIFACT_TYPE, TRACKING_ID
from itdiffusion.stages import CONFIG_DIR, cli_entry, config_dict, launch
from itdiffusion.tracking import Tracker, run_tags

log = logging.getLogger(__name__)

def _check_run(run_dir: Path) -> tuple[dict | None, str | None]:
    """(metrics, None) for an evaluate run dir that verifies, else (None, why)."""
    try:
        metrics, _ = summary.verified_evaluation(run_dir)
    except artifacts.ArtifactError as e:
        return None, str(e)
    return metrics, None


class RowCheck:
    """The report's check of the results store, made under its lock (``results.record_runs(revise=...)``):
    every evaluation below ``paths.output_dir`` and every stored row's run dir is verified
    (:func:`itdiffusion.summary.verified_evaluation`). Rows of runs that verify are rewritten from their
    ``metrics.json`` (an edited ``results.json`` heals); the others are marked :data:`~itdiffusion.results.
    INVALID` with the reason (left out of the tables), or with ``allow_invalid`` dropped from the store."""

    def __init__(self, output_dir: str | Path, allow_invalid: bool):
        self.output_dir, self.allow_invalid = Path(output_dir), allow_invalid
        self.found: list[dict] = []  # metrics of the runs that verify below output_dir
        self.invalid: dict[str, str] = {}  # run id -> why its row is not in the tables

    def __call__(self, stored: dict[str, dict]) -> dict[str, dict]:
        checked: dict[Path, tuple[dict | None, str | None]] = {}

        def check(run_dir: Path) -> tuple[dict | None, str | None]:
            if run_dir not in checked:
                checked[run_dir] = _check_run(run_dir)
            return checked[run_dir]

        scanned = [p.parent.resolve() for p in sorted(self.output_dir.rglob(artifacts.METRICS))]
        for run_dir in scanned:
            check(run_dir)
        out: dict[str, dict] = {}
        row_dirs = set()
        for run_id, row in stored.items():
            if not row.get("metrics_path"):
                out[run_id] = {**row, INVALID: "recorded without its run dir (no metrics_path): cannot be "
                                               "verified"}
                continue
            run_dir = Path(row["metrics_path"]).parent.resolve()
            row_dirs.add(run_dir)
            metrics, reason = check(run_dir)
            if metrics is not None and str(metrics.get("run_id")) != run_id:
                metrics, reason = None, f"{run_dir} now holds the evaluation of run {metrics.get('run_id')!r}"
            if reason is not None and not (run_dir / artifacts.METRICS).exists() and not run_dir.exists():
                reason = f"its run dir {run_dir} was deleted"
            out[run_id] = _row(metrics, run_dir) if metrics is not None else {**row, INVALID: reason}
        for run_dir in scanned:  # runs not (or not yet) in the store, and runs moved to another dir
            metrics, reason = checked[run_dir]
            if metrics is not None and not metrics.get("results", True):  # results=false: kept out
                out = {k: v for k, v in out.items() if v.get("metrics_path") != _row(metrics, run_dir)[
                    "metrics_path"]}
                continue
            if metrics is not None and metrics.get("run_id"):
                out[str(metrics["run_id"])] = _row(metrics, run_dir)
                self.found.append(metrics)
            elif reason is not None and run_dir not in row_dirs:  # not in the store yet
                run_id = _run_id(run_dir)
                if run_id is None:  # no row to mark: an unreadable metrics.json
                    log.warning("skipping %s", reason)
                elif not (out.get(run_id) and not out[run_id].get(INVALID)):
                    out[run_id] = {"run_id": run_id, "metrics_path": str(run_dir / artifacts.METRICS),
                                   INVALID: reason}
        self.invalid = {run_id: row[INVALID] for run_id, row in out.items() if row.get(INVALID)}
        for run_id, why in self.invalid.items():
            log.warning("run %s left out of the tables: %s", run_id, why)
        if self.allow_invalid:
            out = {run_id: row for run_id, row in out.items() if run_id not in self.invalid}
        return out

    def problem(self) -> str | None:
        """The report's last word on rows left out (None: every row verifies, or ``allow_invalid``)."""
        if not self.invalid or self.allow_invalid:
            return None
        named = ", ".join(sorted(self.invalid)[:5]) + (" ..." if len(self.invalid) > 5 else "")
        return (f"{len(self.invalid)} run(s) no longer verify and are left out of the tables ({named}; why: "
                "in results.md and the log): rerun them, or pass report.allow_invalid=true to drop the rows")


def _run_id(run_dir: Path) -> str | None:
    """The run id a ``metrics.json`` names, if it can be read at all."""
    try:
        run_id = artifacts.read_metrics(run_dir / artifacts.METRICS).get("run_id")
    except artifacts.ArtifactError:
        return None
    return str(run_id) if run_id else None


def _row(metrics: dict, run_dir: Path) -> dict:
    return {**{k: v for k, v in metrics.items() if k != "config"},
            "metrics_path": str(run_dir / artifacts.METRICS)}


def find_loss_curves(*roots: str | Path) -> list[tuple[str, list[dict], str | None]]:
    """(run name, points, objective) for every ``loss_curve.json`` below ``roots``; the run name is its
    folder's name.

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
                found.append((path.parent.name, points, artifacts.loss_curve_objective(path)))
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


def _save_figure(fig, path: Path) -> None:
    from itdiffusion.fsio import atomic_write

    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))


def loss_panels(curves: Sequence[tuple[str, list[dict], str | None]]) -> dict[str, list]:
    """Loss series by unit (:data:`itdiffusion.run_figures.LOSS_UNITS`): ``unit -> [(run, kind, points)]``.
    Bits/dim are bits of the continuous IT bound, except for masked-diffusion runs (``any_order``: discrete
    bits/dim); the held-out loss of an ``iddpm`` run is the IT bound."""
    panels: dict[str, list] = {}
    for name, points, objective in curves:
        for kind in ("train", "heldout"):
            found = loss_series(points, kind)
            if not found:
                continue
            unit, series = found
            if unit == "bpd":
                key = run_figures.LOSS_UNITS["any_order" if objective == "any_order" else "it"]
            else:
                key = run_figures.LOSS_UNITS.get(unit, unit)
            panels.setdefault(key, []).append((name, kind, series))
    return panels


def _evaluations(rows: Sequence[Mapping]) -> list[tuple[Mapping, PerImage]]:
    """(metrics, per_image) of the rows whose evaluation is on disk and complete."""
    out = []
    for run in rows:
        if not run.get("metrics_path"):
            continue
        try:
            _, npz = artifacts.read_evaluation(Path(run["metrics_path"]).parent)
            out.append((run, artifacts.read_per_image(npz)))
        except artifacts.ArtifactError as e:
            log.warning("no figures for %s: %s", run["run_id"], e)
    return out


def group_figures(rows: list[dict], loss_curves, figure_dir: Path, slug: str) -> tuple[dict[str, Path], dict]:
    """The figures of one group (name -> path) and the figure-vs-table checks (run id -> numbers)."""
    labels = row_labels(rows)
    evaluations = _evaluations(rows)
    with_curves = [(r, p) for r, p in evaluations
                   if p.curves is not None and p.reference_mmse is not None and r.get("dim")]
    made: dict[str, Path] = {}
    checks: dict = {}
    if with_curves:
        made["mmse"] = figures.plot_mmse(_group_mmse(with_curves, labels), figure_dir / f"{slug}_mmse.png")
        gaps = {}
        for run, per_image in with_curves:
            dim = int(run["dim"])
            entropy = float(run["gaussian_entropy_bpd"]) * dim * math.log(2)
            try:
                data = figures.gap_data(per_image, entropy, dim)
            except ValueError as e:
                log.warning("no gap figure for %s: %s", run["run_id"], e)
                continue
            gaps[labels[run["run_id"]]] = data
            checks[run["run_id"]] = check_gap(run, data)
        if gaps:
            made["mmse_gap"] = figures.plot_gap(gaps, figure_dir / f"{slug}_mmse_gap.png")
    values = {labels[r["run_id"]]: run_figures.per_image_bpd(p, int(r.get("dim") or 0))
              for r, p in evaluations if r.get("dim")}
    path = run_figures.plot_per_image(values, figure_dir / f"{slug}_per_image.png")
    if path is not None:
        made["per_image"] = path
    maps = _pixel_map_runs(evaluations, labels)
    if maps:
        made["pixel_maps"] = figures.plot_pixel_maps(maps, figure_dir / f"{slug}_pixel_maps.png")
    path = run_figures.plot_losses(loss_panels(loss_curves), figure_dir / f"{slug}_loss.png")
    if path is not None:
        made["loss"] = path
    return made, checks


class FigureCheckError(RuntimeError):
    """A figure would show other numbers than the table of the same run."""


# Table 1 prints bits/dim to 3 decimals: a figure's number must round the same (float32 curves: ~1e-6).
FIGURE_TOLERANCE_BPD = 5e-4


def check_gap(run: Mapping, data: figures.GapData) -> dict:
    """The gap figure's numbers against the run's metrics (the table's source): its estimate is the table's
    ``it_continuous_bpd``, Ĝ − area/2 is that estimate, its Gaussian is metrics' closed-form
    ``gaussian_nll_bpd``. Returns them; raises :class:`FigureCheckError` naming every disagreement."""
    numbers = {"figure_bpd": data.estimate_bpd, "table_bpd": run.get("it_continuous_bpd"),
               "table_stderr": run.get("it_continuous_bpd_stderr"), "area_bpd": data.area_bpd,
               "sampled_gaussian_bpd": data.sampled_gaussian_bpd, "gaussian_bpd": data.gaussian_bpd,
               "table_gaussian_bpd": run.get("gaussian_nll_bpd")}
    pairs = [("estimate", data.estimate_bpd, run.get("it_continuous_bpd")),
             ("Ĝ − area/2", data.sampled_gaussian_bpd - data.area_bpd, run.get("it_continuous_bpd")),
             ("Gaussian −ln N", data.gaussian_bpd, run.get("gaussian_nll_bpd"))]
    bad = [f"{name}: figure {fig:.6f}, table {table:.6f}" for name, fig, table in pairs
           if table is not None and not abs(fig - table) <= FIGURE_TOLERANCE_BPD]
    if run.get("it_continuous_bpd") is None:
        bad.append("the table has no it_continuous_bpd")
    if bad:
        raise FigureCheckError(f"the gap figure of run {run['run_id']} disagrees with its metrics.json "
                               f"({'; '.join(bad)}): a bug, please report it")
    return numbers


def _group_mmse(with_curves, labels) -> figures.MMSEData:
    """One MMSE figure for a group: every single-model run's curve (an ensemble's members otherwise), the
    references from the first run (the runs of a group share their test images and points)."""
    singles = [(r, p) for r, p in with_curves if p.curves.num_models == 1] or with_curves[:1]
    first_run, first = singles[0]
    merged = figures.mmse_data(first, int(first_run["dim"]), names=[labels[first_run["run_id"]]]
                               if first.curves.num_models == 1 else None)
    references = {k: merged.continuous.pop(k) for k in
                  (figures.MMSEData.GAUSSIAN_DECODER, figures.MMSEData.REFERENCE, figures.MMSEData.STANDARD)}
    for run, per_image in singles[1:]:
        data = figures.mmse_data(per_image, int(run["dim"]), names=[labels[run["run_id"]]])
        if len(data.centres) != len(merged.centres):
            continue
        merged.continuous[labels[run["run_id"]]] = data.continuous[labels[run["run_id"]]]
        merged.discrete.update(data.discrete)
    merged.best = np.min([v[0] for v in merged.continuous.values()], axis=0)
    merged.continuous.update(references)
    choice = (first_run.get("decoder_choice") or {}).get("groups") or {}
    used = (choice.get("m0") or choice.get("ensemble") or {}).get("used", {})
    merged.reference_spans = {panel: figures.reference_spans(first.curves.proposal, used[panel])
                              for panel in ("continuous", "discrete") if panel in used}
    return merged


def _pixel_map_runs(evaluations, labels) -> dict[str, figures.PixelMapData]:
    """Maps to draw: the base and tuned paper rows when both have them, else the first two runs with maps."""
    have = [(r, p) for r, p in evaluations if p.pixel_maps is not None]
    by_row: dict = {}
    for r, p in have:  # a paper row's first run (table order): ours before the published weights'
        by_row.setdefault(r.get("paper_row"), (r, p))
    chosen = [by_row[k] for k in ("IDDPM", "IDDPM(tune)") if k in by_row]
    if len(chosen) < 2:
        chosen = have[:2]
    return {labels[r["run_id"]]: figures.pixel_map_data(p.pixel_maps) for r, p in chosen}


CAPTIONS = {
    "mmse": "Binned mean E||eps - eps_hat||^2 per log-SNR of each model, the N(mu, Sigma) reference's "
            "analytic mmse_G, the N(0, I) curve, and the reference's linear decoder at the test images (the "
            "estimate's clamp alternative); shaded: where the best model is below that decoder.",
    "mmse_gap": figures.GAP_CAPTION,
    "per_image": "Per-image IT bits/dim (histograms) and IT discrete against the discrete VLB per image.",
    "pixel_maps": "Each pixel's share of -log2 p(x) (channels summed) and the log-SNR its information comes "
                  "from; the difference of two runs on the same images.",
    "loss": "Training (solid blue) and held-out (dashed orange) loss, one row per run, one column per unit.",
}


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Merge all metrics, draw the figures, write results.{json,csv,md} and log them to wandb (on the
    launcher's rank 0 only: started on every task of an ``srun`` step, the others do nothing)."""
    if not distributed.is_main():
        return {}
    results_dir = Path(cfg.paths.results_dir)
    if not any(Path(cfg.paths.output_dir).rglob(artifacts.METRICS)) and not load_runs(results_dir):
        raise UserError(
            f"no metrics.json under {Path(cfg.paths.output_dir).resolve()}: run the evaluate stage first"
        )
    row_check = RowCheck(cfg.paths.output_dir, cfg.report.allow_invalid)
    runs = record_runs(results_dir, [], revise=row_check)
    found = row_check.found
    figure_paths: dict[str, dict[str, Path]] = {}
    checks: dict = {}
    figure_dir = results_dir / "figures"
    loss_curves = find_loss_curves(cfg.paths.output_dir, Path(cfg.paths.checkpoint_dir) / "finetune")
    for group, rows in groups(runs):
        group_curves = [c for c in loss_curves if _belongs(c[0], rows, group)]
        figure_paths[group], group_checks = group_figures(rows, group_curves, figure_dir, _slug(group))
        checks.update(group_checks)
    listed = {g: [str(p.relative_to(results_dir)) for p in made.values()] for g, made in figure_paths.items()}
    runs = record_runs(results_dir, [], figures=listed)  # the store keeps the figure links
    paths = results_paths(results_dir)
    with Tracker(cfg.logger, stage_config(config_dict(cfg), "report"), job_type="report",
                 name=f"report-{cfg.run_id}",
                 tags=run_tags(cfg.experiment, "report"), id_file=Path(run_dir) / TRACKING_ID) as tracker:
        for metrics in found:
            tracker.use_artifact(f"evaluate-{metrics['run_id']}", EVALUATION_ARTIFACT_TYPE)
        for group, rows in groups(runs):
            log_group_tables(tracker, group, rows)
            for name, path in figure_paths.get(group, {}).items():
                tracker.log_image(f"{group}/{name}", path, caption=CAPTIONS.get(name))
        if checks:
            columns = ["figure_bpd", "table_bpd", "table_stderr", "area_bpd", "sampled_gaussian_bpd",
                       "gaussian_bpd", "table_gaussian_bpd"]
            tracker.log_table("figure_checks", ["run_id", *columns],
                              [[k, *(v[c] for c in columns)] for k, v in checks.items()])
    log.info("wrote %s (%d runs)", paths["md"], len(runs))
    problem = row_check.problem()
    if problem is not None:
        raise UserError(problem)
    return {
        "runs": len(runs),
        "figures": listed,
        "figure_checks": checks,
        "results": {k: str(v) for k, v in paths.items() if k != "lock"},
    }


def log_group_tables(tracker: Tracker, group: str, rows: list[dict]) -> None:
    """Table 1, Table 2 and (when there are masked-diffusion rows) the I-MDCE table, as numbers."""
    mdce = [r for r in rows if any(r.get(c.metric) is not None for c in MDCE_COLUMNS)]
    gaussian = [r for r in rows if r not in mdce]
    tables = [("table1_continuous", gaussian, CONTINUOUS_COLUMNS, ("training_objective",)),
              ("table2_discrete", gaussian, DISCRETE_COLUMNS, ()),
              ("imdce", mdce, MDCE_COLUMNS, ("training_objective",))]
    for name, table_rows_, columns, lead in tables:
        if table_rows_:
            headers, values = numeric_table(table_rows_, columns, lead)
            tracker.log_table(f"{group}/{name}", headers, values)


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


@cli_entry
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    return launch(run, cfg)  # optimized_metric's value: an optimizing sweeper's objective


if __name__ == "__main__":
    main()
