"""Exact denoisers: Bayes-optimal noise prediction (Tweedie's formula on an independently computed noisy
marginal), exact log-probabilities, sampling, shapes and input checks."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, MultivariateNormal, Normal

from itdiffusion.denoisers import Denoiser, Gaussian, GaussianMixture, Lattice, noisy_channel, x_from_eps

LOGSNRS = [-8.0, -1.5, 0.0, 2.5, 9.0, 14.0]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _gaussian(d: int = 3) -> Gaussian:
    g = _gen(0)
    a = torch.randn(d, d, dtype=torch.float64, generator=g)
    return Gaussian(torch.randn(d, dtype=torch.float64, generator=g), a @ a.T + 0.2 * torch.eye(d))


def _mixture(d: int = 3, diagonal: bool = True) -> GaussianMixture:
    g = _gen(1)
    means = 2 * torch.randn(3, d, dtype=torch.float64, generator=g)
    if diagonal:
        variances = 0.1 + torch.rand(3, d, dtype=torch.float64, generator=g)
    else:
        variances = torch.tensor([0.3, 1.0, 2.0])
    return GaussianMixture(means, variances, torch.tensor([0.2, 0.5, 0.3]))


def _lattice() -> Lattice:
    g = _gen(2)
    return Lattice(torch.rand(2, 2, 5, dtype=torch.float64, generator=g), delta=0.5, low=-1.0,
                   weights=torch.tensor([0.3, 0.7]))


def _tweedie(log_marginal, z: torch.Tensor, logsnr: float) -> torch.Tensor:
    """E[eps | z] = -sqrt(1 - s) grad_z ln p_a(z)."""
    z = z.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(log_marginal(z).sum(), z)
    return -math.sqrt(torch.sigmoid(torch.tensor(-logsnr, dtype=torch.float64)).item()) * grad


def _noisy_points(dist, logsnr: float, n: int = 64) -> torch.Tensor:
    x = dist.sample(n, _gen(3))
    return noisy_channel(x, torch.full((n,), logsnr, dtype=torch.float64),
                         torch.randn(x.shape, dtype=torch.float64, generator=_gen(4)))


@pytest.mark.parametrize("logsnr", LOGSNRS)
def test_gaussian_denoiser_is_tweedie(logsnr):
    dist = _gaussian()
    s = torch.sigmoid(torch.tensor(logsnr, dtype=torch.float64))
    noisy_cov = s * dist.cov + (1 - s) * torch.eye(3, dtype=torch.float64)
    marginal = MultivariateNormal(s.sqrt() * dist.mean, covariance_matrix=noisy_cov)
    z = _noisy_points(dist, logsnr)
    eps_hat = dist(z, torch.full((z.shape[0],), logsnr))
    torch.testing.assert_close(eps_hat, _tweedie(marginal.log_prob, z, logsnr), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("diagonal", [True, False])
@pytest.mark.parametrize("logsnr", LOGSNRS)
def test_mixture_denoiser_is_tweedie(logsnr, diagonal):
    dist = _mixture(diagonal=diagonal)
    s = torch.sigmoid(torch.tensor(logsnr, dtype=torch.float64))
    comps = Independent(Normal(s.sqrt() * dist.means, (s * dist.variances + 1 - s).sqrt()), 1)
    marginal = MixtureSameFamily(Categorical(logits=dist.log_weights), comps)
    z = _noisy_points(dist, logsnr)
    eps_hat = dist(z, torch.full((z.shape[0],), logsnr))
    torch.testing.assert_close(eps_hat, _tweedie(marginal.log_prob, z, logsnr), rtol=1e-9, atol=1e-11)


def _all_lattice_points(lattice: Lattice) -> torch.Tensor:
    grid = itertools.product(lattice.values.tolist(), repeat=lattice.dim)
    return torch.tensor(list(grid), dtype=torch.float64)


@pytest.mark.parametrize("logsnr", LOGSNRS)
def test_lattice_denoiser_is_tweedie(logsnr):
    """The noisy marginal by brute force over every grid point, weighted by the exact log_prob."""
    lattice = _lattice()
    points = _all_lattice_points(lattice)
    log_p = lattice.log_prob(points)
    s = torch.sigmoid(torch.tensor(logsnr, dtype=torch.float64))

    def log_marginal(z):
        per_point = Normal(s.sqrt() * points, (1 - s).sqrt()).log_prob(z[:, None, :]).sum(-1)
        return torch.logsumexp(log_p + per_point, dim=1)

    z = _noisy_points(lattice, logsnr)
    eps_hat = lattice(z, torch.full((z.shape[0],), logsnr))
    torch.testing.assert_close(eps_hat, _tweedie(log_marginal, z, logsnr), rtol=1e-9, atol=1e-11)


def test_log_probs_are_exact():
    gauss = _gaussian()
    x = gauss.sample(10, _gen(5))
    expected = MultivariateNormal(gauss.mean, covariance_matrix=gauss.cov).log_prob(x)
    torch.testing.assert_close(gauss.log_prob(x), expected)

    mix = _mixture()
    comps = Independent(Normal(mix.means, mix.variances.sqrt()), 1)
    expected = MixtureSameFamily(Categorical(logits=mix.log_weights), comps).log_prob(x)
    torch.testing.assert_close(mix.log_prob(x), expected)

    lattice = _lattice()
    total = lattice.log_prob(_all_lattice_points(lattice)).exp().sum()
    torch.testing.assert_close(total, torch.tensor(1.0, dtype=torch.float64))
    off_grid = torch.tensor([[0.2, 0.5], [-1.5, 0.0], [1.5, 0.0]], dtype=torch.float64)
    assert torch.isinf(lattice.log_prob(off_grid)).all()


def test_samples_follow_the_distributions():
    gauss = _gaussian()
    x = gauss.sample(200_000, _gen(6))
    torch.testing.assert_close(x.mean(0), gauss.mean, atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), gauss.cov, atol=0.05, rtol=0.02)

    mix = _mixture()
    x = mix.sample(200_000, _gen(7))
    torch.testing.assert_close(x.mean(0), mix.mean, atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), mix.covariance, atol=0.05, rtol=0.02)

    lattice = _lattice()
    points = _all_lattice_points(lattice)
    x = lattice.sample(100_000, _gen(8))
    counts = (x[:, None, :] == points[None]).all(-1).sum(0).double()
    expected = lattice.log_prob(points).exp() * x.shape[0]
    assert ((counts - expected).abs() < 5 * expected.sqrt() + 1).all()


def test_inputs_of_any_shape_and_dtype():
    gauss = Gaussian(torch.zeros(6), torch.eye(6) * 2)
    z = torch.randn(4, 2, 3)  # float32 images [B, C, W]
    eps_hat = gauss(z, torch.zeros(4))
    assert eps_hat.shape == z.shape and eps_hat.dtype == torch.float32
    # N(0, 2 I) at a = 0 (s = 1/2): E[eps | z] = sqrt(1/2) z / (2 * 1/2 + 1/2)
    torch.testing.assert_close(eps_hat, z * math.sqrt(0.5) / 1.5)
    assert all(isinstance(d, Denoiser) for d in (gauss, _mixture(), _lattice()))
    assert gauss.log_prob(z).shape == (4,)


def test_channel_round_trip():
    x = torch.randn(5, 3, dtype=torch.float64)
    eps = torch.randn(5, 3, dtype=torch.float64)
    a = torch.tensor([-3.0, 0.0, 1.0, 4.0, 10.0], dtype=torch.float64)
    z = noisy_channel(x, a, eps)
    torch.testing.assert_close(x_from_eps(z, a, eps), x)
    # the closed form of the same prediction: x = sqrt(1 + e^-a) z - e^(-a/2) eps
    torch.testing.assert_close(x_from_eps(z, a, eps), (1 + torch.exp(-a))[:, None].sqrt() * z
                               - torch.exp(-a / 2)[:, None] * eps)


def test_discretize_approximates_the_density():
    mix = GaussianMixture(torch.tensor([[-1.0, 0.5], [1.0, -0.5]]), torch.tensor([0.3, 0.5]), torch.ones(2))
    delta = 0.02
    lattice = Lattice.discretize(mix, delta, -5.0, 5.0)
    assert lattice.interval == pytest.approx((-5.0, 5.0))
    x = lattice.sample(50, _gen(9))
    limit = -mix.log_prob(x) - 2 * math.log(delta)
    torch.testing.assert_close(-lattice.log_prob(x), limit, atol=1e-3, rtol=0)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="positive definite"):
        Gaussian(torch.zeros(2), torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
    with pytest.raises(ValueError, match="cov must be"):
        Gaussian(torch.zeros(2), torch.eye(3))
    with pytest.raises(ValueError, match="variances"):
        GaussianMixture(torch.zeros(2, 3), torch.ones(2, 2), torch.ones(2))
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture(torch.zeros(2, 3), torch.ones(2), torch.ones(3))
    with pytest.raises(ValueError, match="delta"):
        Lattice(torch.ones(2, 3), delta=0.0, low=0.0)
    with pytest.raises(ValueError, match="dimensions"):
        _gaussian()(torch.zeros(2, 4), torch.zeros(2))
    with pytest.raises(ValueError, match="one value per sample"):
        _gaussian()(torch.zeros(2, 3), torch.zeros(3))
