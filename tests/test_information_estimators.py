"""Issue 2's "Done means" for the IT estimators, proven against exact likelihoods.

Every check compares with ground truth that does not come from the estimator: exact ``log_prob`` of a
Gaussian, a Gaussian mixture and a lattice distribution, with their exact (Bayes-optimal) denoisers. The
images are fixed, so the error of the dataset mean is the Monte Carlo error alone:
``stderr(mean) = sqrt(sum_b stderr_b^2) / B`` from the per-image standard errors the estimator reports.
"""

from __future__ import annotations

import math

import pytest
import torch

from itdiffusion.denoisers import Gaussian, GaussianMixture, Lattice
from itdiffusion.information import (
    GaussianReference,
    LogSNRProposal,
    continuous_nll_from_curve,
    it_loss,
    it_nll,
    mc_mean_and_stderr,
)
from toy_distributions import gen, toy_mixture


def _mean_and_mc_stderr(values: torch.Tensor, stderrs: torch.Tensor) -> tuple[float, float]:
    return values.mean().item(), (stderrs.square().sum().sqrt() / values.numel()).item()


def _gaussian(d: int, seed: int) -> Gaussian:
    g = gen(seed)
    a = torch.randn(d, d, dtype=torch.float64, generator=g)
    cov = a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)
    return Gaussian(torch.randn(d, dtype=torch.float64, generator=g), cov)


def _check_continuous(denoiser, x, truth, reference, npoints=2000, **kwargs):
    est = it_nll(denoiser, x, reference, npoints=npoints, generator=gen(0), batch_size=8192, **kwargs)
    diff, se = _mean_and_mc_stderr(est.continuous - truth, est.continuous_stderr)
    d = x[0].numel()
    assert abs(diff) < 3 * se, f"mean error {diff:.4f} nats vs 3 standard errors {3 * se:.4f}"
    assert abs(diff) / d < 0.01, f"mean error {diff / d:.4f} nats/dim"
    return est


@pytest.mark.parametrize("clamp", [True, False])
def test_continuous_matches_gaussian_log_density(clamp):
    dist = _gaussian(8, seed=0)
    x = dist.sample(400, gen(1))
    reference = GaussianReference.from_moments(dist.mean, dist.cov)
    _check_continuous(dist, x, -dist.log_prob(x), reference, clamp=clamp)


@pytest.mark.parametrize("d, num_images", [(2, 1000), (8, 400), (64, 48)])
def test_continuous_matches_mixture_log_density(d, num_images):
    dist = toy_mixture(d, seed=d)
    reference = GaussianReference.from_data(dist.sample(20_000, gen(2)))  # the mixture's moments, estimated
    x = dist.sample(num_images, gen(3))
    truth = -dist.log_prob(x)
    # Non-Gaussian: the best Gaussian's cross-entropy exceeds the truth by 3x the tolerance (exact values).
    best_gaussian = torch.distributions.MultivariateNormal(dist.mean, covariance_matrix=dist.covariance)
    assert (-best_gaussian.log_prob(x) - truth).mean() > 0.03 * d
    _check_continuous(dist, x, truth, reference, control_variate=True)  # the stage's setting


def test_discrete_matches_lattice_probability():
    lattice = Lattice.discretize(toy_mixture(3, seed=5, k=3), delta=0.5, low=-4.0, high=4.0)
    reference = GaussianReference.from_data(lattice.sample(20_000, gen(6)))
    x = lattice.sample(200, gen(7))
    truth = -lattice.log_prob(x)
    for rounding in ("none", "hard", "soft"):
        est = it_nll(lattice, x, reference, npoints=1000, delta=lattice.delta, xinterval=lattice.interval,
                     rounding=rounding, generator=gen(8), batch_size=8192)
        diff, se = _mean_and_mc_stderr(est.discrete - truth, est.discrete_stderr)
        if rounding == "none":  # the exact posterior mean: the pointwise I-MMSE identity holds exactly
            assert abs(diff) < 3 * se, f"{rounding}: mean error {diff:.4f} vs 3 stderr {3 * se:.4f}"
        else:  # rounding the exact posterior mean is another decoder: never better on average
            assert diff > -3 * se, f"{rounding}: {diff:.4f} is more than 3 stderr ({3 * se:.4f}) low"
            assert diff < 0.05 * lattice.dim
        assert est.discrete_right_tail < 1e-9  # the default proposal reaches the SNRs that resolve it


