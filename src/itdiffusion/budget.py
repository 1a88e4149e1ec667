"""A dataset-level evaluation budget: how many log-SNR points and VLB timesteps per image a mean needs.

The standard error of a dataset mean over N images has two parts: the spread between images (fixed by the
test set) and each image's Monte Carlo noise,

    Var(mean) = (sigma_between^2 + v(K)) / N,      v(K) = the mean over images of the per-image MC variance

at K network evaluations per image (bits/dim^2). Once ``v(K)`` is small against ``sigma_between^2``, more
evaluations per image buy nothing. A *pilot* on a few test images (their own seeds, independent of the main
run's draws) measures, for every reported estimate, ``v(K)`` on a ladder of K and ``sigma_between^2``; the
budget is then the smallest K (separately for the IT points and the VLB timesteps) at which every estimate's
predicted stderr reaches the target: ``target_stderr_bpd``, or ``target_ratio`` times what the full-cost
protocol would give (``sigma_between^2 + v(K_full)``, ``v`` extrapolated as 1/K beyond the ladder; the
measured ``v`` falls faster than 1/K, so that is conservative).

**One estimand in both protocols.** The IT estimates may use, per log-SNR bin, another decoder where the
network is worse (the Gaussian decoder; the raw rather than the rounded x_hat; another ensemble member).
Cross-fitted on the evaluated images, that choice would depend on how many points fall in each bin (N x K):
at few points per image it switches in fewer bins, so a budgeted and a full-cost run would estimate
different bounds. So both protocols (``estimator.budget=per_image`` and ``dataset``) fit the choice once,
on held-out draws: the pilot images' curves at :func:`choice_points` points, drawn from their own seed
stream (:func:`fit_decoder_choice`, the two-standard-error rule of the cross-fitted choice), and apply it to
every evaluated image as a function of the log-SNR bin alone (:func:`estimate_with_choice`). The choice
then never sees the noise it is applied to: each estimate is unbiased for the bound of the decoders used, a
valid bound (every decoder's error averages to at least the MMSE), and the same quantity at any K.

**The target is met, not only predicted.** The predicted stderr uses upper confidence bounds on the pilot's
variances (:class:`EstimateStats`) and at least :data:`K_FLOOR` points; after the main run the realized
stderr of every reported estimate is checked and, where it misses the target, more points are drawn for the
same images (:mod:`itdiffusion.topup`).

Per-image estimates (e.g. for outlier detection) should keep the per-image protocol
(``estimator.budget=per_image``): the budget is chosen for dataset means, and at a few points per image the
individual estimates are noisy (their MC stderr says how much).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from itdiffusion.information import DECISION_BINS, Curves, GaussianReference, ITEstimate, estimate
from itdiffusion.information.crossfit import BinTable, Decisions
from itdiffusion.units import nats_to_bpd

BUDGETS = ("per_image", "dataset")  # estimator.budget
IT_LADDER = (2, 4, 8, 16, 32, 64)  # pilot: log-SNR points per image
VLB_LADDER = (2, 4, 8, 16, 32, 64)  # pilot: sampled middle timesteps per image
IT_NAMES = ("it_continuous", "it_discrete", "it_dequantized")  # the estimates whose MC noise sets K
VLB_NAMES = ("vlb", "vlb_continuous")
FAMILIES = ("continuous", "discrete", "dequantized")  # decoder-choice families of the IT estimate
Z_THRESHOLD = 2.0  # the same evidence rule as the cross-fitted choice
UCB_Z = 2.0  # the predicted stderr uses this many standard errors above the pilot's mean variances
K_FLOOR = 4  # the fewest points (and VLB strata) per image a budget chooses: below, v(K) is too erratic
GAUSSIAN = "gaussian"  # the name of the reference's decoder among the candidates


# ----------------------------------------------------------------------------------------------
# The decoder choice, fitted on the pilot and applied as a function of the log-SNR bin
# ----------------------------------------------------------------------------------------------
@dataclass
class DecoderChoice:
    """Per family (``continuous``, ``discrete``, ``dequantized``) the candidate used in each of ``nbins``
    equal-probability log-SNR bins of the proposal. Candidates, in order: ``continuous``: each model's
    x_hat, then the Gaussian decoder; ``discrete``: per model the rounded then the raw x_hat (raw only with
    ``rounding=none``), then the Gaussian decoder; ``dequantized``: each model, then the Gaussian decoder."""

    nbins: int
    index: dict[str, list[int]]
    candidates: dict[str, list[str]]

    @property
    def num_models(self) -> int:
        """How many models the choice was fitted for (the continuous candidates less the Gaussian)."""
        return len(self.candidates["continuous"]) - 1

    def used(self, family: str) -> list[str]:
        """The candidate's name used in each bin."""
        return [self.candidates[family][i] for i in self.index[family]]

    def reference_bins(self, family: str) -> Tensor:
        """``[nbins]`` bool: the bins where the Gaussian reference's decoder stands in for the network."""
        return torch.tensor([name == GAUSSIAN for name in self.used(family)], dtype=torch.bool)

    def reference_only(self) -> dict[str, bool]:
        """Per family, whether the reference's decoder is used in every bin: the estimate is then the
        reference's bound, the network never enters it."""
        return {f: bool(self.reference_bins(f).all()) for f in self.index}

    def to_dict(self) -> dict:
        return {"nbins": self.nbins, "index": self.index, "candidates": self.candidates,
                "used": {f: self.used(f) for f in self.index}, "reference_only": self.reference_only()}


