"""SLURM's variables become torch's ranks under srun (never N copies of rank 0), or a clear refusal."""

from __future__ import annotations

import pytest

from itdiffusion import distributed


@pytest.mark.parametrize("nodelist, host", [
    ("node03", "node03"), ("gpu-a1,gpu-b2", "gpu-a1"), ("node[03-05,9]", "node03"),
    ("node[007,010-012],login1", "node007"), ("c[1-2]-ib", "c1"),
])
def test_first_host_of_a_slurm_host_list(nodelist, host):
    assert distributed.first_host(nodelist) == host


SRUN = {"SLURM_STEP_ID": "0", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4",
        "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_NODELIST": "nodeA[1-2]"}


def test_an_srun_task_gets_its_rank_world_size_and_master(monkeypatch):
    monkeypatch.setattr(distributed.shutil, "which", lambda _: None)  # no scontrol: parse the list
    env = dict(SRUN)
    distributed.adopt_slurm_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("2", "4", "0")
    assert env["MASTER_ADDR"] == "nodeA1" and env["MASTER_PORT"] == str(15000 + 4242)


def test_torchrun_and_sbatch_scripts_are_left_alone(monkeypatch):
    monkeypatch.setattr(distributed, "SLURM_PROBLEM", None)
    torchrun = {**SRUN, "WORLD_SIZE": "8", "RANK": "5"}
    distributed.adopt_slurm_env(torchrun)
    assert torchrun["RANK"] == "5" and "MASTER_ADDR" not in torchrun
    batch_script = {k: v for k, v in SRUN.items() if k not in ("SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS")}
    distributed.adopt_slurm_env(batch_script)  # the sbatch script itself (SLURM_PROCID=0 there): one process
    assert "WORLD_SIZE" not in batch_script and distributed.SLURM_PROBLEM is None


def test_tasks_that_cannot_tell_their_ranks_apart_are_refused(monkeypatch):
    monkeypatch.setattr(distributed, "SLURM_PROBLEM", None)
    env = {k: v for k, v in SRUN.items() if k != "SLURM_PROCID"}
    distributed.adopt_slurm_env(env)
    assert "WORLD_SIZE" not in env and "cannot tell their ranks apart" in distributed.SLURM_PROBLEM
    with pytest.raises(RuntimeError, match="cannot tell their ranks apart"):
        distributed.init(distributed.resolve_device("cpu"))
