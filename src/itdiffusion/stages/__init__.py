"""Pipeline stages, one Hydra entry point each: ``python -m itdiffusion.stages.<stage> [overrides]``.

- ``stats``: the Gaussian reference of the training set (cached under ``paths.cache_dir``).
- ``evaluate``: VLB and IT bits/dim of one model (or an ensemble) on the test set.
- ``finetune``: IT (or IDDPM) training from a checkpoint, DDP under torchrun.
- ``report``: results tables and figures from every ``metrics.json``.

Each stage is a plain function ``run(cfg, run_dir)`` over the library, importable and testable
without Hydra; :func:`launch` wraps it for the command line: device and process-group setup, one
run dir (``hydra.run.dir``) shared by all torchrun ranks, and bad input reported as one clear
message (exit status 2) instead of a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from itdiffusion import config, distributed, preemption, sweeps
from itdiffusion.config import (
    CONFIG_DIR,
    STAGE_GROUPS,
    VALUE_RULES,
    Name,
    OneOf,
    Rule,
    check_values,
    dependency_problems,
    override_keys,
)
from itdiffusion.errors import Preempted, UserError
from itdiffusion.extras import check_extras
from itdiffusion.help import help_text
from itdiffusion.models import families
from itdiffusion.stages.output_dirs import (
    ENVIRONMENT_ERRNOS,
    check_output_dirs,
    check_writable_dir,
    environment_error,
)
from itdiffusion.stages.run_dir import created_by_this_process, remove_unused_run_dir
from itdiffusion.weights_hint import missing_weights

log = logging.getLogger("itdiffusion")


__all__ = ["CONFIG_DIR", "launch", "prepare_process", "register_configs", "value_rules"]


def value_rules() -> tuple[Rule, ...]:
    """:data:`itdiffusion.config.VALUE_RULES` and the registered families' kinds and objectives
    (:func:`itdiffusion.models.families.allowed_values`): every value check a stage makes at launch."""
    return VALUE_RULES + tuple(Rule(key, OneOf(values)) for key, values in families.allowed_values().items())


def register_configs() -> None:
    """The model families' plug-ins imported (:func:`itdiffusion.models.families.load_plugins`), then the
    schemas and resolvers in Hydra's ConfigStore (:func:`itdiffusion.config.register_configs`): what
    composing a config needs (tests and scripts that compose call it too)."""
    families.load_plugins()
    config.register_configs(families.model_schemas())
    if not OmegaConf.has_resolver("itd_help"):  # conf/config.yaml's hydra.help.template
        OmegaConf.register_new_resolver("itd_help", help_text)


def prepare_process() -> None:
    """What a stage's command line does before Hydra composes its config (never at import):
    :func:`register_configs`, and under srun without torchrun the ranks taken from SLURM's variables
    (before the run id is chosen)."""
    try:
        register_configs()
    except UserError as e:  # a plug-in that cannot be imported
        report_user_error(e)
        sys.exit(2)
    distributed.adopt_slurm_env()


def launch(stage: Callable[[DictConfig, Path], Any], cfg: DictConfig) -> float | None:
    """Run ``stage(cfg, run_dir)`` inside a Hydra job; exits with status 2 on a :class:`UserError`.

    Before the stage: :func:`check_launch` (values, keys that need another setting, the folders the
    stage writes). A :class:`UserError` prints one line (``error: ...``) on stderr, goes to the stage's
    log file too, and removes the run dir when this launch created it and it holds nothing but Hydra's
    files (:func:`remove_unused_run_dir`). Returns the number ``optimized_metric`` names in the stage's
    result (:func:`objective_value`; None without one): an optimizing sweeper's objective.
    """
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    distributed.quiet_unless_main()
    job = sweeps.current_job()
    if job is not None:
        return launch_sweep_job(stage, cfg, run_dir, job)
    created = created_by_this_process(run_dir)
    try:
        try:
            check_launch(cfg, stage, list(hydra_cfg.overrides.task))
            value = objective_value(cfg, stage(cfg, run_dir))
        except OSError as e:
            if e.errno not in ENVIRONMENT_ERRNOS:
                raise
            raise environment_error(e) from e
    except UserError as e:
        report_user_error(e)
        if created:
            remove_unused_run_dir(run_dir, hydra_cfg.job.name, cfg.paths.output_dir)
        distributed.shutdown()
        sys.exit(2)
    except Preempted as e:  # a stop signal: what was done is saved, the same command resumes
        log.warning("%s", e)
        distributed.shutdown()
        preemption.exit_preempted()
    distributed.shutdown()
    return value


def objective_value(cfg: DictConfig, result: Any) -> float | None:
    """The number named ``optimized_metric`` in a stage's result (finetune: its ``finetune.json`` summary,
    e.g. ``final_heldout_loss_bpd``; evaluate: its metrics.json, e.g. ``it_continuous_bpd_stderr``); None
    without ``optimized_metric`` and on ranks other than 0 (only rank 0 holds the result)."""
    name = cfg.get("optimized_metric")
    if name is None or not distributed.is_main():
        return None
    value = result.get(name) if isinstance(result, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        numbers = sorted(k for k, v in (result or {}).items()
                         if isinstance(v, int | float) and not isinstance(v, bool))
        raise UserError(f"optimized_metric={name}: the stage's result has no number by that name "
                        f"(its numbers: {', '.join(numbers) or 'none'})")
    return float(value)


def cli_entry(hydra_main: Callable[[], Any]) -> Callable[[], Any]:
    """A stage's console entry point: ``hydra_main`` (the ``@hydra.main`` function) after the command line's
    launcher and sweeper choices are checked for their extras (:func:`itdiffusion.extras.check_extras`:
    one line and exit 2 instead of Hydra's "Could not load ..."); a command line that Hydra cannot compose
    into a config (a mistyped key, a value of the wrong type, an unknown config name) is one line and exit 2
    too, before anything is created."""

    @functools.wraps(hydra_main)
    def main() -> Any:
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        try:
            check_extras(sys.argv[1:])
        except UserError as e:
            report_user_error(e)
            sys.exit(2)
        prepare_process()
        os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # Hydra re-raises instead of printing a report
        try:
            return hydra_main()
        except (HydraException, OmegaConfBaseException) as e:
            if _composed:
                raise
            report_user_error(UserError(_one_line(e)))  # a command line Hydra cannot compose: one line
            sys.exit(2)
        except ValueError as e:  # an Optuna search whose every trial failed (each one logged as it failed)
            if not sweeps.no_trial_succeeded(e):
                raise
            print(f"error: {sweeps.SEARCH_FAILED}", file=sys.stderr, flush=True)
            sys.exit(sweeps.SWEEP_FAILED_EXIT)

    return main


def check_launch(cfg: DictConfig, stage: Callable, overrides: list[str]) -> None:
    """Before a stage runs: every value (:func:`itdiffusion.config.check_values`), every key the command line
    sets that only matters under another setting (:data:`itdiffusion.config.DEPENDENT_KEYS`, in the groups
    the stage reads), the folders it writes (:func:`check_output_dirs`) and an evaluation's weights
    (:func:`itdiffusion.weights_hint.missing_weights`); a UserError names what to fix."""
    name = stage_name(stage)
    check_values(cfg, rules=value_rules())
    problems = dependency_problems(cfg, override_keys(overrides), STAGE_GROUPS.get(name))
    if problems:
        raise UserError("; ".join(problems))
    check_output_dirs(cfg, name)
    if name == "evaluate" and (problem := missing_weights(cfg)):
        raise UserError(problem)


def stage_name(stage: Callable) -> str:
    """``evaluate`` for :func:`itdiffusion.stages.evaluate.run` (its module's file: ``__main__`` under -m)."""
    return Path(inspect.getfile(stage)).stem


def report_user_error(error: UserError) -> None:
    """``error: <message>`` on stderr (rank 0 only) and in the log files (Hydra's ``<stage>.log``)."""
    if _env_rank() == 0:
        print(f"error: {error}", file=sys.stderr, flush=True)
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (error,), None)
    logger: logging.Logger | None = log
    while logger is not None:  # the file handlers of this logger and its ancestors (not the console)
        for handler in logger.handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
        logger = logger.parent if logger.propagate else None


_composed = False  # Hydra composed the config: later errors are not the command line's (see cli)


def _one_line(error: BaseException) -> str:
    """Hydra's message and its cause's first line, without Hydra's advice to append with ``+``."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("To append to your config use")]
    cause = error.__cause__
    if cause is not None and str(cause).strip():
        first = str(cause).strip().splitlines()[0]
        lines += [first] if first not in lines else []
    return " ".join(lines)


class LaunchCheck(Callback):
    """Hydra callback: before Hydra creates the run dir, every value is checked
    (:func:`itdiffusion.config.check_values`: run ids and folder names included, so no name leads outside
    its folder) and so are the folders the stage writes, the run dir's among them (a file in the way, a
    read-only or full disk). A problem is one line on stderr and exit status 2, with nothing created."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _composed
        _composed = True  # each job checks its own values (launch_sweep_job)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _composed
        _composed = True
        try:
            check_before_run_dir(config)
        except UserError as e:
            report_user_error(e)
            _log_in_earlier_run_dir(config, e)
            sys.exit(2)