def _candidates(curves: Curves, family: str) -> tuple[Tensor, list[str]] | None:
    """The raw errors ``[C, B, K]`` of the family's candidate decoders and their names (None: not formed)."""
    m = curves.num_models
    if family == "continuous":
        rows, names = [curves.mmse[j] for j in range(m)], [f"m{j}" for j in range(m)]
        gauss = curves.gaussian_mmse
    elif family == "discrete":
        if curves.delta is None:
            return None
        rows, names = [], []
        for j in range(m):
            if curves.mmse_rounded is not None:
                rows.append(curves.mmse_rounded[j])
                names.append(f"m{j}_rounded")
            rows.append(curves.mmse[j])
            names.append(f"m{j}_raw")
        gauss = curves.gaussian_mmse
    else:
        if curves.mmse_dequantized is None:
            return None
        rows, names = [curves.mmse_dequantized[j] for j in range(m)], [f"m{j}" for j in range(m)]
        gauss = curves.gaussian_mmse_dequantized
    return torch.stack([*rows, gauss]).to(torch.float64), [*names, GAUSSIAN]


def fit_decoder_choice(pilot: Sequence[Curves], nbins: int = DECISION_BINS,
                       z_threshold: float = Z_THRESHOLD) -> DecoderChoice:
    """The decoder per family and log-SNR bin from the pilot's curves (all images and rungs pooled).

    In bin j candidate c replaces candidate 0 (the network; the rounded x_hat) when the mean paired
    difference of the integrands ``(e_c - e_0) / q`` over the pilot's points in the bin is below
    ``-z_threshold`` standard errors; among several such candidates the lowest mean wins (the rule of
    :func:`itdiffusion.information.cross_fitted_choice`, on the pilot instead of the other images)."""
    index, names = {}, {}
    for family in FAMILIES:
        parts = [(_candidates(c, family), c) for c in pilot]
        if any(p is None for p, _ in parts):
            continue
        diffs, bins = [], []
        for (cands, _), c in parts:
            weight = torch.exp(-c.log_q)
            diffs.append(((cands[1:] - cands[:1]) * weight).flatten(1))  # [C-1, B*K]
            bins.append(c.proposal.bins(c.logsnr, nbins).flatten())
        diff, bin_of = torch.cat(diffs, 1), torch.cat(bins)
        chosen = []
        for j in range(nbins):
            d = diff[:, bin_of == j]
            n = d.shape[1]
            if n < 2:
                chosen.append(0)
                continue
            mean, se = d.mean(1), d.std(1) / math.sqrt(n)
            significant = mean < -z_threshold * se
            if not significant.any():
                chosen.append(0)
            else:
                scores = torch.where(significant, mean, torch.full_like(mean, math.inf))
                chosen.append(int(scores.argmin()) + 1)
        index[family], names[family] = chosen, parts[0][0][1]
    return DecoderChoice(nbins=nbins, index=index, candidates=names)


def _apply(curves: Curves, family: str, choice: DecoderChoice) -> Tensor:
    cands, names = _candidates(curves, family)
    if names != choice.candidates[family]:
        raise ValueError(f"decoder choice for {family}: fitted on candidates {choice.candidates[family]}, "
                         f"these curves have {names}")
    table = torch.as_tensor(choice.index[family], dtype=torch.long)
    which = table[curves.proposal.bins(curves.logsnr, choice.nbins)]  # [B, K]
    return cands.gather(0, which[None]).squeeze(0)


