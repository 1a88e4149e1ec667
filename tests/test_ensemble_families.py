"""Ensembles across model families: an IDDPM checkpoint and a diffusers UNet2DModel folder in one ensemble
(``ensemble=[...]`` with ``ensemble_models=[iddpm_tiny,ddpm_tiny]``), evaluated through the evaluate stage,
equal to the ensemble of the two models' own single-model runs; and the launch-time checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY, run_cli
from itdiffusion.artifacts import read_per_image
from itdiffusion.errors import UserError
from itdiffusion.members import model_config
from itdiffusion.models import ddpm
from itdiffusion.stages import evaluate

# IT only (the VLB is per model and its chain length is a per-family setting), no pixel maps
SETTINGS = [*TINY, "estimator.vlb=false", "estimator.pixel_maps=0"]


@pytest.fixture(scope="module")
def ddpm_folder(tmp_path_factory) -> Path:
    """A tiny diffusers UNet2DModel (model=ddpm_tiny) with random weights, saved with save_pretrained."""
    torch.manual_seed(3)
    unet = ddpm.build_unet(model_config("ddpm_tiny"))
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("ddpm") / "ddpm-tiny"
    unet.save_pretrained(folder)
    return folder


def test_an_iddpm_and_a_ddpm_ensemble_like_their_own_runs(make_cfg, tmp_path, tiny_checkpoints, ddpm_folder,
                                                          shared_cache):
    cache = f"paths.cache_dir={shared_cache}"
    out = tmp_path / "outputs" / "evaluate"
    # each model alone, through its own family's config; the DDPM run takes the IDDPM run's log-SNR proposal
    iddpm_run = evaluate.run(
        make_cfg(*SETTINGS, cache, "run_id=a", f"model.checkpoint={tiny_checkpoints[0]}"), out / "a")
    ddpm_run = evaluate.run(make_cfg(*SETTINGS, cache, "run_id=b", "model=ddpm_tiny",
                                     "model.diffusion_steps=100", f"model.checkpoint={ddpm_folder}",
                                     f"estimator.logsnr_proposal_from={out / 'a'}"),
                            out / "b")
    assert iddpm_run["model"] == "iddpm_tiny" and ddpm_run["model"] == "ddpm_tiny"

    members = [f"ensemble=[{tiny_checkpoints[0]},{ddpm_folder}]", "ensemble_models=[iddpm_tiny,ddpm_tiny]"]
    evaluated = evaluate.run(make_cfg(*SETTINGS, cache, "run_id=e", *members,
                                      f"estimator.logsnr_proposal_from={out / 'a'}"), out / "e")
    reused = evaluate.run(make_cfg(*SETTINGS, cache, "run_id=r", *members,
                                   f"ensemble_curves=[{out / 'a'},{out / 'b'}]"), out / "r")

    assert evaluated["model"] == ["iddpm_tiny", "ddpm_tiny"]
    assert [m["model"] for m in evaluated["members"]] == ["iddpm_tiny", "ddpm_tiny"]
    assert [m["checkpoint_sha256"] for m in evaluated["members"]] == [iddpm_run["checkpoint_sha256"],
                                                                      ddpm_run["checkpoint_sha256"]]
    # every member's estimate is that model's own run's (same seeds, same points): the loader gave each
    # checkpoint its own family's network and denoiser
    for member, single in zip(evaluated["members"], (iddpm_run, ddpm_run), strict=True):
        for key in ("it_continuous_bpd", "it_discrete_bpd", "it_dequantized_bpd"):
            assert member[key] == pytest.approx(single[key], rel=1e-9, abs=1e-9), key
    assert iddpm_run["it_continuous_bpd"] != pytest.approx(ddpm_run["it_continuous_bpd"], abs=1e-6)
    # the ensemble from the two runs' stored curves is the network-evaluated ensemble, image by image (up to
    # the curves' float32 storage, as in test_evaluate_ensemble_curves)
    assert reused["network_evals"] == 0
    a, b = read_per_image(out / "e" / "per_image.npz"), read_per_image(out / "r" / "per_image.npz")
    assert a.groups == b.groups == ["m0", "m1", "ensemble"]
    for key, values in a.estimates.items():
        rtol = 1e-4 if "stderr" in key else 1e-5
        np.testing.assert_allclose(b.estimates[key].numpy(), values.numpy(), rtol=rtol, atol=1e-6,
                                   err_msg=key)
    stored = json.loads((out / "r" / "metrics.json").read_text())
    assert stored["members"][1]["model"] == "ddpm_tiny"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["ensemble_models=[iddpm_tiny,ddpm_tiny,ddpm_tiny]"], "3 model config"),
        (["ensemble_models=[iddpm_tiny,ddpm_tinyy]"], "'ddpm_tinyy' is no model config; choose from"),
        (["ensemble_models=[iddpm_tiny,masked_pixels_tiny]"], "masked_pixels_tiny is no Gaussian denoiser"),
    ],
)
def test_bad_ensemble_models_stop_before_any_work(make_cfg, tmp_path, overrides, message):
    cfg = make_cfg(*SETTINGS, "run_id=x", "ensemble=[a.pt,b]", *overrides)
    with pytest.raises(UserError, match=message):
        evaluate.run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists() and not (tmp_path / "outputs" / "cache").exists()


def test_the_cli_composes_member_configs_inside_the_stage(tmp_path):
    """model_config under hydra.main (its global Hydra): a masked-pixel member is refused in one line."""
    proc = run_cli("evaluate", *SETTINGS, f"paths.output_dir={tmp_path}", "ensemble=[a.pt,b.pt]",
                   "ensemble_models=[iddpm_tiny,masked_pixels_tiny]", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "masked_pixels_tiny is no Gaussian denoiser" in proc.stderr
