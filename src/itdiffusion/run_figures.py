"""Figures of runs rather than of log-SNR: fine-tuning losses and per-image bits/dim."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from itdiffusion.artifacts import PerImage
from itdiffusion.figure_files import MODEL_COLOURS, pyplot, save
from itdiffusion.units import nats_to_bpd

LOSS_UNITS = {
    "iddpm": "IDDPM loss (its own units)",
    "it": "continuous bits/dim (IT bound)",
    "any_order": "discrete bits/dim (masked diffusion, I-MDCE)",
}


def plot_losses(panels: Mapping[str, Sequence[tuple[str, str, Sequence[tuple[float, float]]]]],
                path: Path) -> Path | None:
    """One row per run, one column per unit (``unit -> [(run, kind, [(step, value)])]``), so runs of
    different lengths keep their own step axes: train solid blue, held-out dashed orange; markers on series
    of fewer than 30 points (a single point is still drawn)."""
    if not panels:
        return None
    plt = pyplot()
    runs = list(dict.fromkeys(run for series in panels.values() for run, _, _ in series))
    units = list(panels)
    fig, axes = plt.subplots(len(runs), len(units), figsize=(6 * len(units), 3.6 * len(runs)), squeeze=False,
                             layout="constrained")
    styles = {"train": ("C0", "-"), "heldout": ("C1", "--")}
    for c, unit in enumerate(units):
        for r, run in enumerate(runs):
            ax = axes[r, c]
            series = [(kind, points) for name, kind, points in panels[unit] if name == run]
            if not series:
                ax.set_axis_off()
                continue
            for kind, points in series:
                colour, style = styles.get(kind, ("C2", "-."))
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, style, color=colour, marker="o" if len(points) < 30 else None,
                        label=kind)
            ax.set_title(f"{run}: {unit}", fontsize="medium")
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(unit)
            ax.legend(fontsize="small")
    save(fig, path)
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
    plt = pyplot()
    fig, (h1, h2, sc) = plt.subplots(1, 3, figsize=(17, 4.8), layout="constrained")
    for ax, key in ((h1, "it_continuous_bpd"), (h2, "it_discrete_bpd")):
        pooled = [np.asarray(v[key], dtype=float) for v in runs.values() if key in v]
        if not pooled:
            continue
        edges = np.histogram_bin_edges(np.concatenate(pooled),  # the same bins for every run
                                       bins=min(30, max(5, max(len(p) for p in pooled) // 2)))
        for k, (label, v) in enumerate(runs.items()):
            if key in v:
                ax.hist(v[key], bins=edges, histtype="step", lw=1.8,
                        color=MODEL_COLOURS[k % len(MODEL_COLOURS)], label=label)
    for k, (label, v) in enumerate(runs.items()):
        if "it_discrete_bpd" in v and "vlb_bpd" in v:
            sc.scatter(v["vlb_bpd"], v["it_discrete_bpd"], s=10, color=MODEL_COLOURS[k % len(MODEL_COLOURS)],
                       label=label)
    h1.set_title("per-image IT continuous")
    h2.set_title("per-image IT discrete (with tails)")
    for ax in (h1, h2):
        ax.set_xlabel("bits/dim")
        ax.set_ylabel("images")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    sc.set_xlabel("VLB (discrete), bits/dim")
    sc.set_ylabel("IT discrete, bits/dim")
    sc.set_title("per image: IT against VLB")
    if sc.get_legend_handles_labels()[0]:
        lims = sc.get_xlim() + sc.get_ylim()
        sc.plot([min(lims), max(lims)], [min(lims), max(lims)], "k:", lw=0.8)
        sc.legend(fontsize="small")
    else:  # e.g. runs with estimator.vlb=false: say so rather than draw an empty diagonal
        sc.text(0.5, 0.5, "no run has both per-image\nVLB and IT discrete values", ha="center",
                va="center", transform=sc.transAxes)
    save(fig, path)
    return path
