"""torchrun / SLURM / DistributedDataParallel helpers.

Launch with ``torchrun --nproc_per_node=N -m itdiffusion.stages.<stage> ...``, or with SLURM's
``srun --ntasks=N python -m itdiffusion.stages.<stage> ...`` (one task per GPU): :func:`adopt_slurm_env`
maps ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS`` (or ``SLURM_NTASKS``) and ``SLURM_LOCALID`` to torch's
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``, and ``MASTER_ADDR`` (if not given) to the first host of
``SLURM_NODELIST`` (``MASTER_PORT``: given, else derived from ``SLURM_JOB_ID``). Without either (no
``WORLD_SIZE``) everything runs as a single process of rank 0. Backend: NCCL on CUDA, gloo on CPU.
Only rank 0 writes files and logs (:func:`is_main`, :func:`quiet_unless_main`).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import shutil
import subprocess

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0 of the process group; before (or without) one, the launcher's rank (torchrun's ``RANK``, or
    ``SLURM_PROCID`` through :func:`adopt_slurm_env`), so that a one-process stage started on every task
    of an ``srun`` step (the report on every node) writes and logs once."""
    return rank() == 0 if is_distributed() else int(os.environ.get("RANK", "0")) == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


SLURM_PROBLEM: str | None = None  # why an srun step could not be mapped to ranks (raised by init)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list: ``node[03-05,9],gpu1`` -> ``node03``; ``a,b`` -> ``a``."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot read the host list {nodelist!r}")
    prefix, ranges = match.groups()
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "")


def _master_addr(nodelist: str) -> str:
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return first_host(nodelist)


def adopt_slurm_env(env: dict | None = None) -> None:
    """Inside an ``srun`` step of several tasks not started by torchrun, set torch's rank variables from
    SLURM's (see the module docstring). A no-op elsewhere; sets :data:`SLURM_PROBLEM` when it cannot."""
    global SLURM_PROBLEM
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env or "RANK" in env or "SLURM_STEP_ID" not in env:
        return  # torchrun (or the user) set the ranks, or not an srun step (an sbatch script itself)
    ntasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1")
    if ntasks <= 1:
        return
    if "SLURM_PROCID" not in env or ("MASTER_ADDR" not in env and not env.get("SLURM_NODELIST")):
        SLURM_PROBLEM = (f"this srun step has {ntasks} tasks but SLURM_PROCID or SLURM_NODELIST is missing, "
                         "so the tasks cannot tell their ranks apart: set MASTER_ADDR and launch with "
                         "srun (one task per GPU) or torchrun (scripts/reproduce.sh, scripts/slurm.sbatch)")
        return
    try:
        master = env.get("MASTER_ADDR") or _master_addr(env["SLURM_NODELIST"])
    except ValueError as e:
        SLURM_PROBLEM = f"{e}: set MASTER_ADDR to the first node's address"
        return
    env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=str(ntasks), LOCAL_RANK=env.get("SLURM_LOCALID", "0"),
               MASTER_ADDR=master,
               MASTER_PORT=env.get("MASTER_PORT") or str(15000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))


def quiet_unless_main() -> None:
    """On every rank but the launcher's rank 0, show warnings and errors only (no info lines, no
    progress): one log per job however many tasks run the stage."""
    if int(os.environ.get("RANK", "0")) != 0:
        logging.disable(logging.INFO)


def resolve_device(requested: str = "auto") -> torch.device:
    """``auto`` -> this rank's GPU if CUDA is available, else CPU. ``cuda`` without a GPU is an error."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device={requested!r} was requested but no CUDA GPU is visible "
                "(torch.cuda.is_available() is False). Use device=cpu or device=auto."
            )
        if requested == "cuda":
            local, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
            if count == 1:
                return torch.device("cuda", 0)  # one GPU per task (srun --gpus-per-task=1)
            if local >= count:
                raise RuntimeError(f"local rank {local} but only {count} GPUs are visible: launch at most "
                                   f"{count} processes per node")
            return torch.device("cuda", local)
    return torch.device(requested)


def init(device: torch.device) -> None:
    """Initialise the process group when launched by torchrun or srun (idempotent)."""
    if SLURM_PROBLEM is not None:
        raise RuntimeError(SLURM_PROBLEM)
    if not launched_by_torchrun() or is_distributed():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))


def shutdown() -> None:
    if is_distributed():
        with contextlib.suppress(Exception):
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's ``obj`` (any picklable object) on every rank; ``obj`` itself for one process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard_indices(n: int) -> range:
    """The contiguous slice of ``range(n)`` this rank handles (ranks cover it exactly once)."""
    r, w = rank(), world_size()
    per = (n + w - 1) // w
    return range(min(r * per, n), min((r + 1) * per, n))


def all_gather_concat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a per-rank tensor (first dimension may differ between ranks) in rank order."""
    if not is_distributed():
        return t
    sizes = [torch.zeros(1, dtype=torch.long, device=t.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([t.shape[0]], device=t.device))
    sizes = [int(s.item()) for s in sizes]
    padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    out = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[:s] for o, s in zip(out, sizes, strict=True)])


def gather_to_main(obj):
    """Every rank's ``obj`` in rank order on rank 0 (a list), None elsewhere; ``[obj]`` for one process."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def on_main(fn):
    """``fn()`` on rank 0 (None elsewhere); a :class:`~itdiffusion.errors.UserError` raised there is raised
    on every rank, so the other ranks never wait for a rank 0 that has stopped."""
    from itdiffusion.errors import UserError

    result, error = None, None
    if is_main():
        try:
            result = fn()
        except UserError as e:
            error = e
    message = broadcast_object(None if error is None else str(error))
    if error is not None:
        raise error
    if message is not None:
        raise UserError(message)
    return result
