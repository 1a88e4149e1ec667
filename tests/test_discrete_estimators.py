"""Monte Carlo I-MDCE / I-MDSE estimators against exact log-likelihoods of exact distributions."""

import math

import pytest
import torch

from itdiffusion.discrete import (
    ExactScore,
    IndependentCategorical,
    JointTable,
    MarkovChain,
    any_order_loss,
    conditional_nll,
    coupled_log_ratio,
    imdse_nll,
    masked_nll,
    time_free_nll,
    time_integral_nll,
)
from itdiffusion.discrete.masking import subset_masks, subset_size_pmf, time_integral_masks

K = 3000  # masks per sequence
BATCH = 4096


def _gen(seed):
    return torch.Generator().manual_seed(seed)


DISTRIBUTIONS = {
    "independent": lambda: IndependentCategorical.random(4, 8, generator=_gen(0)),
    "markov2": lambda: MarkovChain.random(3, 2, 8, generator=_gen(1)),
    "table": lambda: JointTable.random(3, 5, generator=_gen(2)),
}


def _assert_within_3_stderr(est, exact, rel_precision=0.03):
    z = (est.nats - exact) / est.stderr
    assert z.abs().max() < 3, f"z-scores {z.tolist()}"
    precise = est.stderr < rel_precision * exact.abs().clamp(min=1)
    assert precise.all(), "too few masks for a meaningful test"


class Tempered:
    """A worse denoiser: the exact conditionals flattened (logits * 0.5)."""

    def __init__(self, dist):
        self.dist, self.vocab_size = dist, dist.vocab_size

    def __call__(self, tokens):
        return 0.5 * self.dist(tokens).clamp(min=-30)


@pytest.mark.parametrize("name", DISTRIBUTIONS)
@pytest.mark.parametrize("estimator", ["time_integral", "time_free", "imdse"])
def test_estimators_match_exact_nll(name, estimator):
    dist = DISTRIBUTIONS[name]()
    x = dist.sample(5, _gen(10))
    kw = dict(num_masks=K, batch_size=BATCH, generator=_gen(11))
    if estimator == "imdse":
        est = imdse_nll(ExactScore(dist), x, **kw)
    else:
        est = masked_nll(dist, x, schedule=estimator, **kw)
    _assert_within_3_stderr(est, -dist.log_prob(x))


@pytest.mark.parametrize("name", ["markov2", "table"])
@pytest.mark.parametrize("schedule", ["time_integral", "time_free"])
def test_conditional_matches_exact(name, schedule):
    dist = DISTRIBUTIONS[name]()
    x = dist.sample(5, _gen(12))
    response = torch.arange(dist.length) >= dist.length // 2
    exact = -(dist.log_prob(x) - dist.log_prob(x.masked_fill(response, dist.mask_id)))
    est = conditional_nll(
        dist, x, response, schedule=schedule, num_masks=K, batch_size=BATCH, generator=_gen(13)
    )
    _assert_within_3_stderr(est, exact)
    assert (est.nats < 0.8 * -dist.log_prob(x)).all()  # a conditional, not the full NLL


@pytest.mark.parametrize("schedule", ["time_integral", "time_free"])
def test_coupled_ratio_matches_exact_and_beats_decoupled(schedule):
    dist = MarkovChain.random(3, 2, 12, generator=_gen(3))
    x = dist.sample(5, _gen(14))
    y = x.clone()
    y[:, 6] = (y[:, 6] + 1) % dist.vocab_size  # one token changed
    exact = dist.log_prob(y) - dist.log_prob(x)
    kw = dict(schedule=schedule, num_masks=K, batch_size=BATCH)
    coupled = coupled_log_ratio(dist, x, y, generator=_gen(15), **kw)
    _assert_within_3_stderr(coupled, exact, rel_precision=0.06)
    assert (coupled.network_evals <= 2 * K).all()
    # independent masks for x and y, the same number of network evaluations
    nll_x = masked_nll(dist, x, generator=_gen(16), **kw)
    nll_y = masked_nll(dist, y, generator=_gen(17), **kw)
    decoupled_var = nll_x.stderr**2 + nll_y.stderr**2
    assert (coupled.stderr**2).sum() < 0.5 * decoupled_var.sum()


def _excess_z(est, exact):
    """z-score of the data-averaged excess mean(estimate - exact): a cross-entropy minus the entropy,
    >= 0 over data drawn from p (a single sequence may score better under a wrong model)."""
    excess = est.nats - exact
    return excess.mean() / (excess.std() / math.sqrt(len(excess)))


def test_worse_denoiser_gives_larger_estimate():
    dist = DISTRIBUTIONS["markov2"]()
    x = dist.sample(200, _gen(18))
    exact = -dist.log_prob(x)
    for schedule in ("time_integral", "time_free"):
        worse = masked_nll(
            Tempered(dist), x, schedule=schedule, num_masks=64, batch_size=BATCH, generator=_gen(19)
        )
        assert _excess_z(worse, exact) > 3

    class DoubledScore(ExactScore):  # unnormalised: every ratio twice the exact one
        def __call__(self, tokens, sigma):
            return super().__call__(tokens, sigma) + math.log(2.0)

    worse = imdse_nll(DoubledScore(dist), x, num_masks=64, batch_size=BATCH, generator=_gen(20))
    assert _excess_z(worse, exact) > 3


