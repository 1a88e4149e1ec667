"""The stages on the real command line: Hydra's errors for typos, one clear message for bad input."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException

from conftest import run_cli
from fake_runs import commit_fake_evaluation
from itdiffusion.stages import evaluate


def test_a_mistyped_override_is_hydras_error(make_cfg, tmp_path):
    with pytest.raises(ConfigCompositionException, match="estimator.npoint"):
        make_cfg("estimator.npoint=5")
    with pytest.raises(ConfigCompositionException):
        make_cfg("estimator.npoints=five")
    with pytest.raises(MissingConfigException, match="Available options in .model."):  # lists the options
        make_cfg("model=iddpm_cifar100")
    proc = run_cli("evaluate", "estimator.npoint=5", cwd=tmp_path)
    assert proc.returncode != 0
    assert "Could not override 'estimator.npoint'" in proc.stderr
    assert not (tmp_path / "outputs").exists()


def test_missing_dataset_is_one_message_with_the_path_and_what_to_do(tmp_path):
    proc = run_cli(
        "stats",
        "data=cifar10",
        f"paths.data_dir={tmp_path / 'nowhere'}",
        "logger=none",
        "run_id=m",
        cwd=tmp_path,
    )
    output = proc.stdout + proc.stderr  # Hydra's log goes to stdout
    assert proc.returncode == 2
    assert str(tmp_path / "nowhere" / "cifar10" / "cifar-10-batches-py") in output
    assert "data.download=true" in output and "Traceback" not in output


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_gpu_requested_where_none_exists(make_cfg, tmp_path):
    from itdiffusion.errors import UserError

    with pytest.raises(UserError, match="no CUDA GPU"):
        evaluate.run(make_cfg("experiment=smoke", "device=cuda"), tmp_path / "run")


def test_report_on_the_command_line(tmp_path):
    run_dir = tmp_path / "outputs" / "evaluate" / "r1"
    metrics = {"run_id": "r1", "label": "m", "group": "g", "num_images": 2}
    metrics.update(it_continuous_bpd=-4.0, it_continuous_bpd_stderr=0.1, it_continuous_itd_range_bpd=-4.1,
                   it_continuous_itd_range_bpd_stderr=0.1)
    commit_fake_evaluation(run_dir, metrics)
    proc = run_cli("report", "logger=none", "run_id=rep", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "outputs" / "results" / "results.md").read_text()
    assert "| m | — | — | — | -4.100 ± 0.100 | -4.000 ± 0.100 |" in table  # IT: ITD's range, full range
    assert (
        tmp_path / "outputs" / "report" / "rep" / ".hydra" / "config.yaml"
    ).is_file()  # the stage's run dir


@pytest.mark.slow
def test_smoke_pipeline_end_to_end(tmp_path):
    """reproduce.sh experiment=smoke: every table cell filled, figures, an offline wandb run, resumable."""
    import os
    import subprocess
    import sys

    from PIL import Image

    from conftest import REPO

    outputs, checkpoints = tmp_path / "outputs", tmp_path / "checkpoints"
    cmd = [
        "bash",
        str(REPO / "scripts" / "reproduce.sh"),
        "experiment=smoke",
        f"paths.output_dir={outputs}",
        f"paths.checkpoint_dir={checkpoints}",
    ]
    env = {**os.environ, "PY": sys.executable, "REPRO_ID": "smoke-test"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (outputs / "results" / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| iddpm_tiny")]
    assert len(rows) == 6  # base and tuned in Table 1, Table 2 and the runs table
    for row in rows[:4]:  # Tables 1 and 2
        assert "—" not in row and "nan" not in row
    assert "| Ensemble |" in table
    ensemble = json.loads((outputs / "evaluate" / "smoke-test-ensemble" / "metrics.json").read_text())
    assert ensemble["network_evals"] == 0 and len(ensemble["curves_from"]) == 2  # steps 3 and 5's curves
    masked = [line for line in table.splitlines() if line.startswith("| masked diffusion (I-MDCE) |")]
    assert len(masked) == 2  # the I-MDCE table and the runs table
    assert "—" not in masked[0] and "nan" not in masked[0]
    for fig in (outputs / "results" / "figures").glob("*.png"):
        with Image.open(fig) as im:
            assert im.format == "PNG"
    figures = {p.name.removeprefix("smoke-test_") for p in (outputs / "results" / "figures").glob("*.png")}
    assert figures == {f"{name}.png" for name in ("mmse", "mmse_gap", "per_image", "pixel_maps", "loss")}
    assert list((outputs / "wandb").glob("offline-run-*"))
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("(skipped;") == 7
