"""Per-pixel information maps: each coordinate's share is its exact -ln p_i(x_i) for independent
coordinates (under the dataset budget, at the default point count), and every map sums to the reported
continuous estimate of its image under both budgets."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from itdiffusion.artifacts import read_per_image
from itdiffusion.budget import estimate_with_choice, fit_decoder_choice
from itdiffusion.config import EstimatorConfig
from itdiffusion.denoisers import GaussianMixture
from itdiffusion.information import BinTable, GaussianReference, LogSNRProposal, estimate, sample_curves
from itdiffusion.pixel_maps import SUM_TOLERANCE_NATS, PixelMapError, pixel_maps
from toy_distributions import gen, toy_mixture

DEFAULT_POINTS = EstimatorConfig().pixel_map_points


class ProductOfMixtures:
    """Independent coordinates, coordinate i a 1-d Gaussian mixture: exact denoiser and log-densities."""

    def __init__(self, d: int, seed: int):
        g = gen(seed)
        self.parts = [
            GaussianMixture(2.0 * torch.randn(3, 1, dtype=torch.float64, generator=g),
                            0.05 + 0.3 * torch.rand(3, 1, dtype=torch.float64, generator=g),
                            torch.tensor([1.0, 2.0, 3.0]))
            for _ in range(d)
        ]

    def __call__(self, z, logsnr):
        return torch.cat([p(z[:, i:i + 1], logsnr) for i, p in enumerate(self.parts)], dim=1)

    def log_prob_coords(self, x):  # [B, d]
        return torch.stack([p.log_prob(x[:, i:i + 1]) for i, p in enumerate(self.parts)], dim=1)

    def sample(self, n, g):
        return torch.cat([p.sample(n, g) for p in self.parts], dim=1)


def curves_of(denoiser, x, reference, proposal, npoints, first_seed, sampling="stratified"):
    seeds = list(range(first_seed, first_seed + x.shape[0]))
    return sample_curves(denoiser, x, reference, npoints=npoints, seeds=seeds, proposal=proposal,
                         sampling=sampling, control_variate=True)


def dataset_budget_estimate(denoiser, x, reference, proposal, npoints, pilot_x, sampling="stratified"):
    """The dataset budget's protocol: the decoder choice fitted on a pilot (other images and seeds, a
    ladder of K), applied to the main run's few points per image."""
    pilot = [curves_of(denoiser, pilot_x, reference, proposal, k, 5000 + 100 * k, sampling) for k in (4, 16)]
    choice = fit_decoder_choice(pilot)
    return estimate_with_choice(curves_of(denoiser, x, reference, proposal, npoints, 1000, sampling),
                                reference, choice)


@pytest.fixture(scope="module")
def product_setup():
    data = ProductOfMixtures(8, seed=0)
    reference = GaussianReference.from_data(data.sample(4000, gen(2)), diagonal=True)
    proposal = LogSNRProposal.from_reference(reference, clip=6.0)
    x = data.sample(40, gen(1))
    est = dataset_budget_estimate(data, x, reference, proposal, npoints=4, pilot_x=data.sample(16, gen(3)))
    return data, reference, x, est


def test_dataset_budget_maps_at_the_default_points_are_the_exact_coordinate_log_densities(product_setup):
    data, reference, x, est = product_setup
    mapped = 40
    maps = pixel_maps([data], x[:mapped], list(range(mapped)), [est], reference,
                      list(range(77, 77 + mapped)), npoints=DEFAULT_POINTS)
    exact = -data.log_prob_coords(x[:mapped])  # [P, d] nats
    # every map sums to the reported estimate (4 points per image) to 1e-6 nats
    assert maps.check_sums(est.continuous[:mapped][None]) <= 1e-6
    torch.testing.assert_close(maps.nats[0].sum(-1), est.continuous[:mapped], rtol=0, atol=1e-6)
    # per pixel: the bias over the mapped images within 3 standard errors of the exact -ln p_i(x_i)
    error, stderr = maps.nats[0] - exact, maps.stderr[0]
    bias, bias_stderr = error.mean(0), stderr.square().sum(0).sqrt() / mapped
    assert (bias.abs() < 3 * bias_stderr).all(), (bias, bias_stderr)
    # single shares: few beyond 3 standard errors (the reported estimate's own stderr, from 4 points, is
    # itself noisy, so the tails are a little heavier than normal)
    assert ((error / stderr).abs() > 3).double().mean() < 0.05
    # teeth: the errors are small next to how much the shares differ (they include the reported estimate's
    # noise at 4 points, spread over the pixels: nonzero residuals), the maps adding up exactly nonetheless
    assert stderr.median() < 0.5 * exact.std()
    assert (maps.residual_nats[0].abs() > 1e-3).all()


