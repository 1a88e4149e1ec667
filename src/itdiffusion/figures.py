"""Figures from evaluation artifacts, made from the quantities the estimator integrates.

Every figure has a ``*_data`` function (numbers, no plotting; tests compare them with ``metrics.json``)
and a ``plot_*`` function that draws those numbers into a PNG. Units: eps units summed over the d
dimensions for error curves, bits/dim for estimates, bits for pixel maps.

**Binning.** Each image has its own log-SNR points, drawn from the proposal q. The points of all images
are pooled into equal-probability bins of q (``proposal.bins``, the estimator's decision bins). In bin j
(probability p_j, width w_j) the plotted value of a per-point quantity f is ``(p_j / w_j) mean(f / q)``:
the bin's average of f, estimated exactly as the estimator estimates its integral, so that
``sum_j w_j value_j`` is the estimator's ``mean_k f / q`` (equal when the points fill the bins evenly,
as stratified points do when the bin count divides K). Curves integrated over log-SNR therefore give the
table's numbers (:func:`gap_data`'s ``implied_bpd``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from itdiffusion.artifacts import PerImage
from itdiffusion.units import nats_to_bpd

MAX_PLOT_BINS = 64
Z_THRESHOLD = 2.0  # as the estimator's cross-fitted choice: an alternative must be better by 2 stderr


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


def plot_mmse(data: MMSEData, path: Path, title: str = "") -> Path:
    plt = _pyplot()
    panels = 2 if data.discrete else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.5), squeeze=False)
    ax = axes[0, 0]
    styles = {MMSEData.GAUSSIAN_DECODER: "k--", MMSEData.REFERENCE: "k-", MMSEData.STANDARD: "k:"}
    for k, (name, (mean, _)) in enumerate(data.continuous.items()):
        ax.plot(data.centres, mean, styles.get(name, f"C{k % 10}-"), label=name, marker=_marker(mean))
    gauss = data.continuous[MMSEData.GAUSSIAN_DECODER][0]
    ax.fill_between(data.centres, data.best, gauss, where=gauss >= data.best, color="C2", alpha=0.2,
                    label="best model below the Gaussian decoder")
    ax.set_title("continuous: E||ε − ε̂||²")
    panels_axes = [ax]
    if data.discrete:
        ax2 = axes[0, 1]
        for k, (name, (mean, _)) in enumerate(data.discrete.items()):
            ax2.plot(data.centres, mean, f"C{k % 10}-", label=name, marker=_marker(mean))
        ax2.plot(data.centres, data.continuous[MMSEData.STANDARD][0], "k:", label=MMSEData.STANDARD)
        ax2.set_title("discrete: x̂ rounded to the pixel lattice")
        panels_axes.append(ax2)
    for a, panel in zip(panels_axes, ("continuous", "discrete"), strict=False):
        shade_reference_spans(a, data.reference_spans.get(panel, ()))
        a.set_xlabel("log-SNR a")
        a.set_ylabel("E||ε − ε̂||²  (summed over d)")
        a.set_yticks([0, data.dim / 4, data.dim / 2, 3 * data.dim / 4, data.dim],
                     ["0", "d/4", "d/2", "3d/4", "d"])
        a.set_ylim(0, 1.05 * data.dim)
        a.legend(fontsize="small")
    fig.suptitle(title or "MMSE against log-SNR (binned means over test images and points)")
    fig.tight_layout()
    _save(fig, path)
    return path


# ------------------------------------------------------------------------------------------------------
# (2) the MMSE gap: what the continuous estimate integrates
# ------------------------------------------------------------------------------------------------------

GAP_CAPTION = (
    "gap(a) = mean over test images of [e_G(x, a) − e(x, a)]: the error the model saves relative to the "
    "Gaussian reference's linear decoder at the same images (positive: the model is better). Where the "
    "model is not better by 2 standard errors, the estimate uses the Gaussian decoder instead (gap 0). "
    "Estimate = −ln N(x; μ, Σ) − ½ ∫ used gap da, so the shaded area / 2 is the nats per image the model "
    "gains over the Gaussian. Band: ±1 standard error of the bin's mean."
)


@dataclass
class GapData:
    """The continuous estimate's integrand, binned (eps units; estimates in bits/dim).

    ``gap`` ``[M, J]``: each model's ``mean(e_G - e)`` with ``gap_stderr``; ``used`` ``[J]``: the gap of
    the decoder the estimate uses per bin (``chosen``: model index, or -1 for the Gaussian decoder);
    ``offset`` ``[J]``: ``mean(e_G) - mmse_G`` (the Gaussian decoder at these images against the analytic
    reference); ``implied_bpd``: ``h_G + mean tail + 1/2 sum_j w_j (offset_j - used_j)``, the continuous
    estimate from these numbers; ``gaussian_bpd``: the same without the model (the Gaussian's NLL).
    """

    centres: np.ndarray
    widths: np.ndarray
    gap: np.ndarray
    gap_stderr: np.ndarray
    used: np.ndarray
    chosen: np.ndarray
    offset: np.ndarray
    implied_bpd: float
    gaussian_bpd: float


def gap_data(per_image: PerImage, entropy_nats: float, dim: int,
             models: Sequence[int] | None = None) -> GapData:
    """:class:`GapData` of one model or (several ``models``) their ensemble, from the stored curves."""
    curves = per_image.curves
    models = list(range(curves.num_models)) if models is None else list(models)
    bins = make_bins(per_image)
    mmse_g = reference_mmse(per_image)
    gauss = curves.gaussian_mmse
    gaps = [bins.mean(gauss - curves.mmse[m]) for m in models]
    chosen = _pooled_choice([curves.mmse[m] for m in models] + [gauss], mmse_g, bins)
    used_curve = torch.stack([curves.mmse[m] for m in models] + [gauss])  # [C, B, K]
    per_point = used_curve.gather(0, torch.from_numpy(chosen)[bins.index][None]).squeeze(0)
    used, _ = bins.mean(gauss - per_point)
    offset, _ = bins.mean(gauss - mmse_g)
    tail = float(curves.continuous_tail.mean())
    implied = entropy_nats + tail + 0.5 * float(np.sum(bins.widths * (offset - used)))
    gaussian = entropy_nats + tail + 0.5 * float(np.sum(bins.widths * offset))
    chosen_model = np.where(chosen == len(models), -1, np.array(models)[np.minimum(chosen, len(models) - 1)])
    return GapData(bins.centres, bins.widths, np.array([g[0] for g in gaps]), np.array([g[1] for g in gaps]),
                   used, chosen_model, offset, float(nats_to_bpd(implied, dim)),
                   float(nats_to_bpd(gaussian, dim)))


def _pooled_choice(candidates: Sequence[Tensor], mmse_g: Tensor, bins: Bins) -> np.ndarray:
    """Per bin, the candidate decoder the estimate's rule picks on the pooled points (candidate 0 unless
    another has a lower mean integrand by more than :data:`Z_THRESHOLD` standard errors) ``[J]``."""
    integrands = [(c - mmse_g) * bins.weight for c in candidates]
    out = np.zeros(bins.count, dtype=np.int64)
    for j in range(bins.count):
        mask = bins.index == j
        if mask.sum() < 2:
            continue
        base = integrands[0][mask]
        best, best_mean = 0, 0.0
        for c, values in enumerate(integrands[1:], start=1):
            diff = values[mask] - base
            mean, sem = float(diff.mean()), float(diff.std() / math.sqrt(diff.numel()))
            if mean < -Z_THRESHOLD * sem and mean < best_mean:
                best, best_mean = c, mean
        out[j] = best
    return out


def plot_gap(series: Mapping[str, GapData], path: Path) -> Path:
    """One curve per evaluated model (``label -> data``): its gap with a ±1 stderr band, the part the
    estimate uses shaded."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    for k, (label, d) in enumerate(series.items()):
        colour = f"C{k % 10}"
        gap, err = d.gap[0] if len(d.gap) == 1 else d.used, d.gap_stderr[0] if len(d.gap) == 1 else 0 * d.used
        ax.plot(d.centres, gap, "-", color=colour, marker=_marker(gap),
                label=f"{label}: {d.implied_bpd:.3f} bits/dim (Gaussian {d.gaussian_bpd:.3f})")
        ax.fill_between(d.centres, gap - err, gap + err, color=colour, alpha=0.15)
        ax.fill_between(d.centres, 0, d.used, color=colour, alpha=0.25, step="mid")
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xlabel("log-SNR a")
    ax.set_ylabel("e_G(x, a) − e(x, a)   (ε units, summed over d)")
    ax.set_title("What the continuous estimate integrates: the gain over the Gaussian decoder")
    ax.legend(fontsize="small")
    fig.text(0.01, 0.01, _wrap(GAP_CAPTION, 120), fontsize=6.5, va="bottom")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    _save(fig, path)
    return path


