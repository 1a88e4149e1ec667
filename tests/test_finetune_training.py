"""The fine-tuning loop on a toy model: data order, per-image randomness, DDP equivalence, EMA, checks."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from finetune_toys import BASE, denoising_loss, make_trainer
from itdiffusion import training_state as ckpt
from itdiffusion.artifacts import read_loss_curve
from itdiffusion.seeding import Stream, stream_seed, stream_seed_tensor
from itdiffusion.training import (
    EMA,
    FinetuneError,
    ResumableSampler,
    random_hflip,
    validate_config,
)


def test_stream_seeds_depend_on_each_part_and_not_on_batching():
    idx = torch.arange(8)
    s = stream_seed_tensor(0, idx, Stream.TRAIN_LOSS, 0)
    assert len(set(s.tolist())) == 8 and (s >= 0).all()
    assert torch.equal(torch.cat([stream_seed_tensor(0, idx[:3], Stream.TRAIN_LOSS, 0),
                                  stream_seed_tensor(0, idx[3:], Stream.TRAIN_LOSS, 0)]), s)
    for other in (stream_seed_tensor(1, idx, Stream.TRAIN_LOSS, 0),
                  stream_seed_tensor(0, idx, Stream.TRAIN_FLIP, 0),
                  stream_seed_tensor(0, idx, Stream.TRAIN_LOSS, 1)):
        assert not set(other.tolist()) & set(s.tolist())
    assert stream_seed(1, 2, 0) != stream_seed(2, 1, 0)
    # evaluation's published seeds: numpy's SeedSequence of (seed, index, stream), 63 bits
    hi, lo = np.random.SeedSequence([0, 5, 0]).generate_state(2)
    assert stream_seed(0, 5, Stream.POINTS) == ((int(hi) << 32) | int(lo)) & (2**63 - 1)


def test_random_hflip_flips_about_half_and_exactly_left_right():
    x = torch.arange(2000 * 3 * 2 * 2, dtype=torch.float32).reshape(2000, 3, 2, 2)
    y = random_hflip(x, seed=0, epoch=0, indices=torch.arange(2000))
    flipped = (y != x).flatten(1).any(1)
    assert torch.equal(y[flipped], x[flipped].flip(-1)) and torch.equal(y[~flipped], x[~flipped])
    assert 900 < int(flipped.sum()) < 1100


def test_resumable_sampler_continues_the_same_epoch_order():
    data = list(range(20))
    full = ResumableSampler(data, seed=3)
    full.set_position(epoch=2, skip=0)
    order = list(full)
    assert sorted(order) == data
    part = ResumableSampler(data, seed=3)
    part.set_position(epoch=2, skip=8)
    assert list(part) == order[8:] and len(part) == 12
    other_epoch = ResumableSampler(data, seed=3)
    other_epoch.set_position(epoch=3, skip=0)
    assert list(other_epoch) != order


def test_ema_matches_the_recursion():
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.5)
    w0 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(2.0)
    ema.update(model)
    assert torch.allclose(ema.averaged_state_dict(model)["weight"], 0.5 * w0 + 0.5 * (w0 + 2.0))


@pytest.mark.parametrize(("key", "value", "message"), [
    ("lr", -1e-4, "finetune.lr=-0.0001 must be > 0"),
    ("lr", float("nan"), "finetune.lr=nan"),
    ("batch_size", 0, "finetune.batch_size=0"),
    ("epochs", 0, "finetune.epochs=0"),
    ("ema_decay", 1.0, "finetune.ema_decay=1.0"),
    ("save_every_steps", 0, "finetune.save_every_steps=0"),
    ("keep_epochs", -2, "finetune.keep_epochs=-2 must be >= -1"),
    ("grad_clip", 0.0, "finetune.grad_clip=0.0"),
    ("log_every_steps", 0, "finetune.log_every_steps=0"),
])
def test_bad_settings_are_rejected_with_the_key(key, value, message):
    with pytest.raises(FinetuneError, match=message.replace("(", r"\(").replace(".", r"\.")):
        validate_config(replace(BASE, **{key: value}))


def test_empty_or_too_small_training_set_is_a_clear_error(tmp_path):
    with pytest.raises(FinetuneError, match="training set is empty"):
        make_trainer(tmp_path, n_train=0)
    with pytest.raises(FinetuneError, match="3 images, fewer than one global batch of 4"):
        make_trainer(tmp_path, n_train=3)


def test_training_lowers_heldout_loss_and_writes_the_run_dir(tmp_path):
    result = make_trainer(tmp_path, epochs=3, ema_decay=None, keep_epochs=-1).run()
    curve = read_loss_curve(tmp_path / "loss_curve.json")
    assert curve == result.curve
    assert [p["step"] for p in curve] == [0, 6, 12, 18] and curve[0]["train_loss_nats"] is None
    assert curve[-1]["heldout_loss_nats"] < curve[0]["heldout_loss_nats"]
    for p in curve[1:]:
        assert p["train_loss_bpd"] == pytest.approx(p["train_loss_nats"] / (3 * 16 * 16 * 0.6931471805599453))
    assert sorted(f.name for f in tmp_path.glob("*.pt")) == ["epoch_000.pt", "epoch_001.pt", "epoch_002.pt",
                                                            "last.pt", "model.pt"]
    exported = torch.load(tmp_path / "model.pt", weights_only=True)
    final = ckpt.load_training_state(tmp_path / "last.pt")
    assert exported.keys() == final["model"].keys()
    assert all(torch.equal(exported[k], final["model"][k]) for k in exported)


@pytest.mark.parametrize(("keep", "kept"),
                         [(-1, [0, 1, 2, 3]), (0, []), (1, [3]), (2, [2, 3]), (9, [0, 1, 2, 3])])
def test_keep_epochs_keeps_exactly_the_newest_epoch_files(tmp_path, keep, kept):
    make_trainer(tmp_path, epochs=4, ema_decay=None, keep_epochs=keep, dropout=0.0).run()
    expected = [ckpt.epoch_checkpoint_name(e) for e in kept] + ["last.pt", "model.pt"]
    assert sorted(f.name for f in tmp_path.glob("*.pt")) == expected
    for e in kept:  # each kept file is the state at the end of its own epoch (6 steps per epoch)
        state = ckpt.load_training_state(tmp_path / ckpt.epoch_checkpoint_name(e))
        assert state["progress"]["step"] == 6 * (e + 1)


def test_max_steps_stops_mid_epoch(tmp_path):
    result = make_trainer(tmp_path, max_steps=4).run()
    assert result.steps == 4
    assert [p["step"] for p in result.curve] == [0, 4]
    assert ckpt.load_training_state(tmp_path / "last.pt")["progress"]["batch_in_epoch"] == 4



class RecordingTracker:
    def __init__(self):
        self.rows: list[tuple[int, dict]] = []

    def log(self, row: dict, step: int) -> None:
        self.rows.append((step, row))


def test_tracker_rows_average_the_train_loss_over_log_every_steps(tmp_path):
    tracker = RecordingTracker()
    trainer = make_trainer(tmp_path, log_every_steps=6)  # one row per epoch of 6 steps
    trainer.tracker = tracker
    result = trainer.run()
    train_rows = [(s, r) for s, r in tracker.rows if "train/loss_nats" in r]
    assert [s for s, _ in train_rows] == [6, 12]
    for (_, row), point in zip(train_rows, result.curve[1:], strict=True):
        assert row["train/loss_nats"] == pytest.approx(point["train_loss_nats"], rel=1e-12)
        assert row["train/loss_bpd"] == pytest.approx(point["train_loss_bpd"], rel=1e-12)
    heldout_steps = [s for s, r in tracker.rows if "heldout/loss_bpd" in r]
    assert heldout_steps == [0, 6, 12]


def test_warmup_ramps_the_learning_rate_linearly(tmp_path):
    tracker = RecordingTracker()
    trainer = make_trainer(tmp_path, warmup_steps=4, log_every_steps=1, max_steps=6)
    trainer.tracker = tracker
    trainer.run()
    lrs = [r["train/lr"] for _, r in tracker.rows if "train/lr" in r]
    assert lrs == pytest.approx([1e-2 * f for f in (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)])


def test_bf16_autocast_is_active_in_the_loss(tmp_path):
    seen = []

    def loss(model, x, seeds):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return denoising_loss(model, x, seeds)

    result = make_trainer(tmp_path, loss=loss, bf16=True, max_steps=3).run()
    assert seen == [True, True, True]
    assert all(torch.isfinite(torch.tensor(p["heldout_loss_nats"])) for p in result.curve)


def test_a_global_batch_that_the_processes_cannot_share_is_a_clear_error(tmp_path, monkeypatch):
    from itdiffusion import distributed

    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(FinetuneError, match=r"batch_size=4 \(the global batch\) is not a multiple of the 3"):
        make_trainer(tmp_path)
