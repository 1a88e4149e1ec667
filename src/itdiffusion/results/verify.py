"""The results store's rows checked against their run dirs: the report's :class:`RowCheck`, made under the
store's lock (:func:`itdiffusion.results.store.record_runs` with ``revise``)."""

from __future__ import annotations

import logging
from pathlib import Path

from itdiffusion import artifacts, summary
from itdiffusion.results.tables import INVALID

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
    ``metrics.json`` (an edited ``results.json`` heals); the others are marked
    :data:`~itdiffusion.results.tables.INVALID` with the reason (left out of the tables), or with
    ``allow_invalid`` dropped from the store."""

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
