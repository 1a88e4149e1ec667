"""Building blocks of the IT estimators against closed forms and quadrature: the Gaussian reference, the
log-SNR proposal, the tails, the standard errors, the cross-fitted decoder choice and lattice rounding."""

from __future__ import annotations

import io
import math

import pytest
import torch

from itdiffusion.denoisers import Gaussian, noisy_channel
from itdiffusion.information import (
    ITD_VARIANCE_FACTOR,
    MOMENT_VARIANCE_FACTOR,
    GaussianReference,
    LogSNRProposal,
    continuous_tails,
    cross_fitted_choice,
    left_tail,
    mc_mean_and_stderr,
    resolving_logsnr,
    right_tail_bound,
    round_to_lattice,
)
from toy_distributions import gen


def _known_gaussian(d: int = 4) -> Gaussian:
    g = gen(0)
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))
    eigvals = torch.logspace(-2, 1, d, dtype=torch.float64)
    return Gaussian(torch.randn(d, dtype=torch.float64, generator=g), q @ torch.diag(eigvals) @ q.T)


def _reference(dist: Gaussian) -> GaussianReference:
    return GaussianReference.from_moments(dist.mean, dist.cov)


# ----- Gaussian reference ---------------------------------------------------------------------------


def test_from_data_recovers_a_known_covariance():
    dist = _known_gaussian()
    x = dist.sample(200_000, gen(1)).reshape(-1, 2, 2)  # images of shape [2, 2]
    ref = GaussianReference.from_data(x, chunk_size=30_000)
    assert ref.shape == (2, 2) and ref.dim == 4
    torch.testing.assert_close(ref.mean, dist.mean, atol=0.02, rtol=0)
    torch.testing.assert_close(ref.eigvals, dist.eigvals, rtol=0.02, atol=0)
    cov = ref.eigvecs @ torch.diag(ref.eigvals) @ ref.eigvecs.T
    torch.testing.assert_close(cov, dist.cov, rtol=0, atol=0.05)
    diag = GaussianReference.from_data(x, diagonal=True)
    assert diag.eigvecs is None
    torch.testing.assert_close(diag.eigvals, torch.diagonal(dist.cov), rtol=0.02, atol=0)


def test_eigenvalue_floor_keeps_a_rank_deficient_reference_finite():
    x = torch.randn(3, 10, dtype=torch.float64, generator=gen(2))  # N - 1 = 2 < d: rank 2
    ref = GaussianReference.from_data(x, min_eigval=1e-6)
    assert (ref.eigvals >= 1e-6).all() and math.isfinite(ref.entropy)
    assert math.isfinite(ref.logsnr_loc_scale()[1])


def test_entropy_and_mmse_match_closed_forms():
    dist = _known_gaussian()
    ref = _reference(dist)
    mvn = torch.distributions.MultivariateNormal(dist.mean, covariance_matrix=dist.cov)
    assert ref.entropy == pytest.approx(mvn.entropy().item(), rel=1e-12)
    # mmse_G(a) = tr Cov(eps | z) = tr(I - (1 - s) (s Sigma + (1 - s) I)^-1), by matrices
    eye = torch.eye(4, dtype=torch.float64)
    for a in (-6.0, -1.0, 0.0, 3.0, 9.0):
        s = torch.sigmoid(torch.tensor(a, dtype=torch.float64))
        post = eye - (1 - s) * torch.linalg.inv(s * dist.cov + (1 - s) * eye)
        assert ref.mmse(torch.tensor(a)).item() == pytest.approx(torch.trace(post).item(), rel=1e-10)
    assert ref.mmse(torch.zeros(3, 5)).shape == (3, 5)