def test_the_bias_check_fails_for_a_map_with_the_wrong_decoders(product_setup):
    """The same check flags maps that decompose another estimand (the Gaussian decoder everywhere)."""
    data, reference, x, est = product_setup
    mapped = 40
    table = est.continuous_decisions.candidate
    gaussian = dataclasses.replace(est, continuous_decisions=dataclasses.replace(
        est.continuous_decisions, candidate=BinTable(table.nbins, torch.ones_like(table.values))))
    maps = pixel_maps([data], x[:mapped], list(range(mapped)), [gaussian], reference,
                      list(range(77, 77 + mapped)), npoints=DEFAULT_POINTS)
    error = maps.nats[0] - (-data.log_prob_coords(x[:mapped]))
    bias_stderr = maps.stderr[0].square().sum(0).sqrt() / mapped
    assert (error.mean(0).abs() > 3 * bias_stderr).any()


@pytest.mark.parametrize("budget", ["per_image", "dataset"])
def test_maps_sum_to_the_reported_estimate_with_a_full_covariance_reference(budget):
    data = toy_mixture(4, seed=3)
    x = data.sample(40, gen(4))
    reference = GaussianReference.from_data(data.sample(2000, gen(5)))  # full covariance: eigvecs
    assert reference.eigvecs is not None
    proposal = LogSNRProposal.from_reference(reference, clip=6.0)
    if budget == "dataset":
        est = dataset_budget_estimate(data, x, reference, proposal, 4, data.sample(16, gen(6)), "random")
    else:
        est = estimate(curves_of(data, x, reference, proposal, 64, 1000, "random"), reference)
    maps = pixel_maps([data], x[:3], [0, 1, 2], [est], reference, [7, 8, 9], npoints=64)
    torch.testing.assert_close(maps.nats[0].sum(-1), est.continuous[:3], rtol=0, atol=1e-6)
    assert torch.isfinite(maps.band).all() and (maps.stderr > 0).all()
    # the sum check compares with the number given and fails loudly on another one
    with pytest.raises(PixelMapError, match="not the reported continuous estimate"):
        maps.check_sums(est.continuous[:3][None] + 10 * SUM_TOLERANCE_NATS)
    # and the exact total still holds on average for the exact denoiser
    assert ((est.continuous[:3] - (-data.log_prob(x[:3]))).abs() < 2.0).all()


def test_the_dataset_budget_choice_is_the_one_mapped_not_the_cross_fitted_one(product_setup):
    """With an imperfect denoiser the dataset budget's estimate (the pilot's choice) and the cross-fitted
    one differ; the maps decompose the reported one (the estimate's own decisions)."""
    data, reference, x, _ = product_setup

    def imperfect(z, logsnr):  # overshoots: the Gaussian decoder is better at some log-SNRs
        return 1.6 * data(z, logsnr)

    proposal = LogSNRProposal.from_reference(reference, clip=6.0)
    est = dataset_budget_estimate(imperfect, x, reference, proposal, 16, data.sample(16, gen(3)))
    crossfit = estimate(est.curves, reference)
    assert (crossfit.continuous - est.continuous).abs().max() > 1e-3
    maps = pixel_maps([imperfect], x[:4], list(range(4)), [est], reference, [5, 6, 7, 8], npoints=16)
    assert maps.check_sums(est.continuous[:4][None]) <= 1e-6
    with pytest.raises(PixelMapError):
        maps.check_sums(crossfit.continuous[:4][None])


@pytest.mark.parametrize("budget", ["per_image", "dataset"])
def test_the_evaluate_stage_stores_maps_that_sum_to_per_image_npz(make_cfg, shared_cache, tiny_checkpoints,
                                                                 tmp_path, budget):
    from conftest import TINY
    from itdiffusion.stages import evaluate

    cfg = make_cfg(*TINY, f"paths.cache_dir={shared_cache}", f"model.checkpoint={tiny_checkpoints[0]}",
                   "estimator.vlb=false", "estimator.pixel_maps=2", "estimator.pixel_map_points=6",
                   f"estimator.budget={budget}", "estimator.pilot_images=2",
                   "estimator.target_stderr_bpd=1000")
    evaluate.run(cfg, tmp_path / "run")
    per_image = read_per_image(tmp_path / "run" / "per_image.npz")
    maps = per_image.pixel_maps
    assert maps["nats"].shape == (1, 2, 3072) and maps["stderr"].shape == (1, 2, 3072)
    reported = per_image.estimates["it_continuous_nats"][0, :2]
    assert (maps["nats"][0].sum(-1) - reported).abs().max() <= 1e-6
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())["pixel_maps"]
    assert summary["images"] == 2 and summary["points"] == 6
    assert summary["sum_check_max_abs_nats"] <= 1e-6
    assert summary["stderr_bits_median"] == pytest.approx(float((maps["stderr"] / math.log(2)).median()))
