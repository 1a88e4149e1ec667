"""Data loaders: every format yields the stored pixels; bad input fails with an actionable message."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import random_images, write_cifar_pickles, write_png_folder
from itdiffusion.data import (
    PATCH_PHOTOS,
    dataset_key,
    load_images,
    random_subset,
    to_model_range,
)
from itdiffusion.errors import DatasetError


def pixels(dataset) -> np.ndarray:
    """All images of a dataset as uint8 [N, H, W, 3], checking that item i carries index i."""
    out = []
    for i in range(len(dataset)):
        image, index = dataset[i]
        assert index == i and image.dtype == torch.uint8 and image.shape == (3, 32, 32)
        out.append(image.permute(1, 2, 0).numpy())
    return np.stack(out)


def test_to_model_range_maps_pixels_onto_the_lattice():
    p = torch.arange(256, dtype=torch.uint8)
    x = to_model_range(p)
    assert x[0] == -1 and x[255] == 1
    torch.testing.assert_close(x[1:] - x[:-1], torch.full((255,), 2 / 255), rtol=0, atol=1e-6)
    with pytest.raises(TypeError):
        to_model_range(p.float())


def test_cifar10_pickles_load_through_torchvision(tmp_path, make_cfg):
    train, test = random_images(10, seed=1), random_images(6, seed=2)
    write_cifar_pickles(tmp_path / "data" / "cifar10", train, test)
    cfg = make_cfg("data=cifar10", "data.verify=false")
    np.testing.assert_array_equal(pixels(load_images(cfg.data, "train")), train)
    np.testing.assert_array_equal(pixels(load_images(cfg.data, "test")), test)
    cfg = make_cfg("data=cifar10", "data.verify=false", "data.num_images=4")
    np.testing.assert_array_equal(pixels(load_images(cfg.data, "test")), test[:4])


def test_cifar10_integrity_check_rejects_files_that_are_not_the_official_ones(tmp_path, make_cfg):
    write_cifar_pickles(tmp_path / "data" / "cifar10", random_images(5), random_images(5))
    cfg = make_cfg("data=cifar10")  # data.verify=true: torchvision's md5 sums
    with pytest.raises(DatasetError, match="corrupted.*data.download=true"):
        load_images(cfg.data, "test")


def test_missing_cifar10_names_the_path_and_how_to_get_it(tmp_path, make_cfg):
    cfg = make_cfg("data=cifar10")
    with pytest.raises(DatasetError) as e:
        load_images(cfg.data, "train")
    message = str(e.value)
    assert str(tmp_path / "data" / "cifar10" / "cifar-10-batches-py") in message
    assert "data.download=true" in message and "cifar-10-python.tar.gz" in message


def test_image_folder_in_iddpm_layout(tmp_path, make_cfg):
    train, test = random_images(5, seed=3), random_images(3, seed=4)
    write_png_folder(tmp_path / "data" / "cifar10_png" / "cifar_train", train)
    write_png_folder(tmp_path / "data" / "cifar10_png" / "cifar_test" / "sub", test)  # searched recursively
    cfg = make_cfg("data=image_folder")
    np.testing.assert_array_equal(pixels(load_images(cfg.data, "train")), train)
    np.testing.assert_array_equal(pixels(load_images(cfg.data, "test")), test)


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.zeros((2, 16, 16, 3), np.uint8), "16x16, expected 32x32"),
        (np.zeros((2, 32, 32), np.uint8), "mode 'L'.*expected RGB"),
    ],
)
def test_image_folder_rejects_wrong_size_or_channels(tmp_path, make_cfg, array, match):
    write_png_folder(tmp_path / "data" / "cifar10_png" / "cifar_test", array)
    with pytest.raises(DatasetError, match=match):
        load_images(make_cfg("data=image_folder").data, "test")


def test_image_folder_missing_or_empty(tmp_path, make_cfg):
    cfg = make_cfg("data=image_folder")
    with pytest.raises(DatasetError, match=r"image folder not found: .*cifar_test.*cifar_train"):
        load_images(cfg.data, "test")
    (tmp_path / "data" / "cifar10_png" / "cifar_test").mkdir(parents=True)
    with pytest.raises(DatasetError, match="test split .* is empty"):
        load_images(cfg.data, "test")


def test_npz(tmp_path, make_cfg):
    root = tmp_path / "data" / "npz"
    root.mkdir(parents=True)
    train, test = random_images(7, seed=5), random_images(4, seed=6)
    np.savez(root / "train.npz", x=train)
    np.savez(root / "test.npz", x=test)
    cfg = make_cfg("data=npz")
    np.testing.assert_array_equal(pixels(load_images(cfg.data, "train")), train)
    np.testing.assert_array_equal(pixels(load_images(cfg.data, "test")), test)


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"x": np.zeros((2, 32, 32, 3), np.float32)}, "uint8"),
        ({"x": np.zeros((2, 32, 32, 4), np.uint8)}, r"\[N, 32, 32, 3\].*4 channels"),
        ({"x": np.zeros((2, 28, 28, 3), np.uint8)}, "28x28, expected 32x32"),
        ({"images": np.zeros((2, 32, 32, 3), np.uint8)}, "no array 'x'"),
        ({"x": np.zeros((0, 32, 32, 3), np.uint8)}, "is empty"),
    ],
)
def test_npz_rejects_bad_arrays(tmp_path, make_cfg, arrays, match):
    root = tmp_path / "data" / "npz"
    root.mkdir(parents=True)
    np.savez(root / "test.npz", **arrays)
    with pytest.raises(DatasetError, match=match):
        load_images(make_cfg("data=npz").data, "test")


def test_npz_missing_file_names_the_expected_path(tmp_path, make_cfg):
    with pytest.raises(DatasetError, match=str(tmp_path / "data" / "npz" / "test.npz")):
        load_images(make_cfg("data=npz").data, "test")


def test_patches_hold_out_whole_photos(make_cfg):
    cfg = make_cfg("data=patches", "data.patches_per_photo=20", "data.patches_test_photos=[chelsea]")
    train, test = load_images(cfg.data, "train"), load_images(cfg.data, "test")
    assert len(train) == 20 * (len(PATCH_PHOTOS) - 1) and len(test) == 20
    train_px, test_px = pixels(train), pixels(test)
    # no test crop appears in the training set
    train_rows = {row.tobytes() for row in train_px}
    assert not any(row.tobytes() in train_rows for row in test_px)
    # the crops are real photo content: not constant, and reproducible from the seed
    assert train_px.reshape(len(train_px), -1).std(axis=1).mean() > 5
    np.testing.assert_array_equal(pixels(load_images(cfg.data, "test")), test_px)
    other_seed = make_cfg(
        "data=patches", "data.patches_per_photo=20", "data.patches_test_photos=[chelsea]", "data.seed=1"
    )
    assert not np.array_equal(pixels(load_images(other_seed.data, "test")), test_px)


def test_patches_reject_unknown_photo(make_cfg):
    with pytest.raises(DatasetError, match="unknown photos"):
        load_images(make_cfg("data=patches", "data.patches_test_photos=[camera]").data, "test")


def test_dataset_key_and_subset(tmp_path, make_cfg):
    a = make_cfg("data=patches", "data.patches_per_photo=4")
    b = make_cfg("data=patches", "data.patches_per_photo=5")
    assert dataset_key(a.data) != dataset_key(b.data)
    cifar = dataset_key(make_cfg("data=cifar10").data)
    assert cifar.startswith("cifar10-") and cifar != dataset_key(
        make_cfg("data=cifar10", "data.root=elsewhere").data
    )
    train = load_images(a.data, "train")
    subset = random_subset(train, 10, seed=0)
    assert subset.shape == (10, 3, 32, 32)
    all_rows = {train[i][0].numpy().tobytes() for i in range(len(train))}
    assert all(s.numpy().tobytes() in all_rows for s in subset)
    assert random_subset(train, 10_000, seed=0).shape[0] == len(train)  # capped at the dataset size
