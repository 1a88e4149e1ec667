"""Fine-tuning never mixes runs or exports non-finite weights: resume compares every setting that
changes the trajectory, the default run name carries their hash, a run gives up after
``finetune.max_skipped_steps`` skipped steps, and the non-finite message names the real cause."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from finetune_toys import denoising_loss, make_trainer
from itdiffusion.errors import UserError
from itdiffusion.fsio import atomic_write_json
from itdiffusion.stages import CONFIG_DIR
from itdiffusion.stages.finetune import run
from itdiffusion.training import FinetuneError, NonFiniteError

RUN = "fixed"  # an explicit run name: the settings check alone must catch a changed command


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def cfg_for(work: Path, cache_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[
            "model=iddpm_tiny", "data=patches", "finetune=smoke", "finetune.init=scratch", "logger=none",
            "device=cpu", "run_id=test", "data.num_workers=0", "data.stats_diagonal=true",
            "data.stats_images=64", f"paths.output_dir={work / 'outputs'}", f"paths.cache_dir={cache_dir}",
            f"paths.checkpoint_dir={work / 'checkpoints'}", "finetune.batch_size=4", "finetune.max_steps=1",
            "finetune.heldout_images=2", "finetune.save_every_steps=1", *overrides])


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache_dir) -> Path:
    """A finished one-step run under the explicit run name ``fixed``."""
    work = tmp_path_factory.mktemp("finished")
    run(cfg_for(work, cache_dir, f"finetune.run_name={RUN}"), work / "run")
    return work


@pytest.mark.parametrize(("override", "change"), [
    ("model.noise_schedule=linear", "model.noise_schedule: 'cosine' -> 'linear'"),
    ("model.diffusion_steps=40", "model.diffusion_steps: 100 -> 40"),
    ("data.hflip=false", "data.hflip: True -> False"),
    ("data.num_train_images=319", "data.num_train_images: None -> 319"),
    ("finetune.objective=iddpm", "finetune.objective: 'it' -> 'iddpm'"),
    ("data.seed=1", "data.seed: 0 -> 1"),
])
def test_resume_refuses_each_changed_setting_naming_old_and_new(finished, cache_dir, tmp_path, override,
                                                                 change):
    work = tmp_path / "work"
    shutil.copytree(finished, work)
    before = (work / "checkpoints" / "finetune" / RUN / "model.pt").read_bytes()
    with pytest.raises(UserError, match="settings differ from the checkpoint") as info:
        run(cfg_for(work, cache_dir, f"finetune.run_name={RUN}", override), work / "run2")
    assert change in str(info.value)
    assert (work / "checkpoints" / "finetune" / RUN / "model.pt").read_bytes() == before  # not re-exported


def test_same_settings_resume_a_finished_run(finished, cache_dir, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(finished, work)
    assert run(cfg_for(work, cache_dir, f"finetune.run_name={RUN}"), work / "run2")["steps"] == 1


def test_skip_done_refuses_a_finished_run_with_other_settings(finished, cache_dir):
    with pytest.raises(UserError, match=r"skip_done: .* other settings \(model.diffusion_steps: 100 -> 40\)"):
        run(cfg_for(finished, cache_dir, f"finetune.run_name={RUN}", "skip_done=true",
                    "model.diffusion_steps=40"), finished / "run2")
    same = run(cfg_for(finished, cache_dir, f"finetune.run_name={RUN}", "skip_done=true"), finished / "run3")
    assert same["skipped"]


def test_replaced_starting_weights_refuse_to_resume(finished, cache_dir, tmp_path):
    """The same finetune.init path holding other weights (another sha256) is another run."""
    work = tmp_path / "work"
    shutil.copytree(finished, work)
    init = work / "init.pt"
    shutil.copy(work / "checkpoints" / "finetune" / RUN / "model.pt", init)
    cfg = cfg_for(work, cache_dir, "finetune.run_name=from_file", f"finetune.init={init}")
    run(cfg, work / "a")
    weights = torch.load(init, weights_only=True)
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in weights.items()}, init)
    with pytest.raises(UserError, match=r"finetune.init_sha256: '[0-9a-f]{64}' -> '[0-9a-f]{64}'"):
        run(cfg, work / "b")


def test_default_run_name_differs_exactly_when_the_trajectory_does(tmp_path, cache_dir):
    def name(*overrides: str) -> str:
        return cfg_for(tmp_path, cache_dir, *overrides).finetune.run_name

    default = name()
    assert default.startswith("iddpm_tiny_it_") and len(default) == len("iddpm_tiny_it_") + 8
    for changed in ("model.noise_schedule=linear", "data.hflip=false", "data.num_train_images=320",
                    "finetune.lr=1e-3", "finetune.seed=1", "finetune.init=/some/weights.pt"):
        assert name(changed) != default, changed
    for same in ("finetune.max_steps=5", "finetune.save_every_steps=3", "data.num_workers=2",
                 "finetune.skip_nonfinite=true", "logger=wandb"):
        assert name(same) == default, same
    assert name("finetune.run_name=mine") == "mine"


def test_skip_nonfinite_gives_up_after_max_skipped_steps_and_exports_nothing(tmp_path, cache_dir):
    # Adam moves every weight by ~lr on its first update: lr = 1e30 overflows every later forward pass
    cfg = cfg_for(tmp_path, cache_dir, "finetune.lr=1e30", "finetune.skip_nonfinite=true",
                  "finetune.max_skipped_steps=2", "finetune.max_steps=6", "finetune.run_name=diverge")
    with pytest.raises(NonFiniteError, match=r"3 steps were skipped, more than finetune.max_skipped_steps=2"):
        run(cfg, tmp_path / "run")
    run_dir = tmp_path / "checkpoints" / "finetune" / "diverge"
    assert not (run_dir / "model.pt").exists()
    json.loads((run_dir / "loss_curve.json").read_text())  # strict JSON


def test_a_diverged_run_with_skipped_steps_exports_nothing(tmp_path, cache_dir):
    """lr = 1e12 with skip_nonfinite: the weights stay finite (~1e12), the held-out loss is absurd."""
    cfg = cfg_for(tmp_path, cache_dir, "finetune.lr=1e12", "finetune.skip_nonfinite=true",
                  "finetune.max_steps=3", "finetune.run_name=diverged")
    with pytest.raises(FinetuneError, match=r"held-out loss of the trained weights is .* bits/dim .* nothing "
                                            r"was exported") as info:
        run(cfg, tmp_path / "run")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "checkpoints" / "finetune" / "diverged" / "model.pt").exists()


def test_a_run_whose_every_step_was_skipped_exports_nothing(tmp_path):
    def inf_grad_loss(model, x, seeds):  # a finite loss, an infinite gradient: d sqrt(u)/du at u = 0
        out = denoising_loss(model, x, seeds)
        return out + torch.sqrt((out * 0).sum())

    trainer = make_trainer(tmp_path, loss=inf_grad_loss, skip_nonfinite=True, max_steps=3)
    with pytest.raises(FinetuneError, match=r"all \d+ steps were skipped .* never updated"):
        trainer.run()
    assert not (trainer.run_dir / "model.pt").exists()


def test_nonfinite_initial_weights_name_the_weights_not_the_learning_rate(tmp_path):
    trainer = make_trainer(tmp_path)
    with torch.no_grad():
        trainer.model.net[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"weights themselves are non-finite \(net.0.weight: 1 ") as info:
        trainer.run()
    assert "Lower finetune.lr" not in str(info.value) and info.value.step == 1


def test_nonfinite_loss_before_any_update_does_not_blame_the_learning_rate(tmp_path):
    def nan_loss(model, x, seeds):
        return denoising_loss(model, x, seeds) * float("nan")

    with pytest.raises(NonFiniteError, match="finetune.lr is not the cause") as info:
        make_trainer(tmp_path, loss=nan_loss).run()
    assert "Lower finetune.lr" not in str(info.value)


def test_nonfinite_trained_weights_are_never_exported(tmp_path):
    def poison(step: int) -> None:
        if step == trainer.total_steps:
            with torch.no_grad():
                trainer.model.net[3].bias[1] = float("inf")

    trainer = make_trainer(tmp_path, on_step_end=poison)
    with pytest.raises(FinetuneError, match=r"trained weights are non-finite \(net.3.bias"):
        trainer.run()
    assert not (tmp_path / "model.pt").exists()


def test_json_is_strict_nonfinite_floats_become_null(tmp_path):
    path = atomic_write_json(tmp_path / "x.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": 2})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": 2}
