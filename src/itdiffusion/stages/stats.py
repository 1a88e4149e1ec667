"""Stage ``stats``: the Gaussian reference N(mu, Sigma) of the training set, cached on disk.

``python -m itdiffusion.stages.stats data=cifar10 data.stats_images=12500``

The reference (mean, eigen-decomposition of the covariance: full SVD, or diagonal with
``data.stats_diagonal=true``) of ``data.stats_images`` training images drawn without replacement
(seed ``data.seed``) gives the IT bound its baseline: entropy h_G (nats) and mmse_G(a). It is
cached atomically at ``<paths.cache_dir>/reference_<dataset key>_n<count>[_diag].pt`` and reused by
``evaluate`` and ``finetune`` through :func:`load_or_compute_reference`.

The cache is keyed by content, not by path: a cache file is used only when its record names the
same format version (:data:`CACHE_FORMAT`), settings (count, covariance, subset seed, image size) and
data fingerprint (:func:`data_fingerprint`: name, size, modification time and sha256 of every file the
training split is read from). Replacing ``train.npz`` (or any CIFAR-10 batch or image) at the same
path therefore recomputes the reference.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from itdiffusion import distributed
from itdiffusion.config import stage_config
from itdiffusion.data import dataset_key, load_images, random_subset, source_files, to_model_range
from itdiffusion.fsio import atomic_torch_save, atomic_write_json, file_lock
from itdiffusion.information import GaussianReference
from itdiffusion.stages import CONFIG_DIR, cli_entry, config_dict, launch, rank_zero_first, setup_device
from itdiffusion.tracking import Tracker
from itdiffusion.units import nats_to_bpd

log = logging.getLogger(__name__)

CACHE_FORMAT = "itdiffusion.gaussian_reference/2"  # /2: keyed by the data's content fingerprint
# (path, size, mtime, ctime, inode) -> sha256: each file hashed once per process (ctime changes on every
# write and cannot be set back, so a file rewritten with its old size and mtime is hashed again)
_FILE_SHA256: dict[tuple, str] = {}


def reference_cache_path(cfg: DictConfig) -> Path:
    """Where the reference of ``cfg.data`` with ``cfg.data.stats_images`` images is cached."""
    suffix = "_diag" if cfg.data.stats_diagonal else ""
    suffix += f"_seed{cfg.data.seed}" if cfg.data.seed else ""  # the subset drawn (seed 0: the old names)
    return (
        Path(cfg.paths.cache_dir) / f"reference_{dataset_key(cfg.data)}_n{cfg.data.stats_images}{suffix}.pt"
    )


def load_or_compute_reference(cfg: DictConfig, device: torch.device | str = "cpu") -> GaussianReference:
    """The Gaussian reference of the training set: read from the cache, or computed and cached.

    Safe under torchrun (rank 0 computes, the others then read) and across concurrent processes
    (a file lock around the compute-and-write). A cache file that cannot be read or was made for
    other settings is recomputed with a warning.
    """
    path = reference_cache_path(cfg)
    with rank_zero_first():
        reference = _read_cache(path, cfg)
        if reference is None:
            with file_lock(path.with_name(path.name + ".lock"), remove_on_error=True):
                reference = _read_cache(path, cfg)  # another process may have written it meanwhile
                if reference is None:
                    reference = compute_reference(cfg)
                    if distributed.is_main():
                        atomic_torch_save(path, _cache_record(cfg, reference))
                        log.info("cached the Gaussian reference at %s", path)
    return reference.to(device)


def compute_reference(cfg: DictConfig) -> GaussianReference:
    """``GaussianReference.from_data`` on a seeded random subset of the training images (in [-1, 1])."""
    train = load_images(cfg.data, "train", limit=False)  # data.num_train_images limits fine-tuning only
    images = random_subset(train, cfg.data.stats_images, seed=cfg.data.seed)
    log.info(
        "computing the Gaussian reference of %d training images (%s covariance)",
        len(images),
        "diagonal" if cfg.data.stats_diagonal else "full",
    )
    x = to_model_range(images, torch.float64)
    return GaussianReference.from_data(x, diagonal=cfg.data.stats_diagonal)


def _file_sha256(path: Path, st: os.stat_result) -> str:
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if key not in _FILE_SHA256:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        _FILE_SHA256[key] = h.hexdigest()
    return _FILE_SHA256[key]


def data_fingerprint(data_cfg) -> str:
    """sha256 over (relative name, size, mtime, sha256) of every file of the training split; for
    ``patches``, over the settings and scikit-image's version (the photos ship with it)."""
    files = source_files(data_cfg, "train")
    if files is None:
        import skimage

        entries: list = [dataset_key(data_cfg), skimage.__version__]
    else:
        entries = []
        for path in files:
            try:
                st = path.stat()
            except FileNotFoundError:
                entries.append([path.name, None])  # load_images reports the missing file
                continue
            entries.append([path.name, st.st_size, st.st_mtime_ns, _file_sha256(path, st)])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def _cache_identity(cfg: DictConfig) -> dict:
    """The fields that say which statistics a cache file holds: format, settings, data content."""
    return {
        "format": CACHE_FORMAT,
        "dataset_key": dataset_key(cfg.data),
        "stats_images": cfg.data.stats_images,
        "diagonal": cfg.data.stats_diagonal,
        "subset_seed": cfg.data.seed,
        "image_size": cfg.data.image_size,
        "data_fingerprint": data_fingerprint(cfg.data),
    }


