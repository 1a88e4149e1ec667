"""The U-Net's fast paths (bf16 autocast, channels_last, torch.compile) and the evaluate stage's check."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY, random_tiny_unet, run_cli
from itdiffusion.config import check_values
from itdiffusion.errors import UserError
from itdiffusion.models.acceleration import (
    AcceleratedUNet,
    FastPath,
    accelerate,
    fast_path_from_config,
    resolve_fast_path,
)
from itdiffusion.models.iddpm import IDDPMDenoiser, build_model_and_diffusion
from itdiffusion.stages import CONFIG_DIR, evaluate, precision
from itdiffusion.variational import vlb

TINY_MODEL = OmegaConf.load(Path(CONFIG_DIR) / "model" / "iddpm_tiny.yaml")


@pytest.fixture(scope="module")
def unet():
    return random_tiny_unet()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 32, 32, generator=g), torch.tensor([2.0, 300.0, 900.0], dtype=torch.float64)


@torch.no_grad()
def test_fp32_wrapper_is_the_bare_unet_bit_for_bit(unet, inputs):
    x, t = inputs
    fast = AcceleratedUNet(unet)
    assert torch.equal(fast(x, t), unet(x, t))
    assert [id(p) for p in fast.parameters()] == [id(p) for p in unet.parameters()]  # shared, not copied
    assert list(fast.state_dict()) == [f"unet.{k}" for k in unet.state_dict()]  # weights held once
    assert accelerate(unet, FastPath()) is unet


@torch.no_grad()
def test_channels_last_keeps_fp32_outputs(unet, inputs):
    x, t = inputs
    out = AcceleratedUNet(unet, channels_last=True)(x, t)
    assert out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out, unet(x, t), rtol=0, atol=1e-5)


@torch.no_grad()
def test_bf16_autocast_is_close_but_not_identical_and_returns_float32(unet, inputs):
    x, t = inputs
    ref = unet(x, t)
    out = AcceleratedUNet(unet, dtype=torch.bfloat16, channels_last=True)(x, t)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert not torch.equal(out, ref)
    # bf16 keeps 8 significant bits: relative rounding 2^-8 per operation, accumulated over the layers
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    assert all(p.dtype == torch.float32 for p in unet.parameters())  # weights untouched


@torch.no_grad()
def test_every_caller_of_the_unet_runs_through_the_wrapper(unet):
    """IDDPMDenoiser and the VLB call model(x, t): both take the wrapper; fp32 identical to the bare U-Net."""
    _, diffusion = build_model_and_diffusion({**OmegaConf.to_container(TINY_MODEL), "diffusion_steps": 4})
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    fp32, bf16 = AcceleratedUNet(unet), AcceleratedUNet(unet, dtype=torch.bfloat16)

    def bound(model):
        gen = torch.Generator().manual_seed(3)
        return vlb(model, diffusion, x, steps_per_batch=4, generator=gen).total_bpd

    assert torch.equal(bound(fp32), bound(unet))
    assert not torch.equal(bound(bf16), bound(unet))
    z, logsnr = torch.randn(2, 3, 32, 32), torch.tensor([-2.0, 3.0])
    assert torch.equal(IDDPMDenoiser(fp32, TINY_MODEL)(z, logsnr), IDDPMDenoiser(unet, TINY_MODEL)(z, logsnr))


def test_resolve_fast_path():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_fast_path("auto", True, "max-autotune", cpu).plain  # auto: plain fp32 eager off CUDA
    assert resolve_fast_path("auto", True, "none", cuda) == FastPath(torch.bfloat16, True, "none")
    assert resolve_fast_path("bf16", False, "default", cpu) == FastPath(torch.bfloat16, False, "default")
    assert resolve_fast_path("fp32", False, "none", cuda).plain
    assert FastPath(torch.bfloat16, True, "max-autotune").describe() == (
        "bf16 autocast, channels_last, compile(max-autotune)")
    with pytest.raises(ValueError, match="'fp16' is not one of fp32, bf16, auto"):
        resolve_fast_path("fp16", False, "none", cpu)
    with pytest.raises(ValueError, match="none, default, reduce-overhead, max-autotune"):
        resolve_fast_path("bf16", False, "max_autotune", cpu)


def test_compare_estimates_is_a_paired_bound():
    fp32 = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)}
    shift = {"a": fp32["a"] + torch.tensor([0.01, 0.03, 0.01, 0.03], dtype=torch.float64)}
    se = math.sqrt(4 * 0.01**2 / 3) / math.sqrt(4)  # diffs 0.02 -+ 0.01: sample std sqrt(4 * 0.01^2 / 3)
    out = precision.compare_estimates(fp32, shift, tolerance_bpd=0.05)["a"]
    assert out["diff_bpd"] == pytest.approx(0.02) and out["diff_stderr_bpd"] == pytest.approx(se)
    assert out["bound_bpd"] == pytest.approx(0.02 + 2 * se) and out["within"]
    assert out["fp32_bpd"] == pytest.approx(2.5) and out["fast_bpd"] == pytest.approx(2.52)
    assert not precision.compare_estimates(fp32, shift, tolerance_bpd=0.02 + 1.9 * se)["a"]["within"]


# --- the check in the evaluate stage ------------------------------------------------------------------

ESTIMATES = ("it_continuous_bpd", "it_continuous_itd_range_bpd", "it_discrete_bpd", "it_discrete_notails_bpd",
             "it_dequantized_bpd", "vlb_bpd", "vlb_continuous_bpd")


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("random_tiny") / "tiny.pt"
    torch.save(random_tiny_unet(seed=3).state_dict(), path)
    return path


@pytest.fixture
def check_cfg(make_cfg, shared_cache, random_checkpoint):
    """TINY with 4 test images, all of them in the check: the check's estimates are the run's estimates."""

    def make(*overrides):
        return make_cfg(*TINY, f"paths.cache_dir={shared_cache}", f"model.checkpoint={random_checkpoint}",
                        "estimator.precision_check_images=4", *overrides)

    return make


def _run(cfg, run_dir):
    metrics = evaluate.run(cfg, run_dir)
    assert json.loads((run_dir / "metrics.json").read_text())["precision_check"] == metrics["precision_check"]
    return metrics


def test_a_fast_path_within_tolerance_is_used(check_cfg, tmp_path):
    metrics = _run(check_cfg("estimator.precision=bf16", "estimator.channels_last=true",
                             "estimator.precision_tolerance_bpd=1.0"), tmp_path / "run")
    check = metrics["precision_check"]
    assert check["checked"] and check["images"] == 4 and check["tolerance_bpd"] == 1.0
    assert check["used"] == check["fast_path"] == "bf16 autocast, channels_last, eager"
    assert set(check["estimates"]) == set(ESTIMATES)
    for name, row in check["estimates"].items():
        assert row["within"] and row["diff_bpd"] != 0.0, name  # bf16 moves every estimate a little
        assert metrics[name] == pytest.approx(row["fast_bpd"], rel=1e-9, abs=1e-9), name  # the run used bf16


def test_an_ensemble_is_checked_member_by_member(check_cfg, tmp_path, random_checkpoint):
    cfg = check_cfg(f"ensemble=[{random_checkpoint},{random_checkpoint}]", "estimator.vlb=false",
                    "estimator.precision=bf16", "estimator.precision_tolerance_bpd=1.0")
    check = _run(cfg, tmp_path / "run")["precision_check"]
    names = {f"{p}it_{e}_bpd" for p in ("m0_", "m1_", "ensemble_")
             for e in ("continuous", "continuous_itd_range", "discrete", "discrete_notails", "dequantized")}
    assert set(check["estimates"]) == names and check["used"] == "bf16 autocast, contiguous, eager"
    assert check["estimates"]["m0_it_continuous_bpd"] == check["estimates"]["m1_it_continuous_bpd"]


def test_auto_falls_back_to_fp32_with_one_warning(check_cfg, tmp_path, monkeypatch, caplog):
    """precision=auto on a (pretended) GPU with an impossible tolerance: fp32 eager, one warning."""
    monkeypatch.setattr(precision, "fast_path_from_config",
                        lambda est_cfg, device: fast_path_from_config(est_cfg, torch.device("cuda")))
    cfg = check_cfg("estimator.precision=auto", "estimator.precision_tolerance_bpd=1e-12",
                    "estimator.vlb=false")
    with caplog.at_level(logging.WARNING):
        metrics = _run(cfg, tmp_path / "run")
    check = metrics["precision_check"]
    assert check["checked"] and check["fast_path"] == "bf16 autocast, contiguous, eager"
    assert check["used"] == "fp32, contiguous, eager"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "precision check failed" in warnings[0] and "fp32 eager instead" in warnings[0]
    assert any(name in warnings[0] for name in check["estimates"])
    for name, row in check["estimates"].items():
        assert not row["within"]
        assert metrics[name] == pytest.approx(row["fp32_bpd"], rel=1e-9, abs=1e-9), name  # the run used fp32


def test_an_explicit_bf16_that_fails_the_check_is_an_error(check_cfg, tmp_path):
    cfg = check_cfg("estimator.precision=bf16", "estimator.precision_tolerance_bpd=1e-12",
                    "estimator.it=false")
    with pytest.raises(UserError, match=r"precision check failed.*vlb.*estimator\.precision=fp32.*auto"):
        evaluate.run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_auto_on_cpu_is_plain_fp32_without_a_check(check_cfg, tmp_path):
    metrics = _run(check_cfg("estimator.precision=auto", "estimator.vlb=false"), tmp_path / "run")
    check = metrics["precision_check"]
    assert not check["checked"] and check["used"] == "fp32, contiguous, eager" and "estimates" not in check


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("estimator.precision=fp16", "estimator.precision='fp16' is not one of fp32, bf16, auto"),
        ("estimator.compile=max_autotune", "none, default, reduce-overhead, max-autotune"),
        ("estimator.precision_tolerance_bpd=0", "precision_tolerance_bpd=0.0 must be > 0"),
        ("estimator.precision_check_images=1", "precision_check_images=1 must be >= 2"),
    ],
)
def test_bad_precision_settings_are_user_errors(make_cfg, override, match):
    """Checked with every other value before the stage runs (itdiffusion.stages.launch)."""
    with pytest.raises(UserError, match=match):
        check_values(make_cfg(override))


@pytest.mark.slow
@torch.no_grad()
def test_compiled_unet_matches_eager(unet, inputs):
    """torch.compile (inductor, C++ on CPU): 96-116 s for iddpm_tiny on 2 loaded cores, ~11 s warm-cached."""
    x, t = inputs
    torch.testing.assert_close(AcceleratedUNet(unet, compile="default")(x, t), unet(x, t), rtol=0, atol=1e-4)


def test_two_processes_take_one_decision(check_cfg, tmp_path, shared_cache, random_checkpoint):
    """torchrun with 2 gloo processes: both check the same images, rank 0's record is the one written."""
    outputs = tmp_path / "cli"
    proc = run_cli("evaluate", *TINY, f"paths.cache_dir={shared_cache}", f"paths.output_dir={outputs}",
                   f"model.checkpoint={random_checkpoint}", "estimator.precision_check_images=4",
                   "estimator.precision=bf16", "estimator.precision_tolerance_bpd=1.0", "estimator.vlb=false",
                   "run_id=sharded", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"}, torchrun=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((outputs / "evaluate" / "sharded" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["precision_check"]["used"] == "bf16 autocast, contiguous, eager"
    single = evaluate.run(check_cfg("estimator.precision=bf16", "estimator.precision_tolerance_bpd=1.0",
                                    "estimator.vlb=false"), tmp_path / "one")
    assert metrics["precision_check"]["estimates"] == single["precision_check"]["estimates"]
    for name in ("it_continuous_bpd", "it_discrete_bpd", "it_dequantized_bpd"):
        assert metrics[name] == pytest.approx(single[name], rel=1e-9), name  # sharded bf16 run = one process
