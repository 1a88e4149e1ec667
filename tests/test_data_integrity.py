"""Data that is read safely or refused clearly: CIFAR-10 batches never run code (whatever data.verify
says), the Gaussian-reference cache follows the data's content, a truncated npz is one clear error."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from conftest import random_images, write_cifar_pickles
from itdiffusion import cifar10_files
from itdiffusion.data import load_images
from itdiffusion.errors import DatasetError
from itdiffusion.stages import stats


class _Py2Pickler(pickle._Pickler):
    """Writes bytes and str as Python 2 ``str`` (BINSTRING), as the official CIFAR-10 files hold them."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def write_py2_batch(path: Path, images: np.ndarray) -> None:
    """A batch in the official layout: protocol 2, byte-string keys, numpy 1's module name."""
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    record = {b"batch_label": b"training batch 1 of 5", b"labels": [3] * len(images), b"data": rows,
              b"filenames": [b"img_%d.png" % i for i in range(len(images))]}
    buf = __import__("io").BytesIO()
    _Py2Pickler(buf, protocol=2).dump(record)
    path.write_bytes(buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))


def test_a_batch_in_the_official_python2_format_loads(tmp_path):
    images = random_images(7, seed=3)
    write_py2_batch(tmp_path / "data_batch_1", images)
    assert b"cnumpy.core.multiarray\n_reconstruct" in (tmp_path / "data_batch_1").read_bytes()
    np.testing.assert_array_equal(cifar10_files.read_batch(tmp_path / "data_batch_1"), images)


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("verify", ["false", "true"])
def test_a_crafted_batch_runs_no_code_and_is_refused(tmp_path, make_cfg, verify):
    folder = write_cifar_pickles(tmp_path / "data" / "cifar10", random_images(10, seed=1), random_images(5))
    marker = tmp_path / "code_ran"
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": _RunsCode(marker), "labels": [0]}, f)
    with open(folder / "test_batch", "rb") as f:  # the file is a real threat: plain pickle runs it
        pickle.load(f)  # noqa: S301
    assert marker.exists()
    marker.unlink()

    cfg = make_cfg("data=cifar10", f"data.verify={verify}")
    expected = "global posix.system is not allowed" if verify == "false" else "md5"
    with pytest.raises(DatasetError, match=expected):
        load_images(cfg.data, "test")
    if verify == "true":  # the md5 check refuses first; the reader refuses on its own too
        with pytest.raises(DatasetError, match="is not a CIFAR-10 python batch .*nothing in it was run"):
            cifar10_files.read_batch(folder / "test_batch")
    assert not marker.exists()


def test_a_batch_without_uint8_rows_is_refused(tmp_path):
    with open(tmp_path / "b", "wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), np.float32), "labels": [0, 0]}, f)
    with pytest.raises(DatasetError, match=r"'data' must be uint8 \[N, 3072\], found float32 \(2, 3072\)"):
        cifar10_files.read_batch(tmp_path / "b")


def write_npz(root: Path, train: np.ndarray, test: np.ndarray) -> None:
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "train.npz", x=train)
    np.savez(root / "test.npz", x=test)


def test_replacing_train_npz_at_the_same_path_recomputes_the_reference(tmp_path, make_cfg):
    root = tmp_path / "data" / "npz"
    args = ("data=npz", f"data.root={root}", "data.stats_diagonal=true", "data.stats_images=16")
    write_npz(root, random_images(16, seed=1), random_images(4, seed=2))
    cfg = make_cfg(*args)
    first = stats.load_or_compute_reference(cfg)

    # other images at the same path; same size, and the old modification time restored
    stat = (root / "train.npz").stat()
    bright = np.clip(random_images(16, seed=5).astype(int) // 4 + 190, 0, 255).astype(np.uint8)
    write_npz(root, bright, random_images(4, seed=2))
    assert (root / "train.npz").stat().st_size == stat.st_size
    os.utime(root / "train.npz", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = stats.load_or_compute_reference(make_cfg(*args))

    x = bright.transpose(0, 3, 1, 2).reshape(16, -1).astype(np.float64) / 127.5 - 1
    np.testing.assert_allclose(second.mean.numpy(), x.mean(0), atol=1e-12)  # ground truth: the new images
    assert not np.allclose(second.mean.numpy(), first.mean.numpy())
    assert stats.reference_cache_path(cfg).is_file()


def test_reference_cache_identity_includes_the_subset_seed(tmp_path, make_cfg):
    root = tmp_path / "data" / "npz"
    write_npz(root, random_images(20, seed=1), random_images(4, seed=2))
    args = ("data=npz", f"data.root={root}", "data.stats_diagonal=true", "data.stats_images=8")
    a = stats.load_or_compute_reference(make_cfg(*args))
    b = stats.load_or_compute_reference(make_cfg(*args, "data.seed=1"))
    assert not np.allclose(a.mean.numpy(), b.mean.numpy())


def test_a_truncated_npz_dataset_is_one_clear_error(tmp_path, make_cfg):
    root = tmp_path / "data" / "npz"
    write_npz(root, random_images(20, seed=1), random_images(4, seed=2))
    data = (root / "train.npz").read_bytes()
    (root / "train.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"cannot read .*train.npz: BadZipFile: .*truncated or not an npz"):
        load_images(make_cfg("data=npz", f"data.root={root}").data, "train")
