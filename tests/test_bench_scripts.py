"""The benchmark scripts' cores at tiny sizes: the reference-style baseline is a correct estimator (exact
Gaussian log-density), and the GPU benchmark exits cleanly without CUDA."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from itdiffusion.denoisers import Gaussian
from itdiffusion.information import GaussianReference

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_reference_style_baseline_matches_the_exact_gaussian_density():
    bench = _load("bench_estimator_efficiency")
    g = torch.Generator().manual_seed(0)
    d = 6
    a = torch.randn(d, d, dtype=torch.float64, generator=g)
    cov = a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)
    dist = Gaussian(torch.zeros(d, dtype=torch.float64), cov)
    reference = GaussianReference.from_moments(dist.mean, dist.cov)
    x = dist.sample(100, g)
    out = bench.reference_style(dist, x, reference, 100, torch.Generator().manual_seed(1))
    assert out["evals"] == 100
    # ITD drops the tails outside the grid's range: zero on average for data with the reference's moments
    err = (out["continuous"] + dist.log_prob(x)).mean().item()
    assert abs(err) < 0.02 * d


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_gpu_bench_exits_cleanly_without_cuda(capsys):
    bench = _load("bench_gpu_unet")
    assert bench.main(["--device", "cuda"]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_the_benchmarks_find_their_model_configs_from_any_folder(tmp_path, monkeypatch):
    """`make bench` stopped in bench_budget.py when the configs moved into the package (a path relative to
    the repo root); every script that reads a model config reads the package's, whatever the folder."""
    monkeypatch.chdir(tmp_path)
    budget = _load("bench_budget")
    denoiser, model, *_ = budget.cifar_architecture_setting(steps=2, num_images=2, pilot_images=2)
    assert model.model_channels == 128  # iddpm_cifar10_vlb's flags
    gpu = _load("bench_gpu_unet")
    assert gpu._model_cfg(tiny=False)["num_channels"] == 128
    assert gpu._model_cfg(tiny=True)["num_channels"] < 128
    vlb = _load("bench_vlb")
    out = vlb.run("iddpm_tiny", steps=2, num_images=1, steps_per_batch=2, device="cpu", rounds=1)
    assert out and not list(tmp_path.iterdir())  # nothing written in the folder it ran from