def test_pointwise_mmse_is_the_gaussian_decoders_error_at_each_image():
    dist = _known_gaussian()
    ref = _reference(dist)
    x = dist.sample(3, gen(3))
    logsnr = torch.tensor([[-2.0, 1.0, 4.0]] * 3, dtype=torch.float64)
    exact = ref.pointwise_mmse(x, logsnr)
    n = 40_000
    for b in range(3):
        for k in range(3):
            a = torch.full((n,), logsnr[b, k].item(), dtype=torch.float64)
            eps = torch.randn(n, 4, dtype=torch.float64, generator=gen(10 * b + k))
            err = (dist(noisy_channel(x[b].expand(n, 4), a, eps), a) - eps).square().sum(1)
            assert abs(err.mean().item() - exact[b, k].item()) < 4 * err.std().item() / math.sqrt(n)
    # averaged over the data it is mmse_G(a)
    many = dist.sample(100_000, gen(4))
    avg = ref.pointwise_mmse(many, torch.full((100_000, 1), 0.5, dtype=torch.float64)).mean()
    assert avg.item() == pytest.approx(ref.mmse(torch.tensor(0.5)).item(), rel=0.01)


def test_logsnr_loc_scale_formula():
    eigvals = torch.tensor([0.01, 0.1, 1.0, 4.0], dtype=torch.float64)
    ref = GaussianReference(torch.zeros(4), eigvals)
    log_lam = eigvals.log()
    loc, scale = ref.logsnr_loc_scale()
    assert loc == pytest.approx(-log_lam.mean().item())
    assert scale == pytest.approx(math.sqrt(1 + 3 / math.pi * log_lam.var().item()))  # ITD's code
    assert ITD_VARIANCE_FACTOR == pytest.approx(3 / math.pi)
    _, moment_scale = ref.logsnr_loc_scale(MOMENT_VARIANCE_FACTOR)
    assert moment_scale == pytest.approx(math.sqrt(1 + 3 / math.pi**2 * log_lam.var().item()))


def test_state_dict_round_trip_and_device_move():
    ref = GaussianReference.from_data(_known_gaussian().sample(500, gen(5)).reshape(-1, 1, 4))
    buffer = io.BytesIO()
    torch.save(ref.state_dict(), buffer)
    buffer.seek(0)
    loaded = GaussianReference.from_state_dict(torch.load(buffer))
    assert loaded.shape == ref.shape and loaded.entropy == ref.entropy
    torch.testing.assert_close(loaded.eigvecs, ref.eigvecs)
    assert ref.to("cpu").mmse(torch.tensor(1.0)) == ref.mmse(torch.tensor(1.0))
    diag = GaussianReference.from_state_dict(GaussianReference(torch.zeros(2), torch.ones(2)).state_dict())
    assert diag.eigvecs is None
    with pytest.raises(KeyError, match="eigvals"):
        GaussianReference.from_state_dict({"mean": torch.zeros(2)})


# ----- proposal -------------------------------------------------------------------------------------


@pytest.mark.parametrize("high", [None, 17.0])
def test_proposal_density_integrates_to_one_and_matches_its_samples(high):
    prop = LogSNRProposal(loc=1.5, scale=2.0, clip=4.0, high=high)
    lo, hi = prop.bounds
    assert hi == (9.5 if high is None else high)
    grid = torch.linspace(lo, hi, 200_001, dtype=torch.float64)
    assert torch.trapezoid(prop.log_prob(grid).exp(), grid).item() == pytest.approx(1.0, abs=1e-8)
    assert torch.isinf(prop.log_prob(torch.tensor([lo - 0.1, hi + 0.1]))).all()
    a = prop.points(100_000, "random", gen(6))
    assert lo <= a.min() and a.max() <= hi
    # empirical CDF vs the proposal's CDF (Kolmogorov-Smirnov distance)
    sorted_a, _ = a.sort()
    ks = (prop.cdf(sorted_a) - torch.arange(1, 100_001) / 100_000).abs().max()
    assert ks < 0.01
    mid = (prop.cdf(torch.tensor(2.0)) - prop.cdf(torch.tensor(0.0))).item()
    assert ((a > 0) & (a < 2)).double().mean().item() == pytest.approx(mid, abs=0.01)
    torch.testing.assert_close(prop.quantile(prop.cdf(sorted_a[::997])), sorted_a[::997])


