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
import logging
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from itdiffusion import distributed, sweeps
from itdiffusion.config import register_configs
from itdiffusion.errors import UserError

log = logging.getLogger("itdiffusion")

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")  # shipped inside the package

register_configs()
distributed.adopt_slurm_env()  # srun without torchrun: ranks from SLURM's variables (before the run id)


def launch(stage: Callable[[DictConfig, Path], Any], cfg: DictConfig) -> None:
    """Run ``stage(cfg, run_dir)`` inside a Hydra job; exits with status 2 on a :class:`UserError`."""
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    job = sweeps.current_job()
    if job is not None:
        launch_sweep_job(stage, cfg, run_dir, job)
        return
    try:
        stage(cfg, run_dir)
    except UserError as e:
        log.error("%s", e)
        distributed.shutdown()
        sys.exit(2)
    distributed.shutdown()


def launch_sweep_job(stage: Callable[[DictConfig, Path], Any], cfg: DictConfig, run_dir: Path,
                     job: tuple[int, list[str]]) -> None:
    """One job of a Hydra multirun: a failure is logged (which job, why) and written to the job's
    ``job_status.json`` instead of ending the sweep; :class:`itdiffusion.sweeps.SweepReport` sums up."""
    from itdiffusion.training import Preempted

    try:
        stage(cfg, run_dir)
    except Preempted:
        raise  # SIGTERM: the whole sweep is being stopped
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
