"""Offline downloads fail with what failed, the URL, where to put the file by hand and the override to
use, and leave nothing behind (no empty folders, partial archives or lock files)."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from conftest import run_cli


def _offline(*args, **kwargs):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


def test_a_failed_cifar10_download_says_what_to_do_and_leaves_nothing(make_cfg, tmp_path, monkeypatch):
    from itdiffusion.data import CIFAR10_URL, DatasetError, load_images

    monkeypatch.setattr(urllib.request, "urlopen", _offline)
    cfg = make_cfg("data=cifar10", "data.download=true")
    with pytest.raises(DatasetError) as info:
        load_images(cfg.data, "train")
    message = str(info.value)
    root = tmp_path / "data" / "cifar10"
    assert "downloading CIFAR-10" in message and CIFAR10_URL in message and "name resolution" in message
    assert str(root) in message and "data.root" in message  # where to put it by hand, the override
    assert not (tmp_path / "data").exists()  # no empty data/cifar10/


def test_a_failed_checkpoint_download_says_what_to_do_and_leaves_nothing(tmp_path, monkeypatch):
    from itdiffusion.models.iddpm import resolve_checkpoint
    from itdiffusion.models.weights import CheckpointError

    monkeypatch.setattr(urllib.request, "urlopen", _offline)
    url = "https://example.invalid/diffusion/cifar10_uncond_vlb_50M_500K.pt"
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint({"name": "m", "checkpoint": None, "checkpoint_url": url}, tmp_path / "ckpt",
                           progress=False)
    message = str(info.value)
    assert url in message and "model.checkpoint" in message
    assert str(tmp_path / "ckpt" / "iddpm" / "cifar10_uncond_vlb_50M_500K.pt") in message
    assert not (tmp_path / "ckpt" / "iddpm").exists()  # no lock file, no empty folder


def test_the_stats_stage_offline_leaves_no_lock_file(tmp_path):
    """The command line with data.download=true and no network: one message, exit 2, no lock file or
    empty data folder (the network is cut by an unroutable proxy)."""
    proc = run_cli("stats", "data=cifar10", "data.download=true", "logger=none", "run_id=off",
                   f"paths.data_dir={tmp_path / 'data'}", f"paths.output_dir={tmp_path / 'out'}",
                   cwd=tmp_path,
                   env={"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "downloading CIFAR-10 from https://" in output and "Traceback" not in output
    assert not (tmp_path / "data").exists()
    assert not list((tmp_path / "out").rglob("*.lock"))
