"""Datasets of 32x32 RGB images as uint8 tensors, and their scaling to the model's range.

Every dataset yields ``(image, index)`` with ``image`` a ``uint8`` tensor ``[3, H, W]`` (pixel
values p in {0..255}); models see ``x = p / 127.5 - 1`` in [-1, 1] (:func:`to_model_range`), a
lattice of spacing :data:`itdiffusion.units.PIXEL_BIN`.

Sources (``data.name``):

- ``cifar10``: CIFAR-10 (python version) in ``<root>/cifar-10-batches-py``; ``data.download=true``
  fetches it through torchvision, ``data.verify`` checks the official md5 sums. The batch files are
  read with a restricted unpickler that runs no code (:mod:`itdiffusion.cifar10_files`).
- ``image_folder``: IDDPM-style folders of images, ``<root>/<split>`` (``cifar_train``, ``cifar_test``
  as written by improved-diffusion's ``datasets/cifar10.py``), searched recursively.
- ``npz``: ``<root>/<split>.npz`` holding ``x``: uint8 ``[N, H, W, 3]``.
- ``patches``: 32x32 crops of the colour photos bundled with scikit-image (offline, real images).
  Train and test crops come from disjoint photos, so the test set is held out by source photo.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from itdiffusion import cifar10_files
from itdiffusion.errors import DatasetError

log = logging.getLogger(__name__)

SOURCES = ("cifar10", "image_folder", "npz", "patches")
SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
# Colour photographs that ship inside the scikit-image wheel (no download needed).
PATCH_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "rocket",
)


def to_model_range(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels p in {0..255} -> x = p / 127.5 - 1 in [-1, 1] (float32, or ``dtype``)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"to_model_range expects uint8 pixels, got {images.dtype}")
    return images.to(dtype) / 127.5 - 1.0


class ImageTensorDataset(Dataset):
    """Images held in memory: uint8 ``[N, 3, H, W]``; item ``i`` is ``(images[i], i)``."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], i


class ImageFileDataset(Dataset):
    """Images decoded from files on access; each is checked to be ``size x size`` RGB."""

    def __init__(self, paths: Sequence[Path], size: int):
        self.paths = list(paths)
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path = self.paths[i]
        try:
            with Image.open(path) as im:
                im.load()
                mode, array = im.mode, np.asarray(im)
        except OSError as e:
            raise DatasetError(f"cannot read image {path}: {e}") from e
        if mode != "RGB":
            raise DatasetError(
                f"image {path} has mode {mode!r} ({_channels(array)} channel(s)); expected RGB with 3 "
                "channels. Convert the folder to RGB PNGs (e.g. improved-diffusion's datasets/cifar10.py)."
            )
        _check_hw(array.shape[:2], self.size, str(path))
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))), i


