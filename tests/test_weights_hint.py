"""An evaluation of a model with no weights of its own (experiment=smoke's iddpm_tiny) names the exact
model.checkpoint to add: the reproduce chain's trained model; a sweep says so before any job starts."""

from __future__ import annotations

import os

from conftest import path_overrides, run_cli
from itdiffusion import training_state as ckpt
from itdiffusion.weights_hint import chain_checkpoints


def chain_run(checkpoint_dir, run_name: str, model_name: str, age_s: float = 0.0):
    """A finetune run dir as the reproduce chain leaves it: model.pt and a last.pt naming the model."""
    run_dir = checkpoint_dir / "finetune" / run_name
    run_dir.mkdir(parents=True)
    state = {"model": {}, "optimizer": {}, "scheduler": {}, "rng": [], "progress": {},
             "config": {"model": {"name": model_name}}}
    (run_dir / ckpt.LAST).write_bytes(ckpt.serialize(state))
    (run_dir / ckpt.EXPORTED_MODEL).write_bytes(b"weights")
    when = (run_dir / ckpt.EXPORTED_MODEL).stat().st_mtime - age_s
    os.utime(run_dir / ckpt.EXPORTED_MODEL, (when, when))
    return run_dir / ckpt.EXPORTED_MODEL


def test_the_chains_models_are_found_tuned_first_newest_first(tmp_path):
    old_tune = chain_run(tmp_path, "smoke-aaaa-tune", "iddpm_tiny", age_s=100)
    new_tune = chain_run(tmp_path, "smoke-bbbb-tune", "iddpm_tiny")
    base = chain_run(tmp_path, "smoke-bbbb-base", "iddpm_tiny")
    chain_run(tmp_path, "paper-cccc-tune", "iddpm_cifar10_vlb")  # another model
    ddpm = chain_run(tmp_path, "smoke-bbbb-ddpm-tune", "ddpm_tiny")
    masked = chain_run(tmp_path, "smoke-bbbb-masked", "masked_pixels_tiny")
    assert chain_checkpoints(tmp_path, "iddpm_tiny", "iddpm") == [new_tune, old_tune, base]
    assert chain_checkpoints(tmp_path, "ddpm_tiny", "ddpm") == [ddpm]
    assert chain_checkpoints(tmp_path, "masked_pixels_tiny", "masked_pixels") == [masked]
    assert chain_checkpoints(tmp_path / "nowhere", "iddpm_tiny", "iddpm") == []


def test_a_smoke_sweep_without_weights_fails_before_any_job_with_the_override(tmp_path):
    tune = chain_run(tmp_path / "checkpoints", "smoke-bbbb-tune", "iddpm_tiny")
    base = chain_run(tmp_path / "checkpoints", "smoke-bbbb-base", "iddpm_tiny", age_s=10)
    proc = run_cli("evaluate", "-m", "experiment=smoke", "logger=none", "estimator.npoints=4,8",
                   *path_overrides(tmp_path), cwd=tmp_path, env={"ITD_SWEEP_ID": "sw"}, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [
        f"error: model iddpm_tiny names no weights: add model.checkpoint={tune} (the newest iddpm_tiny "
        f"that scripts/reproduce.sh trained; others: {base})"]
    assert not list((tmp_path / "outputs").rglob("job_status.json"))  # no job started
    assert not (tmp_path / "outputs" / "multirun" / "evaluate" / "sw" / "0").exists()


def test_a_single_run_without_weights_or_chain_says_what_to_add(tmp_path):
    proc = run_cli("evaluate", "experiment=smoke", "logger=none", "run_id=nw", *path_overrides(tmp_path),
                   cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [
        "error: model iddpm_tiny names no weights: add model.checkpoint=<its weights file> (no iddpm_tiny "
        f"trained by scripts/reproduce.sh in {tmp_path / 'checkpoints' / 'finetune'}: `make smoke` trains "
        "one)"]
    assert not (tmp_path / "outputs" / "evaluate").exists()