# ------------------------------------------------------------------------------------------------------
# (3) loss curves, (4) per-image values
# ------------------------------------------------------------------------------------------------------

LOSS_UNITS = {
    "iddpm": "IDDPM loss (its own units)",
    "it": "continuous bits/dim (IT bound)",
    "any_order": "discrete bits/dim (masked diffusion, I-MDCE)",
}


def plot_losses(panels: Mapping[str, Sequence[tuple[str, str, Sequence[tuple[float, float]]]]],
                path: Path) -> Path | None:
    """One panel per unit (``unit -> [(run, kind, [(step, value)])]``): train solid, held-out dashed;
    markers on series of fewer than 30 points (a single point is still drawn)."""
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    colours: dict[str, str] = {}
    for ax, (unit, series) in zip(axes[0], panels.items(), strict=True):
        for run, kind, points in series:
            colour = colours.setdefault(run, f"C{len(colours) % 10}")
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, "-" if kind == "train" else "--", color=colour,
                    marker="o" if len(points) < 30 else None, label=f"{run}: {kind}")
        ax.set_title(unit)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(unit)
        ax.legend(fontsize="small")
    fig.tight_layout()
    _save(fig, path)
    return path


def per_image_bpd(per_image: PerImage, dim: int, group: str | None = None) -> dict[str, np.ndarray]:
    """Per-image bits/dim of every estimate of ``group`` (default: the ensemble or the one model) and the
    VLBs of the first model: ``{metrics key: [B]}``."""
    out: dict[str, np.ndarray] = {}
    if per_image.estimates:
        group = group or per_image.groups[-1]
        for name, values in per_image.group(group).items():
            if "_mc_stderr" in name or name.endswith("_stderr"):
                continue
            out[name.removesuffix("_nats") + "_bpd" if name.endswith("_nats") else name] = (
                nats_to_bpd(values, dim).numpy() if name.endswith("_nats") else values.numpy())
    for key in ("vlb_bpd", "vlb_continuous_bpd"):
        if key in per_image.member_values:
            out[key] = per_image.member_values[key][0].numpy()
    return out