def _cache_record(cfg: DictConfig, reference: GaussianReference) -> dict:
    return {**_cache_identity(cfg), "state_dict": reference.state_dict()}


def _read_cache(path: Path, cfg: DictConfig) -> GaussianReference | None:
    if not path.is_file():
        return None
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        log.warning("the reference cache %s is unreadable (%s); recomputing it", path, e)
        return None
    expected = _cache_identity(cfg)
    found = {k: record.get(k) for k in expected} if isinstance(record, dict) else None
    if found != expected:
        log.warning("the reference cache %s was made for %s, not %s; recomputing it", path, found, expected)
        return None
    return GaussianReference.from_state_dict(record["state_dict"])


def summarize_reference(reference: GaussianReference) -> dict:
    """Scalars that describe the reference: entropy (nats and bits/dim) and the log-SNR proposal."""
    loc, scale = reference.logsnr_loc_scale()
    eig = reference.eigvals.double()
    return {
        "dim": reference.dim,
        "entropy_nats": float(reference.entropy),
        "entropy_bpd": float(nats_to_bpd(float(reference.entropy), reference.dim)),
        "logsnr_loc": float(loc),
        "logsnr_scale": float(scale),
        "eigval_min": float(eig.min()),
        "eigval_max": float(eig.max()),
        "log_eigval_mean": float(eig.log().mean()),
    }


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Compute (or load) the reference and write ``stats.json`` into ``run_dir``."""
    setup_device(cfg)
    with Tracker(cfg.logger, stage_config(config_dict(cfg), "stats"), job_type="stats",
                 name=f"stats-{cfg.run_id}") as tracker:
        return _compute(cfg, run_dir, tracker)  # the run is live (console captured) while it computes


def _compute(cfg: DictConfig, run_dir: Path, tracker: Tracker) -> dict:
    reference = load_or_compute_reference(cfg)
    summary = {
        "run_id": cfg.run_id,
        "dataset_key": dataset_key(cfg.data),
        "stats_images": cfg.data.stats_images,
        "cache": str(reference_cache_path(cfg)),
        **summarize_reference(reference),
    }
    if distributed.is_main():
        atomic_write_json(run_dir / "stats.json", summary)
        tracker.summary(summary)
        log.info(
            "Gaussian reference: h_G = %.4f bits/dim (continuous), log-SNR loc %.3f scale %.3f",
            summary["entropy_bpd"],
            summary["logsnr_loc"],
            summary["logsnr_scale"],
        )
    return summary


@cli_entry
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    return launch(run, cfg)  # optimized_metric's value: an optimizing sweeper's objective


if __name__ == "__main__":
    main()
