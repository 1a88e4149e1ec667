"""The evaluate stage: metrics and per-image outputs, sharding invariance, ensembles, bad settings."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import TINY, run_cli
from itdiffusion.artifacts import read_per_image
from itdiffusion.data import load_images, to_model_range
from itdiffusion.errors import UserError
from itdiffusion.models.iddpm import build_model_and_diffusion
from itdiffusion.models.weights import file_sha256
from itdiffusion.results import load_runs
from itdiffusion.seeding import Stream, stream_seed
from itdiffusion.stages import evaluate
from itdiffusion.variational import vlb

METRICS = ("vlb_bpd", "vlb_continuous_bpd", "it_continuous_bpd", "it_discrete_bpd", "it_dequantized_bpd")


@pytest.fixture
def tiny_cfg(make_cfg, shared_cache):
    def make(*overrides):
        return make_cfg(*TINY, f"paths.cache_dir={shared_cache}", *overrides)

    return make


def test_evaluate_writes_metrics_per_image_arrays_and_the_results_row(tiny_cfg, tiny_checkpoints, tmp_path):
    cfg = tiny_cfg(
        f"model.checkpoint={tiny_checkpoints[0]}", "run_id=single", "label=tiny", "paper_row=IDDPM"
    )
    run_dir = tmp_path / "run"
    metrics = evaluate.run(cfg, run_dir)
    stored = json.loads((run_dir / "metrics.json").read_text())
    assert stored["run_id"] == "single" and stored["num_images"] == 4 and stored["npoints"] == 4
    for key in METRICS:
        assert (
            np.isfinite(stored[key]) and np.isfinite(stored[f"{key}_stderr"]) and stored[f"{key}_stderr"] > 0
        )
    assert stored["checkpoint_sha256"] == file_sha256(tiny_checkpoints[0])
    assert stored["training_objective"] == cfg.model.training_objective
    assert stored["config"]["estimator"]["npoints"] == 4 and "git_commit" in stored
    assert stored["network_evals"] == 4 * (2 * 4 + 4)  # IT: 2 passes x 4 points; VLB: one pass of 4 steps
    assert metrics["it_continuous_bpd"] == stored["it_continuous_bpd"]
    per_image = read_per_image(run_dir / "per_image.npz")
    assert per_image.index.tolist() == [0, 1, 2, 3] and per_image.curves.logsnr.shape == (4, 4)
    vlb_bpd = per_image.member_values["vlb_bpd"][0].numpy()
    assert stored["vlb_bpd"] == pytest.approx(vlb_bpd.mean())
    assert load_runs(cfg.paths.results_dir)["single"]["label"] == "tiny"

    # the VLB column is the library's VLB of each image with that image's own noise seed
    model, diffusion = build_model_and_diffusion(cfg.model)
    model.load_state_dict(torch.load(tiny_checkpoints[0]))
    x = to_model_range(load_images(cfg.data, "test")[2][0])[None]
    gen = torch.Generator().manual_seed(stream_seed(cfg.estimator.seed, 2, Stream.VLB))
    expected = vlb(model, diffusion, x, steps_per_batch=4, generator=gen).total_bpd
    np.testing.assert_allclose(vlb_bpd[2], expected.item(), rtol=1e-6)

    # a rerun with skip_done finds the outputs and does nothing
    assert (
        evaluate.run(tiny_cfg(f"model.checkpoint={tiny_checkpoints[0]}", "skip_done=true"), run_dir) is None
    )


def test_ensemble_of_a_model_with_itself_is_that_model(tiny_cfg, tiny_checkpoints, tmp_path):
    """Each member's numbers are its single-model estimates; a model paired with itself changes nothing."""
    a, b = (str(p) for p in tiny_checkpoints)
    twice = evaluate.run(tiny_cfg(f"ensemble=[{a},{a}]", "estimator.vlb=false"), tmp_path / "twice")
    assert len(twice["members"]) == 2
    for key in ("it_continuous_bpd", "it_discrete_bpd", "it_dequantized_bpd"):
        assert twice[key] == pytest.approx(twice["members"][0][key], rel=1e-12)
        assert twice["members"][1][key] == twice["members"][0][key]
    pair = evaluate.run(tiny_cfg(f"ensemble=[{a},{b}]", "estimator.vlb=false"), tmp_path / "pair")
    assert pair["checkpoint_sha256"] == [file_sha256(a), file_sha256(b)]
    assert "vlb_bpd" not in pair and np.isfinite(pair["it_continuous_bpd_stderr"])
    stored = read_per_image(tmp_path / "pair" / "per_image.npz")
    assert stored.curves.num_models == 2 and stored.groups == ["m0", "m1", "ensemble"]
    assert stored.estimates["it_continuous_nats"].shape == (3, 4)
    # two different networks (not the Gaussian decoder twice): their member estimates differ
    m0, m1 = stored.estimates["it_continuous_nats"][:2]
    assert not torch.equal(m0, m1)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["estimator.it=false", "estimator.vlb=false"], "nothing to evaluate"),
        (["ensemble=[a.pt]"], "at least two checkpoints"),
        (["model.checkpoint=/nonexistent/weights.pt"], "/nonexistent/weights.pt"),
        (["estimator.logsnr_proposal_from=/nonexistent/run"], "no evaluate run there"),
    ],
)
def test_bad_settings_are_user_errors(tiny_cfg, tmp_path, overrides, match):
    with pytest.raises(UserError, match=match):
        evaluate.run(tiny_cfg(*overrides), tmp_path / "run")


