"""Run ids: the name of a stage run's dir, its results row and its wandb run.

A single process: ``ITD_RUN_ID``, else a timestamp plus a random suffix; torchrun ranks agree through the
rendezvous id, srun steps through SLURM's job and step ids. A Hydra multirun job: ``<sweep id>-<job
number>`` (:mod:`itdiffusion.sweeps`).
"""

from __future__ import annotations

import functools
import os
import secrets
import time


def current_job() -> tuple[int, list[str]] | None:
    """(job number, its overrides) when this process runs a job of a Hydra multirun, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return int(hydra_cfg.job.num), list(hydra_cfg.overrides.task)


def sweep_id() -> str:
    """This process's sweep id: ``ITD_SWEEP_ID``, else a new one (then exported as ``ITD_SWEEP_ID``)."""
    if not os.environ.get("ITD_SWEEP_ID"):
        os.environ["ITD_SWEEP_ID"] = process_run_id()
    return os.environ["ITD_SWEEP_ID"]


def job_run_id() -> str | None:
    """``<sweep id>-<job number>`` inside a multirun job, else None."""
    job = current_job()
    return None if job is None else f"{sweep_id()}-{job[0]}"


def default_run_id() -> str:
    """The run id when none is given: in a Hydra multirun job ``<sweep id>-<job number>``
    (:mod:`itdiffusion.sweeps`), else :func:`process_run_id`."""
    return job_run_id() or process_run_id()


@functools.cache
def process_run_id() -> str:
    """This process's run id: ``ITD_RUN_ID``, else one that every torchrun rank agrees on.

    A single process gets a timestamp plus a random suffix. Under ``torchrun --standalone`` the
    ranks share torchelastic's rendezvous id; other multi-process launches must pass ``run_id=...``
    (``scripts/reproduce.sh`` always does), since ranks cannot talk before Hydra picks the run dir.
    """
    if os.environ.get("ITD_RUN_ID"):
        return os.environ["ITD_RUN_ID"]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        rdzv = os.environ.get("TORCHELASTIC_RUN_ID", "none")
        if rdzv in ("", "none") and os.environ.get("SLURM_JOB_ID") and os.environ.get("SLURM_STEP_ID"):
            return f"slurm-{os.environ['SLURM_JOB_ID']}-{os.environ['SLURM_STEP_ID']}"  # srun: one step
        if rdzv in ("", "none"):
            raise ValueError("launched with several processes: pass run_id=<name> (or set ITD_RUN_ID) "
                             "so that all ranks write to one run dir")
        return "torchrun-" + rdzv.replace("-", "")[:12]
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)
