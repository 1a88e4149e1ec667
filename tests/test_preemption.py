"""Stop signals under submitit, the SLURM launcher preset, one writer per srun step.

The end-to-end runs on a real SLURM are in tests/test_slurm_cluster.py (``make test-slurm``)."""

from __future__ import annotations

import os
import signal

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from itdiffusion import distributed, preemption
from itdiffusion.errors import Preempted
from itdiffusion.stages import CONFIG_DIR
from itdiffusion.stages.report import run as report_run


def test_outside_submitit_sigterm_stops_and_the_exit_status_is_143(monkeypatch):
    monkeypatch.delenv("SUBMITIT_FOLDER", raising=False)
    before = signal.getsignal(signal.SIGTERM)
    with preemption.stop_requested() as stop:
        assert not stop
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop and stop.name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back
    with pytest.raises(SystemExit) as info:
        preemption.exit_preempted()
    assert info.value.code == Preempted.EXIT_STATUS


def test_under_submitit_its_signal_stops_the_stage_then_goes_to_submitits_handler(monkeypatch, tmp_path):
    """submitit's own handler of USR2 (checkpoint, scontrol requeue, exit) runs after the stage saved,
    not in the middle of a step; SIGTERM leaves the requeue to SLURM. Neither leaves a result."""
    monkeypatch.setenv("SUBMITIT_FOLDER", str(tmp_path))
    calls = []

    def submitit_handler(signum, _frame):  # stands for submitit's SignalHandler.checkpoint_and_try_requeue
        calls.append(signum)

    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        with preemption.stop_requested() as stop:
            os.kill(os.getpid(), signal.SIGUSR2)
            assert stop and stop.name == "SIGUSR2" and calls == []  # only flagged while the stage runs
        assert signal.getsignal(signal.SIGUSR2) is submitit_handler
        with pytest.raises(SystemExit) as info:
            preemption.exit_preempted()
        assert calls == [signal.SIGUSR2] and info.value.code == Preempted.EXIT_STATUS

        calls.clear()
        with preemption.stop_requested() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(SystemExit):
            preemption.exit_preempted()
        assert stop.name == "SIGTERM" and calls == []  # SLURM itself requeues (or cancels) the job
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert not isinstance(SystemExit(), Exception)  # what Hydra's job wrapper and submitit do not catch


def launcher(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)
    return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


@pytest.mark.parametrize("gpus, tasks", [(8, 8), (1, 1), (0, 1), (None, 1)])
def test_the_slurm_preset_runs_one_task_per_gpu_and_one_without(gpus, tasks):
    got = launcher("hydra.launcher.gpus_per_node=" + ("null" if gpus is None else str(gpus)))
    assert (got["gpus_per_node"], got["tasks_per_node"]) == (gpus, tasks)
    explicit = launcher("hydra.launcher.gpus_per_node=4", "hydra.launcher.tasks_per_node=2")
    assert explicit["tasks_per_node"] == 2


def test_the_report_on_another_task_of_an_srun_step_writes_nothing(make_cfg, tmp_path, monkeypatch):
    """Started on every task of a 2-task srun step (RANK from SLURM_PROCID, no process group): only task 0
    writes results and makes a wandb run."""
    monkeypatch.setenv("RANK", "1")
    assert not distributed.is_main()
    assert report_run(make_cfg(), tmp_path / "run") == {}
    assert not (tmp_path / "outputs").exists()
    monkeypatch.setenv("RANK", "0")
    assert distributed.is_main()
