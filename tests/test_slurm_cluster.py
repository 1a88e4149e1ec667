"""On a real single-node SLURM (``bash scripts/local_slurm.sh up``; ``make test-slurm``): the sbatch template,
time limits, requeues, resubmission, ``srun -n2`` and submitit sweeps, as users run them.

The smoke chain (MASKED=0) runs three times through scripts/slurm.sbatch on the CPU partition: once
uninterrupted, once cut by its time limit (it requeues itself) and once cancelled and submitted again; the
per-image results and the weights of the interrupted ones must equal the uninterrupted run's exactly.
The submitit sweeps evaluate the uninterrupted run's base model at tiny sizes. SLURM holds a requeued job
for two minutes (its BeginTime); the tests release it at once with ``scontrol update StartTime=now``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "scripts" / "slurm.sbatch"
CPU_JOB = ["--partition=cpu", "--gpus-per-node=0", "--cpus-per-task=2"]  # the template's CPU overrides
CHAIN_TIMEOUT = 1500
# the smoke chain at tiny sizes (every stage of it still runs): 4 training steps per model, 4 test images
SMALL = ["data.stats_diagonal=true", "data.stats_images=64", "data.num_train_images=64",
         "finetune.max_steps=4", "finetune.heldout_images=8", "data.num_images=4", "estimator.npoints=8",
         "model.diffusion_steps=4", "estimator.vlb_steps_per_batch=4"]
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED"}


def environment(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "REPRO_", "ITD_SWEEP"))}
    return {**env, "PY": sys.executable, "PYTHONPATH": str(REPO / "src"), "WANDB_SILENT": "true",
            "MASKED": "0", **extra}


@pytest.fixture(scope="session")
def cluster() -> None:
    probe = None
    if shutil.which("sinfo"):
        probe = subprocess.run(["sinfo", "-h", "-p", "cpu", "-o", "%a"], capture_output=True, text=True)
    if probe is None or probe.returncode != 0 or probe.stdout.strip() != "up":
        pytest.fail("no SLURM with an `up` partition `cpu` here: run `bash scripts/local_slurm.sh up` as "
                    "root (make test-slurm does)")


def job_info(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    info: dict[str, str] = {}
    for line in out.splitlines()[:1]:
        for field in line.split():
            key, _, value = field.partition("=")
            info.setdefault(key, value)
    return info


def release_held(jobs: list[str] | None = None) -> None:
    """Start requeued jobs now instead of after SLURM's two-minute hold."""
    out = subprocess.run(["squeue", "-h", "-t", "PD", "-o", "%i %r"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        job, _, reason = line.partition(" ")
        if reason.strip() == "BeginTime" and (jobs is None or job.split("_")[0] in jobs):
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)


def wait_for(job: str, timeout: float, log: Path | None = None) -> dict[str, str]:
    """Wait for a job to end (releasing its requeue holds); its final ``scontrol show job`` fields."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job_info(job)
        if info.get("JobState") in FINAL:
            return info
        release_held([job])
        time.sleep(2)
    subprocess.run(["scancel", job])
    tail = log.read_text()[-4000:] if log is not None and log.exists() else ""
    pytest.fail(f"job {job} did not end within {timeout} s: {job_info(job)}\n{tail}")


def submit(args: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def chain_args(root: Path) -> list[str]:
    return [str(SBATCH), "experiment=smoke", *SMALL, f"paths.output_dir={root / 'outputs'}",
            f"paths.checkpoint_dir={root / 'checkpoints'}"]


def run_id(root: Path) -> str:
    """The chain's REPRO_ID, read from its base model's evaluation folder."""
    found = sorted(p.name[: -len("-base")] for p in (root / "outputs" / "evaluate").glob("*-base"))
    assert len(found) == 1, found
    return found[0]


def outputs_of(root: Path) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict[str, torch.Tensor]]]:
    """Per-image results of every evaluation and the weights of the base and fine-tuned models."""
    rid = run_id(root)
    per_image = {}
    for step in ("base", "tuned", "ensemble"):
        with np.load(root / "outputs" / "evaluate" / f"{rid}-{step}" / "per_image.npz") as f:
            per_image[step] = {k: f[k] for k in f.files}
    weights = {step: torch.load(root / "checkpoints" / "finetune" / f"{rid}-{step}" / "model.pt",
                                map_location="cpu", weights_only=True) for step in ("base", "tune")}
    return per_image, weights


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal arrays, NaN (an estimate a run does not make) equal to NaN."""
    return np.array_equal(a, b, equal_nan=a.dtype.kind == "f" and b.dtype.kind == "f")


def assert_same_outputs(root: Path, reference: Path) -> None:
    per_image, weights = outputs_of(root)
    ref_per_image, ref_weights = outputs_of(reference)
    for step, arrays in ref_per_image.items():
        assert arrays.keys() == per_image[step].keys()
        for k, v in arrays.items():
            assert same(per_image[step][k], v), (step, k)
    for step, state in ref_weights.items():
        assert state.keys() == weights[step].keys()
        for k, v in state.items():
            assert torch.equal(weights[step][k], v), (step, k)


def filled_table(root: Path) -> list[dict]:
    """The results rows of the chain with their IT and variational numbers (each a finite number)."""
    rows = json.loads((root / "outputs" / "results" / "results.json").read_text())
    rows = rows.get("runs", rows) if isinstance(rows, dict) else rows
    rows = list(rows.values()) if isinstance(rows, dict) else rows
    assert rows, "results.json holds no rows"
    for row in rows:
        assert np.isfinite(row["it_continuous_bpd"]), row["run_id"]
    return rows


@pytest.fixture(scope="session")
def uninterrupted(cluster, tmp_path_factory) -> Path:
    """The smoke chain through the template on the CPU partition, submitted from a folder outside the
    repository."""
    root = tmp_path_factory.mktemp("uninterrupted")
    started = time.time()
    job = submit([*CPU_JOB, *chain_args(root)], cwd=root, env=environment())
    log = root / f"slurm-itdiffusion-{job}.out"
    info = wait_for(job, CHAIN_TIMEOUT, log)
    print(f"uninterrupted chain: job {job} {info['JobState']} in {time.time() - started:.0f} s")
    assert info["JobState"] == "COMPLETED", log.read_text()[-4000:]
    return root


def test_the_template_runs_the_smoke_chain_on_a_cpu_partition(uninterrupted):
    rid = run_id(uninterrupted)
    assert rid.startswith("smoke-slurm-")  # not paper-slurm-<job id>
    rows = filled_table(uninterrupted)
    assert {f"{rid}-{s}" for s in ("base", "tuned", "ensemble")} <= {r["run_id"] for r in rows}
    assert "| " in (uninterrupted / "outputs" / "results" / "results.md").read_text()


def test_a_time_limit_requeues_the_job_and_it_finishes_as_if_uninterrupted(uninterrupted, tmp_path):
    """--time=4 with USR1 150 s before it: the job requeues itself (SLURM sends the signal up to half a
    minute early, so every attempt runs 1-1.5 minutes), resumes, and ends with the uninterrupted run's
    numbers."""
    started = time.time()
    job = submit([*CPU_JOB, "--time=4", "--signal=B:USR1@150", *chain_args(tmp_path)], cwd=tmp_path,
                 env=environment())
    log = tmp_path / f"slurm-itdiffusion-{job}.out"
    info = wait_for(job, CHAIN_TIMEOUT, log)
    text = log.read_text()
    print(f"time-limited chain: job {job} {info['JobState']}, {info['Restarts']} requeue(s), "
          f"{time.time() - started:.0f} s")
    assert info["JobState"] == "COMPLETED", text[-4000:]
    assert int(info["Restarts"]) >= 1 and "USR1: the time limit is near" in text
    assert "(attempt 1)" in text and "(attempt 2)" in text  # one log, appended across requeues
    assert_same_outputs(tmp_path, uninterrupted)


def test_a_cancelled_chain_resumes_when_submitted_again(uninterrupted, tmp_path):
    env, started = environment(), time.time()
    first = submit([*CPU_JOB, *chain_args(tmp_path)], cwd=tmp_path, env=env)
    deadline = time.time() + CHAIN_TIMEOUT
    while not list((tmp_path / "outputs" / "evaluate").glob("*-base/metrics.json")):
        assert time.time() < deadline and job_info(first).get("JobState") not in FINAL, \
            (tmp_path / f"slurm-itdiffusion-{first}.out").read_text()[-4000:]
        time.sleep(2)
    subprocess.run(["scancel", first], check=True)
    assert wait_for(first, 120)["JobState"] == "CANCELLED"
    again = submit([*CPU_JOB, *chain_args(tmp_path)], cwd=tmp_path, env=env)
    log = tmp_path / f"slurm-itdiffusion-{again}.out"
    info = wait_for(again, CHAIN_TIMEOUT, log)
    text = log.read_text()
    print(f"cancelled chain: job {first} cancelled after the base model's evaluation, job {again} "
          f"{info['JobState']}, {time.time() - started:.0f} s in all")
    assert info["JobState"] == "COMPLETED", text[-4000:]
    assert f"exists: {tmp_path / 'outputs'}/evaluate/{run_id(tmp_path)}-base/metrics.json" in text
    assert_same_outputs(tmp_path, uninterrupted)


def srun(args: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["srun", "-n2", "--cpus-per-task=1", sys.executable, "-m", *args], cwd=cwd,
                          env=environment(), capture_output=True, text=True, timeout=timeout)


def test_srun_n2_is_one_job_of_two_ranks_with_one_writer(uninterrupted, tmp_path):
    """srun -n2 without torchrun: one evaluation of world size 2 with the one-process run's per-image
    numbers; the report started on both tasks writes once and makes one wandb run."""
    rid, started = run_id(uninterrupted), time.time()
    outputs = uninterrupted / "outputs"
    base = outputs / "evaluate" / f"{rid}-base"
    common = ["experiment=smoke", *SMALL, f"paths.output_dir={tmp_path / 'outputs'}",
              f"paths.cache_dir={outputs / 'cache'}", "logger.group=srun"]
    tuned = uninterrupted / "checkpoints" / "finetune" / f"{rid}-tune" / "model.pt"
    proc = srun(["itdiffusion.stages.evaluate", *common, "run_id=srun2", f"model.checkpoint={tuned}",
                 "model.training_objective=IT", f"estimator.logsnr_proposal_from={base}"],
                cwd=tmp_path)  # as the chain evaluated it (smoke: the per-image budget, no budget_from)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "outputs" / "evaluate" / "srun2" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    with np.load(tmp_path / "outputs" / "evaluate" / "srun2" / "per_image.npz") as two, \
            np.load(outputs / "evaluate" / f"{rid}-tuned" / "per_image.npz") as one:
        for k in one.files:
            assert same(two[k], one[k]), k

    proc = srun(["itdiffusion.stages.report", *common, "run_id=srun2-report"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert output.count("wrote ") == 1, output[-3000:]
    runs = list((tmp_path / "outputs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs  # the evaluation's and one report's (not one per task)
    print(f"srun -n2: evaluate and report in {time.time() - started:.0f} s")


def sweep_command(root: Path, base: Path, sweep_id: str, *extra: str) -> tuple[list[str], dict]:
    """A 2-job submitit sweep (hydra/launcher=slurm, CPU partition) evaluating ``base`` at tiny sizes."""
    args = [sys.executable, "-m", "itdiffusion.stages.evaluate", "-m", "hydra/launcher=slurm",
            "hydra.launcher.partition=cpu", "hydra.launcher.gpus_per_node=0",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=20", "experiment=smoke",
            f"paths.output_dir={root / 'outputs'}", f"model.checkpoint={base}", "estimator.vlb=false",
            "data.num_images=16", "estimator.batch_size=16", "estimator.npoints=8,16", "logger=none", *extra]
    return args, environment(ITD_SWEEP_ID=sweep_id)


def sweep_results(root: Path, sweep_id: str) -> dict[int, dict[str, np.ndarray]]:
    out = {}
    for n in range(2):
        folder = root / "outputs" / "multirun" / "evaluate" / sweep_id / str(n)
        assert json.loads((folder / "job_status.json").read_text())["status"] == "ok"
        with np.load(folder / "per_image.npz") as f:
            out[n] = {k: f[k] for k in f.files}
    return out


@pytest.fixture(scope="session")
def plain_sweep(uninterrupted, tmp_path_factory) -> tuple[Path, Path]:
    root, started = tmp_path_factory.mktemp("sweep"), time.time()
    base = uninterrupted / "checkpoints" / "finetune" / f"{run_id(uninterrupted)}-base" / "model.pt"
    args, env = sweep_command(root, base, "plain")
    proc = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "all 2 job(s) succeeded" in proc.stdout + proc.stderr
    print(f"submitit sweep of 2 jobs: exit 0 in {time.time() - started:.0f} s")
    return root, base


def test_a_submitit_sweep_of_two_jobs(plain_sweep):
    root, _ = plain_sweep
    results = sweep_results(root, "plain")
    for n in range(2):
        assert results[n]["index"].tolist() == list(range(16))
        assert np.isfinite(results[n]["estimate__it_continuous_nats"]).all()
    curves = [results[n]["curves__logsnr"].shape for n in range(2)]
    assert curves == [(16, 8), (16, 16)]  # the jobs' own settings (estimator.npoints=8,16)


def test_requeued_submitit_jobs_resume_and_the_sweep_reports_them(plain_sweep, tmp_path):
    """Job 0 requeued by `scontrol requeue` (SIGTERM), job 1 sent submitit's USR2 (its time-limit
    signal), each once it has kept an evaluation chunk: the sweep waits for both, exits 0, and their
    per-image numbers equal the uninterrupted sweep's."""
    reference, base = plain_sweep
    args, env = sweep_command(tmp_path, base, "requeued")
    sweep = tmp_path / "outputs" / "multirun" / "evaluate" / "requeued"
    started = time.time()
    launcher = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    try:
        signalled: dict[int, str] = {}
        deadline = time.time() + 600
        while len(signalled) < 2 and launcher.poll() is None and time.time() < deadline:
            for n in set(range(2)) - set(signalled):
                chunks = list((sweep / str(n) / "partial").glob("chunk_*.npz"))
                jobs = sorted(p.name.split("_")[0] for p in (sweep / ".submitit").glob("*_*") if p.is_dir())
                if chunks and jobs:
                    job = f"{jobs[0]}_{n}"
                    if n == 0:
                        subprocess.run(["scontrol", "requeue", job], check=True)
                    else:
                        subprocess.run(["scancel", "--signal=USR2", job], check=True)
                    signalled[n] = job
            time.sleep(0.5)
        assert len(signalled) == 2, "the jobs ended before they could be signalled"
        while launcher.poll() is None and time.time() < deadline:
            release_held()
            time.sleep(2)
        output = launcher.communicate(timeout=60)[0]
    finally:
        if launcher.poll() is None:
            launcher.kill()
    print(f"submitit sweep with jobs {', '.join(signalled.values())} requeued: exit {launcher.returncode} in "
          f"{time.time() - started:.0f} s")
    assert launcher.returncode == 0, output[-4000:]
    assert "all 2 job(s) succeeded" in output
    for job in signalled.values():
        assert int(job_info(job).get("Restarts", "0")) >= 1, job_info(job)
    got, want = sweep_results(tmp_path, "requeued"), sweep_results(reference, "plain")
    for n in range(2):
        for k, v in want[n].items():
            assert same(got[n][k], v), (n, k)