def test_proposal_reaches_the_snr_that_resolves_a_lattice():
    ref = GaussianReference(torch.zeros(3), torch.tensor([0.5, 1.0, 2.0]))
    plain = LogSNRProposal.from_reference(ref)
    assert LogSNRProposal.from_reference(ref, delta=10.0) == plain  # a coarse lattice is resolved already
    fine = LogSNRProposal.from_reference(ref, delta=0.01)
    assert fine.bounds == (plain.bounds[0], pytest.approx(resolving_logsnr(0.01)))
    assert right_tail_bound(3, 0.01, fine.bounds[1]) < 1e-10
    assert resolving_logsnr(2 / 255) == pytest.approx(2 * math.log(14 * 127.5))
    with pytest.raises(ValueError, match="below the lower end"):
        LogSNRProposal(loc=0.0, scale=1.0, clip=4.0, high=-5.0)


def test_stratified_and_grid_points_fill_one_stratum_each():
    prop = LogSNRProposal(loc=-1.0, scale=1.3)
    for mode in ("stratified", "grid"):
        a = prop.points(37, mode, gen(7))
        torch.testing.assert_close(prop.bins(a, 37), torch.arange(37))
    torch.testing.assert_close(prop.points(9, "grid"), prop.points(9, "grid", gen(8)))
    with pytest.raises(ValueError, match="sampling"):
        prop.points(4, "halton")


# ----- tails ----------------------------------------------------------------------------------------


def _quadrature(fn, lo: float, hi: float, n: int = 40_001) -> torch.Tensor:
    a = torch.linspace(lo, hi, n, dtype=torch.float64)
    return torch.trapezoid(fn(a), a, dim=-1)


def test_tails_match_quadrature_of_the_gaussian_decoder_error():
    dist = _known_gaussian()
    ref = _reference(dist)
    x = dist.sample(3, gen(9))
    lo, hi = -3.0, 5.0

    def pointwise(a):
        return ref.pointwise_mmse(x, a.expand(3, -1))

    expected_left = 0.5 * _quadrature(pointwise, -60.0, lo)
    torch.testing.assert_close(left_tail(ref, x, lo), expected_left, rtol=1e-6, atol=1e-9)

    def gap(a):
        return pointwise(a) - ref.mmse(a)

    expected = 0.5 * (_quadrature(gap, -60.0, lo) + _quadrature(gap, hi, 60.0))
    torch.testing.assert_close(continuous_tails(ref, x, (lo, hi)), expected, rtol=1e-6, atol=1e-9)
    # ITD's left tail is its average over data with the reference's moments
    many = dist.sample(200_000, gen(10))
    itd_left = 0.5 * torch.nn.functional.softplus(lo + ref.log_eigvals).sum()
    assert left_tail(ref, many, lo).mean().item() == pytest.approx(itd_left.item(), rel=0.01)


def test_right_tail_bound_holds_for_the_rounding_decoder():
    """Exact error of rounding x + n to the lattice (unbounded grid): e^a delta^2 E[round(n / delta)^2]."""
    delta = 0.1
    ks = torch.arange(1, 200, dtype=torch.float64)
    normal = torch.distributions.Normal(0.0, 1.0)

    def eps_error(a):  # per coordinate, eps units
        sd = torch.exp(-a / 2)[:, None]
        prob = normal.cdf(-(ks - 0.5) * delta / sd) - normal.cdf(-(ks + 0.5) * delta / sd)  # P(round = k)
        return torch.exp(a) * delta**2 * 2 * (ks.square() * prob).sum(-1)

    for a_hi in (6.0, 8.0, 10.0):
        exact = 0.5 * _quadrature(eps_error, a_hi, 40.0, 20_001).item()
        bound = right_tail_bound(1, delta, a_hi)
        assert exact <= bound <= 20 * exact + 1e-12, (a_hi, exact, bound)
    assert right_tail_bound(3072, 2 / 255, resolving_logsnr(2 / 255)) < 1e-7  # CIFAR-10 at a = 16.2


