"""CIFAR-10's python batch files, read without running any code they might contain.

The official files (``cifar-10-batches-py/data_batch_1..5``, ``test_batch``) are Python 2 pickles of
``{"data": uint8 [10000, 3072] (R plane, G plane, B plane of each 32x32 image), "labels": [...], ...}``.
``pickle.load`` would call any function a crafted file names, so :func:`read_batch` uses
:class:`RestrictedUnpickler`: plain containers, bytes, str and numbers, plus the handful of numpy
constructors an array needs (:data:`ALLOWED_GLOBALS`); any other global stops the read. This holds
whatever ``data.verify`` says. torchvision is used only to download and extract the archive and for
the md5 sums it ships; it never opens a batch file here.
"""

from __future__ import annotations

import codecs
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from itdiffusion.errors import DatasetError

BASE_FOLDER = "cifar-10-batches-py"
SIDE = 32


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as Python 3 protocol-2 pickles use it for bytes; only latin-1 text is accepted."""
    if not isinstance(text, str) or encoding.lower().replace("-", "") not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with {type(text).__name__}, {encoding!r}")
    return codecs.encode(text, "latin1")


_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own array constructor for pickles


def _frombuffer(buffer: Any, dtype: np.dtype, shape: tuple, order: str) -> np.ndarray:
    """numpy's protocol-5 array constructor, restricted to plain dtypes."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError(f"refusing an array of dtype {dtype!r}")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # Python 2 / numpy 1 files (the official ones)
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # numpy 2
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _latin1_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS`; every other global is an error."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch"
                                         ) from None


def read_batch(path: Path) -> np.ndarray:
    """The images of one batch file as uint8 ``[N, 32, 32, 3]``; :class:`DatasetError` if it is not one."""
    try:
        data = path.read_bytes()
        record = RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, MemoryError) as e:
        raise DatasetError(f"{path} is not a CIFAR-10 python batch ({type(e).__name__}: {e}); nothing in it "
                           "was run. Delete the folder and rerun with data.download=true.") from e
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e}") from e
    if isinstance(record, dict):
        record = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in record.items()}
    rows = record.get("data") if isinstance(record, dict) else None
    if not (isinstance(rows, np.ndarray) and rows.dtype == np.uint8 and rows.ndim == 2
            and rows.shape[1] == 3 * SIDE * SIDE):
        found = f"{rows.dtype} {rows.shape}" if isinstance(rows, np.ndarray) else type(rows).__name__
        raise DatasetError(f"{path} is not a CIFAR-10 python batch: 'data' must be uint8 "
                           f"[N, {3 * SIDE * SIDE}], found {found}")
    return np.ascontiguousarray(rows.reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1))


def batch_files(split: str) -> list[tuple[str, str]]:
    """``(file name, md5)`` of the split's batch files (torchvision's list of the official sums)."""
    from torchvision.datasets import CIFAR10

    return [tuple(entry) for entry in (CIFAR10.train_list if split == "train" else CIFAR10.test_list)]


def check_files(folder: Path, split: str, verify: bool) -> str | None:
    """None when every batch file of ``split`` exists (with ``verify``: has its md5), else the problem."""
    from torchvision.datasets.utils import check_integrity

    for name, md5 in batch_files(split):
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if verify and not check_integrity(str(path), md5):
            return f"{path} does not have the official md5 sum {md5}"
    return None


ARCHIVE = "cifar-10-python.tar.gz"  # torchvision's CIFAR10.filename


def download(root: Path) -> None:
    """Fetch and extract the official archive into ``root`` (torchvision checks the archive's md5)."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import download_and_extract_archive

    download_and_extract_archive(CIFAR10.url, str(root), filename=ARCHIVE, md5=CIFAR10.tgz_md5)


def read_split(folder: Path, split: str) -> np.ndarray:
    """All images of ``split`` as uint8 ``[N, 32, 32, 3]``, in file order."""
    return np.concatenate([read_batch(folder / name) for name, _ in batch_files(split)])
