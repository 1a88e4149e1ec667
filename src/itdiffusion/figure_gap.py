"""The MMSE gap figure: what the continuous estimate integrates, binned over log-SNR so that its area gives
the table's number (the binning: :mod:`itdiffusion.figures`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from itdiffusion.artifacts import ENSEMBLE, PerImage
from itdiffusion.figure_files import marker, pyplot, save, wrap
from itdiffusion.figures import make_bins, reference_mmse
from itdiffusion.units import nats_to_bpd

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
