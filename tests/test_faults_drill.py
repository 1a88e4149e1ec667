"""scripts/fault_drill.py: repeated SIGKILLs of the smoke fine-tuning, each followed by a resume."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_fault_drill_two_cycles(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "scripts/fault_drill.py", "--cycles", "2", "--workdir", str(tmp_path),
           "finetune.batch_size=4", "data.stats_diagonal=true"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "resumed 2/2, identical weights: yes" in out.stdout
    assert "while writing a checkpoint" in out.stdout  # the second cycle killed a checkpoint write
