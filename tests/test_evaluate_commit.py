"""An evaluate run dir is committed as a unit: a crash between any two of the stage's writes never leaves a
run that a later reader takes for complete with other numbers (issue: half-old, half-new run dirs)."""

from __future__ import annotations

import json

import pytest

from conftest import TINY
from itdiffusion import artifacts, evaluation
from itdiffusion.errors import UserError
from itdiffusion.results import load_runs
from itdiffusion.stages import evaluate, evaluation_frame

KEYS = ("it_continuous_bpd", "it_discrete_bpd", "it_dequantized_bpd", "vlb_bpd")


class Crash(Exception):
    """Stands in for a kill at one write: only files survive."""


@pytest.fixture
def cfg_for(make_cfg, shared_cache, tiny_checkpoints):
    def make(*overrides: str):
        return make_cfg(
            *TINY,
            f"paths.cache_dir={shared_cache}",
            f"model.checkpoint={tiny_checkpoints[0]}",
            "estimator.pixel_maps=0",
            "run_id=unit",
            *overrides,
        )

    return make


# the stage's writes, in order: per_image.npz, metrics.json, the results row
WRITES = [(artifacts, "write_per_image"), (artifacts, "atomic_write_json"), (evaluation_frame, "record_run")]


@pytest.mark.parametrize("crash_at", range(len(WRITES)))
def test_a_crash_at_any_write_is_redone_or_refused_never_mixed(cfg_for, tmp_path, monkeypatch, crash_at):
    run_dir = tmp_path / "run"
    old = evaluate.run(cfg_for("estimator.seed=1"), run_dir)  # an earlier run in the same dir
    # what the new settings give uninterrupted (its results row elsewhere)
    fresh = evaluate.run(cfg_for(f"paths.results_dir={tmp_path / 'elsewhere'}"), tmp_path / "fresh")
    module, name = WRITES[crash_at]

    def crash(*args, **kwargs):
        raise Crash

    with pytest.raises(UserError, match=r"other settings \(estimator\.seed: 1 -> 0\)"):
        evaluate.run(cfg_for("skip_done=true"), run_dir)  # never skipped as done: it holds other numbers
    with monkeypatch.context() as patch:
        patch.setattr(module, name, crash)
        with pytest.raises(Crash):
            evaluate.run(cfg_for(), run_dir)
    if crash_at < 2:  # before metrics.json was written: the dir reads as incomplete, and readers refuse it
        assert not artifacts.is_complete(run_dir)
        with pytest.raises(UserError, match="incomplete evaluation|not found"):
            from itdiffusion.ensemble import proposal_of_run

            proposal_of_run(str(run_dir))
    rerun = evaluate.run(cfg_for("skip_done=true"), run_dir)
    stored = json.loads((run_dir / "metrics.json").read_text())
    for key in KEYS:
        assert stored[key] == fresh[key], key  # the new settings' numbers, never the old run's
        assert stored[key] != old[key], key
    row = load_runs(tmp_path / "outputs" / "results")["unit"]
    assert all(row[key] == stored[key] for key in KEYS)  # the results store agrees with metrics.json
    assert rerun is None or rerun[KEYS[0]] == fresh[KEYS[0]]


def test_a_rerun_removes_the_temporary_files_of_a_killed_commit(cfg_for, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stale = [run_dir / ".per_image.npz.k1ll3d.tmp", run_dir / ".metrics.json.k1ll3d.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    evaluate.run(cfg_for(), run_dir)
    assert artifacts.is_complete(run_dir) and not any(p.exists() for p in stale)


def test_a_nonfinite_estimate_stops_the_run_and_leaves_no_chunks(cfg_for, tmp_path, monkeypatch):
    real = evaluation.estimate_groups

    def with_a_nan(per_image, *args, **kwargs):
        out, found = real(per_image, *args, **kwargs)
        out.estimates["it_continuous_nats"][0, 1] = float("nan")
        return out, found

    monkeypatch.setattr(evaluation, "estimate_groups", with_a_nan)
    run_dir = tmp_path / "run"
    with pytest.raises(UserError, match=r"evaluation stopped: m0.it_continuous_nats of test image 1 is nan"):
        evaluate.run(cfg_for(), run_dir)
    assert not (run_dir / "partial").exists() and not (run_dir / artifacts.METRICS).exists()


def test_more_images_asked_for_than_the_set_holds_are_logged_and_recorded(cfg_for, tmp_path, caplog):
    metrics = evaluate.run(cfg_for("data.patches_per_photo=2", "data.num_images=100"), tmp_path / "run")
    assert metrics["num_images"] == 4 and metrics["num_images_requested"] == 100
    assert "data.num_images=100, but the test split holds 4 images: all 4 are used" in caplog.text
