"""The evaluate stage's ``ensemble_curves``: an ensemble from its members' stored curves, no network runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import TINY, path_overrides
from itdiffusion import evaluation
from itdiffusion.artifacts import commit_evaluation, read_per_image
from itdiffusion.errors import UserError
from itdiffusion.models.iddpm import build_model_and_diffusion
from itdiffusion.models.weights import file_sha256
from itdiffusion.stages import CONFIG_DIR, evaluate
from itdiffusion.summary import verified_evaluation

ESTIMATES = ("it_continuous", "it_discrete", "it_discrete_notails", "it_dequantized")


@pytest.fixture(scope="module")
def members(tmp_path_factory, shared_cache):
    """``(make_cfg, checkpoints, run dirs)``: two tiny U-Nets with different outputs, each evaluated alone
    (VLB and IT, the defaults of ``make smoke``'s steps 3 and 5), once for this module."""
    root = tmp_path_factory.mktemp("ensemble_curves")
    model_cfg = OmegaConf.load(Path(CONFIG_DIR) / "model" / "iddpm_tiny.yaml")
    checkpoints = []
    for seed in (0, 1):  # a fresh U-Net predicts eps_hat = 0 (zeroed last layer): perturb every weight
        torch.manual_seed(seed)
        model, _ = build_model_and_diffusion(model_cfg)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.05 * torch.randn_like(param))
        checkpoints.append(str(root / f"tiny_{seed}.pt"))
        torch.save(model.state_dict(), checkpoints[-1])

    def make_cfg(*overrides: str):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            common = [*path_overrides(root), *TINY, f"paths.cache_dir={shared_cache}"]
            return compose("config", overrides=[*common, *overrides])

    runs = [root / "evaluate" / name for name in ("base", "tuned")]
    for checkpoint, run in zip(checkpoints, runs, strict=True):
        evaluate.run(make_cfg(f"model.checkpoint={checkpoint}"), run)
    return make_cfg, checkpoints, runs


def test_the_reused_ensemble_is_the_evaluated_ensemble(members, tmp_path, monkeypatch):
    """Same per-image estimates (to the float32 storage of the curves) as evaluating both networks again,
    with no network evaluation and no precision check."""
    make_cfg, (a, b), (run_a, run_b) = members
    fresh = evaluate.run(make_cfg(f"ensemble=[{a},{b}]", "estimator.vlb=false"), tmp_path / "fresh")

    def no_network(*args, **kwargs):
        raise AssertionError("ensemble_curves must not run the networks")

    monkeypatch.setattr(evaluation, "sample", no_network)
    monkeypatch.setattr(evaluate, "select_fast_path", no_network)
    npz_b = run_b / "per_image.npz"  # a run dir or its per_image.npz
    reused = evaluate.run(
        make_cfg(f"ensemble=[{a},{b}]", f"ensemble_curves=[{run_a},{npz_b}]", "estimator.vlb=false"),
        tmp_path / "reused",
    )
    assert reused["network_evals"] == 0 and fresh["network_evals"] == 4 * 2 * (2 * 4)  # 4 images, 2 members
    assert [m["network_evals"] for m in reused["members"]] == [0, 0]
    assert reused["curves_from"] == [str(run_a / "per_image.npz"), str(npz_b)]
    assert reused["precision_check"]["checked"] is False
    assert reused["checkpoint_sha256"] == fresh["checkpoint_sha256"]
    stored = json.loads((tmp_path / "reused" / "metrics.json").read_text())
    assert stored["curves_from"] == reused["curves_from"] and stored["network_evals"] == 0
    for run in ("fresh", "reused"):  # the report's check: every number, the members' too, from per_image.npz
        metrics, _ = verified_evaluation(tmp_path / run)  # raises ArtifactError on any difference
        assert len(metrics["members"]) == 2
    with np.load(tmp_path / "fresh/per_image.npz") as f, np.load(tmp_path / "reused/per_image.npz") as r:
        assert set(r.files) == set(f.files)
        assert json.loads(str(r["meta"]))["groups"] == ["m0", "m1", "ensemble"]
        for key in f.files:
            if key.endswith("network_evals") or key == "meta":
                continue
            # the reused curves went through float32 storage: estimates (means over points) keep ~1e-6 of
            # it, their Monte Carlo standard errors (spreads around the mean) and the estimate's per-point
            # values (differences of errors) somewhat less
            rtol = 1e-4 if "stderr" in key or key == "continuous_integrand" else 1e-5
            np.testing.assert_allclose(r[key], f[key], rtol=rtol, atol=1e-6, err_msg=key)
    for name in ESTIMATES:
        assert reused[f"{name}_bpd"] == pytest.approx(fresh[f"{name}_bpd"], rel=1e-5)
        for j in (0, 1):
            assert reused["members"][j][f"{name}_bpd"] == pytest.approx(
                fresh["members"][j][f"{name}_bpd"], rel=1e-5
            )
    # the members' own runs give the same member numbers, and the members differ
    for j, run in enumerate((run_a, run_b)):
        alone = json.loads((run / "metrics.json").read_text())
        assert reused["members"][j]["it_discrete_bpd"] == pytest.approx(alone["it_discrete_bpd"], rel=1e-5)
    assert abs(reused["members"][0]["it_continuous_bpd"] - reused["members"][1]["it_continuous_bpd"]) > 1e-3


