"""Per-pixel information maps: each coordinate's share is its exact -ln p_i(x_i) for independent
coordinates, and a map sums to the image's continuous estimate for any data and reference."""

from __future__ import annotations

import torch

from itdiffusion.denoisers import GaussianMixture
from itdiffusion.information import GaussianReference, LogSNRProposal, estimate, sample_curves
from itdiffusion.pixel_maps import pixel_maps
from toy_distributions import gen, toy_mixture


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


def curves_and_maps(denoiser, x, reference, npoints, mapped, sampling="stratified", control_variate=True):
    seeds = list(range(1000, 1000 + x.shape[0]))
    proposal = LogSNRProposal.from_reference(reference, clip=6.0)
    curves = sample_curves(denoiser, x, reference, npoints=npoints, seeds=seeds, proposal=proposal,
                           sampling=sampling, control_variate=control_variate)
    maps = pixel_maps([denoiser], x[:mapped], list(range(mapped)), curves, reference, seeds[:mapped])
    return curves, maps


def test_each_coordinate_share_is_its_exact_log_density():
    data = ProductOfMixtures(3, seed=0)
    x = data.sample(64, gen(1))
    reference = GaussianReference.from_data(data.sample(4000, gen(2)), diagonal=True)
    curves, maps = curves_and_maps(data, x, reference, npoints=2000, mapped=6)
    exact = -data.log_prob_coords(x[:6])  # [6, 3]
    z = (maps.nats[0] - exact) / maps.stderr[0]
    assert z.abs().max() < 3.5, z  # 18 shares: each within ~3 standard errors
    assert maps.stderr[0].max() < 0.3 < exact.std()  # teeth: errors small next to the spread of shares
    # a map sums to the image's continuous estimate
    est = estimate(curves, reference).continuous[:6]
    torch.testing.assert_close(maps.total_nats[0], est, rtol=0, atol=1e-8)
    torch.testing.assert_close(maps.nats[0].sum(-1), est, rtol=0, atol=1e-8)


def test_maps_sum_to_the_estimate_with_a_full_covariance_reference():
    data = toy_mixture(4, seed=3)
    x = data.sample(40, gen(4))
    reference = GaussianReference.from_data(data.sample(2000, gen(5)))  # full covariance: eigvecs
    assert reference.eigvecs is not None
    curves, maps = curves_and_maps(data, x, reference, npoints=64, mapped=3, sampling="random")
    est = estimate(curves, reference).continuous[:3]
    torch.testing.assert_close(maps.nats[0].sum(-1), est, rtol=0, atol=1e-8)
    assert torch.isfinite(maps.band).all() and (maps.stderr > 0).all()
    # and the exact total still holds on average for the exact denoiser
    assert ((est - (-data.log_prob(x[:3]))).abs() < 1.0).all()


def test_wrong_seeds_are_refused():
    import pytest

    data = ProductOfMixtures(2, seed=0)
    x = data.sample(8, gen(1))
    reference = GaussianReference.from_data(data.sample(500, gen(2)), diagonal=True)
    curves = sample_curves(data, x, reference, npoints=8, seeds=list(range(8)))
    with pytest.raises(ValueError, match="seed"):
        pixel_maps([data], x[:1], [0], curves, reference, [123])