# ----- standard errors, cross-fitted choice, rounding ----------------------------------------------


def test_mc_stderr_formulas():
    values = torch.tensor([[1.0, 3.0, 2.0, 6.0, 4.0]], dtype=torch.float64)
    mean, se = mc_mean_and_stderr(values, "random")
    assert mean.item() == pytest.approx(3.2)
    assert se.item() == pytest.approx(values.std().item() / math.sqrt(5))
    _, se = mc_mean_and_stderr(values, "stratified")  # pairs (1, 3), then the triple (2, 6, 4)
    triple = 3 * torch.tensor([2.0, 6.0, 4.0]).var().item()
    assert se.item() == pytest.approx(math.sqrt((1 - 3) ** 2 + triple) / 5)
    _, se = mc_mean_and_stderr(values[:, :4], "grid")
    assert se.item() == pytest.approx(math.sqrt(4 + 16) / 4)
    assert torch.isnan(mc_mean_and_stderr(values[:, :1], "random")[1]).all()


def test_cross_fitted_choice_never_looks_at_the_image_itself():
    g = gen(11)
    b, k = 20, 40
    bins = torch.arange(k).repeat(b, 1) // 10  # four bins of ten points
    network = torch.randn(b, k, dtype=torch.float64, generator=g)
    other = network.clone()
    other[:, :10] -= 5.0  # clearly better in bin 0
    other[:, 10:20] += 5.0  # clearly worse in bin 1
    other[:, 20:] += 0.01 * torch.randn(b, 20, dtype=torch.float64, generator=g)  # indistinguishable
    chosen = cross_fitted_choice(torch.stack([network, other]), bins, 4)
    torch.testing.assert_close(chosen[:, :10], other[:, :10])
    torch.testing.assert_close(chosen[:, 10:], network[:, 10:])  # the default stays unless clearly beaten
    # image 0's own values do not change its choice, only its values
    tampered = other.clone()
    tampered[0, :10] += 100.0
    chosen2 = cross_fitted_choice(torch.stack([network, tampered]), bins, 4)
    torch.testing.assert_close(chosen2[0], tampered[0].where(torch.arange(k) < 10, network[0]))


def test_round_to_lattice_modes():
    delta, interval = 0.25, (-1.0, 1.0)
    x_hat = torch.tensor([[-1.3, -0.61, 0.1, 0.37, 1.2]], dtype=torch.float64)
    torch.testing.assert_close(round_to_lattice(x_hat, delta, interval, "none"), x_hat.clamp(-1, 1))
    hard = round_to_lattice(x_hat, delta, interval, "hard")
    torch.testing.assert_close(hard, torch.tensor([[-1.0, -0.5, 0.0, 0.25, 1.0]], dtype=torch.float64))
    high = round_to_lattice(x_hat, delta, interval, "soft", torch.tensor([20.0]))
    torch.testing.assert_close(high, hard)  # tau = e^-10 << delta
    low = round_to_lattice(x_hat, delta, interval, "soft", torch.tensor([0.0]))
    torch.testing.assert_close(low, x_hat.clamp(-1, 1))  # tau = 1 > delta: identity
    # in between: a smooth staircase, monotone, pulled towards the nearest point, inside the interval
    x = torch.linspace(-1, 1, 2001, dtype=torch.float64)[None]
    mid = round_to_lattice(x, delta, interval, "soft", torch.tensor([2 * math.log(1 / (0.3 * delta))]))
    assert (mid.diff() >= -1e-12).all() and mid.min() >= -1 and mid.max() <= 1
    nearest = round_to_lattice(x, delta, interval, "hard")
    assert ((mid - nearest).abs() <= (x - nearest).abs() + 1e-12).all()
    with pytest.raises(ValueError, match="log-SNR"):
        round_to_lattice(x_hat, delta, interval, "soft")
