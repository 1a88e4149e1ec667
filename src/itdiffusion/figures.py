"""Figures from evaluation artifacts, made from the quantities the estimator integrates.

Every figure has a ``*_data`` function (numbers, no plotting; tests compare them with ``metrics.json``)
and a ``plot_*`` function that draws those numbers into a PNG. Units: eps units summed over the d
dimensions for error curves, bits/dim for estimates, bits for pixel maps.

**Binning.** Each image has its own log-SNR points, drawn from the proposal q. The points of all images
are pooled into equal-probability bins of q (``proposal.bins``). In bin j (probability p_j, width w_j) the
MMSE figure plots ``(p_j / w_j) mean(f / q)``, the bin's average of f estimated as the estimator estimates its
integral (:meth:`Bins.mean`); the gap figure's shaded gap is ``sum_{bin j} (f / q) / (N w_j)`` over the N
points of all images (:meth:`Bins.share`), so that ``sum_j w_j value_j`` is exactly the estimator's
``mean f / q`` and its area gives the table's number (:func:`gap_data`).

This module: the binning and the paper's MMSE figure; the gap figure is :mod:`itdiffusion.figure_gap`, the
pixel maps :mod:`itdiffusion.figure_pixel_maps`. Every figure is saved with a sidecar of what it shows
(:mod:`itdiffusion.figure_files`); the loss and per-image figures are in :mod:`itdiffusion.run_figures`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from itdiffusion.artifacts import PerImage
from itdiffusion.figure_files import MODEL_COLOURS, marker, pyplot, save

MAX_PLOT_BINS = 64


def plot_bins(num_points: int) -> int:
    """Bins for a curve from K points per image: the largest divisor of K up to 64 (stratified points then
    fill every bin evenly), or min(K, 32) when K has no divisor above 7."""
    best = max(n for n in range(1, min(num_points, MAX_PLOT_BINS) + 1) if num_points % n == 0)
    return best if best >= 8 or num_points < 16 else min(num_points, 32)


@dataclass
class Bins:
    """Equal-probability bins of the proposal over the pooled points of all images."""

    index: Tensor  # [B, K] bin of every point
    weight: Tensor  # [B, K] 1 / q(a)
    edges: np.ndarray  # [J + 1]
    centres: np.ndarray  # [J] median of q in the bin
    prob: float  # p_j = 1 / J

    @property
    def count(self) -> int:
        return len(self.centres)

    @property
    def widths(self) -> np.ndarray:
        return np.diff(self.edges)

    def mean(self, values: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Bin averages of a per-point quantity ``[B, K]`` (see the module) and their standard errors."""
        f = (values.double() * self.weight).reshape(-1)
        idx = self.index.reshape(-1)
        n = torch.bincount(idx, minlength=self.count).double()
        s1 = torch.zeros(self.count, dtype=torch.float64).scatter_add_(0, idx, f)
        s2 = torch.zeros(self.count, dtype=torch.float64).scatter_add_(0, idx, f * f)
        mean = s1 / n.clamp_min(1)
        var = (s2 / n.clamp_min(1) - mean.square()).clamp_min(0) * n / (n - 1).clamp_min(1)
        scale = torch.from_numpy(self.prob / self.widths)
        sem = torch.where(n > 1, (var / n.clamp_min(1)).sqrt(), torch.full_like(n, math.nan))
        return (scale * mean).numpy(), (scale * sem).numpy()


    def share(self, values: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Per bin, the sum of per-point values ``[B, K]`` already divided by q, over all points in the bin,
        divided by the number of points and by the bin's width ``[J]``: ``sum_j w_j share_j`` is the mean of
        the values exactly, whatever the points' spread over the bins. And each share's standard error
        (the bin's points taken as i.i.d.)."""
        f = values.double().reshape(-1)
        idx = self.index.reshape(-1)
        n = torch.bincount(idx, minlength=self.count).double()
        s1 = torch.zeros(self.count, dtype=torch.float64).scatter_add_(0, idx, f)
        s2 = torch.zeros(self.count, dtype=torch.float64).scatter_add_(0, idx, f * f)
        var = (s2 - s1.square() / n.clamp_min(1)).clamp_min(0) / (n - 1).clamp_min(1)
        scale = torch.from_numpy(1.0 / (f.numel() * self.widths))
        return (scale * s1).numpy(), (scale * (n * var).sqrt()).numpy()


def make_bins(per_image: PerImage, nbins: int | None = None) -> Bins:
    curves = per_image.curves
    prop = curves.proposal
    nbins = nbins or plot_bins(curves.num_points)
    p = torch.linspace(0, 1, nbins + 1, dtype=torch.float64)
    edges = prop.quantile(p).numpy()
    edges[0], edges[-1] = prop.bounds
    centres = prop.quantile((torch.arange(nbins, dtype=torch.float64) + 0.5) / nbins).numpy()
    return Bins(prop.bins(curves.logsnr, nbins), torch.exp(-curves.log_q), edges, centres, 1.0 / nbins)


def reference_mmse(per_image: PerImage) -> Tensor:
    """mmse_G(a) of the reference at every point ``[B, K]``."""
    if per_image.reference_mmse is None:
        raise ValueError("per_image.npz holds no reference_mmse (mmse_G at the points): rerun the evaluation")
    return per_image.reference_mmse


# ------------------------------------------------------------------------------------------------------
# (1) the paper's MMSE figure
# ------------------------------------------------------------------------------------------------------


@dataclass
class MMSEData:
    """Binned mean errors (eps units, summed over d) against log-SNR: ``continuous`` and ``discrete``
    (rounded x_hat) series by name, each ``(mean [J], stderr [J])``; ``best``: the lowest model per bin;
    ``dim``: d (the y ticks)."""

    centres: np.ndarray
    dim: int
    continuous: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    discrete: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    best: np.ndarray | None = None
    # per panel (continuous, discrete): log-SNR spans where the estimate's decoder choice uses the Gaussian
    # decoder (reference_spans), shaded by shade_reference_spans
    reference_spans: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    GAUSSIAN_DECODER = "Gaussian decoder at these images"
    REFERENCE = "N(μ, Σ): mmse_G(a)"
    STANDARD = "N(0, I): d·σ(a)"


def mmse_data(per_image: PerImage, dim: int, names: Sequence[str] | None = None) -> MMSEData:
    """The paper's MMSE figure's numbers: each model's mean error, the N(mu, Sigma) reference's analytic
    mmse_G, the N(0, I) curve ``d sigmoid(a)``, and the reference's linear decoder at the evaluated images
    (the alternative the estimate's clamp uses)."""
    curves = per_image.curves
    bins = make_bins(per_image)
    names = list(names or [f"m{j}" for j in range(curves.num_models)])
    out = MMSEData(bins.centres, dim)
    for j, name in enumerate(names):
        out.continuous[name] = bins.mean(curves.mmse[j])
        if curves.mmse_rounded is not None:
            out.discrete[name + " (rounded)"] = bins.mean(curves.mmse_rounded[j])
    out.best = np.min([v[0] for v in out.continuous.values()], axis=0)
    out.continuous[MMSEData.GAUSSIAN_DECODER] = bins.mean(curves.gaussian_mmse)
    out.continuous[MMSEData.REFERENCE] = bins.mean(reference_mmse(per_image))
    out.continuous[MMSEData.STANDARD] = bins.mean(dim * torch.sigmoid(curves.logsnr))
    return out


def reference_spans(proposal, used: Sequence[str]) -> list[tuple[float, float]]:
    """The log-SNR spans of the equal-probability bins of ``proposal`` (a
    :class:`~itdiffusion.information.LogSNRProposal`) whose decoder in ``used`` (metrics.json's
    ``decoder_choice``) is the Gaussian one, adjacent bins merged."""
    n = len(used)
    edges = proposal.quantile(torch.linspace(0, 1, n + 1, dtype=torch.float64)).tolist()
    spans: list[tuple[float, float]] = []
    for j, name in enumerate(used):
        if name != "gaussian":
            continue
        if spans and spans[-1][1] == edges[j]:
            spans[-1] = (spans[-1][0], edges[j + 1])
        else:
            spans.append((edges[j], edges[j + 1]))
    return spans


def shade_reference_spans(ax, spans: Sequence[tuple[float, float]]) -> None:
    """Grey bands over the log-SNR spans where the Gaussian decoder stands in for the network."""
    for k, (lo, hi) in enumerate(spans):
        ax.axvspan(lo, hi, color="0.5", alpha=0.12, lw=0, label="Gaussian decoder used" if k == 0 else None)
# The references' styles (colour, linestyle), distinct from each other and from the models' colours.
REFERENCE_STYLES = {
    MMSEData.REFERENCE: ("k", "-"),
    MMSEData.STANDARD: ("0.55", ":"),
    MMSEData.GAUSSIAN_DECODER: ("C5", "--"),
}


def plot_mmse(data: MMSEData, path: Path, title: str = "") -> Path:
    plt = pyplot()
    panels = 2 if data.discrete else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.8), squeeze=False, layout="constrained")
    ax = axes[0, 0]
    models = 0
    for name, (mean, _) in data.continuous.items():
        colour, style = REFERENCE_STYLES.get(name, (None, "-"))
        if colour is None:
            colour, models = MODEL_COLOURS[models % len(MODEL_COLOURS)], models + 1
        ax.plot(data.centres, mean, style, color=colour, lw=1.6, label=name, marker=marker(mean))
    gauss = data.continuous[MMSEData.GAUSSIAN_DECODER][0]
    ax.fill_between(data.centres, data.best, gauss, where=gauss >= data.best, color="C2", alpha=0.2,
                    label="best model below the Gaussian decoder")
    ax.set_title("continuous: E||ε − ε̂||²")
    panels_axes = [ax]
    if data.discrete:
        ax2 = axes[0, 1]
        for k, (name, (mean, _)) in enumerate(data.discrete.items()):
            ax2.plot(data.centres, mean, "-", color=MODEL_COLOURS[k % len(MODEL_COLOURS)], label=name,
                     marker=marker(mean))
        colour, style = REFERENCE_STYLES[MMSEData.STANDARD]
        ax2.plot(data.centres, data.continuous[MMSEData.STANDARD][0], style, color=colour, lw=1.6,
                 label=MMSEData.STANDARD)
        ax2.set_title("discrete: x̂ rounded to the pixel lattice")
        panels_axes.append(ax2)
    for a, panel in zip(panels_axes, ("continuous", "discrete"), strict=False):
        shade_reference_spans(a, data.reference_spans.get(panel, ()))
        a.set_xlabel("log-SNR a")
        a.set_ylabel("E||ε − ε̂||²  (summed over d)")
        lo, hi = _data_range(a, data.dim)
        ticks, labels = _dim_ticks(lo, hi, data.dim)
        a.set_yticks(ticks, labels)
        a.set_ylim(lo, hi)
        a.legend(fontsize="small")
    fig.suptitle(title or "MMSE against log-SNR (binned means over test images and points)")
    save(fig, path)
    return path


