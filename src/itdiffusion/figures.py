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

Every figure is saved with a sidecar of what it shows (:mod:`itdiffusion.figure_files`); the loss and
per-image figures are in :mod:`itdiffusion.run_figures`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from itdiffusion.artifacts import ENSEMBLE, PerImage
from itdiffusion.figure_files import MODEL_COLOURS, marker, pyplot, save, wrap
from itdiffusion.units import nats_to_bpd

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


# ------------------------------------------------------------------------------------------------------
# (2) the MMSE gap: what the continuous estimate integrates
# ------------------------------------------------------------------------------------------------------

GAP_CAPTION = (
    "Shaded: the used gap, per log-SNR bin the mean over test images and points of (e_G − e_used) / q, "
    "e_G the error of the Gaussian reference's linear decoder at the same images and e_used that of the "
    "decoder the estimate uses there (the model, or the Gaussian decoder where the model is not better by 2 "
    "standard errors; gap 0 up to the control variate). The estimate is exactly Ĝ − area / 2, Ĝ the same "
    "sampled integral with the Gaussian decoder at every point; the closed-form −ln N(x; μ, Σ) differs from "
    "Ĝ by that integral's Monte Carlo error. Line: the model's own gap with ±1 standard error."
)


@dataclass
class GapData:
    """The continuous estimate's integrand, binned (eps units summed over d; numbers in bits/dim).

    Per point the estimate averages ``v`` (:attr:`PerImage.continuous_integrand`); with
    ``g = (e_G - mmse_G) / q``, the Gaussian decoder's integrand at the same points, the *used gap* is
    ``g - v``. ``used`` ``[J]`` bins it so that ``sum_j w_j used_j`` is its mean over images and points
    (:meth:`Bins.share`), hence exactly ``estimate_bpd = sampled_gaussian_bpd - area_bpd`` with
    ``area_bpd = 1/2 sum_j w_j used_j`` and ``sampled_gaussian_bpd = h_G + tails + 1/2 mean g``.
    ``estimate_bpd``: the mean of the group's per-image continuous estimates (what metrics.json reports);
    ``gaussian_bpd``: the mean closed-form ``-ln N(x; mu, Sigma)`` of the images. ``gap`` ``[M, J]``: each
    model's own gap ``e_G - e``, bin averages as in the MMSE figure (:meth:`Bins.mean`; the same as the
    shares when the points fill the bins evenly), with ``gap_stderr``.
    """

    centres: np.ndarray
    edges: np.ndarray
    gap: np.ndarray
    gap_stderr: np.ndarray
    used: np.ndarray
    estimate_bpd: float
    sampled_gaussian_bpd: float
    area_bpd: float
    gaussian_bpd: float

    @property
    def widths(self) -> np.ndarray:
        return np.diff(self.edges)


def gap_data(per_image: PerImage, entropy_nats: float, dim: int, group: str | None = None) -> GapData:
    """:class:`GapData` of one group of an evaluation (``m0``, ..., ``ensemble``; default: the last, i.e.
    the ensemble or the single model), from the stored curves and the estimate's own per-point values."""
    curves = per_image.curves
    group = group or per_image.groups[-1]
    if per_image.continuous_integrand is None or curves.gaussian_nll is None or not per_image.estimates:
        raise ValueError("per_image.npz holds no continuous_integrand or gaussian_nll (made before they were "
                         "stored): rerun the evaluation for the gap figure")
    row = per_image.groups.index(group)
    models = list(range(curves.num_models)) if group == ENSEMBLE else [int(group.removeprefix("m"))]
    bins = make_bins(per_image)
    g = (curves.gaussian_mmse - reference_mmse(per_image)) * bins.weight
    used, _ = bins.share(g - per_image.continuous_integrand[row])
    gaps = [bins.mean(curves.gaussian_mmse - curves.mmse[m]) for m in models]
    area = 0.5 * float(np.sum(bins.widths * used))
    sampled = entropy_nats + float(curves.continuous_tail.mean()) + 0.5 * float(g.mean())
    table = float(per_image.group(group)["it_continuous_nats"].mean())
    return GapData(bins.centres, bins.edges, np.array([x[0] for x in gaps]), np.array([x[1] for x in gaps]),
                   used, float(nats_to_bpd(table, dim)), float(nats_to_bpd(sampled, dim)),
                   float(nats_to_bpd(area, dim)), float(nats_to_bpd(float(curves.gaussian_nll.mean()), dim)))


def gap_legend(label: str, d: GapData) -> tuple[str, str]:
    """The gap figure's legend lines of one run: its estimate as Ĝ − area, and the closed-form Gaussian."""
    return (f"{label}: {d.estimate_bpd:.3f} bits/dim = Ĝ {d.sampled_gaussian_bpd:.3f} − area/2 "
            f"({d.area_bpd:.3f})",
            f"{label}: Gaussian −ln N(x; μ, Σ) {d.gaussian_bpd:.3f} bits/dim (closed form)")


