"""Exact discrete distributions against brute-force enumeration, and the I-MDCE identities proved
exactly (no Monte Carlo) on them."""

import itertools
import math

import numpy as np
import pytest
import torch

from itdiffusion.discrete import ExactScore, IndependentCategorical, JointTable, MarkovChain


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _chain_rule_table(mc: MarkovChain) -> JointTable:
    """The Markov chain's joint, built term by term from its initial and transition tables."""
    v, k, n = mc.vocab_size, mc.order, mc.length
    probs = torch.zeros([v] * n, dtype=torch.float64)
    for x in itertools.product(range(v), repeat=n):
        ctx = sum(x[j] * v ** (k - 1 - j) for j in range(k))
        p = mc.initial[ctx]
        for t in range(k, n):
            p = p * mc.transition[ctx, x[t]]
            ctx = (ctx * v) % v**k + x[t]
        probs[x] = p
    return JointTable(probs)


def _independent_table(ind: IndependentCategorical) -> JointTable:
    probs = ind.log_probs.exp()
    table = probs[0]
    for row in probs[1:]:
        table = table[..., None] * row
    return JointTable(table)


def _random_masked(dist, n, rate, seed):
    g = _gen(seed)
    x = dist.sample(n, g)
    return x.masked_fill(torch.rand(x.shape, generator=g) < rate, dist.mask_id)


@pytest.mark.parametrize("order", [1, 2])
def test_markov_forward_backward_matches_enumeration(order):
    mc = MarkovChain.random(3, order, 6, generator=_gen(order))
    table = _chain_rule_table(mc)
    tokens = _random_masked(mc, 40, 0.5, seed=1)
    torch.testing.assert_close(mc.log_prob(tokens), table.log_prob(tokens), rtol=0, atol=1e-12)
    torch.testing.assert_close(mc(tokens).exp(), table(tokens).exp(), rtol=0, atol=1e-12)
    full = mc.sample(20, _gen(2))
    torch.testing.assert_close(mc.log_prob(full), table.log_prob(full), rtol=0, atol=1e-12)


def test_independent_matches_enumeration():
    ind = IndependentCategorical.random(3, 5, generator=_gen(3))
    table = _independent_table(ind)
    tokens = _random_masked(ind, 40, 0.5, seed=4)
    torch.testing.assert_close(ind.log_prob(tokens), table.log_prob(tokens), rtol=0, atol=1e-12)
    masked = tokens == ind.mask_id  # the protocol defines the output at masked positions only
    torch.testing.assert_close(ind(tokens).exp()[masked], table(tokens).exp()[masked], rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "dist",
    [
        IndependentCategorical.random(3, 4, generator=_gen(5)),
        MarkovChain.random(2, 2, 5, generator=_gen(6)),
        JointTable.random(3, 4, generator=_gen(7)),
    ],
)
def test_distribution_normalised_and_sampler_matches(dist):
    configs = JointTable.configurations(dist.vocab_size, dist.length)
    probs = dist.log_prob(configs).exp()
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-12)
    # the sampler's empirical frequencies agree with the probabilities (5 binomial sigmas)
    n = 20000
    draws = dist.sample(n, _gen(8))
    index = (draws * dist.vocab_size ** torch.arange(dist.length - 1, -1, -1)).sum(1)
    freq = torch.bincount(index, minlength=len(configs)).double() / n
    assert ((freq - probs).abs() <= 5 * (probs * (1 - probs) / n).sqrt() + 1e-3).all()


def _exact_terms(dist, x, subset):
    """sum_{i in S} -log p(x_i | x_{~S}) from the exact denoiser."""
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[:, list(subset)] = True
    logp = dist(x.masked_fill(mask, dist.mask_id))
    return -(logp.gather(-1, x[..., None]).squeeze(-1) * mask).sum(1)