def _log_in_earlier_run_dir(config: DictConfig, error: UserError) -> None:
    """Append the error to the stage's log in the run dir when that dir exists already (an earlier run's), as
    Hydra's logging would once the stage runs; a refused launch creates no dir."""
    with contextlib.suppress(Exception):
        run_dir = Path(str(config.hydra.run.dir))
        if Name().allows(config.run_id) and run_dir.is_dir():  # never a folder a bad name points at
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            with open(run_dir / f"{config.hydra.job.name}.log", "a") as f:
                f.write(f"[{stamp}][{log.name}][ERROR] - {error}\n")


def check_before_run_dir(config: DictConfig) -> None:
    """What :class:`LaunchCheck` checks of a config composed with its ``hydra`` node (UserError)."""
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(config)  # ${hydra:job.name} in the run dir
    check_values(config, rules=value_rules())
    check_writable_dir(str(config.hydra.run.dir), "paths.output_dir (the run dir)")
    check_output_dirs(config, str(config.hydra.job.name))


def _env_rank() -> int:
    """This process's rank from torchrun's environment (the process group may not exist yet)."""
    return int(os.environ.get("RANK", "0"))


def launch_sweep_job(stage: Callable[[DictConfig, Path], Any], cfg: DictConfig, run_dir: Path,
                     job: tuple[int, list[str]]) -> float | None:
    """One job of a Hydra multirun: a failure is logged (which job, why) and written to the job's
    ``job_status.json`` instead of ending the sweep; :class:`itdiffusion.sweeps.SweepReport` sums up.
    Returns :func:`objective_value` (None for a failed job: an optimizing sweeper marks its trial failed)."""
    from hydra.core.hydra_config import HydraConfig

    value = None
    try:
        check_launch(cfg, stage, list(HydraConfig.get().overrides.task))
        value = objective_value(cfg, stage(cfg, run_dir))
    except Preempted as e:  # a stop signal: no job status, no result; SLURM or submitit requeues the job
        log.warning("sweep job #%d (%s): %s", job[0], " ".join(job[1]), e)
        distributed.shutdown()
        preemption.exit_preempted()
    except Exception as e:
        if isinstance(e, UserError):
            log.error("sweep job #%d (%s) failed: %s", job[0], " ".join(job[1]), e)
        else:
            log.exception("sweep job #%d (%s) failed", job[0], " ".join(job[1]))
        sweeps.write_status(run_dir, job, e)
    else:
        if distributed.is_main():
            sweeps.write_status(run_dir, job, None)
    distributed.shutdown()
    return value


