"""scripts/download_checkpoints.py ddpm_cifar10: the hub id's folder in the Hugging Face cache (what
reproduce.sh passes as the DDPM base model's model.checkpoint), offline from a filled cache, and one clear
failure when the cache is empty."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest
from huggingface_hub import constants

from itdiffusion.members import model_config
from itdiffusion.models import ddpm

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def script():
    path = REPO / "scripts" / "download_checkpoints.py"
    spec = importlib.util.spec_from_file_location("download_checkpoints", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_a_filled_hub_cache_gives_the_snapshot_folder(script, offline_cache, capsys):
    # the hub cache's layout: refs/main names the commit whose snapshot folder holds the files
    repo = offline_cache / "models--google--ddpm-cifar10-32"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    ddpm.build_unet(model_config("ddpm_tiny")).save_pretrained(snapshot)  # stands in for the hub's weights
    assert script.main(["ddpm_cifar10"]) == 0
    out = capsys.readouterr().out
    weights = snapshot / "diffusion_pytorch_model.safetensors"
    sha256 = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert out.strip() == f"ddpm_cifar10: {snapshot} sha256={sha256}"


def test_an_empty_cache_offline_says_how_to_place_the_files(script, offline_cache, capsys):
    assert script.main(["ddpm_cifar10"]) == 1
    err = capsys.readouterr().err
    assert "google/ddpm-cifar10-32" in err and str(offline_cache) in err and "model.pretrained=DIR" in err
