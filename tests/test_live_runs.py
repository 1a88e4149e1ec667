"""The wandb runs are live while a stage works, as users run it: an evaluation stopped by SIGTERM through
the real command line leaves an offline run (read back from disk) with the running estimates it logged
(the numbers metrics.json's function gives on the images done) and its console output; fine-tuning shows
its loss in the progress bar and in finetune.log."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY, path_overrides
from itdiffusion.artifacts import PerImage, read_per_image
from wandb_records import offline_runs


def launch(module: str, *overrides: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", f"itdiffusion.stages.{module}", *overrides], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def output_log(run) -> str:
    path = run.files / "output.log"
    for _ in range(100):  # wandb's service writes it after the run ends
        if path.exists() and path.stat().st_size:
            break
        time.sleep(0.1)
    return path.read_text()


def evaluation_settings(tmp_path: Path, checkpoint: Path, cache: Path, run_id: str, images: int,
                        *extra: str) -> list[str]:
    """A tiny evaluation with wandb offline under ``tmp_path/wb`` and a running estimate after every chunk."""
    return [*TINY, *path_overrides(tmp_path), f"paths.cache_dir={cache}", "logger=wandb",
            f"logger.dir={tmp_path / 'wb'}", "logger.running_every_s=0", f"run_id={run_id}",
            f"model.checkpoint={checkpoint}", f"data.num_images={images}", "estimator.npoints=32",
            "estimator.batch_size=32", "estimator.vlb=false", "estimator.pixel_maps=0", *extra]


def launch_until_chunks(settings: list[str], tmp_path: Path, run_id: str, chunks: int = 3):
    """The evaluate stage launched on the command line, once ``chunks`` chunks are in its partial/ folder:
    (the process, that folder)."""
    proc = launch("evaluate", *settings, cwd=tmp_path)
    partial = tmp_path / "outputs" / "evaluate" / run_id / "partial"
    deadline = time.time() + 240
    while len(list(partial.glob("chunk_*.npz"))) < chunks and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    return proc, partial


def test_an_evaluation_stopped_midway_leaves_a_run_with_its_running_estimates_and_console(
        tmp_path, tiny_checkpoints, shared_cache, make_cfg):
    settings = evaluation_settings(tmp_path, tiny_checkpoints[0], shared_cache, "killed", 16)
    proc, partial = launch_until_chunks(settings, tmp_path, "killed")
    assert proc.poll() is None, "the evaluation ended before it could be stopped: " + proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out

    [run] = offline_runs(tmp_path / "wb")
    assert run.job_type == "evaluate" and run.name == "evaluate-killed"
    running = [row for row in run.history if "running/it_continuous_bpd" in row]
    assert running, run.history
    # what it logged is metrics.json's function on the images done: recompute it from the kept chunks
    chunks = sorted(partial.glob("chunk_*.npz"))
    from itdiffusion import evaluation
    from itdiffusion.stages.stats import load_or_compute_reference

    cfg = make_cfg(*settings)
    reference = load_or_compute_reference(cfg)
    last = running[-1]
    done = int(last["progress/images"])
    parts = [read_per_image(c) for c in chunks]
    assert sum(p.num_images for p in parts) >= done >= 3
    # the decoder choice of both protocols is fitted on the pilot images' own draws before the run
    import torch

    from itdiffusion.data import load_images
    from itdiffusion.members import load_members
    from itdiffusion.stages import budget_pilot

    cpu = torch.device("cpu")
    pilot = budget_pilot.choice_curves(load_members(cfg, cpu), load_images(cfg.data, "test"), reference,
                                       parts[0].curves.proposal, cfg.estimator, cpu)
    per_image = PerImage.cat(parts[:done])
    per_image.pilot_curves = pilot
    per_image = evaluation.with_estimates(per_image, reference)
    expected = evaluation.summarize(per_image, [None], reference, per_image.curves.proposal)
    for key in ("it_continuous_bpd", "it_continuous_bpd_stderr", "it_discrete_bpd", "it_dequantized_bpd"):
        assert last[f"running/{key}"] == pytest.approx(expected[key], rel=1e-12, abs=1e-12), key
    # its console output, up to the stop: the running estimates as printed
    console = output_log(run)
    total = int(re.findall(rf"running estimate over {done}/(\d+) images", console)[-1])
    assert last["progress/fraction"] == pytest.approx(done / total) and done < total
    printed = re.findall(r"it_continuous_bpd (-?[\d.]+) ± ([\d.]+)", console)
    mean, stderr = expected["it_continuous_bpd"], expected["it_continuous_bpd_stderr"]
    assert printed[-1] == (f"{mean:.4f}", f"{stderr:.4f}")
    assert "SIGTERM" in console or "SIGTERM" in out


def test_an_evaluation_killed_outright_keeps_the_running_estimates_written_before(tmp_path, tiny_checkpoints,
                                                                                  shared_cache):
    """SIGKILL (no handler runs, wandb's service ends with the process): the offline run file keeps what was
    written up to the last ``logger.flush_every_s`` (wandb alone writes only full 32 KiB blocks: the
    file held its 7-byte header after a run killed a few chunks in)."""
    settings = evaluation_settings(tmp_path, tiny_checkpoints[0], shared_cache, "killed9", 32,
                                   "logger.flush_every_s=0.2")
    proc, _ = launch_until_chunks(settings, tmp_path, "killed9")
    time.sleep(1.0)  # five flush intervals
    assert proc.poll() is None, "the evaluation ended before it could be killed: " + proc.communicate()[0]
    proc.kill()
    proc.communicate(timeout=60)
    [run] = offline_runs(tmp_path / "wb", wait_s=0)
    assert run.job_type == "evaluate" and run.name == "evaluate-killed9"
    running = [row for row in run.history if "running/it_continuous_bpd" in row]
    assert len(running) >= 2, run.history
    assert all(0 < row["progress/fraction"] < 1 for row in running)


def test_finetune_shows_its_loss_in_the_bar_and_the_log(tmp_path):
    steps = 6
    proc = launch("finetune", "model=iddpm_tiny", "data=patches", "finetune=smoke", "finetune.init=scratch",
                  "device=cpu", "data.num_workers=0", "data.stats_diagonal=true", "data.patches_per_photo=8",
                  "data.stats_images=40", "run_id=ft", "finetune.run_name=ft", f"finetune.max_steps={steps}",
                  "finetune.batch_size=4", "finetune.heldout_images=4", "finetune.log_every_steps=2",
                  "logger=wandb", f"logger.dir={tmp_path / 'wb'}", *path_overrides(tmp_path), cwd=tmp_path)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    [run] = offline_runs(tmp_path / "wb")
    logged = {int(row["_step"]): row["train/loss_bpd"] for row in run.history if "train/loss_bpd" in row}
    heldout = [row["heldout/loss_bpd"] for row in run.history if "heldout/loss_bpd" in row]
    assert sorted(logged) == [2, 4, 6] and heldout
    # finetune.log: a train-loss line at every logged step (6 steps: every window), the held-out losses
    log_text = (tmp_path / "outputs" / "finetune" / "ft" / "finetune.log").read_text()
    lines = dict(re.findall(rf"step (\d+)/{steps}: train loss (-?[\d.]+) bits/dim", log_text))
    assert lines == {str(s): f"{v:.4f}" for s, v in logged.items()}
    assert re.findall(rf"step \d+/{steps}: held-out loss (-?[\d.]+) bits/dim", log_text) == [
        f"{v:.4f}" for v in heldout]
    # the progress bar (stderr) carries the last train loss and the held-out loss in its postfix
    bars = [line for line in re.split(r"[\r\n]", out) if line.startswith("finetune")]
    shown = f"loss={logged[steps]:.4f}", f"heldout={heldout[-1]:.4f}"
    assert any(shown[0] in b and shown[1] in b for b in bars), bars[-3:]
    # and the wandb run captured the console from the start
    assert "train loss" in output_log(run)
