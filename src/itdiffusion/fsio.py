"""Crash-safe file output: atomic writes and an inter-process file lock.

Every artifact the pipeline writes (checkpoints, caches, npz, metrics.json, results tables) goes
through :func:`atomic_write`: the bytes go to a temporary file in the same folder, are fsync'ed,
and are renamed over the target, so a reader sees either the old file or the whole new one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Write a file atomically: ``write(f)`` fills a temporary file which then replaces ``path``.

    The file gets the usual permissions (0666 less the umask), not mkstemp's private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None and e.errno is not None:  # a write: name the file
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-inf) replaced by None, so it is valid JSON.

    Writers whose readers must know a value was non-finite add a flag key next to it."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v) for v in obj]
    return obj


def json_text(obj: Any) -> str:
    """``obj`` as JSON text (strict: non-finite floats become null, see :func:`finite_json`)."""
    return json.dumps(finite_json(obj), indent=2, sort_keys=True, default=str, allow_nan=False) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON (:func:`json_text`)."""
    return atomic_write_text(path, json_text(obj))


def atomic_write_many(texts: dict[Path, str]) -> None:
    """Replace several files together: every text goes to a temporary file first (fsync'ed), and only when
    all are written are they renamed over their targets. A failed write (a full disk) leaves every target
    as it was and no temporary file behind."""
    temps: list[tuple[str, Path]] = []
    try:
        for path, text in texts.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            temps.append((tmp, path))
            os.fchmod(fd, 0o666 & ~_umask())
            with os.fdopen(fd, "wb") as f:
                f.write(text.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in temps:
            os.replace(tmp, path)
    except BaseException as e:
        for tmp, _ in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None and e.errno is not None and temps:
            raise OSError(e.errno, e.strerror, str(temps[-1][1])) from e
        raise
    for folder in {path.parent for _, path in temps}:
        _fsync_dir(folder)


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    import torch

    def write(f: IO[bytes]) -> None:
        buf = io.BytesIO()
        torch.save(obj, buf)
        f.write(buf.getbuffer())

    return atomic_write(path, write)


def atomic_savez(path: str | os.PathLike, **arrays: Any) -> Path:
    import numpy as np

    def write(f: IO[bytes]) -> None:
        np.savez(f, **arrays)

    return atomic_write(path, write)


_FLOCK_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
_warned_no_flock = False
SOFT_LOCK_TIMEOUT_S = 3600.0  # a lock file left by a killed process is never released: give up after this


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, remove_on_error: bool = False) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (created if missing) for read-modify-write sections.

    ``remove_on_error``: delete the lock file (and its folder, if this call created it and it is empty)
    when the section raises, so a failed first download leaves nothing behind. Only for sections that
    check again and write atomically: a process already waiting then holds a lock on the deleted file.

    Where the filesystem does not support ``flock`` (Lustre or NFS mounted without it: ENOLCK,
    EOPNOTSUPP), the lock falls back, with one warning per process, to ``filelock``'s lock file
    ``<path>.soft`` (atomic creation; safe between processes that share the filesystem).
    """
    path = Path(path)
    new_folder = not path.parent.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _locked(path):
            yield
    except BaseException:
        if remove_on_error:
            with contextlib.suppress(OSError):
                path.unlink()
            if new_folder:
                with contextlib.suppress(OSError):
                    path.parent.rmdir()
        raise


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in _FLOCK_UNSUPPORTED:
                raise
            with _soft_lock(path, e):
                yield
            return
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _soft_lock(path: Path, error: OSError) -> Iterator[None]:
    import filelock

    global _warned_no_flock
    if not _warned_no_flock:
        _warned_no_flock = True
        warnings.warn(f"flock is not supported on the filesystem of {path} ({error.strerror}); using "
                      "lock files (filelock.SoftFileLock) instead", RuntimeWarning, stacklevel=3)
    soft = str(path) + ".soft"
    try:
        with filelock.SoftFileLock(soft, timeout=SOFT_LOCK_TIMEOUT_S):
            yield
    except filelock.Timeout as e:
        raise TimeoutError(f"waited {SOFT_LOCK_TIMEOUT_S:.0f} s for the lock file {soft}: if no other "
                           "process of this pipeline runs, a killed one left it behind; delete it") from e