@pytest.mark.parametrize(
    ("change", "overrides", "match"),
    [
        ("reversed", [], r"not the ensemble member .*tiny_0\.pt .*order of ensemble="),
        ("", ["estimator.seed=1"], r"estimator\.seed=0 there, 1 here"),
        ("", ["estimator.npoints=5"], r"estimator\.npoints=4 there, 5 here"),
        ("", ["estimator.clip=3"], r"estimator\.clip=4\.0 there, 3\.0 here"),
        ("", ["data.num_images=3"], r"holds test images 0\.\.3 \(4 images\), this run evaluates 0\.\.2 "),
        ("", ["data.stats_images=30"], r"its gaussian_mmse at test images \[0, 1, 2, 3\] differ from this"),
        ("missing", [], r"nonexistent/metrics\.json not found\. Evaluate .*tiny_1\.pt first"),
        ("one_run", [], r"1 runs for 2 ensemble checkpoints"),
        ("", ["estimator.vlb=true"], r"set estimator\.vlb=false, or drop ensemble_curves"),
        ("no_ensemble", [], r"give their checkpoints in ensemble="),
    ],
)
def test_curves_that_are_not_the_ensembles_are_refused(members, tmp_path, change, overrides, match):
    make_cfg, (a, b), (run_a, run_b) = members
    ensemble, runs = f"ensemble=[{a},{b}]", [str(run_a), str(run_b)]
    if change == "reversed":
        runs.reverse()
    elif change == "missing":
        runs[1] = str(tmp_path / "nonexistent")
    elif change == "one_run":
        runs = runs[:1]
    elif change == "no_ensemble":
        ensemble = f"model.checkpoint={a}"
    cfg = make_cfg(ensemble, f"ensemble_curves=[{','.join(runs)}]", "estimator.vlb=false", *overrides)
    with pytest.raises(UserError, match=match):
        evaluate.run(cfg, tmp_path / "run")


def test_a_missing_curve_an_incomplete_run_or_an_unreadable_file_is_refused(members, tmp_path):
    """A member run without the control variate's curves cannot serve a run that uses it; nor can a run
    dir whose per_image.npz is not the one its metrics.json was written with, or a file that is not an npz."""
    make_cfg, (a, b), (run_a, run_b) = members
    stored = read_per_image(run_b / "per_image.npz")
    stored.curves.gaussian_errors = stored.curves.gaussian_errors_dequantized = None
    metrics = json.loads((run_b / "metrics.json").read_text())
    commit_evaluation(
        tmp_path, stored, {k: v for k, v in metrics.items() if not k.startswith(("format", "per_"))}
    )
    cfg = make_cfg(f"ensemble=[{a},{b}]", f"ensemble_curves=[{run_a},{tmp_path}]", "estimator.vlb=false")
    with pytest.raises(
        UserError, match=r"no gaussian_errors \(this run needs estimator\.control_variate=true"
    ):
        evaluate.run(cfg, tmp_path / "run")
    (tmp_path / "per_image.npz").write_bytes(b"truncated")
    with pytest.raises(
        UserError, match=r"incomplete evaluation \(per_image\.npz is missing or is not the one"
    ):
        evaluate.run(cfg, tmp_path / "run")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    (tmp_path / "metrics.json").write_text(
        json.dumps({**metrics, "per_image_sha256": file_sha256(tmp_path / "per_image.npz")})
    )
    with pytest.raises(UserError, match=r"per_image\.npz cannot be the ensemble's curves: .* cannot be read"):
        evaluate.run(cfg, tmp_path / "run")
