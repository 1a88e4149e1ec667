"""The stats stage: the Gaussian reference of the training set, cached and reused."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from conftest import run_cli
from itdiffusion.data import load_images, random_subset
from itdiffusion.stages import stats

SMALL = ["data=patches", "data.patches_per_photo=12", "data.stats_images=50"]


def test_reference_matches_the_moments_of_the_sampled_training_images(make_cfg):
    cfg = make_cfg(*SMALL, "data.stats_diagonal=true", "data.num_train_images=7")  # the limit is for finetune
    reference = stats.load_or_compute_reference(cfg)
    images = random_subset(load_images(cfg.data, "train", limit=False), 50, seed=cfg.data.seed)
    x = images.double().reshape(50, -1) / 127.5 - 1
    np.testing.assert_allclose(reference.mean.numpy(), x.mean(0).numpy(), atol=1e-12)
    np.testing.assert_allclose(reference.eigvals.numpy(), np.maximum(x.var(0).numpy(), 1e-10), rtol=1e-9)


@pytest.mark.slow
def test_full_covariance_reference_round_trips_through_the_cache(make_cfg):
    cfg = make_cfg(*SMALL, "data.stats_images=40")
    first = stats.load_or_compute_reference(cfg)  # an eigendecomposition of a 3072 x 3072 matrix
    assert first.eigvecs is not None and first.dim == 3072
    again = stats.load_or_compute_reference(cfg)
    assert torch.equal(again.eigvecs, first.eigvecs) and again.entropy == first.entropy


def test_reference_is_cached_and_reused(make_cfg, monkeypatch, caplog):
    cfg = make_cfg(*SMALL, "data.stats_images=40", "data.stats_diagonal=true")
    first = stats.load_or_compute_reference(cfg)
    path = stats.reference_cache_path(cfg)
    assert path.is_file() and "n40_diag" in path.name

    def not_again(_cfg):
        raise AssertionError("the cached reference should have been used")

    monkeypatch.setattr(stats, "compute_reference", not_again)
    again = stats.load_or_compute_reference(cfg)
    assert torch.equal(again.eigvals, first.eigvals) and again.entropy == first.entropy
    monkeypatch.undo()

    # a damaged cache file is recomputed with a warning
    path.write_bytes(path.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        repaired = stats.load_or_compute_reference(cfg)
    assert "unreadable" in caplog.text and torch.equal(repaired.eigvals, first.eigvals)


def test_cache_is_keyed_by_dataset_and_count(make_cfg):
    a = make_cfg(*SMALL, "data.stats_diagonal=true")
    assert stats.reference_cache_path(a) != stats.reference_cache_path(
        make_cfg(*SMALL, "data.stats_images=49")
    )
    assert stats.reference_cache_path(a) != stats.reference_cache_path(
        make_cfg(*SMALL, "data.stats_diagonal=true", "data.patches_test_photos=[rocket]")
    )
    assert stats.reference_cache_path(a) != stats.reference_cache_path(make_cfg(*SMALL))


def test_stats_stage_on_the_command_line(tmp_path):
    outputs = tmp_path / "outputs"
    proc = run_cli(
        "stats",
        *SMALL,
        "data.stats_diagonal=true",
        f"paths.output_dir={outputs}",
        "run_id=s1",
        "logger=none",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((outputs / "stats" / "s1" / "stats.json").read_text())
    assert summary["dim"] == 3072 and summary["stats_images"] == 50
    assert summary["entropy_bpd"] == pytest.approx(summary["entropy_nats"] / (3072 * np.log(2)))
    assert (outputs / "cache").is_dir() and summary["cache"].startswith(str(outputs / "cache"))