def test_discrete_continuous_limit_on_a_fine_lattice():
    """-ln P(x) ~ -ln p(x) - d ln(delta): exactly, and between the discrete and continuous estimates."""
    mixture = toy_mixture(2, seed=9, k=3)
    delta = 0.05
    lattice = Lattice.discretize(mixture, delta=delta, low=-6.0, high=6.0)
    x = lattice.sample(100, gen(10))
    truth_discrete = -lattice.log_prob(x)
    limit = -mixture.log_prob(x) - lattice.dim * math.log(delta)
    assert (truth_discrete - limit).abs().mean() < 0.01 * lattice.dim

    reference = GaussianReference.from_data(lattice.sample(20_000, gen(11)))
    proposal = LogSNRProposal.from_reference(reference, delta=delta)  # shared by both estimates
    disc = it_nll(lattice, x, reference, npoints=500, delta=delta, xinterval=lattice.interval,
                  rounding="none", proposal=proposal, generator=gen(12), batch_size=8192)
    cont = it_nll(mixture, x, reference, npoints=500, proposal=proposal, generator=gen(13), batch_size=8192)
    diff, se = _mean_and_mc_stderr(disc.discrete - truth_discrete, disc.discrete_stderr)
    assert abs(diff) < 3 * se
    diff, se = _mean_and_mc_stderr(cont.continuous - lattice.dim * math.log(delta) - truth_discrete,
                                   cont.continuous_stderr)
    assert abs(diff) < 3 * se + 0.01 * lattice.dim


def test_dequantized_estimate_on_a_fine_lattice():
    """On a fine lattice a smooth density's denoiser sees x + U(-delta/2, delta/2) as ~ p, so the dequantized
    estimate (continuous + d ln(1/delta)) recovers -ln P(x) up to the discretisation of the density."""
    mixture = toy_mixture(2, seed=14, k=3)
    delta = 0.05
    lattice = Lattice.discretize(mixture, delta=delta, low=-6.0, high=6.0)
    x = lattice.sample(300, gen(15))
    reference = GaussianReference.from_data(lattice.sample(20_000, gen(16)))
    est = it_nll(mixture, x, reference, npoints=500, delta=delta, xinterval=lattice.interval, rounding="none",
                 dequantize=True, generator=gen(17), batch_size=8192)
    assert est.network_evals == 1000
    diff, se = _mean_and_mc_stderr(est.dequantized + lattice.log_prob(x), est.dequantized_stderr)
    assert abs(diff) < 3 * se + 0.01 * lattice.dim


def test_standard_errors_are_honest():
    """Over 50 seeds, the spread of the estimates matches the mean reported standard error (factor 1.5),
    per image and for the dataset mean; for each sampling mode and for the discrete estimate."""
    mixture = toy_mixture(4, seed=18)
    reference = GaussianReference.from_data(mixture.sample(20_000, gen(19)))
    x = mixture.sample(8, gen(20))
    lattice = Lattice.discretize(toy_mixture(2, seed=21, k=2), delta=0.5, low=-4.0, high=4.0)
    lat_reference = GaussianReference.from_data(lattice.sample(20_000, gen(22)))
    lat_x = lattice.sample(8, gen(23))
    cases = {
        "stratified": lambda seed: it_nll(mixture, x, reference, npoints=100, generator=gen(seed)),
        "random": lambda seed: it_nll(mixture, x, reference, npoints=100, generator=gen(seed),
                                      logsnr_sampling="random"),
        "grid": lambda seed: it_nll(mixture, x, reference, npoints=100, generator=gen(seed),
                                    logsnr_sampling="grid"),
    }
    for name, run in cases.items():
        runs = [run(seed) for seed in range(50)]
        values = torch.stack([r.continuous for r in runs])
        stderrs = torch.stack([r.continuous_stderr for r in runs])
        _assert_honest(name, values, stderrs)
    # The discrete integrand is skewed (rare noise draws that land near another lattice point): it needs
    # more points than the continuous one before its standard error settles.
    runs = [it_nll(lattice, lat_x, lat_reference, npoints=400, delta=lattice.delta,
                   xinterval=lattice.interval, rounding="hard", generator=gen(seed)) for seed in range(50)]
    _assert_honest("discrete", torch.stack([r.discrete for r in runs]),
                   torch.stack([r.discrete_stderr for r in runs]))