def estimate_with_choice(curves: Curves, reference: GaussianReference, choice: DecoderChoice) -> ITEstimate:
    """Every IT estimate of :func:`~itdiffusion.information.estimate` with the decoders of ``choice`` (a
    function of the log-SNR bin) instead of the cross-fitted ones: the chosen errors become a single
    model's curve and ``estimate(..., clamp=False)`` integrates it (control variate and tails as there).
    Its ``continuous_decisions`` hold the choice's table (per bin: each model, then the Gaussian decoder) and
    the cross-fitted control-variate coefficients."""
    cont = dataclasses.replace(curves, mmse=_apply(curves, "continuous", choice)[None], mmse_rounded=None,
                               mmse_dequantized=None if curves.mmse_dequantized is None
                               else _apply(curves, "dequantized", choice)[None])
    out = estimate(cont, reference, clamp=False)
    table = torch.as_tensor(choice.index["continuous"], dtype=torch.long).expand(curves.num_images, -1)
    out.continuous_decisions = Decisions(BinTable(choice.nbins, table.clone()),
                                         out.continuous_decisions.coefficient)
    if curves.delta is not None:
        disc = dataclasses.replace(curves, mmse=_apply(curves, "discrete", choice)[None], mmse_rounded=None,
                                   mmse_dequantized=None)
        d = estimate(disc, reference, clamp=False)
        out.discrete, out.discrete_stderr = d.discrete, d.discrete_stderr
        out.discrete_notails = d.discrete_notails
        out.discrete_left_tail, out.discrete_right_tail = d.discrete_left_tail, d.discrete_right_tail
    out.curves = curves
    out.reference_bins = {f: choice.reference_bins(f) for f in choice.index}
    out.decoder_choice = choice
    return out


def choice_points(npoints: int) -> int:
    """The points per pilot image the decoder choice is fitted on: the top rung of the pilot's ladder (at
    most ``npoints``), the same in both protocols."""
    return max([k for k in IT_LADDER if k <= npoints] or [npoints])


# ----------------------------------------------------------------------------------------------
# The pilot and the choice of K
# ----------------------------------------------------------------------------------------------
@dataclass
class EstimateStats:
    """One estimate's pilot figures (bits/dim^2): at each rung of the ladder, an upper confidence bound on
    the mean per-image MC variance (the pilot's mean plus :data:`UCB_Z` standard errors of it: per-image
    variances at a few points are heavy-tailed), and the between-image variance (the spread at the top rung
    minus its MC part, >= 0, raised by :data:`UCB_Z` standard errors of a sample variance)."""

    ladder: list[int]
    mc_var: list[float]
    between_var: float
    evals: list[int]  # network evaluations per image at each rung (the IT pass count included)
    mc_var_mean: list[float] = field(default_factory=list)  # the pilot's plain estimates (a ratio
    between_var_mean: float | None = None  # target's reference: the full protocol's stderr)

    def plain(self) -> EstimateStats:
        """The pilot's plain estimates in place of the upper bounds."""
        return dataclasses.replace(self, mc_var=self.mc_var_mean or self.mc_var,
                                   between_var=self.between_var if self.between_var_mean is None
                                   else self.between_var_mean)

    def mc_var_at(self, k: float) -> float:
        """``v(k)``: log-log interpolation between rungs, ``1/k`` beyond the top, the bottom rung's below."""
        ks, vs = self.ladder, [max(v, 1e-300) for v in self.mc_var]
        if k <= ks[0]:
            return vs[0]
        if k >= ks[-1]:
            return vs[-1] * ks[-1] / k
        i = max(j for j in range(len(ks)) if ks[j] <= k)
        frac = math.log(k / ks[i]) / math.log(ks[i + 1] / ks[i])
        return math.exp(math.log(vs[i]) + frac * (math.log(vs[i + 1]) - math.log(vs[i])))

    def to_dict(self) -> dict:
        return {"ladder": self.ladder, "mc_var_bpd2": self.mc_var, "mc_var_mean_bpd2": self.mc_var_mean,
                "between_var_bpd2": self.between_var, "between_var_mean_bpd2": self.between_var_mean,
                "mc_var_x_evals_bpd2": [v * e for v, e in zip(self.mc_var, self.evals, strict=True)],
                "evals_per_image": self.evals}


