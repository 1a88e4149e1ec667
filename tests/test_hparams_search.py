"""A 2-trial Optuna search (hparams_search=finetune_lr) through the real CLI: each trial's objective is the
number its finetune.json holds, and optimization_results.yaml names the best trial's parameters."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import TINY, path_overrides, run_cli


def test_a_two_trial_finetune_search_writes_the_best_trials_parameters(tmp_path):
    proc = run_cli("finetune", "hparams_search=finetune_lr", "hydra.sweeper.n_trials=2",
                   "hydra.sweeper.sampler.n_startup_trials=2", *TINY, "finetune=smoke_base",
                   "finetune.init=scratch", "finetune.max_steps=1", "finetune.batch_size=4",
                   "finetune.heldout_images=2", "data.num_train_images=4", *path_overrides(tmp_path),
                   cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "multirun" / "finetune").iterdir()
    trials = []
    for job in sorted(p for p in sweep.iterdir() if p.is_dir()):
        summary = json.loads((job / "finetune.json").read_text())
        listed = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        overrides = dict(o.split("=", 1) for o in listed)
        trials.append((summary["final_heldout_loss_bpd"], overrides, summary["checkpoint_dir"]))
    assert len(trials) == 2 and trials[0][2] != trials[1][2]  # one checkpoint dir per trial
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    value, overrides, _ = min(trials, key=lambda t: t[0])
    assert best["best_value"] == pytest.approx(value, rel=1e-12)
    assert set(best["best_params"]) == {"finetune.lr", "finetune.warmup_steps"}
    assert best["best_params"]["finetune.lr"] == pytest.approx(float(overrides["finetune.lr"]), rel=1e-12)
    assert best["best_params"]["finetune.warmup_steps"] == int(overrides["finetune.warmup_steps"])


def test_a_search_whose_every_trial_fails_ends_with_one_line(tmp_path):
    """finetune=smoke without the finetune=smoke_base weights it starts from: each trial fails (logged), and
    the search ends with one line and exit 1 instead of Optuna's traceback ("No trials are completed yet")."""
    proc = run_cli("finetune", "hparams_search=finetune_lr", "hydra.sweeper.n_trials=2", *TINY,
                   "finetune=smoke", "finetune.max_steps=1", *path_overrides(tmp_path), cwd=tmp_path,
                   timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: every trial of the search failed")
    # each trial's reason, logged as it failed: its starting weights are missing
    assert (proc.stdout + proc.stderr).count("does not exist") >= 2
    (sweep,) = (tmp_path / "outputs" / "multirun" / "finetune").iterdir()
    statuses = [json.loads(p.read_text())["status"] for p in sweep.glob("*/job_status.json")]
    assert statuses == ["failed", "failed"]