def plot_per_image(values: Mapping[str, Mapping[str, np.ndarray]], path: Path) -> Path | None:
    """Histograms of per-image IT bits/dim (one colour per run) and IT-vs-VLB scatter (discrete: IT
    discrete against the VLB, both bits/dim of the 8-bit images; the diagonal marks equality)."""
    runs = {k: v for k, v in values.items() if v}
    if not runs:
        return None
    plt = _pyplot()
    fig, (h1, h2, sc) = plt.subplots(1, 3, figsize=(17, 4.5))
    for k, (label, v) in enumerate(runs.items()):
        for ax, key in ((h1, "it_continuous_bpd"), (h2, "it_discrete_bpd")):
            if key in v:
                ax.hist(v[key], bins=min(30, max(5, len(v[key]) // 2)), alpha=0.5, color=f"C{k % 10}",
                        label=label)
        if "it_discrete_bpd" in v and "vlb_bpd" in v:
            sc.scatter(v["vlb_bpd"], v["it_discrete_bpd"], s=10, color=f"C{k % 10}", label=label)
    h1.set_title("per-image IT continuous")
    h2.set_title("per-image IT discrete (with tails)")
    for ax in (h1, h2):
        ax.set_xlabel("bits/dim")
        ax.set_ylabel("images")
        ax.legend(fontsize="small")
    lims = sc.get_xlim() + sc.get_ylim()
    lo, hi = min(lims), max(lims)
    sc.plot([lo, hi], [lo, hi], "k:", lw=0.8)
    sc.set_xlabel("VLB (discrete), bits/dim")
    sc.set_ylabel("IT discrete, bits/dim")
    sc.set_title("per image: IT against VLB")
    if runs and any("vlb_bpd" in v for v in runs.values()):
        sc.legend(fontsize="small")
    fig.tight_layout()
    _save(fig, path)
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


def plot_pixel_maps(maps: Mapping[str, PixelMapData], path: Path, max_images: int = 4) -> Path | None:
    """Rows: images. Columns: the image, then for each run (e.g. base, tuned) its bits per pixel and its
    log-SNR band, and for two runs their difference (second − first) in bits."""
    if not maps:
        return None
    plt = _pyplot()
    runs = list(maps.items())
    first = runs[0][1]
    n = min(max_images, len(first.index))
    diff = len(runs) == 2 and np.array_equal(runs[0][1].index, runs[1][1].index)
    cols = 1 + 2 * len(runs) + int(diff)
    fig, axes = plt.subplots(n, cols, figsize=(2.3 * cols, 2.3 * n + 0.6), squeeze=False)
    bit_max = max(float(np.abs(m.bits[:n]).max()) for _, m in runs)
    band_lo = min(float(m.band[:n].min()) for _, m in runs)
    band_hi = max(float(m.band[:n].max()) for _, m in runs)
    for i in range(n):
        axes[i, 0].imshow(first.images[i])
        axes[i, 0].set_title(f"test image {first.index[i]}", fontsize=7)
        for r, (label, m) in enumerate(runs):
            im = axes[i, 1 + 2 * r].imshow(m.bits[i], cmap="magma", vmin=min(0.0, float(m.bits[:n].min())),
                                           vmax=bit_max)
            axes[i, 1 + 2 * r].set_title((f"{label}\n" if i == 0 else "") + f"bits: {m.total_bits[i]:.0f}",
                                         fontsize=7)
            fig.colorbar(im, ax=axes[i, 1 + 2 * r], fraction=0.046)
            im = axes[i, 2 + 2 * r].imshow(m.band[i], cmap="viridis", vmin=band_lo, vmax=band_hi)
            axes[i, 2 + 2 * r].set_title((f"{label}\n" if i == 0 else "") + "log-SNR band", fontsize=7)
            fig.colorbar(im, ax=axes[i, 2 + 2 * r], fraction=0.046)
        if diff:
            delta = runs[1][1].bits[i] - runs[0][1].bits[i]
            lim = float(np.abs(delta).max()) or 1.0
            im = axes[i, -1].imshow(delta, cmap="RdBu_r", vmin=-lim, vmax=lim)
            axes[i, -1].set_title(("second − first\n" if i == 0 else "") + f"{delta.sum():+.0f} bits",
                                  fontsize=7)
            fig.colorbar(im, ax=axes[i, -1], fraction=0.046)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("−log2 p(x) per pixel (channels summed; sums to the image's continuous estimate) and the "
                 "log-SNR its information comes from", fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return path


# ------------------------------------------------------------------------------------------------------


def _marker(values) -> str | None:
    return "o" if len(values) < 30 else None


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    from itdiffusion.io import atomic_write

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    _pyplot().close(fig)