@pytest.mark.parametrize(
    "dist",
    [
        IndependentCategorical.random(4, 5, generator=_gen(9)),
        MarkovChain.random(3, 2, 5, generator=_gen(10)),
        JointTable.random(3, 4, generator=_gen(11)),
    ],
)
def test_imdce_integral_is_exact(dist):
    """int_0^1 (1/lam) E_M[sum_masked -log p] dlam, with the expectation over masks enumerated and the
    lambda integral by Gauss-Legendre (exact: the integrand is a polynomial of degree L-1), equals
    -log p(x); so does the time-free sum H_L E_{m ~ 1/m, S}[...] including m = L."""
    x = dist.sample(6, _gen(12))
    n = dist.length
    subsets = [s for m in range(1, n + 1) for s in itertools.combinations(range(n), m)]
    terms = {s: _exact_terms(dist, x, s) for s in subsets}
    nodes, weights = np.polynomial.legendre.leggauss(n + 2)
    integral = torch.zeros(x.shape[0], dtype=torch.float64)
    for node, weight in zip((nodes + 1) / 2, weights / 2, strict=True):
        expect = sum(node ** len(s) * (1 - node) ** (n - len(s)) * terms[s] for s in subsets)
        integral += weight * expect / node
    exact = -dist.log_prob(x)
    torch.testing.assert_close(integral, exact, rtol=0, atol=1e-10)

    harmonic = math.fsum(1 / m for m in range(1, n + 1))
    time_free = sum(harmonic * (1 / len(s)) / harmonic / math.comb(n, len(s)) * terms[s] for s in subsets)
    torch.testing.assert_close(time_free, exact, rtol=0, atol=1e-10)
    # the reference script's sum without m = L misses a term of the size of -log p(x_i | nothing)
    without_full = sum(
        harmonic * (1 / len(s)) / (harmonic - 1 / n) / math.comb(n, len(s)) * terms[s]
        for s in subsets
        if len(s) < n
    )
    assert (without_full - exact).abs().min() > 1e-3


def test_conditional_identity_is_exact():
    """Only response positions masked: the time-free sum gives -log p(response | prompt)."""
    mc = MarkovChain.random(3, 1, 6, generator=_gen(13))
    x = mc.sample(5, _gen(14))
    response = [3, 4, 5]
    n = len(response)
    prompt_only = x.clone()
    prompt_only[:, response] = mc.mask_id
    exact = -(mc.log_prob(x) - mc.log_prob(prompt_only))
    total = sum(
        _exact_terms(mc, x, s) / (len(s) * math.comb(n, len(s)))
        for m in range(1, n + 1)
        for s in itertools.combinations(response, m)
    )
    torch.testing.assert_close(total, exact, rtol=0, atol=1e-10)


def test_exact_score_matches_noisy_marginals():
    """ExactScore = p_sigma(z^{i<-v}) / p_sigma(z), with p_sigma the absorbing process's marginal
    computed by summing p(x0) prod_i q(z_i | x0_i) over the table."""
    table = JointTable.random(3, 4, generator=_gen(15))
    score = ExactScore(table)
    g = _gen(16)
    for sigma in (0.05, 0.7, 3.0):
        lam = torch.tensor(1 - math.exp(-sigma), dtype=torch.float64)
        z = table.sample(8, g).masked_fill(torch.rand(8, 4, generator=g) < 0.5, table.mask_id)

        def noisy_prob(z, lam=lam):
            masked = z[:, None, :] == table.mask_id
            same = table.configs[None] == z[:, None, :]
            per_token = torch.where(masked, lam, same * (1 - lam))
            return (table.probs * per_token.prod(dim=2)).sum(dim=1)

        got = score(z, torch.full((8,), sigma, dtype=torch.float64)).exp()
        for i in range(4):
            for v in range(3):
                swapped = z.clone()
                swapped[:, i] = v
                ratio = noisy_prob(swapped) / noisy_prob(z)
                rows = z[:, i] == table.mask_id
                torch.testing.assert_close(got[rows, i, v], ratio[rows], rtol=1e-10, atol=0)


def test_bad_input_raises():
    mc = MarkovChain.random(3, 1, 4, generator=_gen(17))
    with pytest.raises(ValueError, match="LongTensor"):
        mc(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="mask id"):
        mc(torch.full((2, 4), 7, dtype=torch.long))
    with pytest.raises(ValueError, match="shorter than the order"):
        MarkovChain(torch.ones(9), torch.ones(9, 3), length=1)
