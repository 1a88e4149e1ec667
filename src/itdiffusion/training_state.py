"""Training checkpoints: an exact, crash-safe record of a fine-tuning run.

A run directory ``checkpoints/finetune/<run>/`` holds

- ``last.pt``: the newest training state (rewritten every ``save_every_steps`` and every epoch),
- ``epoch_XXX.pt``: the state at the end of epoch XXX (0-based); only the newest ``finetune.keep_epochs``
  of them are kept (:func:`prune_epoch_checkpoints`),
- ``model.pt`` (and ``ema.pt``): plain U-Net state_dicts exported when training finishes, loadable
  like an official IDDPM checkpoint,
- ``loss_curve.json``: the train / held-out loss curve.

A training state is a dict with the model, optimizer, LR schedule, EMA, the RNG states of every
process, the position in the data order, the step counter and the config (see
:func:`itdiffusion.training.Trainer`). Every file is written atomically (:mod:`itdiffusion.fsio`), so
a crash leaves either the old file or the new one. A file damaged some other way (an older crash,
a full disk, a copy cut short) fails validation on load, and :func:`find_resume_checkpoint` falls
back to the newest readable checkpoint with a warning.

RNG states are stored as tensors and plain numbers, so checkpoints load with
``torch.load(weights_only=True)``: no pickled code runs when resuming.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import random
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from itdiffusion.errors import CheckpointError
from itdiffusion.fsio import atomic_torch_save, atomic_write_bytes

FORMAT = "itdiffusion.finetune"
VERSION = 1
LAST = "last.pt"
EXPORTED_MODEL = "model.pt"
EXPORTED_EMA = "ema.pt"
_EPOCH_RE = re.compile(r"^epoch_(\d+)\.pt$")
_REQUIRED_KEYS = ("format", "version", "model", "optimizer", "scheduler", "rng", "progress", "config")



def epoch_checkpoint_name(epoch: int) -> str:
    return f"epoch_{epoch:03d}.pt"


# ----------------------------------------------------------------------------------------------
# RNG streams
# ----------------------------------------------------------------------------------------------
def capture_rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """The global RNG streams of this process: torch CPU, CUDA (``device``), numpy, Python ``random``."""
    # numpy's legacy global stream is recorded because library code (improved-diffusion) draws from it
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()  # noqa: NPY002
    py_version, py_internal, py_gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "python": {"version": py_version, "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss_next": py_gauss_next},
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np_keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state((np_state["name"], np_keys, np_state["pos"],  # noqa: NPY002
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    py_state = state["python"]
    random.setstate((py_state["version"], tuple(py_state["internal"].tolist()), py_state["gauss_next"]))
    if device is not None and device.type == "cuda":
        if "cuda" not in state:
            raise CheckpointError("the checkpoint was written on CPU and holds no CUDA RNG state")
        torch.cuda.set_rng_state(state["cuda"], device)


# ----------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------
def serialize(state: dict[str, Any]) -> bytes:
    """A training state as bytes (``torch.save``); tagged with the format and version."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **state}, buf)
    return buf.getvalue()


def save_training_state(run_dir: Path, data: bytes, epoch_end: int | None = None,
                        keep_epochs: int = -1) -> None:
    """Write serialized state to ``last.pt`` (and first to ``epoch_XXX.pt`` at the end of an epoch), then
    keep only the newest ``keep_epochs`` epoch files (:func:`prune_epoch_checkpoints`).

    The epoch file is written first: a crash in between leaves an older ``last.pt``, from which the
    run resumes and rewrites both, never a ``last.pt`` newer than a missing epoch file. Pruning comes
    last, once ``last.pt`` (what a resume reads) holds this state.
    """
    if epoch_end is not None and keep_epochs != 0:
        atomic_write_bytes(run_dir / epoch_checkpoint_name(epoch_end), data)
    atomic_write_bytes(run_dir / LAST, data)
    prune_epoch_checkpoints(run_dir, keep_epochs)


def epoch_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """``(epoch, path)`` of every ``epoch_XXX.pt`` in ``run_dir``, newest epoch first."""
    return sorted(
        ((int(m.group(1)), p) for p in run_dir.glob("epoch_*.pt") if (m := _EPOCH_RE.match(p.name))),
        reverse=True,
    )


def prune_epoch_checkpoints(run_dir: Path, keep_epochs: int) -> list[Path]:
    """Delete all but the newest ``keep_epochs`` epoch files (-1: keep all; 0: none); returns those deleted.

    ``last.pt``, ``model.pt`` and ``ema.pt`` are never touched: a resume reads ``last.pt`` (the epoch files
    are only its fallback when it is damaged), so no pruning can take what a resume needs.
    """
    if keep_epochs < 0:
        return []
    stale = [p for _, p in epoch_checkpoints(run_dir)[keep_epochs:]]
    for p in stale:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return stale


def load_training_state(path: Path) -> dict[str, Any]:
    """Load and validate one checkpoint; :class:`CheckpointError` if it is damaged or foreign."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError / EOFError / UnpicklingError on damaged files
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an itdiffusion fine-tuning checkpoint")
    if state["version"] != VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {state['version']}, expected {VERSION}")
    missing = [k for k in _REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {missing}")
    return state


def checkpoint_candidates(run_dir: Path) -> list[Path]:
    """Checkpoints to resume from, newest first: ``last.pt``, then epoch files by epoch, descending."""
    last = [run_dir / LAST] if (run_dir / LAST).exists() else []
    return last + [p for _, p in epoch_checkpoints(run_dir)]


def find_resume_checkpoint(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable checkpoint in ``run_dir`` and its state; ``None`` for a fresh run.

    Damaged checkpoints are skipped with a warning naming the file. If checkpoints exist but none
    is readable, resuming is impossible without losing the run, so this raises instead of silently
    starting over.
    """
    candidates = checkpoint_candidates(run_dir)
    damaged = []
    for path in candidates:
        try:
            state = load_training_state(path)
        except CheckpointError as e:
            warnings.warn(f"skipping damaged checkpoint: {e}", stacklevel=2)
            damaged.append(path)
            continue
        if damaged:
            warnings.warn(f"resuming from the previous good checkpoint {path}", stacklevel=2)
        return path, state
    if damaged:
        raise CheckpointError(
            f"no readable checkpoint in {run_dir} (damaged: {', '.join(p.name for p in damaged)}). "
            f"Move the run directory away to start over, or set finetune.run_name to a new name."
        )
    return None


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete temporary files left by writes that a SIGKILL interrupted (``.<name>.*.tmp``)."""
    stale = [p for p in run_dir.glob(".*.tmp") if p.is_file()]
    for p in stale:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return stale


def export_state_dict(path: Path, state_dict: dict[str, torch.Tensor]) -> Path:
    """Write a plain model state_dict (CPU tensors), loadable like an official IDDPM checkpoint."""
    return atomic_torch_save(path, {k: v.detach().cpu() for k, v in state_dict.items()})


@contextlib.contextmanager
def exclusive_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold a non-blocking lock on ``run_dir/.lock`` so two processes never train the same run.

    The kernel drops the lock when the holder dies (SIGKILL included), so a restart after a crash
    never finds a stale lock.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CheckpointError(
                f"another process is training in {run_dir} (it holds {run_dir / '.lock'}); "
                "wait for it to finish or set finetune.run_name to a new name"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)

