"""Resumable evaluation: finished chunks survive a crash, SIGKILL or SIGTERM, and a rerun of the same
command ends with a per_image.npz identical, bit for bit, to an uninterrupted run's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, TINY, path_overrides
from itdiffusion import evaluation
from itdiffusion.stages import evaluate
from itdiffusion.stages.partial import PARTIAL

CHUNKED = ("data.num_images=6", "estimator.batch_size=4", "estimator.vlb=false", "estimator.pixel_maps=2")


class Crash(Exception):
    """Stands in for a kill: only files survive."""


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_checkpoints, shared_cache):
    """An uninterrupted evaluation (one image per chunk), in process."""
    from hydra import compose, initialize_config_dir

    from itdiffusion.stages import CONFIG_DIR

    root = tmp_path_factory.mktemp("uninterrupted")

    def make_cfg(folder: Path, *overrides: str):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose(
                "config",
                overrides=[
                    *path_overrides(folder),
                    *TINY,
                    f"paths.cache_dir={shared_cache}",
                    f"model.checkpoint={tiny_checkpoints[0]}",
                    *CHUNKED,
                    *overrides,
                ],
            )

    evaluate.run(make_cfg(root), root / "run")
    return make_cfg, root / "run" / "per_image.npz"


def assert_same_npz(a: Path, b: Path) -> None:
    with np.load(a) as x, np.load(b) as y:
        assert x.files == y.files
        for key in x.files:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_a_crash_keeps_finished_chunks_and_the_rerun_is_identical(reference_run, tmp_path, monkeypatch):
    make_cfg, uninterrupted = reference_run
    cfg, run_dir = make_cfg(tmp_path), tmp_path / "run"
    real, calls = evaluation.sample, []

    def crashing(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 4:
            raise Crash
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "sample", crashing)
    with pytest.raises(Crash):
        evaluate.run(cfg, run_dir)
    kept = sorted(p.name for p in (run_dir / PARTIAL).glob("chunk_*.npz"))
    assert kept == [f"chunk_{i:07d}_{i + 1:07d}.npz" for i in range(3)]
    assert not (run_dir / "metrics.json").exists()
    calls.clear()
    evaluate.run(cfg, run_dir)
    assert [c for c in calls] == [[3], [4], [5]]  # only the missing chunks ran
    assert_same_npz(run_dir / "per_image.npz", uninterrupted)
    assert not (run_dir / PARTIAL).exists()  # committed: the chunks live in per_image.npz now


def test_chunks_of_other_settings_are_not_reused(reference_run, tmp_path, monkeypatch):
    make_cfg, _ = reference_run
    run_dir = tmp_path / "run"
    real, calls = evaluation.sample, []

    def crashing(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 3:
            raise Crash
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "sample", crashing)
    with pytest.raises(Crash):
        evaluate.run(make_cfg(tmp_path), run_dir)
    calls.clear()
    monkeypatch.setattr(evaluation, "sample", lambda *a, **k: (calls.append(a[2]), real(*a, **k))[1])
    evaluate.run(make_cfg(tmp_path, "estimator.seed=5"), run_dir)
    assert calls == [[i] for i in range(6)]  # another seed: every chunk evaluated again


def cli(tmp_path: Path, cache: Path, checkpoint: Path) -> list[str]:
    overrides = [
        *path_overrides(tmp_path),
        *TINY,
        f"paths.cache_dir={cache}",
        f"model.checkpoint={checkpoint}",
        *CHUNKED,
        "data.num_images=6",
        "run_id=resumable",
    ]
    return [sys.executable, "-m", "itdiffusion.stages.evaluate", *overrides]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_command_resumes_to_identical_numbers(
    reference_run, tmp_path, shared_cache, tiny_checkpoints, sig
):
    """The real command line, killed once the first chunk is on disk (SIGKILL: nothing else happens;
    SIGTERM: exit 143, the chunk in progress kept), then the same command again."""
    _, uninterrupted = reference_run
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}
    command = cli(tmp_path, shared_cache, tiny_checkpoints[0])
    run_dir = tmp_path / "outputs" / "evaluate" / "resumable"
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while (
        not list((run_dir / PARTIAL).glob("chunk_*.npz")) and proc.poll() is None and time.time() < deadline
    ):
        time.sleep(0.05)
    proc.send_signal(sig)
    out = proc.communicate(timeout=120)[0].decode()
    if proc.returncode == 0:
        pytest.skip("the evaluation finished before the signal arrived")
    assert proc.returncode == (-9 if sig == signal.SIGKILL else 143), out[-2000:]
    assert list((run_dir / PARTIAL).glob("chunk_*.npz")) and not (run_dir / "metrics.json").exists()
    if sig == signal.SIGTERM:
        assert "rerun the same command to resume" in out
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert_same_npz(run_dir / "per_image.npz", uninterrupted)
