"""A non-editable install (a wheel built from this tree) runs the stages from any directory, with the
configs it ships, through its console scripts. CI runs it (``make test-package`` in .ci/run)."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO, TINY

BUILD_WHEEL = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"


def test_the_wheel_builds_with_no_warning_and_ships_the_license(tmp_path):
    # setuptools' build backend with every warning an error (a deprecated pyproject key stops the build on
    # setuptools' announced date; it warns until then), on a copy of the files a wheel is built from
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, tree / name)
    shutil.copytree(REPO / "src", tree / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    proc = subprocess.run([sys.executable, "-W", "error", "-c", BUILD_WHEEL, str(tmp_path / "dist")],
                          cwd=tree, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr, proc.stderr[-3000:]
    with zipfile.ZipFile(tmp_path / "dist" / proc.stdout.split()[-1]) as wheel:
        metadata = wheel.read("itdiffusion-0.1.0.dist-info/METADATA").decode()
        license_text = wheel.read("itdiffusion-0.1.0.dist-info/licenses/LICENSE").decode()
    assert "License-Expression: MIT" in metadata.splitlines()
    assert license_text.startswith("MIT License") and "itdiffusion contributors" in license_text


@pytest.mark.slow
def test_a_wheel_runs_a_stage_from_another_directory(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels), str(REPO)], check=True, timeout=300, cwd=tmp_path)
    (wheel,) = wheels.glob("itdiffusion-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                    "--ignore-installed", "-q", str(wheel)], check=True, timeout=300)
    # then the dependencies from the test's environment (its editable itdiffusion is not activated: its
    # .pth files are not processed from a folder added this way)
    (Path(purelib) / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["WANDB_SILENT"] = "true"
    where = subprocess.run([python, "-c", "import itdiffusion; print(itdiffusion.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(venv)), where  # not this checkout
    proc = subprocess.run([venv / "bin" / "itdiffusion-stats", *TINY, "run_id=wheel"], cwd=elsewhere,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (elsewhere / "outputs" / "stats" / "wheel" / "stats.json").is_file()
    completion = subprocess.run([venv / "bin" / "itdiffusion-evaluate", "-sc", "install=bash"], cwd=elsewhere,
                                env=env, capture_output=True, text=True, timeout=120)
    assert completion.returncode == 0 and "itdiffusion-evaluate" in completion.stdout  # tab completion
