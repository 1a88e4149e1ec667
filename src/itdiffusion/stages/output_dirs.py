"""The folders a stage writes, checked before it runs (writable, with free space), and a write the
environment refused (disk full, read-only) as one line."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from itdiffusion.errors import UserError

# Folders each stage writes into (besides its Hydra run dir), checked before it runs: (key, path).
# The cache dir is left out for evaluate and finetune: they write there only when the reference is
# missing, and a read-only cache that holds it is fine.
STAGE_OUTPUT_DIRS: dict[str, Callable[[DictConfig], list[tuple[str, str]]]] = {
    "stats": lambda cfg: [("paths.cache_dir", cfg.paths.cache_dir)],
    "evaluate": lambda cfg: [("paths.results_dir", cfg.paths.results_dir)],
    "finetune": lambda cfg: [
        ("paths.checkpoint_dir", str(Path(cfg.paths.checkpoint_dir) / "finetune" / cfg.finetune.run_name))
    ],
    "report": lambda cfg: [("paths.results_dir", cfg.paths.results_dir)],
}


def check_output_dirs(cfg: DictConfig, stage_name: str) -> None:
    """:func:`check_writable_dir` for each folder that the stage ``stage_name`` writes."""
    for key, path in STAGE_OUTPUT_DIRS.get(stage_name, lambda _: [])(cfg):
        check_writable_dir(path, key)


# A folder a stage writes into needs this much free space at launch (a full disk fails at once, not after the
# work); a disk that fills up during the work still ends in one line (environment_error).
MIN_FREE_BYTES = 64 * 2**20
# OSErrors of the environment rather than of the code: one line (exit 2) instead of a traceback
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                                errno.ENOTDIR, errno.EISDIR, errno.EFBIG})


def check_writable_dir(path: str | Path, key: str) -> None:
    """UserError unless ``path`` is a writable folder with :data:`MIN_FREE_BYTES` free, or does not exist yet
    and can be created (its nearest existing parent is such a folder). Creates nothing."""
    path = Path(path)
    target = path
    while not target.exists() and target != target.parent:
        target = target.parent
    where = f"{key}: {path}" + ("" if target == path else f" cannot be created: {target}")
    if not target.is_dir():
        raise UserError(f"{where} is not a directory")
    if not os.access(target, os.W_OK | os.X_OK) or _read_only_mount(target):
        raise UserError(f"{where} is not writable")
    free = shutil.disk_usage(target).free
    if free < MIN_FREE_BYTES:
        raise UserError(f"{where}: only {free / 2**20:.1f} MiB free on its disk (a stage needs at least "
                        f"{MIN_FREE_BYTES // 2**20} MiB): free some space or point {key} elsewhere")


def _read_only_mount(path: Path) -> bool:
    """Whether ``path`` lies on a file system mounted read-only (os.access says writable to root there)."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def environment_error(error: OSError) -> UserError:
    """A write that the environment refused (disk full, read-only, a file where a folder belongs) as one line:
    what, where, and what to do."""
    where = f" ({error.filename})" if error.filename else ""
    return UserError(f"{error.strerror or error}{where}: free space on that disk, make the folder writable, "
                     "or point paths.* elsewhere, then rerun (finished work is kept where the stage resumes)")
