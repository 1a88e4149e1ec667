"""Figures are made from what the estimator integrates: the gap figure's numbers give the table's estimate."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from itdiffusion import figure_files, figures, run_figures
from itdiffusion.artifacts import PerImage
from itdiffusion.information import GaussianReference, LogSNRProposal, estimate, sample_curves
from itdiffusion.stages.evaluate import with_estimates
from itdiffusion.units import nats_to_bpd
from toy_distributions import gen, toy_mixture


@pytest.fixture(scope="module")
def toy():
    """An exact denoiser on a 4-d mixture whose test images are NOT distributed as the reference (the
    Gaussian decoder's error at the images differs from mmse_G), estimated as the evaluate stage does."""
    data = toy_mixture(4, seed=3)
    reference = GaussianReference.from_data(data.sample(3000, gen(5)) * 0.5)  # a reference too narrow
    x = data.sample(300, gen(4))
    proposal = LogSNRProposal.from_reference(reference, clip=5.0)
    curves = sample_curves(data, x, reference, npoints=64, seeds=list(range(300)), proposal=proposal,
                           control_variate=True)
    per_image = with_estimates(PerImage(index=torch.arange(300), curves=curves), reference)
    return data, reference, x, per_image


def test_the_closed_form_gaussian_nll_is_the_density_of_the_reference(toy):
    _, reference, x, _ = toy
    cov = reference.eigvecs @ torch.diag(reference.eigvals) @ reference.eigvecs.T
    exact = -torch.distributions.MultivariateNormal(reference.mean, cov).log_prob(x.double())
    torch.testing.assert_close(reference.nll(x), exact, rtol=1e-10, atol=1e-9)
    diagonal = GaussianReference(reference.mean, reference.eigvals)  # U = I
    exact = -torch.distributions.Normal(reference.mean, reference.eigvals.sqrt()).log_prob(x.double()).sum(-1)
    torch.testing.assert_close(diagonal.nll(x), exact, rtol=1e-10, atol=1e-9)


def test_the_gap_figure_is_the_continuous_estimate(toy):
    data, reference, x, per_image = toy
    est = estimate(per_image.curves, reference).continuous
    d = reference.dim
    gap = figures.gap_data(per_image, reference.entropy, d)
    table = float(nats_to_bpd(est.mean(), d))
    assert gap.estimate_bpd == pytest.approx(table, abs=1e-12)  # the table's number
    # the shaded area, with the same sampled integral for the Gaussian decoder, is that number exactly
    area = float(nats_to_bpd(0.5 * np.sum(np.diff(gap.edges) * gap.used), d))
    assert gap.area_bpd == pytest.approx(area, abs=1e-12)
    assert gap.sampled_gaussian_bpd - gap.area_bpd == pytest.approx(table, abs=1e-9)
    # the Gaussian in the legend is the closed form; the sampled one differs by its Monte Carlo error only
    assert gap.gaussian_bpd == pytest.approx(float(nats_to_bpd(reference.nll(x).mean(), d)), abs=1e-12)
    stderr = float(nats_to_bpd(est.std() / math.sqrt(len(est)), d))
    assert abs(gap.sampled_gaussian_bpd - gap.gaussian_bpd) < 3 * stderr
    exact = float(nats_to_bpd(-data.log_prob(x).mean(), d))
    assert abs(gap.estimate_bpd - exact) < 3 * stderr
    # the exact denoiser beats the Gaussian decoder at these images: the area is a gain
    assert gap.area_bpd > 0 and gap.gap[0].max() > 0


def test_the_gap_figure_is_exact_with_uneven_bins_and_the_dataset_budgets_choice(toy):
    """Random points fill the plot's bins unevenly, and a fixed per-bin choice (the dataset budget's) is
    another function than the cross-fitted one: the area still gives the estimate exactly."""
    from itdiffusion.budget import DecoderChoice

    data, reference, x, _ = toy
    proposal = LogSNRProposal.from_reference(reference, clip=5.0)
    curves = sample_curves(data, x[:40], reference, npoints=12, seeds=list(range(40)), proposal=proposal,
                           sampling="random")
    choice = DecoderChoice(nbins=12, index={"continuous": [1, 0] * 6},
                           candidates={"continuous": ["m0", "gaussian"]})
    per_image = with_estimates(PerImage(index=torch.arange(40), curves=curves), reference, choice)
    gap = figures.gap_data(per_image, reference.entropy, reference.dim)
    assert gap.sampled_gaussian_bpd - gap.area_bpd == pytest.approx(gap.estimate_bpd, abs=1e-9)
    table = float(nats_to_bpd(per_image.estimates["it_continuous_nats"][0].mean(), reference.dim))
    assert gap.estimate_bpd == pytest.approx(table, abs=1e-12)


def test_no_mmse_curve_leaves_its_axes(tmp_path):
    """Curves far above d (a poor model at high log-SNR) and below 0 stay inside the axes."""
    centres = np.linspace(-5, 5, 9)
    d = 100
    data = figures.MMSEData(centres, d)
    data.continuous["model"] = (np.linspace(10, 290, 9), np.zeros(9))  # up to 2.9 d
    data.continuous[figures.MMSEData.GAUSSIAN_DECODER] = (np.linspace(-20, 90, 9), np.zeros(9))
    data.continuous[figures.MMSEData.REFERENCE] = (np.linspace(0, 80, 9), np.zeros(9))
    data.continuous[figures.MMSEData.STANDARD] = (d / (1 + np.exp(-centres)), np.zeros(9))
    data.discrete["model (rounded)"] = (np.linspace(5, 150, 9), np.zeros(9))
    data.best = data.continuous["model"][0]
    path = figures.plot_mmse(data, tmp_path / "mmse.png")
    drawn = json.loads(figure_files.sidecar_path(path).read_text())
    for ax in drawn["axes"]:
        lo, hi = ax["ylim"]
        for line in ax["lines"]:
            assert lo <= line["min"] and line["max"] <= hi, (ax["title"], line)
    assert max(line["max"] for line in drawn["axes"][0]["lines"]) == pytest.approx(290)
    # the references are told apart by colour and line style
    styles = {name: figures.REFERENCE_STYLES[name] for name in figures.REFERENCE_STYLES}
    assert len(set(styles.values())) == 3 and len({c for c, _ in styles.values()}) == 3
    assert not {c for c, _ in styles.values()} & set(figure_files.MODEL_COLOURS)


def test_pixel_colour_range_is_robust_to_outliers():
    values = np.zeros(10_000)
    values[:5] = [400, -400, 300, 250, -350]  # a few outliers
    values[5:] = np.random.default_rng(0).normal(0, 1, 9995)
    lim, beyond = figures.symmetric_range([values])
    assert 2 < lim < 4 and beyond == 100  # the 99th percentile of |bits|: 1% of the pixels beyond


def test_figures_are_png_files_with_the_paper_layout(toy, tmp_path):
    data, reference, x, per_image = toy
    mmse = figures.mmse_data(per_image, reference.dim, names=["exact"])
    assert set(mmse.continuous) == {"exact", figures.MMSEData.GAUSSIAN_DECODER, figures.MMSEData.REFERENCE,
                                    figures.MMSEData.STANDARD}
    # N(0, I): d sigmoid(a), binned like every curve
    np.testing.assert_allclose(mmse.continuous[figures.MMSEData.STANDARD][0],
                               reference.dim / (1 + np.exp(-mmse.centres)), rtol=0.15)
    for path in (figures.plot_mmse(mmse, tmp_path / "mmse.png"),
                 figures.plot_gap({"exact": figures.gap_data(per_image, reference.entropy, reference.dim)},
                                  tmp_path / "gap.png"),
                 run_figures.plot_losses({"u": [("run", "train", [(1, 2.0)])]}, tmp_path / "loss.png")):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 300
            assert np.asarray(im.convert("L")).std() > 5  # something is drawn


def test_the_mmse_figure_shades_the_bins_where_the_gaussian_decoder_stands_in(toy, tmp_path):
    _, reference, _, per_image = toy
    proposal = per_image.curves.proposal
    used = ["gaussian"] * 3 + ["m0"] * 26 + ["gaussian"] * 3
    spans = figures.reference_spans(proposal, used)
    edges = proposal.quantile(torch.tensor([0.0, 3 / 32, 29 / 32, 1.0], dtype=torch.float64)).tolist()
    np.testing.assert_allclose(spans, [(edges[0], edges[1]), (edges[2], edges[3])])  # adjacent bins merged
    assert figures.reference_spans(proposal, ["m0"] * 32) == []
    mmse = figures.mmse_data(per_image, reference.dim, names=["exact"])
    plain = np.asarray(Image.open(figures.plot_mmse(mmse, tmp_path / "plain.png")).convert("L"), float)
    mmse.reference_spans = {"continuous": spans}
    shaded = np.asarray(Image.open(figures.plot_mmse(mmse, tmp_path / "shaded.png")).convert("L"), float)
    assert plain.shape == shaded.shape and (shaded < plain - 5).sum() > 1000  # grey bands drawn