def load_images(data_cfg, split: str, limit: bool = True) -> Dataset:
    """The ``split`` ("train" or "test") of the dataset described by ``data_cfg`` (a ``DataConfig``).

    With ``limit`` the test split is cut to its first ``data.num_images`` images (evaluation) and the
    train split to its first ``data.num_train_images`` (fine-tuning); None means all. Raises
    :class:`DatasetError` with the expected path and how to obtain the data when it is missing, and
    for empty sets or wrong image shapes.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    name = data_cfg.name
    if name == "cifar10":
        dataset = _load_cifar10(data_cfg, split)
    elif name == "image_folder":
        dataset = _load_image_folder(data_cfg, split)
    elif name == "npz":
        dataset = _load_npz(data_cfg, split)
    elif name == "patches":
        dataset = _load_patches(data_cfg, split)
    else:
        raise DatasetError(f"unknown dataset data.name={name!r}; choose one of {', '.join(SOURCES)}")
    if len(dataset) == 0:
        raise DatasetError(f"the {split} split of data.name={name} ({_describe(data_cfg, split)}) is empty")
    count = data_cfg.num_images if split == "test" else data_cfg.num_train_images
    if limit and count is not None:
        if count < 1:
            name = "data.num_images" if split == "test" else "data.num_train_images"
            raise DatasetError(f"{name} must be >= 1 (or null for all images), got {count}")
        if count > len(dataset):
            key = "data.num_images" if split == "test" else "data.num_train_images"
            log.warning("%s=%d, but the %s split holds %d images: all %d are used", key, count, split,
                        len(dataset), len(dataset))
        dataset = _first(dataset, count)
    return dataset


def dataset_key(data_cfg) -> str:
    """A short name that identifies the full training split (used to key caches such as the reference):
    the source and a hash of where it lives (or, for patches, of how the crops are made)."""
    if data_cfg.name == "patches":
        ident = repr(
            (
                _patch_photos(data_cfg, "train"),
                data_cfg.patches_per_photo,
                data_cfg.patch_photo_size,
                data_cfg.image_size,
                data_cfg.seed,
            )
        )
    else:
        ident = repr((str(Path(data_cfg.root).resolve()), _split_name(data_cfg, "train")))
    return f"{data_cfg.name}-{hashlib.sha256(ident.encode()).hexdigest()[:10]}"


def source_files(data_cfg, split: str = "train") -> list[Path] | None:
    """The files the ``split`` of ``data_cfg`` is read from (for content fingerprints of caches);
    None for ``patches`` (made from scikit-image's bundled photos and the settings)."""
    name = data_cfg.name
    if name == "cifar10":
        folder = Path(data_cfg.root) / cifar10_files.BASE_FOLDER
        return [folder / file for file, _ in cifar10_files.batch_files(split)]
    if name == "npz":
        return [Path(data_cfg.root) / f"{_split_name(data_cfg, split)}.npz"]
    if name == "image_folder":
        folder = Path(data_cfg.root) / _split_name(data_cfg, split)
        return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return None


def random_subset(dataset: Dataset, n: int, seed: int) -> torch.Tensor:
    """``min(n, len(dataset))`` images drawn without replacement (seeded), as uint8 ``[n, 3, H, W]``."""
    n = min(n, len(dataset))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    if isinstance(dataset, ImageTensorDataset):
        return dataset.images[order]
    return torch.stack([dataset[int(i)][0] for i in order])


# --- sources -------------------------------------------------------------------------------------


def _load_cifar10(data_cfg, split: str) -> ImageTensorDataset:
    """The python-version batches, read with a restricted unpickler (:mod:`itdiffusion.cifar10_files`)."""
    root = Path(data_cfg.root)
    folder = root / cifar10_files.BASE_FOLDER
    if not data_cfg.download and not folder.is_dir():
        raise DatasetError(
            f"CIFAR-10 not found: expected the folder {folder.resolve()} (python version: data_batch_1..5, "
            f"test_batch, batches.meta). Either rerun with data.download=true to fetch it with torchvision "
            f"(about 170 MB), or download {CIFAR10_URL} and extract it into {root.resolve()}, "
            f"or point data.root at the folder that contains cifar-10-batches-py."
        )
    created = _missing_folders(root) if data_cfg.download else []
    try:
        problem = cifar10_files.check_files(folder, split, data_cfg.verify)
        if problem and data_cfg.download:
            cifar10_files.download(root)
            problem = cifar10_files.check_files(folder, split, data_cfg.verify)
        if problem:
            raise RuntimeError(problem)
    except RuntimeError as e:  # a missing file or an md5 mismatch
        _remove_partial_download(root, cifar10_files.ARCHIVE, created)
        raise DatasetError(
            f"CIFAR-10 in {folder.resolve()} is incomplete or corrupted (md5 check: {e}). "
            f"Delete the folder and rerun with data.download=true, or re-extract {CIFAR10_URL} there."
        ) from e
    except OSError as e:  # download failed (no network, proxy, disk)
        _remove_partial_download(root, cifar10_files.ARCHIVE, created)
        raise DatasetError(
            f"downloading CIFAR-10 from {CIFAR10_URL} into {root.resolve()} failed ({e}). Without network "
            f"access, fetch that file elsewhere and extract it into {root.resolve()} (giving "
            f"{folder.resolve()}), then rerun; or point data.root at a folder that already holds "
            "cifar-10-batches-py (data.download=false)."
        ) from e
    images = cifar10_files.read_split(folder, split)
    _check_nhwc(images, data_cfg.image_size, str(folder))
    return ImageTensorDataset(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())


def _missing_folders(path: Path) -> list[Path]:
    """``path`` and those of its ancestors that do not exist yet, deepest first."""
    missing = []
    for p in (path, *path.parents):
        if p.exists():
            break
        missing.append(p)
    return missing


def _remove_partial_download(root: Path, archive: str, created: list[Path]) -> None:
    """After a failed download: the partial archive and the folders the download created (if empty)."""
    if created:  # the folder was new: nothing in it predates this download
        with contextlib.suppress(OSError):
            (root / archive).unlink()
    for folder in created:
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if empty


def _load_image_folder(data_cfg, split: str) -> ImageFileDataset:
    folder = Path(data_cfg.root) / _split_name(data_cfg, split)
    if not folder.is_dir():
        raise DatasetError(
            f"image folder not found: {folder.resolve()}. Expected IDDPM-style folders "
            f"<data.root>/{data_cfg.train_split} and <data.root>/{data_cfg.test_split} of "
            f"{data_cfg.image_size}x{data_cfg.image_size} RGB PNGs (improved-diffusion's datasets/cifar10.py "
            "writes cifar_train/ and cifar_test/); set data.root to their parent folder."
        )
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    dataset = ImageFileDataset(paths, data_cfg.image_size)
    if paths:
        dataset[0]  # fail now, not mid-run, if the images have the wrong size or channel count
    return dataset


def _load_npz(data_cfg, split: str) -> ImageTensorDataset:
    path = Path(data_cfg.root) / f"{_split_name(data_cfg, split)}.npz"
    if not path.is_file():
        raise DatasetError(
            f"npz dataset not found: {path.resolve()}. Expected <data.root>/{data_cfg.train_split}.npz and "
            f"<data.root>/{data_cfg.test_split}.npz, each with an array 'x' of uint8 images "
            f"[N, {data_cfg.image_size}, {data_cfg.image_size}, 3]."
        )
    try:
        with np.load(path) as f:
            if "x" not in f:
                raise DatasetError(f"{path} has no array 'x' (found: {', '.join(f.files) or 'nothing'})")
            images = f["x"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DatasetError(f"cannot read {path}: {type(e).__name__}: {e} (truncated or not an npz file; "
                           "write it again with numpy.savez)") from e
    if images.dtype != np.uint8:
        raise DatasetError(f"{path}: 'x' must hold uint8 pixels in 0..255, got dtype {images.dtype}")
    _check_nhwc(images, data_cfg.image_size, str(path))
    return ImageTensorDataset(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())


def _load_patches(data_cfg, split: str) -> ImageTensorDataset:
    """``patches_per_photo`` random ``image_size`` crops of each photo of the split, shuffled (seeded).

    Each photo is first resized (antialiased) so that its shorter side is ``patch_photo_size``
    pixels, which gives crops with CIFAR-like content rather than flat close-ups.
    """
    size, per_photo = data_cfg.image_size, data_cfg.patches_per_photo
    if per_photo < 1:
        raise DatasetError(f"data.patches_per_photo must be >= 1, got {per_photo}")
    if data_cfg.patch_photo_size < size:
        raise DatasetError(
            f"data.patch_photo_size ({data_cfg.patch_photo_size}) must be >= data.image_size ({size})"
        )
    photos = _patch_photos(data_cfg, split)
    crops = []
    for name in photos:
        photo = _resize_shorter_side(_bundled_photo(name), data_cfg.patch_photo_size)
        h, w = photo.shape[1:]
        gen = torch.Generator().manual_seed(data_cfg.seed * 7919 + PATCH_PHOTOS.index(name))
        top = torch.randint(0, h - size + 1, (per_photo,), generator=gen)
        left = torch.randint(0, w - size + 1, (per_photo,), generator=gen)
        crops += [
            photo[:, t : t + size, l : l + size] for t, l in zip(top.tolist(), left.tolist(), strict=True)
        ]
    images = torch.stack(crops)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(data_cfg.seed))
    return ImageTensorDataset(images[order].contiguous())


def _patch_photos(data_cfg, split: str) -> list[str]:
    test = list(data_cfg.patches_test_photos)
    unknown = [p for p in test if p not in PATCH_PHOTOS]
    if unknown:
        raise DatasetError(
            f"data.patches_test_photos has unknown photos {unknown}; choose from {PATCH_PHOTOS}"
        )
    if split == "test":
        return test
    return [p for p in PATCH_PHOTOS if p not in test]


def _bundled_photo(name: str) -> torch.Tensor:
    import skimage.data

    array = np.asarray(getattr(skimage.data, name)())
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise DatasetError(
            f"scikit-image photo {name!r} is not an RGB uint8 image ({array.shape}, {array.dtype})"
        )
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _resize_shorter_side(photo: torch.Tensor, shorter: int) -> torch.Tensor:
    h, w = photo.shape[1:]
    scale = shorter / min(h, w)
    if scale >= 1:
        return photo
    size = (max(shorter, round(h * scale)), max(shorter, round(w * scale)))
    out = torch.nn.functional.interpolate(
        photo[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False
    )[0]
    return out.round().clamp(0, 255).to(torch.uint8)


# --- helpers -------------------------------------------------------------------------------------


def _split_name(data_cfg, split: str) -> str:
    return data_cfg.train_split if split == "train" else data_cfg.test_split


def _describe(data_cfg, split: str) -> str:
    if data_cfg.name == "patches":
        return "photos " + ", ".join(_patch_photos(data_cfg, split))
    return f"data.root={Path(data_cfg.root).resolve()}, split {_split_name(data_cfg, split)!r}"


def _first(dataset: Dataset, n: int) -> Dataset:
    if n >= len(dataset):
        return dataset
    if isinstance(dataset, ImageTensorDataset):
        return ImageTensorDataset(dataset.images[:n])
    return ImageFileDataset(dataset.paths[:n], dataset.size)


def _channels(array: np.ndarray) -> int:
    return 1 if array.ndim == 2 else array.shape[-1]


def _check_hw(hw: tuple[int, ...], size: int, where: str) -> None:
    if tuple(hw) != (size, size):
        raise DatasetError(
            f"{where}: images are {hw[0]}x{hw[1]}, expected {size}x{size} (data.image_size={size})"
        )


def _check_nhwc(images: np.ndarray, size: int, where: str) -> None:
    if images.ndim != 4 or images.shape[-1] != 3:
        raise DatasetError(
            f"{where}: expected RGB images [N, {size}, {size}, 3], got shape {tuple(images.shape)}"
            + (f" ({images.shape[-1]} channels)" if images.ndim == 4 else "")
        )
    _check_hw(images.shape[1:3], size, where)
