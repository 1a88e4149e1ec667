"""Exact resume of the fine-tuning loop: crashes, pre-emption, damaged checkpoints, non-finite steps."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from finetune_toys import denoising_loss, make_trainer
from itdiffusion import training_state as ckpt
from itdiffusion.artifacts import read_loss_curve
from itdiffusion.training import FinetuneError, NonFiniteError, Preempted

TOTAL_STEPS = 12  # 2 epochs x 6 steps


class Crash(Exception):
    """Stands in for SIGKILL: the process state is dropped, only files survive."""


def crash_at(step: int):
    def hook(s: int) -> None:
        if s == step:
            raise Crash(s)
    return hook


def final_files(run_dir: Path) -> dict:
    return {
        "model": torch.load(run_dir / "model.pt", weights_only=True),
        "ema": torch.load(run_dir / "ema.pt", weights_only=True),
        "curve": read_loss_curve(run_dir / "loss_curve.json"),
    }


def assert_identical(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
        assert torch.equal(a["ema"][k], b["ema"][k]), k
    assert a["curve"] == b["curve"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("reference")
    result = make_trainer(run_dir).run()
    assert result.steps == TOTAL_STEPS and result.skipped_steps == 0
    return final_files(run_dir)


@pytest.mark.parametrize("crash_step", [1, 3, 6, 9])
def test_crash_and_resume_is_bit_identical(tmp_path, reference, crash_step):
    # 1, 3, 9: mid-epoch (before / after a save_every_steps=2 checkpoint); 6: last batch of epoch 0
    with pytest.raises(Crash):
        make_trainer(tmp_path, on_step_end=crash_at(crash_step)).run()
    assert not (tmp_path / "model.pt").exists()
    make_trainer(tmp_path).run()
    assert_identical(final_files(tmp_path), reference)


def test_repeated_crashes_resume_bit_identical(tmp_path, reference):
    for step in (2, 5, 7, 11):
        with pytest.raises(Crash):
            make_trainer(tmp_path, on_step_end=crash_at(step)).run()
    make_trainer(tmp_path).run()
    assert_identical(final_files(tmp_path), reference)


def test_kill_after_pruning_then_resume_is_bit_identical(tmp_path, reference):
    # keep_epochs=0 from step 6 on: epoch 0's file is never kept, so the resume reads last.pt alone
    with pytest.raises(Crash):
        make_trainer(tmp_path, keep_epochs=0, on_step_end=crash_at(9)).run()
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["last.pt"]
    make_trainer(tmp_path, keep_epochs=0).run()
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["ema.pt", "last.pt", "model.pt"]
    assert_identical(final_files(tmp_path), reference)


def test_rerun_of_finished_run_changes_nothing(tmp_path, reference):
    make_trainer(tmp_path).run()
    result = make_trainer(tmp_path).run()
    assert result.steps == TOTAL_STEPS
    assert_identical(final_files(tmp_path), reference)


def test_crash_during_checkpoint_write_leaves_previous_checkpoint(tmp_path, reference, monkeypatch):
    real_write = ckpt.atomic_write_bytes
    calls = {"n": 0}

    def dies_midway(path, data):  # SIGKILL halfway through the 2nd write of last.pt: a partial temporary
        calls["n"] += Path(path).name == "last.pt"
        if calls["n"] == 2:
            Path(path).with_name(f".{Path(path).name}.abc123.tmp").write_bytes(data[: len(data) // 2])
            raise Crash("killed while writing")
        return real_write(path, data)

    monkeypatch.setattr(ckpt, "atomic_write_bytes", dies_midway)
    with pytest.raises(Crash):
        make_trainer(tmp_path).run()
    monkeypatch.setattr(ckpt, "atomic_write_bytes", real_write)
    assert list(tmp_path.glob(".*.tmp"))
    assert ckpt.load_training_state(tmp_path / "last.pt")["progress"]["step"] == 2
    with pytest.warns(UserWarning, match="partial file"):
        make_trainer(tmp_path).run()
    assert not list(tmp_path.glob(".*.tmp"))
    assert_identical(final_files(tmp_path), reference)


def test_truncated_last_checkpoint_falls_back_to_previous_good_one(tmp_path, reference):
    with pytest.raises(Crash):
        make_trainer(tmp_path, on_step_end=crash_at(9)).run()
    last = tmp_path / "last.pt"
    assert ckpt.load_training_state(last)["progress"]["step"] == 8
    last.write_bytes(last.read_bytes()[:1000])  # an older, non-atomic crash cut it short
    with pytest.warns(UserWarning) as record:
        make_trainer(tmp_path).run()
    messages = " ".join(str(w.message) for w in record)
    assert "skipping damaged checkpoint" in messages and "last.pt" in messages
    assert "epoch_000.pt" in messages  # the previous good one
    assert_identical(final_files(tmp_path), reference)


def test_all_checkpoints_damaged_is_an_error_not_a_silent_restart(tmp_path):
    with pytest.raises(Crash):
        make_trainer(tmp_path, on_step_end=crash_at(3)).run()
    (tmp_path / "last.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.warns(UserWarning, match="damaged"):
        with pytest.raises(FinetuneError, match="no readable checkpoint"):
            make_trainer(tmp_path).run()


def test_sigterm_saves_then_resume_is_bit_identical(tmp_path, reference):
    def preempt(step: int) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    handler_before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted) as info:
        make_trainer(tmp_path, on_step_end=preempt).run()
    # the signal arrived between steps 3 and 4: every process finishes step 4, then saves
    assert info.value.step == 4
    assert signal.getsignal(signal.SIGTERM) is handler_before
    assert ckpt.load_training_state(tmp_path / "last.pt")["progress"]["step"] == 4
    make_trainer(tmp_path).run()
    assert_identical(final_files(tmp_path), reference)


def nan_at_call(n: int, grad_only: bool = False):
    calls = {"n": 0}

    def loss(model, x, seeds):
        calls["n"] += 1
        out = denoising_loss(model, x, seeds)
        if calls["n"] == n:
            if grad_only:  # finite loss, infinite gradient: d sqrt(u)/du at u = 0
                return out + torch.sqrt((out * 0).sum())
            return out * float("nan")
        return out
    return loss


@pytest.mark.parametrize("grad_only", [False, True])
def test_nonfinite_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path, grad_only):
    with pytest.raises(NonFiniteError, match="at step 4 ") as info:
        make_trainer(tmp_path, loss=nan_at_call(4, grad_only), save_every_steps=1).run()
    assert info.value.step == 4
    state = ckpt.load_training_state(tmp_path / "last.pt")
    assert state["progress"]["step"] == 3
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (tmp_path / "model.pt").exists()


def test_skip_nonfinite_skips_and_counts(tmp_path):
    with pytest.warns(UserWarning, match=r"skipped step 4: .*\(1 skipped so far\)"):
        result = make_trainer(tmp_path, loss=nan_at_call(4, grad_only=True), skip_nonfinite=True).run()
    assert result.steps == 12 and result.skipped_steps == 1
    state = ckpt.load_training_state(tmp_path / "last.pt")
    assert state["progress"]["skipped_steps"] == 1
    adam_steps = {float(s["step"]) for s in state["optimizer"]["state"].values()}
    assert adam_steps == {11.0}  # 12 batches, one update skipped
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_second_process_on_same_run_is_refused(tmp_path):
    with ckpt.exclusive_run_dir(tmp_path), pytest.raises(FinetuneError, match="another process"):
        make_trainer(tmp_path).run()


def test_changed_settings_refuse_to_resume(tmp_path):
    with pytest.raises(Crash):
        make_trainer(tmp_path, on_step_end=crash_at(3)).run()
    with pytest.raises(FinetuneError, match=r"lr: 0.01 -> 0.02"):
        make_trainer(tmp_path, lr=2e-2).run()
