"""The results store (:mod:`~itdiffusion.results.store`), the tables' columns and published numbers
(:mod:`~itdiffusion.results.tables`) and their rendering to markdown and CSV
(:mod:`~itdiffusion.results.render`)."""

from itdiffusion.results.store import (
    FORMAT,
    ResultsStoreError,
    load_figures,
    load_runs,
    record_run,
    record_runs,
    results_paths,
)

__all__ = [
    "FORMAT", "ResultsStoreError", "load_figures", "load_runs", "record_run", "record_runs", "results_paths",
]
