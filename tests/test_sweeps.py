"""Hydra multirun (-m) through the real command line: one run id, run dir and results row per job;
a failed job is reported and the others still run; the sweep's exit status says whether all succeeded."""

from __future__ import annotations

import json

from conftest import TINY, run_cli


def test_a_2x2_evaluate_sweep_gives_four_runs_and_four_rows(tiny_checkpoints, shared_cache, tmp_path):
    outputs = tmp_path / "outputs"
    proc = run_cli(
        "evaluate", "-m", *TINY, "estimator.vlb=false", f"paths.cache_dir={shared_cache}",
        f"paths.output_dir={outputs}", f"model.checkpoint={tiny_checkpoints[0]}",
        "estimator.npoints=4,5", "estimator.seed=0,1", cwd=tmp_path, env={"ITD_SWEEP_ID": "sw"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sweep = outputs / "multirun" / "evaluate" / "sw"
    metrics = [json.loads((sweep / str(n) / "metrics.json").read_text()) for n in range(4)]
    assert [m["run_id"] for m in metrics] == ["sw-0", "sw-1", "sw-2", "sw-3"]
    assert sorted((m["npoints"], m["config"]["estimator"]["seed"]) for m in metrics) == [
        (4, 0), (4, 1), (5, 0), (5, 1)]
    assert len({m["it_continuous_bpd"] for m in metrics}) == 4  # four different estimates
    rows = json.loads((outputs / "results" / "results.json").read_text())
    rows = rows.get("runs", rows) if isinstance(rows, dict) else rows
    assert {"sw-0", "sw-1", "sw-2", "sw-3"} <= set(rows if isinstance(rows, dict) else
                                                   [r["run_id"] for r in rows])
    for n in range(4):
        assert json.loads((sweep / str(n) / "job_status.json").read_text())["status"] == "ok"


def test_a_failed_job_is_reported_and_the_others_still_run(tmp_path):
    outputs = tmp_path / "outputs"
    proc = run_cli(
        "stats", "-m", *TINY, f"paths.output_dir={outputs}", f"paths.data_dir={tmp_path / 'nothing'}",
        "data=cifar10,patches", cwd=tmp_path, env={"ITD_SWEEP_ID": "mixed"},
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    failed = [line for line in output.splitlines() if "job #0 (" in line and ") failed: " in line]
    assert failed and "data=cifar10" in failed[-1] and "cifar-10-batches-py" in failed[-1]  # which job, why
    assert "1 job(s) succeeded, 1 failed or missing" in output
    sweep = outputs / "multirun" / "stats" / "mixed"
    assert json.loads((sweep / "0" / "job_status.json").read_text())["status"] == "failed"
    assert json.loads((sweep / "1" / "stats.json").read_text())["run_id"] == "mixed-1"  # job 1 still ran