def _stats(ladder: Sequence[int], values: list[Tensor], mc_stderr: list[Tensor],
           evals: list[int]) -> EstimateStats:
    n = values[-1].numel()
    mean = [float(s.square().mean()) for s in mc_stderr]
    ucb = [m + UCB_Z * (float(s.square().std()) / math.sqrt(n) if n > 1 else 0.0)
           for m, s in zip(mean, mc_stderr, strict=True)]
    between = max(float(values[-1].var()) - mean[-1], 0.0) if n > 1 else 0.0
    upper = between * (1 + UCB_Z * math.sqrt(2 / max(n - 1, 1)))
    return EstimateStats(list(ladder), ucb, upper, list(evals), mean, between)


def it_pilot(
    sample: Callable[[int], Curves], reference: GaussianReference, ladder: Sequence[int] = IT_LADDER
) -> tuple[dict[str, EstimateStats], DecoderChoice, int, Curves]:
    """``sample(K)``: the pilot images' curves at K points (their own seeds per rung). Returns the stats of
    every IT estimate, the decoder choice fitted on the top rung (:func:`choice_points`: what the per-image
    protocol fits it on), the pilot's network evaluations per image and the top rung's curves."""
    curves = [sample(k) for k in ladder]
    choice = fit_decoder_choice([curves[-1]])
    found = [estimate_with_choice(c, reference, choice).per_image() for c in curves]
    evals = [c.network_evals * c.num_models for c in curves]
    stats = {}
    for name in IT_NAMES:
        key = name.removeprefix("it_")
        if key not in found[0]:
            continue
        bpd = [nats_to_bpd(f[key], reference.dim) for f in found]
        mc = [nats_to_bpd(f[key + "_mc_stderr"], reference.dim) for f in found]
        stats[name] = _stats(ladder, bpd, mc, evals)
    return stats, choice, sum(evals), curves[-1]


def vlb_pilot(sample: Callable[[int], object],
              ladder: Sequence[int]) -> tuple[dict[str, EstimateStats], int]:
    """``sample(K)``: the pilot images' :class:`~itdiffusion.variational.SampledVLB` at K strata."""
    results = [sample(k) for k in ladder]
    evals = [r.network_evals for r in results]
    mc = [r.mc_stderr_bpd for r in results]
    stats = {name: _stats(ladder, [r.total(name == "vlb_continuous") for r in results], mc, evals)
             for name in VLB_NAMES}
    return stats, sum(evals)


@dataclass
class Choice:
    """The smallest K in ``[k_min, k_max]`` meeting every target, and the predicted stderrs (bits/dim)."""

    k: int
    reached: bool
    predicted_stderr: dict[str, float] = field(default_factory=dict)
    full_stderr: dict[str, float] = field(default_factory=dict)
    target: dict[str, float] = field(default_factory=dict)


def choose_k(stats: dict[str, EstimateStats], num_images: int, k_full: int, *, k_min: int = K_FLOOR,
             target_stderr_bpd: float | None = None, target_ratio: float | None = None) -> Choice:
    """The fewest evaluations K per image (``k_min <= K <= k_full``, even: the stratified standard error
    pairs neighbouring strata, and top-up blocks of K points concatenate) at which every estimate's
    predicted total stderr ``sqrt((sigma_between^2 + v(K)) / N)`` (upper confidence bounds) is at most its
    target: ``target_stderr_bpd``, or ``target_ratio`` times the full-cost protocol's (``K = k_full``, from
    the pilot's plain estimates; the between-image part is then the plain one on both sides, where it
    cancels, and the bound applies to ``v(K)``). If no K reaches it, ``k_full``."""
    if (target_stderr_bpd is None) == (target_ratio is None):
        raise ValueError("give exactly one of target_stderr_bpd and target_ratio")

    def stderr(s: EstimateStats, k: float) -> float:
        between = s.plain().between_var if target_ratio is not None else s.between_var
        return math.sqrt((between + s.mc_var_at(k)) / num_images)

    full = {n: stderr(s.plain(), k_full) for n, s in stats.items()}
    target = {n: target_stderr_bpd if target_stderr_bpd is not None else target_ratio * full[n]
              for n in stats}
    for k in range(min(k_min + k_min % 2, k_full), k_full + 1, 2):
        if all(stderr(s, k) <= target[n] for n, s in stats.items()):
            return Choice(k, True, {n: stderr(s, k) for n, s in stats.items()}, full, target)
    return Choice(k_full, False, {n: stderr(s, k_full) for n, s in stats.items()}, full, target)