def _assert_honest(name, values, stderrs):
    """``values``, ``stderrs``: ``[runs, images]``. The reported standard errors are averaged as variances
    (root mean square): the squared standard error is the unbiased estimate of the variance, while a plain
    mean of standard errors is pulled low by Jensen's inequality when the integrand is skewed."""
    ratio = values.std(0) / stderrs.square().mean(0).sqrt()
    assert ((ratio > 1 / 1.5) & (ratio < 1.5)).all(), f"{name}: per-image spread / stderr {ratio.tolist()}"
    dataset_se = stderrs.square().sum(1).mean().sqrt() / values.shape[1]
    dataset_ratio = values.mean(1).std() / dataset_se
    assert 1 / 1.5 < dataset_ratio < 1.5, f"{name}: dataset spread / stderr {dataset_ratio:.3f}"


@pytest.mark.parametrize("clamp", [True, False])
def test_worse_denoiser_gives_larger_estimate(clamp):
    mixture = toy_mixture(8, seed=24)
    reference = GaussianReference.from_data(mixture.sample(20_000, gen(25)))
    x = mixture.sample(100, gen(26))
    seeds = list(range(100))  # the same points and noise for every denoiser: paired comparisons
    exact = it_nll(mixture, x, reference, npoints=200, image_seeds=seeds, clamp=clamp)
    wrong_model = GaussianMixture(mixture.means + 0.3, mixture.variances * 1.5, mixture.log_weights.exp())
    worse = {
        "wrong mixture": wrong_model,
        "shrunk": lambda z, a: 0.8 * mixture(z, a),  # E||eps - 0.8 eps_hat||^2 = mmse + 0.04 E||eps_hat||^2
    }
    for name, denoiser in worse.items():
        est = it_nll(denoiser, x, reference, npoints=200, image_seeds=seeds, clamp=clamp)
        # standard error of the paired difference, from the two error curves on the shared points
        _, paired_se = mc_mean_and_stderr((est.mmse - exact.mmse) * torch.exp(-est.log_q), "stratified")
        gap, se = _mean_and_mc_stderr(est.continuous - exact.continuous, 0.5 * paired_se)
        assert gap > 3 * se, f"{name}: mean increase {gap:.4f} nats, stderr {se:.4f}"


def test_ensemble_of_curves_takes_the_better_model_where_it_is_better():
    """ITD's ensemble: models evaluated on shared points and noise, combined per log-SNR bin."""
    mixture = toy_mixture(8, seed=24)
    reference = GaussianReference.from_data(mixture.sample(20_000, gen(25)))
    x = mixture.sample(200, gen(26))
    seeds = list(range(200))
    shrunk = it_nll(lambda z, a: 0.8 * mixture(z, a), x, reference, npoints=200, image_seeds=seeds)
    exact = it_nll(mixture, x, reference, npoints=200, image_seeds=seeds)
    torch.testing.assert_close(shrunk.logsnr, exact.logsnr)
    ensemble = continuous_nll_from_curve(torch.stack([shrunk.mmse, exact.mmse]), exact.logsnr, exact.log_q,
                                         reference, x=x)
    truth = -mixture.log_prob(x)
    diff, se = _mean_and_mc_stderr(ensemble.nll - truth, ensemble.stderr)
    assert abs(diff) < 3 * se + 0.01 * mixture.dim, f"ensemble vs truth: {diff:.4f}, stderr {se:.4f}"
    gain = (shrunk.continuous - ensemble.nll).mean()  # most of the shrunk model's excess is removed
    assert gain > 0.5 * (shrunk.continuous - exact.continuous).mean()


