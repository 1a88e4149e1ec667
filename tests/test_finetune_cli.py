"""The finetune stage as users run it: the command line, torchrun with 2 gloo processes, and real
SIGKILL / SIGTERM of the process followed by a restart of the same command. The runs they are
compared with go through Hydra's compose API in this process (one thread, like the subprocesses)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from itdiffusion.artifacts import read_loss_curve
from itdiffusion.models.iddpm import build_model_and_diffusion
from itdiffusion.stages import CONFIG_DIR
from itdiffusion.stages.finetune import run

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6



def overrides(work: Path, run_name: str, *extra: str) -> list[str]:
    return ["model=iddpm_tiny", "data=patches", "finetune=smoke", "finetune.init=scratch",
            "finetune.lr=2.5e-5", "logger=none", "device=cpu", "data.num_workers=0",
            "data.stats_diagonal=true", f"run_id={run_name}", f"finetune.run_name={run_name}",
            f"finetune.max_steps={STEPS}",
            "finetune.batch_size=4", "finetune.save_every_steps=1", "finetune.heldout_images=4",
            f"paths.output_dir={work / 'outputs'}", f"paths.checkpoint_dir={work / 'checkpoints'}", *extra]


def run_in_process(work: Path, run_name: str, *extra: str) -> dict:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides(work, run_name, *extra))
    return run(cfg, work / "outputs" / "finetune" / run_name)


def launch(args: list[str], launcher: tuple[str, ...] = (), env_extra: dict | None = None
           ) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not (env_extra and k.startswith("SLURM_"))}
    env.update(OMP_NUM_THREADS="1", **(env_extra or {}))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    return subprocess.Popen([*(launcher or (sys.executable,)), "-m", "itdiffusion.stages.finetune", *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def run_dir(work: Path, run_name: str) -> Path:
    return work / "checkpoints" / "finetune" / run_name


def weights(work: Path, run_name: str) -> dict[str, torch.Tensor]:
    return torch.load(run_dir(work, run_name) / "model.pt", weights_only=True)


def saved_step(path: Path) -> int | None:
    try:
        return torch.load(path / "last.pt", weights_only=True)["progress"]["step"]
    except (FileNotFoundError, RuntimeError):
        return None


def wait_for_step(proc: subprocess.Popen, path: Path, step: int, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        s = saved_step(path)
        if s is not None and s >= step:
            return s
        time.sleep(0.02)
    raise TimeoutError(f"no checkpoint at step >= {step}")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """An uninterrupted run (global batch 4) that the command-line runs are compared with."""
    work = tmp_path_factory.mktemp("cli")
    assert run_in_process(work, "reference")["steps"] == STEPS
    return work


def test_sigkill_then_sigterm_then_resume_gives_identical_weights(work):
    path = run_dir(work, "faults")
    args = overrides(work, "faults")

    proc = launch(args)
    wait_for_step(proc, path, 2)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    killed_at = saved_step(path)

    proc = launch(args)  # the same command resumes; SIGTERM (pre-emption) saves before exiting
    wait_for_step(proc, path, killed_at + 1)
    proc.send_signal(signal.SIGTERM)
    rc, out = finish(proc)
    assert rc == 143, out
    assert f"resumed from {path / 'last.pt'} at step {killed_at}/{STEPS}" in out
    assert "SIGTERM received: saved step" in out and "Traceback" not in out

    rc, out = finish(launch(args))
    assert rc == 0, out
    one, resumed = weights(work, "reference"), weights(work, "faults")
    assert all(torch.equal(one[k], resumed[k]) for k in one)
    curve = read_loss_curve(path / "loss_curve.json")
    assert curve == read_loss_curve(run_dir(work, "reference") / "loss_curve.json")
    assert curve[-1]["step"] == STEPS
    summary = json.loads((work / "outputs" / "finetune" / "faults" / "finetune.json").read_text())
    assert summary["model_path"] == str(path / "model.pt") and summary["steps"] == STEPS


def test_two_gloo_processes_match_one_process(work):
    """torchrun, 2 processes against 1 process, both at finetune.batch_size=4 (the global batch: 2 images
    per process), and 1 process in passes of 3 + 1 images (gradient accumulation): the same weights
    within 1e-5.

    64 channels, not iddpm_tiny's 32: with GroupNorm(32, 32) every group is one channel, so the
    bias of each conv that feeds a norm has an exactly zero gradient; Adam divides that gradient's
    rounding noise by its own magnitude and moves such biases by about +-lr at random, differently
    for any other summation order. With two channels per group no gradient is identically zero.
    """
    wide = ("model.num_channels=64", "finetune.max_steps=3", "finetune.save_every_steps=null")
    run_in_process(work, "one", *wide)
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    rc, out = finish(launch(overrides(work, "two", *wide), launcher))
    assert rc == 0, out
    assert "3 steps of 4 images (2 process(es) x 2, passes of 2)" in out
    run_in_process(work, "accumulated", *wide, "finetune.micro_batch_size=3")
    one, two = weights(work, "one"), weights(work, "two")
    accumulated = weights(work, "accumulated")
    torch.manual_seed(0)  # the scratch initialisation (finetune.seed=0)
    tiny = OmegaConf.load(Path(CONFIG_DIR) / "model" / "iddpm_tiny.yaml")
    model_cfg = OmegaConf.merge(tiny, {"num_channels": 64})
    init = build_model_and_diffusion(model_cfg)[0].state_dict()
    assert max((one[k] - init[k]).abs().max() for k in one) > 5e-5  # it trained (Adam: ~lr per step)
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-5)
        torch.testing.assert_close(accumulated[k], one[k], rtol=0, atol=1e-5)


def ignored_parameters(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> set[str]:
    """The parameters the network's output does not depend on: shifting one by 0.1 leaves the output
    unchanged to float32 rounding (1e-5 of its scale; a parameter that matters moves it far more)."""
    model = model.eval()
    with torch.no_grad():
        out = model(x, t)
        ignored = set()
        for name, p in model.named_parameters():
            p.add_(0.1)
            if (model(x, t) - out).abs().max() <= 1e-5 * out.abs().max():
                ignored.add(name)
            p.sub_(0.1)
    return ignored


def test_at_32_channels_weights_adam_moves_on_rounding_noise_depend_on_the_process_count(work):
    """iddpm_tiny as the smoke run trains it: 32 channels, GroupNorm(32, 32), one channel per group. A
    conv bias that feeds such a norm is ignored by the network (the norm subtracts each channel's mean):
    its gradient is exactly zero and the computed one is rounding noise whose sign depends on the
    summation order, i.e. on the process count; Adam normalises it into steps of about finetune.lr.
    2 processes against 1: the largest weight differences are in such ignored parameters, every other
    weight differs by less than two Adam steps (2 lr), and the two networks compute the same function
    (outputs within 1e-6 of their scale)."""
    lr, short = 2.5e-5, ("finetune.max_steps=3", "finetune.save_every_steps=null")
    run_in_process(work, "one32", *short)
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    rc, out = finish(launch(overrides(work, "two32", *short), launcher))
    assert rc == 0, out
    one, two = weights(work, "one32"), weights(work, "two32")
    diff = {k: (one[k] - two[k]).abs().max().item() for k in one}

    tiny = OmegaConf.load(Path(CONFIG_DIR) / "model" / "iddpm_tiny.yaml")
    model = build_model_and_diffusion(tiny)[0]
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([1, 3, 50, 90])
    model.load_state_dict(one)
    ignored = ignored_parameters(model, x, t)
    assert max(diff, key=diff.get) in ignored and max(diff.values()) > 1e-5  # the effect, where it arises
    others = {k: d for k, d in diff.items() if k not in ignored}
    assert max(others.values()) < 2 * lr, sorted(others.items(), key=lambda kv: -kv[1])[:3]
    outputs = []
    for state in (one, two):
        model.load_state_dict(state)
        with torch.no_grad():
            outputs.append(model(x, t))
    scale = outputs[0].abs().max().item()
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-6 * scale)


def test_bad_setting_exits_2_with_one_message(work):
    rc, out = finish(launch(overrides(work, "bad", "finetune.lr=-1")))
    assert rc == 2
    assert "error: finetune.lr=-1.0 must be > 0" in out and "Traceback" not in out


def test_a_faked_srun_step_matches_torchrun(work, tmp_path):
    """Two processes started the way srun starts them (SLURM_* variables, no torchrun, no RANK or
    WORLD_SIZE): the weights of the one-process run (and so of torchrun's, see above) within 1e-5."""
    import socket

    wide = ("model.num_channels=64", "finetune.max_steps=3", "finetune.save_every_steps=null")
    if not (run_dir(work, "one") / "model.pt").is_file():
        run_in_process(work, "one", *wide)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = {"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2",
               "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NODELIST": "localhost",
               "MASTER_PORT": str(port)}
        args = [a for a in overrides(work, "srun", *wide) if not a.startswith("run_id=")]  # agreed via SLURM
        procs.append(launch(args, env_extra=env))
    outs = [finish(p) for p in procs]
    assert [rc for rc, _ in outs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    assert "3 steps of 4 images (2 process(es) x 2" in outs[0][1]
    assert "steps of 4 images" not in outs[1][1]  # one log per job: rank 1 shows warnings only
    summary = json.loads((work / "outputs" / "finetune" / "slurm-77-0" / "finetune.json").read_text())
    assert summary["world_size"] == 2
    one, srun = weights(work, "one"), weights(work, "srun")
    for k in one:
        torch.testing.assert_close(srun[k], one[k], rtol=0, atol=1e-5)