def test_two_processes_give_the_per_image_numbers_of_one(tiny_cfg, tiny_checkpoints, tmp_path, shared_cache):
    """torchrun with 2 gloo processes on the command line vs. one in-process run: same per-image values."""
    overrides = [
        *TINY,
        f"paths.cache_dir={shared_cache}",
        f"model.checkpoint={tiny_checkpoints[1]}",
        "data.num_images=5",
    ]  # 5 images: the ranks get 3 and 2
    one = tmp_path / "one"
    evaluate.run(tiny_cfg(f"model.checkpoint={tiny_checkpoints[1]}", "data.num_images=5"), one)
    outputs = tmp_path / "cli"
    env = {"OMP_NUM_THREADS": "1"}
    proc = run_cli(
        "evaluate",
        *overrides,
        f"paths.output_dir={outputs}",
        "run_id=sharded",
        cwd=tmp_path,
        env=env,
        torchrun=2,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = outputs / "evaluate" / "sharded"
    assert sorted(os.listdir(outputs / "evaluate")) == ["sharded"]  # one run dir for both ranks
    assert json.loads((run_dir / "metrics.json").read_text())["world_size"] == 2
    with np.load(one / "per_image.npz") as a, np.load(run_dir / "per_image.npz") as b:
        assert a.files == b.files and str(a["meta"]) == str(b["meta"])
        for key in set(a.files) - {"meta"}:
            np.testing.assert_allclose(b[key], a[key], rtol=1e-6, atol=1e-9, err_msg=key)


def test_a_checkpoint_for_other_flags_is_a_user_error(tiny_cfg, tmp_path):
    cfg = tiny_cfg("model.num_channels=64")
    model, _ = build_model_and_diffusion(cfg.model)
    torch.save(model.state_dict(), tmp_path / "wide.pt")
    with pytest.raises(UserError, match="does not fit the model"):
        evaluate.run(tiny_cfg(f"model.checkpoint={tmp_path / 'wide.pt'}"), tmp_path / "run")


def test_control_variate_agrees_with_the_plain_estimate(tiny_cfg, tiny_checkpoints, tmp_path):
    """estimator.control_variate (the default): same points and noise, no extra network calls, the same
    quantity as without it."""
    a, b = (str(p) for p in tiny_checkpoints)
    common = ("estimator.vlb=false", "estimator.npoints=16")
    plain = evaluate.run(tiny_cfg(f"model.checkpoint={a}", "estimator.control_variate=false", *common),
                         tmp_path / "plain")
    cv = evaluate.run(tiny_cfg(f"model.checkpoint={a}", *common), tmp_path / "cv")
    assert cv["network_evals"] == plain["network_evals"]
    for key in ("it_continuous_bpd", "it_discrete_bpd", "it_dequantized_bpd"):
        se = np.hypot(plain[f"{key}_mc_stderr"], cv[f"{key}_mc_stderr"])
        assert np.isfinite(cv[key]) and cv[f"{key}_stderr"] > 0
        assert abs(cv[key] - plain[key]) < 4 * se + 1e-9, key
    curves = read_per_image(tmp_path / "cv" / "per_image.npz").curves
    assert curves.gaussian_errors is not None and curves.gaussian_errors_dequantized is not None
    pair = evaluate.run(tiny_cfg(f"ensemble=[{a},{b}]", *common), tmp_path / "pair")
    assert np.isfinite(pair["it_continuous_bpd"]) and np.isfinite(pair["it_discrete_bpd_stderr"])


def test_a_rerun_gives_identical_per_image_numbers(tiny_cfg, tiny_checkpoints, tmp_path):
    cfg = tiny_cfg(f"model.checkpoint={tiny_checkpoints[0]}", "estimator.vlb=false")
    first, second = evaluate.run(cfg, tmp_path / "a"), evaluate.run(cfg, tmp_path / "b")
    assert first["it_discrete_bpd"] == second["it_discrete_bpd"]
    with np.load(tmp_path / "a" / "per_image.npz") as a, np.load(tmp_path / "b" / "per_image.npz") as b:
        assert a.files == b.files
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_the_absurd_value_check_reads_bits_per_dim_not_counts(tmp_path):
    """The paper's protocol evaluates a network 2 npoints + 4000 times per image: a count far above the
    bits/dim bound is no reason to stop; an estimate beyond it is."""
    from itdiffusion.artifacts import PerImage
    from itdiffusion.stages.evaluation_frame import ABSURD_BPD, check_finite

    per_image = PerImage(index=torch.arange(2), groups=["m0"])
    per_image.member_values["network_evals"] = torch.tensor([[6000.0, 6000.0]], dtype=torch.float64)
    per_image.member_values["vlb_bpd"] = torch.tensor([[3.0, 3.1]], dtype=torch.float64)
    check_finite(per_image, dim=3072, run_dir=tmp_path)
    per_image.member_values["vlb_bpd"][0, 1] = 2 * ABSURD_BPD
    with pytest.raises(UserError, match="m0.vlb_bpd of test image 1"):
        check_finite(per_image, dim=3072, run_dir=tmp_path)
