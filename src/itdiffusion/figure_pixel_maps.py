"""The per-pixel information maps figure: each pixel's share of the continuous estimate, in bits
(:mod:`itdiffusion.pixel_maps` computes them)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from itdiffusion.figure_files import pyplot, save


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
