"""Resumable evaluation: the finished chunks of an evaluation, kept until the run dir is committed.

Each chunk of test images that a rank finishes is written atomically to
``<run dir>/partial/chunk_<start>_<stop>.npz`` (:func:`itdiffusion.artifacts.write_per_image` with float64
curves), beside ``settings.json``, the fingerprint of everything that decides the numbers (model, data,
estimator, checkpoints' sha256, log-SNR proposal, the U-Net's fast path). A rerun of the same command reads
the chunks it finds and evaluates the rest; the result is identical to an uninterrupted run, since every
image's draws come from its own seeds. Chunks are global (``range(0, N, chunk)``, dealt to ranks in turn),
so a rerun with another number of processes reuses them too. Partial files of other settings are deleted
with a warning. SIGTERM (or submitit's signal) finishes and keeps the chunk in progress, then stops the
stage (:class:`~itdiffusion.errors.Preempted`, :mod:`itdiffusion.preemption`).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from itdiffusion import distributed
from itdiffusion.artifacts import ArtifactError, PerImage, read_per_image, write_per_image
from itdiffusion.fsio import atomic_write_json

log = logging.getLogger(__name__)

PARTIAL = "partial"
SETTINGS = "settings.json"


class Partial:
    """The chunk files of one evaluation under ``<run_dir>/partial`` for the settings ``fingerprint``."""

    def __init__(self, run_dir: Path, fingerprint: dict):
        self.folder = Path(run_dir) / PARTIAL
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))

    def open(self) -> None:
        """Rank 0 drops chunks of other settings and records these; every rank waits for it."""
        if distributed.is_main():
            stored = self._stored_fingerprint()
            if stored is not None and stored != self.fingerprint:
                changed = sorted(k for k in set(stored) | set(self.fingerprint)
                                 if stored.get(k) != self.fingerprint.get(k))
                log.warning("%s holds chunks evaluated with other settings (%s): evaluating again",
                            self.folder, ", ".join(changed))
                discard(self.folder.parent)
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.folder / SETTINGS, self.fingerprint)
        distributed.barrier()

    def load(self, start: int, stop: int) -> PerImage | None:
        path = self._path(start, stop)
        if not path.is_file():
            return None
        try:
            return read_per_image(path)
        except ArtifactError as e:  # a chunk cut short: evaluate it again
            log.warning("ignoring %s", e)
            return None

    def save(self, start: int, stop: int, part: PerImage) -> None:
        write_per_image(self._path(start, stop), part, exact=True)

    def _path(self, start: int, stop: int) -> Path:
        return self.folder / f"chunk_{start:07d}_{stop:07d}.npz"

    def _stored_fingerprint(self) -> dict | None:
        try:
            return json.loads((self.folder / SETTINGS).read_text())
        except (OSError, ValueError):
            return None


def discard(run_dir: Path) -> None:
    """Remove the finished chunks of a run dir once its ``per_image.npz`` holds them (or they are stale)."""
    shutil.rmtree(Path(run_dir) / PARTIAL, ignore_errors=True)
