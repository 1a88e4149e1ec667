"""Evaluate run dirs for report tests without a network: per-image values made to give chosen table numbers.

The report recomputes every number of a ``metrics.json`` from its ``per_image.npz``
(:func:`itdiffusion.summary.summarize`), so a fake run must hold per-image values whose means and standard
errors are the numbers a test wants in its table.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from itdiffusion.artifacts import IT_ESTIMATES, MASKED_ESTIMATES, PerImage, commit_evaluation
from itdiffusion.summary import summarize


def values_with(mean: float, stderr: float | None, n: int) -> torch.Tensor:
    """``n`` values whose mean is ``mean`` and whose standard error (ddof=1) is ``stderr`` (0 if None)."""
    z = torch.linspace(-1.0, 1.0, n, dtype=torch.float64)
    z = z / z.std(unbiased=True) if n > 1 else z
    return mean + (stderr or 0.0) * math.sqrt(n) * z


def per_image_for(numbers: dict, num_images: int, dim: int, base: PerImage | None = None) -> PerImage:
    """``base`` (default: ``num_images`` images, no curves) with per-image values that give ``numbers``
    (``<estimate>_bpd`` and ``_bpd_stderr`` metrics keys; ``network_evals``) as dataset means."""
    per_image = base or PerImage(index=torch.arange(num_images))
    n = per_image.num_images
    nats = dim * math.log(2)
    for name in IT_ESTIMATES:
        if numbers.get(f"{name}_bpd") is not None:
            bpd = values_with(numbers[f"{name}_bpd"], numbers.get(f"{name}_bpd_stderr"), n)
            per_image.estimates[f"{name}_nats"] = (bpd * nats)[None]
            per_image.estimates[f"{name}_mc_stderr_nats"] = torch.zeros(1, n, dtype=torch.float64)
    for key in MASKED_ESTIMATES:
        if numbers.get(key) is not None:
            per_image.estimates[key] = values_with(numbers[key], numbers.get(f"{key}_stderr"), n)[None]
    for key in ("vlb_bpd", "vlb_continuous_bpd"):
        if numbers.get(key) is not None:
            per_image.member_values[key] = values_with(numbers[key], numbers.get(f"{key}_stderr"), n)[None]
    evals = numbers.get("network_evals") or 0
    per_image.member_values["network_evals"] = torch.full((1, n), evals / n, dtype=torch.float64)
    return per_image


def commit_fake_evaluation(run_dir: Path, metrics: dict, base: PerImage | None = None) -> dict:
    """Write ``run_dir`` as the evaluate stage does: ``metrics`` with its numbers recomputed by the stage's
    summary from per-image values made to give them (``num_images`` images, ``dim`` default 3072)."""
    dim = int(metrics.get("dim") or 3072)
    per_image = per_image_for(metrics, int(metrics.get("num_images") or 4), dim, base)
    run_dir.mkdir(parents=True, exist_ok=True)
    return commit_evaluation(run_dir, per_image, {**metrics, "dim": dim, **summarize(per_image, dim)})
