"""Masked-diffusion models through the pipeline: finetune (any-order loss) -> evaluate (I-MDCE) -> report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from itdiffusion.artifacts import MASKED_ESTIMATES, read_loss_curve, read_per_image
from itdiffusion.errors import UserError
from itdiffusion.stages import CONFIG_DIR, evaluate, evaluate_masked, finetune, report


def masked_cfg(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[
            "experiment=smoke", "model=masked_pixels_tiny", "finetune=smoke_masked", "logger=none",
            "device=cpu", "data.num_workers=0", "data.patches_per_photo=8", "data.num_images=2",
            f"paths.output_dir={tmp_path / 'outputs'}", f"paths.cache_dir={tmp_path / 'cache'}",
            f"paths.checkpoint_dir={tmp_path / 'checkpoints'}", "finetune.batch_size=2",
            "finetune.max_steps=2", "finetune.heldout_images=2", "finetune.run_name=masked",
            "estimator.num_masks=2", "estimator.batch_size=8", *overrides])


def test_train_evaluate_and_report_a_masked_model(tmp_path):
    summary = finetune.run(masked_cfg(tmp_path, "run_id=train"), tmp_path / "run_train")
    assert summary["objective"] == "any_order" and summary["init"] == "scratch" and summary["steps"] == 2
    curve = read_loss_curve(summary["loss_curve"])
    assert all(math.isfinite(p["heldout_loss_bpd"]) for p in curve)

    cfg = masked_cfg(tmp_path, "run_id=eval", f"model.checkpoint={summary['model_path']}",
                     "label='masked diffusion (I-MDCE)'")
    metrics = evaluate.run(cfg, tmp_path / "run_eval")
    assert metrics["num_images"] == 2 and metrics["num_masks"] == 2 and metrics["network_evals"] > 0
    for key in MASKED_ESTIMATES:
        assert math.isfinite(metrics[key]) and math.isfinite(metrics[f"{key}_stderr"]), key
        assert metrics[f"{key}_stderr"] > 0, key
    for key in ("mdce_bpd", "mdce_timefree_bpd", "mdce_bottom_given_top_bpd"):
        assert 0 < metrics[key] < 30, key  # a discrete NLL over 256 values per sub-pixel, bits/dim
    saved = json.loads((tmp_path / "run_eval" / "metrics.json").read_text())
    assert saved["checkpoint"] == summary["model_path"] and len(saved["checkpoint_sha256"]) == 64
    per_image = read_per_image(tmp_path / "run_eval" / "per_image.npz").group("m0")
    assert per_image["mdce_bpd"].shape == (2,)
    assert np.isclose(per_image["mdce_bpd"].mean(), metrics["mdce_bpd"])

    report.run(masked_cfg(tmp_path, "run_id=report"), tmp_path / "run_report")
    table = (tmp_path / "outputs" / "results" / "results.md").read_text()
    assert "Masked diffusion (I-MDCE)" in table
    row = next(line for line in table.splitlines() if line.startswith("| masked diffusion (I-MDCE) |"))
    assert f"{metrics['mdce_bpd']:.3f} ± {metrics['mdce_bpd_stderr']:.3f}" in row
    assert "nan" not in row and "—" not in row


def test_masked_images_are_seeded_per_image(tmp_path):
    """An image's estimates do not depend on which other images share its batch (sharding)."""
    from itdiffusion.models.masked_unet import build_masked_pixel_model

    cfg = masked_cfg(tmp_path)
    torch.manual_seed(0)
    model = build_masked_pixel_model(cfg.model).eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    both = evaluate_masked.sample(model, images, [5, 6], cfg.estimator)
    alone = evaluate_masked.sample(model, images[1:], [6], cfg.estimator)
    for key, value in alone.group("m0").items():
        torch.testing.assert_close(value[0], both.group("m0")[key][1], rtol=1e-4, atol=1e-3, msg=key)
    evals = alone.member_values["network_evals"][0, 0], both.member_values["network_evals"][0, 1]
    torch.testing.assert_close(*evals)


@pytest.mark.parametrize("overrides, message", [
    (("finetune.objective=it",), "finetune.objective=any_order"),
    (("model=iddpm_tiny", "finetune.objective=any_order"), "finetune.objective=it or iddpm"),
])
def test_objective_must_fit_the_model(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        finetune.run(masked_cfg(tmp_path, *overrides), tmp_path / "run")


def test_evaluating_a_masked_model_needs_its_weights(tmp_path):
    with pytest.raises(UserError, match="model.checkpoint="):
        evaluate.run(masked_cfg(tmp_path), tmp_path / "run")