def _data_range(ax, dim: int) -> tuple[float, float]:
    """y limits holding every drawn line (and at least 0 to d), with a 5% margin."""
    values = [np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()]
    finite = np.concatenate([v[np.isfinite(v)] for v in values] + [np.array([0.0, float(dim)])])
    lo, hi = float(finite.min()), float(finite.max())
    pad = 0.05 * (hi - lo)
    return lo - pad if lo < 0 else 0.0, hi + pad


def _dim_ticks(lo: float, hi: float, dim: int) -> tuple[list[float], list[str]]:
    """Ticks at multiples of d/4 (d/2, d, 2d, ... when the range is wide), labelled in units of d."""
    quarters = max(1, math.ceil((hi - lo) / dim / 2.0))  # about 8 ticks at most
    step = quarters * dim / 4
    start, stop = math.ceil(lo / step), math.floor(hi / step)
    ticks = [k * step for k in range(start, stop + 1)]
    return ticks, [_in_dims(k * quarters) for k in range(start, stop + 1)]


def _in_dims(q: int) -> str:
    """``q`` quarters of d as text: 0, d/4, d/2, 3d/4, d, 5d/4, ..., −d/4."""
    from fractions import Fraction

    f = Fraction(q, 4)
    if f == 0:
        return "0"
    sign, f = ("−" if f < 0 else ""), abs(f)
    num = "" if f.numerator == 1 else str(f.numerator)
    return f"{sign}{num}d" if f.denominator == 1 else f"{sign}{num}d/{f.denominator}"