def setup_device(cfg: DictConfig) -> torch.device:
    """Resolve ``cfg.device`` and join the torchrun process group (a no-op for one process)."""
    try:
        device = distributed.resolve_device(cfg.device)
    except RuntimeError as e:  # a GPU was requested where none exists
        raise UserError(str(e)) from e
    try:
        distributed.init(device)
    except RuntimeError as e:
        if distributed.SLURM_PROBLEM is None:
            raise
        raise UserError(str(e)) from e
    return device


@contextlib.contextmanager
def rank_zero_first() -> Iterator[None]:
    """Rank 0 runs the block first (downloads, caches), the other ranks after it finished."""
    if not distributed.is_main():
        distributed.barrier()
    yield
    if distributed.is_main():
        distributed.barrier()


def git_commit() -> str | None:
    """The commit of the source tree (with ``+dirty`` for uncommitted changes); None outside a git
    checkout, e.g. for an installed wheel (whose folder may lie inside some unrelated repository)."""
    package = Path(__file__).resolve().parents[1]
    root = package.parents[1]
    if package.parent.name != "src" or not (root / "pyproject.toml").is_file():
        return None
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def config_dict(cfg: DictConfig) -> dict:
    """The resolved config as plain containers (for metrics.json and wandb)."""
    return OmegaConf.to_container(cfg, resolve=True)
