"""The finetune stage with model.kind=ddpm: 2 IT steps of a tiny diffusers UNet2DModel from a
save_pretrained directory, the exported weights, and a crash followed by an exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import itdiffusion.stages.finetune as finetune_stage
from itdiffusion.artifacts import read_loss_curve
from itdiffusion.errors import UserError
from itdiffusion.models import ddpm, ddpm_weights
from itdiffusion.stages import CONFIG_DIR
from itdiffusion.stages.finetune import SUMMARY, run
from itdiffusion.training_state import load_training_state


class Crash(Exception):
    """Stands in for SIGKILL: only files survive."""


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")  # the Gaussian reference of the patches, computed once


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    unet = ddpm.build_unet(cfg_for(Path("/unused"), Path("/unused")).model)
    folder = tmp_path_factory.mktemp("base") / "ddpm-tiny"
    unet.save_pretrained(folder)
    return folder


def cfg_for(tmp_path: Path, cache_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[
            "model=ddpm_tiny", "data=patches", "finetune=ddpm", "logger=none", "device=cpu", "run_id=test",
            "data.num_workers=0", "data.stats_diagonal=true", f"paths.output_dir={tmp_path / 'outputs'}",
            f"paths.cache_dir={cache_dir}", f"paths.checkpoint_dir={tmp_path / 'checkpoints'}",
            "finetune.batch_size=4", "finetune.max_steps=2", "finetune.heldout_images=4",
            "finetune.save_every_steps=1", *overrides])


def test_two_it_steps_from_a_diffusers_directory(tmp_path, cache_dir, base_dir):
    summary = run(cfg_for(tmp_path, cache_dir, f"finetune.init={base_dir}"), tmp_path / "run")
    assert summary["steps"] == 2 and summary["objective"] == "it"
    assert summary["init"].startswith(str(base_dir)) and "sha256" in summary["init"]
    run_dir = Path(summary["checkpoint_dir"])
    assert run_dir.name.startswith("ddpm_tiny_it_")  # the default run name ends in a hash of the settings
    assert json.loads((tmp_path / "run" / SUMMARY).read_text())["steps"] == 2
    curve = read_loss_curve(run_dir / "loss_curve.json")
    assert [p["step"] for p in curve] == [0, 2]
    assert all(0 < p["heldout_loss_bpd"] < 50 for p in curve)

    # the exported state dict is a plain UNet2DModel's: it loads as model.checkpoint, and it moved
    cfg = cfg_for(tmp_path, cache_dir, f"model.checkpoint={run_dir / 'model.pt'}").model
    tuned, _, _ = ddpm_weights.load_unet(cfg, tmp_path / "checkpoints")
    base_cfg = cfg_for(tmp_path, cache_dir, f"model.pretrained={base_dir}").model
    base, _, _ = ddpm_weights.load_unet(base_cfg, "unused")
    assert any(not torch.equal(v, base.state_dict()[k]) for k, v in tuned.state_dict().items())


def test_crash_then_resume_gives_the_same_weights(tmp_path, cache_dir, base_dir, monkeypatch):
    # 3 steps, a checkpoint after each; the crash comes after step 2, before its checkpoint: resume from 1
    steps = ("finetune.max_steps=3", f"finetune.init={base_dir}")
    ref = run(cfg_for(tmp_path / "ref", cache_dir, *steps), tmp_path / "ref" / "run")
    real_trainer = finetune_stage.Trainer

    def crashing(*args, **kwargs):
        def hook(step: int) -> None:
            if step == 2:
                raise Crash(step)
        return real_trainer(*args, **kwargs, on_step_end=hook)

    monkeypatch.setattr(finetune_stage, "Trainer", crashing)
    cfg = cfg_for(tmp_path / "faults", cache_dir, *steps)
    with pytest.raises(Crash):
        run(cfg, tmp_path / "faults" / "run1")
    run_dir = finetune_stage.finetune_run_dir(cfg)
    assert load_training_state(run_dir / "last.pt")["progress"]["step"] == 1
    assert not (run_dir / "model.pt").exists()
    monkeypatch.setattr(finetune_stage, "Trainer", real_trainer)
    resumed = run(cfg, tmp_path / "faults" / "run2")
    assert resumed["steps"] == 3
    one = torch.load(Path(ref["model_path"]), weights_only=True)
    two = torch.load(Path(resumed["model_path"]), weights_only=True)
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


@pytest.mark.parametrize(("override", "message"), [
    ("finetune.objective=iddpm", "kind ddpm.*use finetune.objective=it"),
    ("finetune.init=/nonexistent/unet", "finetune.init=/nonexistent/unet does not exist"),
    ("finetune.init=null", "names no weights"),  # ddpm_tiny has no published weights
])
def test_bad_input_is_a_user_error(tmp_path, cache_dir, override, message):
    with pytest.raises(UserError, match=message):
        run(cfg_for(tmp_path, cache_dir, override), tmp_path / "run")
