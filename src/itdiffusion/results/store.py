"""The results store: every evaluated run, merged by run id into ``results.{json,csv,md}``.

``results.json`` maps run id -> that run's metrics (the ``metrics.json`` an evaluation wrote, less
its config). Writers take a file lock and rewrite all three files atomically, so concurrent
evaluations both keep their rows and a reader never sees a half-written table. Rerunning a run id
replaces that run's row; other runs are never touched.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from itdiffusion.errors import UserError
from itdiffusion.fsio import atomic_write_many, file_lock, json_text
from itdiffusion.results.render import render_csv, render_markdown

log = logging.getLogger(__name__)


FORMAT = "itdiffusion.results/1"


class ResultsStoreError(UserError):
    """results.json exists but cannot be read: it is left as it is, never overwritten."""


def results_paths(results_dir: str | Path) -> dict[str, Path]:
    d = Path(results_dir)
    return {
        "json": d / "results.json",
        "csv": d / "results.csv",
        "md": d / "results.md",
        "lock": d / ".results.lock",
    }


def load_runs(results_dir: str | Path) -> dict[str, dict]:
    """The runs recorded in ``results.json`` (empty if none); an unreadable file is an error."""
    path = results_paths(results_dir)["json"]
    if not path.is_file():
        return {}
    try:
        stored = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ResultsStoreError(f"{path} is not valid JSON ({e}); move it aside to start a new store") from e
    if not isinstance(stored, dict) or stored.get("format") != FORMAT:
        raise ResultsStoreError(f"{path} is no itdiffusion results store; move it aside to start a new one")
    runs = stored.get("runs")
    if not (isinstance(runs, dict) and all(isinstance(r, dict) for r in runs.values())):
        raise ResultsStoreError(f"{path}: 'runs' must map run ids to metrics objects, found "
                                f"{type(runs).__name__}; move the file aside to start a new store")
    return runs


def record_runs(
    results_dir: str | Path,
    runs: Iterable[Mapping],
    figures: Mapping[str, list[str]] | None = None,
    revise: Callable[[dict[str, dict]], dict[str, dict]] | None = None,
) -> dict:
    """Merge ``runs`` (metrics dicts with a ``run_id``) into the store and rewrite json, csv and md together
    (:func:`itdiffusion.fsio.atomic_write_many`: all three or none). ``revise(stored) -> stored``: a change of
    the stored rows made under the store's lock (the report's check of every row against its run dir)."""
    paths = results_paths(results_dir)
    with file_lock(paths["lock"]):
        stored = load_runs(results_dir)
        stored_figures = {**load_figures(results_dir), **{g: list(f) for g, f in (figures or {}).items()}}
        for metrics in runs:
            if not metrics.get("run_id"):
                raise ValueError("a results row needs a run_id")
            stored[str(metrics["run_id"])] = {k: v for k, v in metrics.items() if k != "config"}
        if revise is not None:
            stored = revise(stored)
        store = {"format": FORMAT, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "runs": stored,
                 "figures": stored_figures}
        atomic_write_many({
            paths["json"]: json_text(store),
            paths["csv"]: render_csv(stored),
            paths["md"]: render_markdown(stored, stored_figures),
        })
    return stored


def load_figures(results_dir: str | Path) -> dict[str, list[str]]:
    """The figures the store knows, by group (paths relative to the results dir): kept across writes, so
    results.md links every figure whatever order evaluations and reports finish in."""
    path = results_paths(results_dir)["json"]
    if not path.is_file():
        return {}
    load_runs(results_dir)  # the same checks
    figures = json.loads(path.read_text()).get("figures") or {}
    return {str(g): [str(f) for f in fs] for g, fs in figures.items() if isinstance(fs, list)}


def record_run(results_dir: str | Path, metrics: Mapping) -> dict:
    """Merge one run's metrics into the store (see :func:`record_runs`)."""
    return record_runs(results_dir, [metrics])