def plot_gap(series: Mapping[str, GapData], path: Path) -> Path:
    """One colour per evaluated run (``label -> data``): the used gap as stairs over the bins (their area
    is the one in the legend), and for a single model its own gap with a ±1 stderr band."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.6), layout="constrained")
    for k, (label, d) in enumerate(series.items()):
        colour = f"C{k % 10}"
        estimate_line, gaussian_line = gap_legend(label, d)
        ax.stairs(d.used, d.edges, fill=True, color=colour, alpha=0.25, label=estimate_line)
        if len(d.gap) == 1:
            gap, err = d.gap[0], d.gap_stderr[0]
            ax.plot(d.centres, gap, "-", color=colour, marker=marker(gap))
            ax.fill_between(d.centres, gap - err, gap + err, color=colour, alpha=0.12)
        ax.plot([], [], " ", label=gaussian_line)
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xlabel("log-SNR a")
    ax.set_ylabel("e_G(x, a) − e(x, a), bin average   (ε units, summed over d)")
    ax.set_title("What the continuous estimate integrates: the gain over the Gaussian decoder")
    ax.legend(fontsize="small")
    fig.text(0.01, 0.0, wrap(GAP_CAPTION, 130), fontsize=6.5, va="top")
    save(fig, path)
    return path


# ------------------------------------------------------------------------------------------------------
# (5) per-pixel information maps
# ------------------------------------------------------------------------------------------------------


@dataclass
class PixelMapData:
    """For the mapped images: ``images`` ``[P, H, W, C]`` uint8, ``bits`` ``[P, H, W]`` (bits per pixel,
    channels summed), ``band`` ``[P, H, W]`` (log-SNR centroid, channels averaged), ``total_bits`` ``[P]``."""

    index: np.ndarray
    images: np.ndarray
    bits: np.ndarray
    band: np.ndarray
    total_bits: np.ndarray


def pixel_map_data(maps: Mapping[str, Tensor], model: int = 0) -> PixelMapData:
    """From the ``pixel_maps`` of a ``per_image.npz`` (:class:`itdiffusion.pixel_maps.PixelMaps` fields)."""
    images = maps["images"]  # [P, C, H, W] in [-1, 1]
    p, c, h, w = images.shape
    bits = (maps["nats"][model] / math.log(2)).reshape(p, c, h, w)
    band = maps["band"][model].reshape(p, c, h, w)
    pixels = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return PixelMapData(maps["index"].long().numpy(), pixels, bits.sum(1).numpy(), band.mean(1).numpy(),
                        (maps["total_nats"][model] / math.log(2)).numpy())


PIXEL_PERCENTILE = 99.0  # the bits colour range: +-this percentile of |bits| over the drawn maps


def symmetric_range(values: Sequence[np.ndarray], percentile: float = PIXEL_PERCENTILE) -> tuple[float, int]:
    """``L``, the ``percentile`` of ``|values|`` (all arrays pooled), and how many values lie beyond +-L
    (drawn in the end colours)."""
    pooled = np.abs(np.concatenate([np.ravel(v) for v in values]))
    lim = float(np.percentile(pooled, percentile)) or float(pooled.max()) or 1.0
    return lim, int((pooled > lim).sum())


def plot_pixel_maps(maps: Mapping[str, PixelMapData], path: Path, max_images: int = 4) -> Path | None:
    """Rows: images. Columns: the image, then for each run (e.g. base, tuned) its bits per pixel and its
    log-SNR band, and for two runs their difference (second − first) in bits. Bits use a diverging colour
    map symmetric about 0 up to the 99th percentile of |bits| (the clipped pixels are counted in the
    title), so a few outliers do not wash the map out."""
    if not maps:
        return None
    plt = pyplot()
    runs = list(maps.items())
    first = runs[0][1]
    n = min(max_images, len(first.index))
    diff = len(runs) == 2 and np.array_equal(runs[0][1].index, runs[1][1].index)
    cols = 1 + 2 * len(runs) + int(diff)
    fig, axes = plt.subplots(n, cols, figsize=(2.6 * cols, 2.5 * n + 1.0), squeeze=False,
                             layout="constrained")
    bit_lim, bit_out = symmetric_range([m.bits[:n] for _, m in runs])
    band_lo = min(float(m.band[:n].min()) for _, m in runs)
    band_hi = max(float(m.band[:n].max()) for _, m in runs)
    deltas = [runs[1][1].bits[i] - runs[0][1].bits[i] for i in range(n)] if diff else []
    delta_lim, delta_out = symmetric_range(deltas) if diff else (1.0, 0)
    for i in range(n):
        axes[i, 0].imshow(first.images[i])
        axes[i, 0].set_title(f"test image {first.index[i]}", fontsize=7)
        for r, (label, m) in enumerate(runs):
            im = axes[i, 1 + 2 * r].imshow(m.bits[i], cmap="RdBu_r", vmin=-bit_lim, vmax=bit_lim)
            axes[i, 1 + 2 * r].set_title(f"{label}: bits/pixel\nimage total {m.total_bits[i]:.0f} bits",
                                         fontsize=7)
            fig.colorbar(im, ax=axes[i, 1 + 2 * r], fraction=0.046).set_label("bits", fontsize=7)
            im = axes[i, 2 + 2 * r].imshow(m.band[i], cmap="viridis", vmin=band_lo, vmax=band_hi)
            axes[i, 2 + 2 * r].set_title(f"{label}: log-SNR band", fontsize=7)
            fig.colorbar(im, ax=axes[i, 2 + 2 * r], fraction=0.046).set_label("log-SNR a", fontsize=7)
        if diff:
            im = axes[i, -1].imshow(deltas[i], cmap="PuOr_r", vmin=-delta_lim, vmax=delta_lim)
            axes[i, -1].set_title(f"second − first\n{deltas[i].sum():+.0f} bits", fontsize=7)
            fig.colorbar(im, ax=axes[i, -1], fraction=0.046).set_label("bits", fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    clipped = (f"colours: ±{bit_lim:.3g} bits ({PIXEL_PERCENTILE:g}th percentile of |bits|; {bit_out} pixels "
               "beyond, in the end colours)")
    if diff:
        clipped += f"; difference ±{delta_lim:.3g} bits ({delta_out} beyond)"
    fig.suptitle("−log2 p(x) per pixel (channels summed; sums to the image's continuous estimate) and the "
                 f"log-SNR its information comes from\n{clipped}", fontsize=8)
    save(fig, path)
    return path
