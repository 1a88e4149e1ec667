"""torchrun / DistributedDataParallel helpers.

Launch with ``torchrun --nproc_per_node=N -m itdiffusion.stages.<stage> ...``. Without torchrun
(no ``WORLD_SIZE`` in the environment) everything runs as a single process of rank 0.
Backend: NCCL on CUDA, gloo on CPU. Only rank 0 writes files and logs (:func:`is_main`).
"""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


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
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(requested)


def init(device: torch.device) -> None:
    """Initialise the process group when launched by torchrun (idempotent)."""
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
