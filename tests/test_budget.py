"""The dataset budget on exact denoisers: the estimand does not depend on the budget, and K is chosen
from the pilot's variances (mixture and lattice distributions: their log-likelihoods are the truth)."""

from __future__ import annotations

import math

import pytest
import torch

from itdiffusion.artifacts import PerImage
from itdiffusion.budget import EstimateStats, choose_k, estimate_with_choice, fit_decoder_choice, it_pilot
from itdiffusion.denoisers import Lattice
from itdiffusion.information import Curves, GaussianReference, LogSNRProposal, sample_curves
from itdiffusion.stages.budget_pilot import merge_blocks
from itdiffusion.topup import Check, blocks_needed
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


def test_blocks_added_later_are_one_draw_of_all_blocks_and_the_truth():
    """The top-up's merge (curves concatenated along the points, block means of sampled values) gives exactly
    what one draw of all the blocks gives, and the estimate stays the exact lattice NLL within its MC error;
    R blocks have about 1/R of one block's Monte Carlo variance."""
    dist = Lattice.discretize(toy_mixture(4, seed=5, k=2), delta=0.5, low=-3.0, high=3.0)
    reference = GaussianReference.from_data(dist.sample(5000, gen(1)))
    proposal = LogSNRProposal.from_reference(reference, delta=dist.delta)
    x = dist.sample(64, gen(2))
    first = list(range(64))

    def blocks(rs):
        return Curves.cat_points([
            sample_curves(dist, x, reference, npoints=8, proposal=proposal,
                          seeds=[s + 1000 * r for s in first], uniform_seeds=None if r == 0 else first,
                          delta=dist.delta, xinterval=dist.interval, rounding="none", dequantize=True,
                          control_variate=True)
            for r in rs])

    def per_image(rs, curves):
        # block r's "VLB": r with a Monte Carlo stderr of 1; the mean of R blocks: 1 / sqrt(R)
        fake = torch.stack([torch.full((64,), float(r)) for r in rs]).mean(0)[None]
        se = torch.ones(1, 64, dtype=torch.float64) / math.sqrt(len(rs))
        values = {"vlb_bpd": fake.double(), "vlb_continuous_bpd": fake.double(), "vlb_bpd_mc_stderr": se,
                  "vlb_continuous_bpd_mc_stderr": se, "network_evals": torch.full((1, 64), 16.0 * len(rs))}
        return PerImage(index=torch.arange(64), member_values=values, curves=curves)

    once = per_image(range(3), blocks(range(3)))
    merged = merge_blocks(per_image(range(2), blocks(range(2))), per_image(range(2, 3), blocks(range(2, 3))),
                          {"npoints": 2, "vlb_steps": 2}, {"npoints": 3, "vlb_steps": 3})
    for name, value in once.curves.tensors().items():
        assert torch.equal(merged.curves.tensors()[name], value), name
    for name, value in once.member_values.items():
        torch.testing.assert_close(merged.member_values[name], value, rtol=1e-12, atol=0, msg=name)
    choice = fit_decoder_choice([blocks([7])])  # held-out draws
    est = estimate_with_choice(merged.curves, reference, choice)
    err, err_se = _mean_se(est.discrete + dist.log_prob(x), est.discrete_stderr)
    assert abs(err) < 3 * err_se, (err, err_se)
    one = estimate_with_choice(blocks([0]), reference, choice)
    ratio = float(one.discrete_stderr.square().mean() / est.discrete_stderr.square().mean())
    assert 1.8 < ratio < 5, ratio  # 3 blocks: a third of the variance (the per-image stderrs are noisy)
    assert est.reference_bins["discrete"].shape == (choice.nbins,)
    assert est.reference_bins["discrete"].tolist() == [u == "gaussian" for u in choice.used("discrete")]


def test_a_missed_target_asks_for_the_blocks_that_reach_it():
    found = Check("it_discrete", target=0.1, realized=0.2, mc=math.sqrt(0.2**2 - 0.05**2), predicted=0.09)
    # s'^2 = 0.05^2 + 0.0375 / R' <= 0.01 / 1.25  ->  R' >= 0.0375 / 0.0055 = 6.8  -> 7 (one block now)
    assert blocks_needed(found, 1, 100) == 7
    assert blocks_needed(found, 1, 4) == 4  # capped at the full protocol's points
    assert blocks_needed(found, 4, 4) == 4
    between_only = Check("it_discrete", target=0.1, realized=0.2, mc=0.01, predicted=None)
    assert blocks_needed(between_only, 2, 50) == 50  # unreachable: all the way, then reported missed
    met = Check("vlb", target=0.1, realized=0.1, mc=0.05, predicted=0.1)
    assert met.met and blocks_needed(met, 3, 10) == 3
