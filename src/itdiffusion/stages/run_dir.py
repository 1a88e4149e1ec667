"""A stage's Hydra run dir (``hydra.run.dir``): whether this launch created it, and its removal when a
refused launch left nothing in it but Hydra's own files, so bad input leaves no empty run dirs."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

HYDRA_SUBDIR = ".hydra"


def remove_unused_run_dir(run_dir: Path, job_name: str, output_dir: str | Path) -> bool:
    """Remove ``run_dir`` if it holds nothing but Hydra's files (``.hydra/``, ``<job_name>.log``), then its
    empty parents below ``output_dir``. Returns whether it was removed; a dir with outputs is kept."""
    try:
        entries = {p.name for p in run_dir.iterdir()}
    except OSError:
        return False
    if not entries <= {HYDRA_SUBDIR, f"{job_name}.log"}:
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    root = Path(output_dir).resolve()
    parent = run_dir.resolve().parent
    while parent != root and root in parent.parents:
        try:
            parent.rmdir()  # only while empty
        except OSError:
            break
        parent = parent.parent
    return not run_dir.exists()


PROCESS_START = time.time()  # before hydra.main creates the run dir (itdiffusion.stages imports this module)


def created_by_this_process(run_dir: Path) -> bool:
    """Whether ``run_dir``'s entries were made since this process started (Hydra made the dir, or added
    ``.hydra/`` and the log to an empty one): a dir of an earlier run keeps its old modification time."""
    try:
        return run_dir.stat().st_mtime >= PROCESS_START - 1.0  # 1 s: coarse file-system clocks
    except OSError:
        return False
