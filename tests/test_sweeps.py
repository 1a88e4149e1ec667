"""Hydra multirun (-m) through the real command line: one run id, run dir and results row per job;
a failed job is reported and the others still run; the sweep's exit status says whether all succeeded."""

from __future__ import annotations

import json

from conftest import TINY, run_cli


def test_a_2x2_evaluate_sweep_gives_four_runs_and_four_rows(tiny_checkpoints, shared_cache, tmp_path):
    outputs = tmp_path / "outputs"
    proc = run_cli(
        "evaluate", "-m", *[o for o in TINY if not o.startswith("data.num_images")], "data.num_images=2",
        "estimator.vlb=false", "estimator.pixel_maps=0",
        f"paths.cache_dir={shared_cache}",
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
    assert {rows[f"sw-{n}"]["group"] for n in range(4)} == {"sweep sw"}  # one group per sweep

    # a run with results=false keeps its run dir and stays out of the tables, also after a report
    proc = run_cli(
        "evaluate", *TINY, "estimator.vlb=false", f"paths.cache_dir={shared_cache}",
        f"paths.output_dir={outputs}", f"model.checkpoint={tiny_checkpoints[0]}", "run_id=hidden",
        "results=false", cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((outputs / "evaluate" / "hidden" / "metrics.json").read_text())["results"] is False
    proc = run_cli("report", "logger=none", f"paths.output_dir={outputs}", "run_id=rep", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads((outputs / "results" / "results.json").read_text())["runs"]
    assert "hidden" not in runs and {f"sw-{n}" for n in range(4)} <= set(runs)
    md = (outputs / "results" / "results.md").read_text()
    assert md.count("## sweep sw") == 1 and "hidden" not in md
    section = md[md.index("## sweep sw"):]
    assert all(f"| sw-{n} |" in section for n in range(4))


def test_a_failed_job_is_reported_and_the_others_still_run(tmp_path):
    outputs = tmp_path / "outputs"
    proc = run_cli(
        "stats", "-m", *[o for o in TINY if not o.startswith("data.patches_")], f"paths.output_dir={outputs}",
        f"paths.data_dir={tmp_path / 'nothing'}", "data=cifar10,patches", cwd=tmp_path,
        env={"ITD_SWEEP_ID": "mixed"},  # (a data.patches_* key would fail the cifar10 job at launch)
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    failed = [line for line in output.splitlines() if "job #0 (" in line and ") failed: " in line]
    assert failed and "data=cifar10" in failed[-1] and "cifar-10-batches-py" in failed[-1]  # which job, why
    assert "1 job(s) succeeded, 1 failed or missing" in output
    sweep = outputs / "multirun" / "stats" / "mixed"
    assert json.loads((sweep / "0" / "job_status.json").read_text())["status"] == "failed"
    assert json.loads((sweep / "1" / "stats.json").read_text())["run_id"] == "mixed-1"  # job 1 still ran


def test_the_submitit_local_launcher_runs_a_two_job_sweep(tmp_path):
    """Hydra's submitit launcher (the local executor: the same code path as SLURM's, jobs in their own
    processes) runs a 2-job stats sweep; the jobs agree on the sweep id and get their own run ids."""
    outputs = tmp_path / "outputs"
    proc = run_cli(
        "stats", "-m", "hydra/launcher=submitit_local", *TINY, f"paths.output_dir={outputs}",
        "data.stats_images=20,40", cwd=tmp_path, env={"ITD_SWEEP_ID": "local"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sweep = outputs / "multirun" / "stats" / "local"
    runs = [json.loads((sweep / str(n) / "stats.json").read_text()) for n in range(2)]
    assert [(r["run_id"], r["stats_images"]) for r in runs] == [("local-0", 20), ("local-1", 40)]
    assert list((sweep / ".submitit").iterdir())  # submitit's job folders: it really went through submitit


def test_the_slurm_preset_composes(make_cfg):
    from hydra import compose, initialize_config_dir

    from itdiffusion.stages import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.nodes=2"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 8, 8)
    assert launcher.max_num_timeout > 0  # requeued after pre-emption / time-out


def test_reproduce_sh_runs_the_chain_once_per_sweep_job_and_reports_failures(tmp_path):
    """`make reproduce ARGS="-m ..."`: reproduce.sh expands the sweep, runs every job, lists the failed ones
    and exits 1 (two bad experiments fail fast, so no chain runs here)."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    proc = subprocess.run(["bash", str(REPO / "scripts" / "reproduce.sh"), "-m", "experiment=nope1,nope2",
                           "estimator.npoints=4"], env={**os.environ, "PY": sys.executable},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "sweep job #0/2: experiment=nope1 estimator.npoints=4" in proc.stdout
    assert "sweep job #1/2: experiment=nope2 estimator.npoints=4" in proc.stdout
    assert "2 of 2 job(s) failed" in proc.stderr
    assert "#1 (experiment=nope2 estimator.npoints=4)" in proc.stderr