@pytest.mark.parametrize("scheme", ["uniform", "harmonic"])
def test_any_order_loss_is_unbiased(scheme):
    dist = DISTRIBUTIONS["table"]()
    x = dist.sample(3, _gen(21))
    reps = 4000
    loss = any_order_loss(dist, x.repeat_interleave(reps, dim=0), scheme=scheme, generator=_gen(22))
    loss = loss.reshape(3, reps)
    stderr = loss.std(dim=1) / math.sqrt(reps)
    z = (loss.mean(dim=1) - -dist.log_prob(x)) / stderr
    assert z.abs().max() < 3, z.tolist()


def test_any_order_loss_is_differentiable():
    class TableModel(torch.nn.Module):  # per-position logits, ignores the context
        vocab_size = 5

        def __init__(self):
            super().__init__()
            self.logits = torch.nn.Parameter(torch.zeros(7, 5))

        def forward(self, tokens):
            return self.logits.expand(tokens.shape[0], -1, -1)

    model = TableModel()
    x = torch.randint(0, 5, (4, 7), generator=_gen(23))
    loss = any_order_loss(model, x, generator=_gen(24))
    assert loss.shape == (4,) and loss.requires_grad
    loss.mean().backward()
    assert model.logits.grad.abs().sum() > 0


def test_per_image_seeds_make_results_independent_of_batching():
    dist = DISTRIBUTIONS["markov2"]()
    x = dist.sample(4, _gen(25))
    seeds = [101, 102, 103, 104]
    for schedule in ("time_integral", "time_free"):
        full = masked_nll(dist, x, schedule=schedule, num_masks=50, image_seeds=seeds)
        part = masked_nll(dist, x[2:], schedule=schedule, num_masks=50, image_seeds=seeds[2:], batch_size=7)
        torch.testing.assert_close(full.nats[2:], part.nats, rtol=1e-12, atol=0)


@pytest.mark.parametrize("scheme", ["harmonic", "uniform"])
def test_subset_sizes_follow_the_proposal(scheme):
    maskable = torch.tensor([True, False, True, True, True, False, True])  # n = 5
    draws = 40000
    masks, weights = subset_masks(maskable, draws, _gen(26), scheme=scheme, stratified=False)
    assert not masks[:, ~maskable].any()
    m = masks.sum(dim=1)
    pmf = subset_size_pmf(5, scheme)
    freq = torch.bincount(m, minlength=6)[1:].double() / draws
    assert ((freq - pmf).abs() < 5 * (pmf * (1 - pmf) / draws).sqrt()).all()
    torch.testing.assert_close(weights, 1.0 / (m * pmf[m - 1]))
    # each maskable position equally likely given m = 2
    pairs = masks[m == 2][:, maskable].double().mean(dim=0)
    torch.testing.assert_close(pairs, torch.full((5,), 0.4, dtype=torch.float64), atol=0.02, rtol=0)


def test_time_integral_masks_follow_lambda():
    maskable = torch.ones(400, dtype=torch.bool)
    masks, weights, lam = time_integral_masks(maskable, 64, _gen(27), power=2.0)
    u = lam.sqrt()
    assert ((u > torch.arange(64) / 64) & (u <= (torch.arange(64) + 1) / 64)).all()  # one per stratum
    torch.testing.assert_close(weights, 2.0 / u)
    rate = masks.double().mean(dim=1)
    assert ((rate - lam).abs() < 5 * (lam * (1 - lam) / 400).sqrt() + 1e-9).all()


def test_network_evals_are_counted():
    dist = DISTRIBUTIONS["independent"]()
    x = dist.sample(3, _gen(28))
    est = time_integral_nll(dist, x, num_masks=40, generator=_gen(29))
    nonempty = (est.samples != 0).sum(dim=1)  # every non-empty mask has a positive term
    assert torch.equal(est.network_evals, nonempty) and (nonempty < 40).all()
    assert torch.equal(time_free_nll(dist, x, num_masks=40).network_evals, torch.full((3,), 40))


def test_bad_input_raises():
    dist = DISTRIBUTIONS["independent"]()
    x = dist.sample(2, _gen(30))
    with pytest.raises(ValueError, match="lambda_power must be > 1"):
        time_integral_nll(dist, x, num_masks=4, lambda_power=1.0)
    with pytest.raises(ValueError, match="mask id"):
        time_free_nll(dist, x.masked_fill(torch.ones_like(x, dtype=torch.bool), dist.mask_id), num_masks=4)
    with pytest.raises(ValueError, match="no maskable position"):
        conditional_nll(dist, x, torch.zeros(2, 8, dtype=torch.bool), num_masks=4)
    with pytest.raises(ValueError, match="unknown schedule"):
        masked_nll(dist, x, schedule="tiem_free", num_masks=4)
    with pytest.raises(ValueError, match="image_seeds"):
        time_free_nll(dist, x, num_masks=4, image_seeds=[1])
    with pytest.raises(TypeError, match="vocab_size"):
        time_free_nll(lambda t: t, x, num_masks=4)