def test_it_loss_is_unbiased_and_differentiable():
    dist = _gaussian(4, seed=27)
    reference = GaussianReference.from_moments(dist.mean, dist.cov)
    x = dist.sample(4, gen(28))
    repeats = 20_000
    losses = it_loss(dist, x.repeat(repeats, 1), reference, generator=gen(29)).reshape(repeats, 4)
    mean, se = losses.mean(0), losses.std(0) / math.sqrt(repeats)
    truth = -dist.log_prob(x)
    assert ((mean - truth).abs() < 3.5 * se).all(), f"{(mean - truth) / se}"
    unclamped = it_nll(dist, x, reference, npoints=4000, clamp=False, generator=gen(30))
    joint_se = (se.square() + unclamped.continuous_stderr.square()).sqrt()
    assert ((mean - unclamped.continuous).abs() < 3.5 * joint_se).all()

    scale = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)  # a shrunk/stretched exact denoiser
    loss = it_loss(lambda z, a: scale * dist(z, a), x.repeat(2000, 1), reference, generator=gen(31)).mean()
    loss.backward()
    assert scale.grad is not None and scale.grad > 0  # the loss pulls the scale back towards the exact 1


def test_image_seeds_make_results_batch_invariant():
    lattice = Lattice.discretize(toy_mixture(2, seed=32, k=2), delta=0.5, low=-4.0, high=4.0)
    reference = GaussianReference.from_data(lattice.sample(5_000, gen(33)))
    x = lattice.sample(6, gen(34))
    seeds = [11, 22, 33, 44, 55, 66]
    kwargs = dict(npoints=40, delta=lattice.delta, xinterval=lattice.interval, rounding="soft", clamp=False,
                  dequantize=True, proposal=LogSNRProposal.from_reference(reference, clip=6.0))
    whole = it_nll(lattice, x, reference, image_seeds=seeds, batch_size=7, **kwargs)
    order = [4, 1, 5, 0, 3, 2]
    shuffled = it_nll(lattice, x[order], reference, image_seeds=[seeds[i] for i in order], batch_size=64,
                      **kwargs)
    names = ("continuous", "discrete", "dequantized", "mmse", "mmse_rounded", "mmse_dequantized", "logsnr")
    for name in names:
        torch.testing.assert_close(getattr(shuffled, name), getattr(whole, name)[order], rtol=1e-12, atol=0)
    # Alone, an image gets the same points, noise and curves. Estimates that involve no decoder choice match
    # too; the discrete one picks raw or rounded x_hat on the *other* images, so it depends on the set.
    single = it_nll(lattice, x[2:3], reference, image_seeds=seeds[2:3], batch_size=3, **kwargs)
    for name in ("continuous", "dequantized", "mmse", "mmse_rounded", "mmse_dequantized", "logsnr"):
        torch.testing.assert_close(getattr(single, name), getattr(whole, name)[2:3], rtol=1e-12, atol=1e-12)
    other = it_nll(lattice, x, reference, image_seeds=[s + 1 for s in seeds], **kwargs)
    assert not torch.equal(other.logsnr, whole.logsnr)


def test_it_nll_rejects_bad_arguments():
    dist = _gaussian(3, seed=35)
    reference = GaussianReference.from_moments(dist.mean, dist.cov)
    x = dist.sample(2, gen(36))
    with pytest.raises(ValueError, match="xinterval"):
        it_nll(dist, x, reference, npoints=4, delta=0.1)
    with pytest.raises(ValueError, match="dequantize"):
        it_nll(dist, x, reference, npoints=4, dequantize=True)
    with pytest.raises(ValueError, match="rounding"):
        it_nll(dist, x, reference, npoints=4, delta=0.1, xinterval=(-1, 1), rounding="round")
    with pytest.raises(ValueError, match="logsnr_sampling"):
        it_nll(dist, x, reference, npoints=4, logsnr_sampling="sobol")
    with pytest.raises(ValueError, match="do not match the reference"):
        it_nll(dist, torch.zeros(2, 5, dtype=torch.float64), reference, npoints=4)
    with pytest.raises(ValueError, match="image_seeds"):
        it_nll(dist, x, reference, npoints=4, image_seeds=[1])
    with pytest.raises(ValueError, match="shaped like z"):
        it_nll(lambda z, a: z[:, :1], x, reference, npoints=4)
    short = LogSNRProposal.from_reference(reference)  # ends long before a lattice of spacing 1e-3 is resolved
    with pytest.warns(UserWarning, match="right-tail"):
        it_nll(dist, x, reference, npoints=4, delta=1e-3, xinterval=(-1, 1), rounding="hard", proposal=short)
