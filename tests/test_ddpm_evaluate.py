"""The evaluate stage with model.kind=ddpm: a tiny diffusers UNet2DModel saved with save_pretrained goes
through IT and VLB, alone and as an ensemble, and its numbers are the library's on the same seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from itdiffusion.artifacts import read_per_image
from itdiffusion.data import load_images, to_model_range
from itdiffusion.models import ddpm
from itdiffusion.seeding import Stream, stream_seed
from itdiffusion.stages import CONFIG_DIR, evaluate
from itdiffusion.variational import vlb


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> list[Path]:
    """Two tiny UNet2DModels with different random weights, each saved with save_pretrained."""
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        unet = ddpm.build_unet(cfg_for(Path("/unused"), Path("/unused")).model)
        with torch.no_grad():  # diffusers zero-initialises nothing we rely on; perturb for distinct outputs
            for p in unet.parameters():
                p.add_(0.02 * torch.randn_like(p))
        folder = tmp_path_factory.mktemp(f"unet{seed}") / "ddpm-tiny"
        unet.save_pretrained(folder)
        out.append(folder)
    return out


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def cfg_for(tmp_path: Path, cache_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[
            "model=ddpm_tiny", "model.diffusion_steps=50", "data=patches", "data.num_images=3",
            "logger=none", "device=cpu", "data.num_workers=0", "data.stats_diagonal=true",
            "estimator.npoints=4", "estimator.batch_size=64", "estimator.vlb_steps_per_batch=25",
            f"paths.output_dir={tmp_path / 'o'}",
            f"paths.cache_dir={cache_dir}", f"paths.checkpoint_dir={tmp_path / 'c'}", *overrides])


def test_a_diffusers_directory_evaluates_with_it_and_vlb(tmp_path, cache_dir, folders):
    cfg = cfg_for(tmp_path, cache_dir, f"model.checkpoint={folders[0]}", "run_id=ddpm")
    metrics = evaluate.run(cfg, tmp_path / "run")
    keys = ("it_continuous_bpd", "it_discrete_bpd", "it_dequantized_bpd", "vlb_bpd", "vlb_continuous_bpd")
    for key in keys:
        assert np.isfinite(metrics[key]) and metrics[f"{key}_stderr"] > 0, key
    assert metrics["network_evals"] == 3 * (2 * 4 + 50)  # IT: 2 passes x 4 points; VLB: 50 steps
    assert metrics["model"] == "ddpm_tiny" and len(metrics["checkpoint_sha256"]) == 64
    # the stage's VLB of image 1 is the library's VLB of that image with its own seed
    member = evaluate.load_members(cfg, torch.device("cpu"))[0]
    x = to_model_range(load_images(cfg.data, "test")[1][0])[None]
    gen = torch.Generator().manual_seed(stream_seed(cfg.estimator.seed, 1, Stream.VLB))
    expected = vlb(member.network, member.diffusion, x, steps_per_batch=25, generator=gen).total(False)
    stored = read_per_image(tmp_path / "run" / "per_image.npz")
    np.testing.assert_allclose(stored.member_values["vlb_bpd"][0, 1].item(), expected.item(), rtol=1e-6)


def test_an_ensemble_of_two_diffusers_models(tmp_path, cache_dir, folders):
    pair = evaluate.run(cfg_for(tmp_path, cache_dir, f"ensemble=[{folders[0]},{folders[1]}]",
                                "estimator.vlb=false", "run_id=pair"), tmp_path / "pair")
    assert len(pair["members"]) == 2 and pair["members"][0]["checkpoint_sha256"] != pair["members"][1][
        "checkpoint_sha256"]
    assert np.isfinite(pair["it_discrete_bpd"])
