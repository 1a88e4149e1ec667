"""Figures are made from what the estimator integrates: the gap figure's numbers give the table's estimate."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from itdiffusion import figures
from itdiffusion.artifacts import PerImage
from itdiffusion.information import GaussianReference, LogSNRProposal, estimate, sample_curves
from itdiffusion.units import nats_to_bpd
from toy_distributions import gen, toy_mixture


@pytest.fixture(scope="module")
def toy():
    """An exact denoiser on a 4-d mixture whose test images are NOT distributed as the reference (the
    Gaussian decoder's error at the images differs from mmse_G: the case the old figure got wrong)."""
    data = toy_mixture(4, seed=3)
    reference = GaussianReference.from_data(data.sample(3000, gen(5)) * 0.5)  # a reference too narrow
    x = data.sample(300, gen(4))
    proposal = LogSNRProposal.from_reference(reference, clip=5.0)
    curves = sample_curves(data, x, reference, npoints=64, seeds=list(range(300)), proposal=proposal,
                           control_variate=True)
    per_image = PerImage(index=torch.arange(300), curves=curves,
                         reference_mmse=reference.mmse(curves.logsnr))
    return data, reference, x, per_image


def test_the_gap_figure_reproduces_the_continuous_estimate(toy):
    data, reference, x, per_image = toy
    est = estimate(per_image.curves, reference).continuous
    d = reference.dim
    table = float(nats_to_bpd(est.mean(), d))
    stderr = float(nats_to_bpd(est.std() / math.sqrt(len(est)), d))
    gap = figures.gap_data(per_image, reference.entropy, d)
    assert abs(gap.implied_bpd - table) < stderr  # the figure's area gives the table's number
    exact = float(nats_to_bpd(-data.log_prob(x).mean(), d))
    assert abs(gap.implied_bpd - exact) < 3 * stderr
    # the Gaussian decoder at these images is far from mmse_G: the offset the old figure left out
    assert np.abs(gap.offset).max() > 0.5
    # and the figure's Gaussian NLL is the images' exact Gaussian NLL
    gauss_nll = 0.5 * (d * math.log(2 * math.pi) + reference.log_eigvals.sum()
                       + reference.whiten_coords(x).sum(-1))
    assert abs(gap.gaussian_bpd - float(nats_to_bpd(gauss_nll.mean(), d))) < stderr


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
                 figures.plot_losses({"u": [("run", "train", [(1, 2.0)])]}, tmp_path / "loss.png")):
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
