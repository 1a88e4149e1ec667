"""The evaluate stage under a dataset budget: the pilot, the chosen settings, the sampled VLB."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from itdiffusion.artifacts import read_per_image
from itdiffusion.config import value_problems
from itdiffusion.stages import evaluate
from wandb_records import offline_runs


@pytest.fixture
def tiny_cfg(make_cfg, shared_cache):
    from conftest import TINY

    def make(*overrides):
        return make_cfg(*TINY, f"paths.cache_dir={shared_cache}", *overrides)

    return make


def test_dataset_budget_records_the_pilot_and_uses_its_choice(tiny_cfg, tiny_checkpoints, tmp_path):
    cfg = tiny_cfg(f"model.checkpoint={tiny_checkpoints[0]}", "model.diffusion_steps=12",
                   "estimator.npoints=16", "estimator.budget=dataset", "estimator.pilot_images=4",
                   "estimator.target_stderr_bpd=1000", "run_id=budget")
    run_dir = tmp_path / "run"
    evaluate.run(cfg, run_dir)
    stored = json.loads((run_dir / "metrics.json").read_text())
    budget = stored["budget"]
    # a huge target: the fewest points and VLB strata (the floor, 4) do, with no top-up
    assert budget["chosen"] == {"npoints": 4, "vlb_steps": "4", "it_blocks": 1, "vlb_blocks": 1}
    assert budget["full"] == {"npoints": 16, "vlb_steps": "all"}
    assert budget["network_evals_per_image"] == {"budgeted": 2 * 4 + 5, "planned": 2 * 4 + 5,
                                                 "full": 2 * 16 + 12, "ratio": round(44 / 13, 2)}
    assert budget["target_met"] is True and len(budget["top_ups"]) == 1
    for name in ("it_continuous", "it_discrete", "it_dequantized", "vlb", "vlb_continuous"):
        check = budget["stderr_check"][name]
        assert check["target"] == 1000 and check["met"] and check["predicted"] > 0
        key = "vlb_bpd" if name == "vlb" else f"{name}_bpd"
        assert check["realized"] == stored[f"{key}_stderr"] == budget["realized_stderr_bpd"][name]
    assert set(budget["pilot"]["it"]) == {"it_continuous", "it_discrete", "it_dequantized"}
    assert set(budget["pilot"]["vlb"]) == {"vlb", "vlb_continuous"}
    assert budget["pilot"]["it"]["it_continuous"]["ladder"] == [2, 4, 8, 16]
    assert budget["pilot"]["vlb"]["vlb"]["ladder"] == [2, 4, 8]
    choice = stored["decoder_choice"]
    assert choice["rule"] == "pilot" and choice["pilot_images"] == 4 and choice["points_per_image"] == 16
    assert set(choice["groups"]["m0"]["index"]) == {"continuous", "discrete", "dequantized"}
    # the run evaluated what was chosen, and says so in its config
    assert stored["config"]["estimator"]["npoints"] == 4 and stored["npoints"] == 4
    assert stored["network_evals"] == 4 * 13
    per_image = read_per_image(run_dir / "per_image.npz")
    assert per_image.curves.logsnr.shape == (4, 4)
    assert per_image.pilot_curves.logsnr.shape == (4, 16)
    assert np.isfinite(stored["vlb_bpd_mc_stderr"]) and stored["vlb_bpd_mc_stderr"] > 0
    assert stored["vlb_bpd_stderr"] >= stored["vlb_bpd_mc_stderr"] * 0.5
    assert np.isfinite(stored["it_discrete_bpd_mc_stderr"])


def test_a_tight_target_falls_back_to_the_full_protocol(tiny_cfg, tiny_checkpoints, tmp_path):
    cfg = tiny_cfg(f"model.checkpoint={tiny_checkpoints[0]}", "estimator.vlb=false", "estimator.npoints=8",
                   "estimator.budget=dataset", "estimator.pilot_images=3", "estimator.target_stderr_bpd=1e-6")
    metrics = evaluate.run(cfg, tmp_path / "run")
    assert metrics["budget"]["chosen"] == {"npoints": 8, "it_blocks": 1, "vlb_blocks": 1}
    assert metrics["budget"]["target_reached"] == {"npoints": False}
    # the full protocol's points already: no top-up can help, and the run says the target was missed
    assert metrics["budget"]["target_met"] is False and len(metrics["budget"]["top_ups"]) == 1


def test_budget_values_are_checked_at_launch(tiny_cfg):
    cfg = tiny_cfg("estimator.budget=both", "estimator.vlb_steps=alll", "estimator.target_stderr_ratio=0.9",
                   "estimator.pilot_images=1")
    problems = " ".join(value_problems(cfg))
    for key in ("estimator.budget", "estimator.vlb_steps", "estimator.target_stderr_ratio",
                "estimator.pilot_images"):
        assert key in problems
    assert not value_problems(tiny_cfg("estimator.vlb_steps=32"))


def test_each_stderr_check_is_logged_live_as_metrics_json_records_it(tiny_cfg, tiny_checkpoints, tmp_path,
                                                                     optimistic_pilot, caplog):
    """A pilot that says 4 points reach a target no estimate can meet: the run tops up to the full
    protocol's points and reports the miss; every check is in the offline wandb run (read back from disk)
    with metrics.json's ``budget.top_ups`` values, and on the console, as it is made."""
    cfg = tiny_cfg(f"model.checkpoint={tiny_checkpoints[0]}", "model.diffusion_steps=12",
                   "estimator.npoints=16", "estimator.budget=dataset", "estimator.pilot_images=4",
                   "estimator.target_stderr_bpd=1e-6", "estimator.pixel_maps=0", "run_id=topup",
                   "logger=wandb", f"logger.dir={tmp_path / 'wb'}")
    with caplog.at_level(logging.INFO, logger="itdiffusion"):
        metrics = evaluate.run(cfg, tmp_path / "run")
    rounds = json.loads((tmp_path / "run" / "metrics.json").read_text())["budget"]["top_ups"]
    assert rounds == metrics["budget"]["top_ups"]
    assert [r["blocks"]["npoints"] for r in rounds] == [1, 4]  # 4 of the full 16 points, then all 16
    assert metrics["budget"]["target_met"] is False
    [run] = offline_runs(tmp_path / "wb")
    logged = [row for row in run.history if "budget/check" in row]
    assert [row["budget/check"] for row in logged] == list(range(len(rounds)))
    for row, entry in zip(logged, rounds, strict=True):
        assert row["budget/it_blocks"] == entry["blocks"]["npoints"]
        assert row["budget/vlb_blocks"] == entry["blocks"]["vlb_steps"]
        assert entry["stderr_check"]
        for name, found in entry["stderr_check"].items():
            assert row[f"budget/{name}/realized_stderr_bpd"] == found["realized"]
            assert row[f"budget/{name}/target_stderr_bpd"] == found["target"] == 1e-6
            assert row[f"budget/{name}/met"] == int(found["met"]) == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dataset budget check")]
    assert len(lines) == len(rounds)
    assert "drawing blocks up to" in lines[0] and "drawing" not in lines[-1]
    shown = f"it_discrete {rounds[0]['stderr_check']['it_discrete']['realized']:.4g}/1e-06 MISSED"
    assert shown in lines[0], lines[0]
