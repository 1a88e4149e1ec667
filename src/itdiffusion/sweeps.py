"""Hydra multirun (``-m``) support: one run id per job, failed jobs reported, the sweep's exit status.

``python -m itdiffusion.stages.evaluate -m estimator.npoints=8,16 seed=1,2`` runs four jobs in
``<paths.output_dir>/multirun/<stage>/<sweep id>/<job number>/``. The sweep id is ``ITD_SWEEP_ID``, else
the process's default run id (:func:`itdiffusion.run_ids.default_run_id`); it is exported as
``ITD_SWEEP_ID`` so that jobs started in other processes (the submitit launchers) agree on it. Each job's
default ``run_id`` is ``<sweep id>-<job number>``: its own results row and wandb run name.

A job that fails does not stop the sweep: :func:`itdiffusion.stages.launch` logs which job failed and
why and writes ``job_status.json`` into every job's run dir; :class:`SweepReport` (a Hydra callback, see
``conf/config.yaml``) reads them when the sweep ends, logs one line per failed job and exits with
status 1 unless every job succeeded.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from itdiffusion.run_ids import current_job, sweep_id  # noqa: F401 (the stages' sweeps.current_job)

log = logging.getLogger("itdiffusion")

STATUS_FILE = "job_status.json"
SWEEP_FAILED_EXIT = 1
# Optuna's study.best_trial when no trial completed: the Optuna sweeper raises it after the last trial
OPTUNA_NO_TRIAL = "No trials are completed yet."
SEARCH_FAILED = ("every trial of the search failed, so it has no best parameters (each trial's error is "
                 "logged above and in its job_status.json)")


def job_group() -> str | None:
    """``sweep <sweep id>`` inside a multirun job (the results tables' group of a sweep's rows), else None."""
    return None if current_job() is None else f"sweep {sweep_id()}"


def write_status(run_dir: Path, job: tuple[int, list[str]], error: BaseException | None) -> None:
    """``job_status.json`` in the job's run dir: its number, overrides, ok/failed and the error message."""
    from itdiffusion.fsio import atomic_write_json

    record = {"job": job[0], "overrides": job[1], "status": "failed" if error else "ok", "time": time.time(),
              "error": None if error is None else f"{type(error).__name__}: {error}"}
    atomic_write_json(run_dir / STATUS_FILE, record)


def expected_jobs(config: DictConfig) -> int | None:
    """How many jobs the basic sweeper makes of this sweep's overrides (None for other sweepers)."""
    if "BasicSweeper" not in str(OmegaConf.select(config, "hydra.sweeper._target_", default="")):
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    return sum(len(batch) for batch in BasicSweeper.split_arguments(overrides, None))


def summarize(sweep_dir: Path, since: float, expected: int | None) -> tuple[list[dict], list[str]]:
    """The status records written since ``since`` below ``sweep_dir`` and one line per failed/missing job."""
    records = []
    for path in sorted(sweep_dir.glob(f"*/{STATUS_FILE}")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(record, dict) and record.get("time", 0) >= since:
            records.append({**record, "run_dir": str(path.parent)})
    problems = [f"job #{r['job']} ({' '.join(r['overrides']) or 'no overrides'}) failed: {r['error']} "
                f"(log: {r['run_dir']})" for r in records if r["status"] != "ok"]
    if expected is not None and len(records) < expected:
        seen = {r["job"] for r in records}
        missing = [str(n) for n in range(expected) if n not in seen]
        problems.append(f"job(s) #{', #'.join(missing)} left no status (killed, or failed before the stage "
                        f"started: see their logs under {sweep_dir})")
    return records, problems


def sweep_without_weights(config: DictConfig) -> str | None:
    """:func:`itdiffusion.weights_hint.missing_weights` of an evaluate sweep's config when no override
    sweeps the model or the ensemble (then every job would lack weights); else None."""
    if config.hydra.job.name != "evaluate":
        return None
    swept = [o for o in config.hydra.overrides.task
             if o.lstrip("+~").startswith(("model", "ensemble")) and "," in o.partition("=")[2]]
    if swept:
        return None
    from itdiffusion.weights_hint import missing_weights

    return missing_weights(config)


class SweepReport(Callback):
    """Hydra callback: at the end of a multirun, report failed jobs and exit 1 unless all succeeded."""

    def __init__(self) -> None:
        self.started = time.time()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time() - 1.0  # file times may be coarser than the clock
        problem = sweep_without_weights(config)
        if problem:  # every job would fail: say so once, before any job starts
            log.error("%s", problem)
            print(f"error: {problem}", file=sys.stderr, flush=True)
            sys.exit(2)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        records, problems = summarize(sweep_dir, self.started, expected_jobs(config))
        ok = sum(r["status"] == "ok" for r in records)
        if not problems:
            log.info("sweep %s: all %d job(s) succeeded", sweep_dir, ok)
            return
        for line in problems:
            log.error("%s", line)
        message = f"sweep {sweep_dir}: {ok} job(s) succeeded, {len(problems)} failed or missing"
        log.error("%s", message)
        print(message, file=sys.stderr)
        sys.exit(SWEEP_FAILED_EXIT)


def no_trial_succeeded(error: BaseException) -> bool:
    """Whether ``error`` is the Optuna sweeper's end of a search whose every trial failed."""
    return isinstance(error, ValueError) and str(error) == OPTUNA_NO_TRIAL


def expand(arguments: list[str]) -> list[list[str]]:
    """The jobs of a sweep as the basic sweeper makes them: ``["a=1,2", "b=x"]`` -> ``[["a=1", "b=x"],
    ["a=2", "b=x"]]`` (used by scripts/reproduce.sh to run the whole chain once per job)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(arguments)
    return [list(job) for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


if __name__ == "__main__":  # python -m itdiffusion.sweeps <overrides>: one shell-quoted job per line
    import shlex

    for job in expand(sys.argv[1:]):
        print(shlex.join(job))
