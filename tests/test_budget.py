"""The dataset budget on exact denoisers: the estimand does not depend on the budget, and K is chosen
from the pilot's variances (mixture and lattice distributions: their log-likelihoods are the truth)."""

from __future__ import annotations

import math

import pytest
import torch

from itdiffusion.budget import EstimateStats, choose_k, estimate_with_choice, fit_decoder_choice, it_pilot
from itdiffusion.denoisers import Lattice
from itdiffusion.information import GaussianReference, LogSNRProposal, sample_curves
from toy_distributions import gen, toy_mixture


def _mean_se(values, stderrs=None):
    if stderrs is None:
        return float(values.mean()), float(values.std() / math.sqrt(values.numel()))
    return float(values.mean()), float(stderrs.square().sum().sqrt() / values.numel())


def _sampler(dist, x, reference, proposal, first_seed, **kw):
    def sample(k):
        return sample_curves(dist, x, reference, npoints=k, proposal=proposal,
                             seeds=list(range(first_seed + 1000 * k, first_seed + 1000 * k + x.shape[0])),
                             batch_size=8192, control_variate=True, **kw)
    return sample


@pytest.mark.parametrize("lattice", [False, True])
def test_budgeted_and_full_dataset_means_agree_with_each_other_and_the_truth(lattice):
    d = 6
    dist = toy_mixture(d, seed=11, k=3)
    kw = {}
    if lattice:
        dist = Lattice.discretize(dist, delta=0.5, low=-4.0, high=4.0)
        kw = dict(delta=dist.delta, xinterval=dist.interval, rounding="none", dequantize=True)
    reference = GaussianReference.from_data(dist.sample(20_000, gen(1)))
    proposal = LogSNRProposal.from_reference(reference, delta=kw.get("delta"))
    pilot_x, x = dist.sample(16, gen(2)), dist.sample(300, gen(3))
    truth = -dist.log_prob(x)
    stats, choice, _, _ = it_pilot(_sampler(dist, pilot_x, reference, proposal, 0, **kw), reference)
    for family, index in choice.index.items():  # the exact denoiser: the network (index 0) everywhere
        if family == "dequantized":  # (not exact for the dequantized data: any choice is fine there)
            continue
        assert sum(i != 0 for i in index) <= 2, (family, index)
    name = "discrete" if lattice else "continuous"  # (the continuous estimate of lattice data is not one)
    found = choose_k({"it_" + name: stats["it_" + name]}, x.shape[0], 256, target_ratio=1.1)
    assert found.reached and found.k < 256, found  # (the toy lattice: small spread between images)
    main = _sampler(dist, x, reference, proposal, 10**6, **kw)
    budgeted = estimate_with_choice(main(found.k), reference, choice)
    full = estimate_with_choice(main(256), reference, choice)
    b, f = getattr(budgeted, name), getattr(full, name)
    mb, sb = _mean_se(b)
    mf, sf = _mean_se(f)
    # the same estimand: paired over images, the difference is Monte Carlo noise only
    diff, diff_se = _mean_se(b - f)
    assert abs(diff) < 3 * diff_se, (diff, diff_se)
    # each equals the truth within its Monte Carlo error (the images are the same, so the MC part)
    for est, stderr in ((b, getattr(budgeted, name + "_stderr")), (f, getattr(full, name + "_stderr"))):
        err, err_se = _mean_se(est - truth, stderr)
        assert abs(err) < 3 * err_se + 1e-3 * d, (err, err_se)
    # total stderrs: the budgeted one within the target's 10% (plus the noise of a 300-image estimate)
    assert sb < 1.25 * sf, (sb, sf)


def test_choose_k_is_the_fewest_points_meeting_the_target():
    stats = {"a": EstimateStats([2, 4, 8, 16], [1.0, 0.25, 1 / 16, 1 / 64], between_var=1.0,
                                evals=[2, 4, 8, 16])}
    # need (1 + v(K)) / 100 <= 0.0121  ->  v(K) <= 0.21  ->  v = 4/K^2 -> K >= 4.36 -> 6 (K is even)
    found = choose_k(stats, 100, 1000, target_stderr_bpd=0.11)
    assert found.k == 6 and found.reached
    assert found.predicted_stderr["a"] <= 0.11
    # ratio targets: relative to the full protocol's stderr (v extrapolated as 1/K beyond the ladder)
    ratio = choose_k(stats, 100, 1000, target_ratio=1.1)
    assert 4 <= ratio.k <= 6 and ratio.reached
    assert choose_k(stats, 100, 8, target_stderr_bpd=0.05).reached is False
    with pytest.raises(ValueError):
        choose_k(stats, 100, 8)


def test_decoder_choice_takes_the_gaussian_decoder_where_the_network_is_clearly_worse():
    dist = toy_mixture(4, seed=3, k=2)
    reference = GaussianReference.from_data(dist.sample(5000, gen(1)))
    proposal = LogSNRProposal.from_reference(reference)

    def bad(z, logsnr):  # an exact denoiser made worse at low SNR
        eps = dist(z, logsnr)
        return torch.where((logsnr < proposal.loc)[:, None], eps + 0.8, eps)

    x = dist.sample(32, gen(2))
    curves = sample_curves(bad, x, reference, npoints=64, proposal=proposal, seeds=list(range(32)))
    choice = fit_decoder_choice([curves])
    index = torch.tensor(choice.index["continuous"])
    assert choice.candidates["continuous"] == ["m0", "gaussian"]
    low = torch.arange(32) < 12  # bins well below loc (equal-probability bins: loc is bin 16)
    assert bool((index[low] == 1).all()) and bool((index[20:] == 0).all())
