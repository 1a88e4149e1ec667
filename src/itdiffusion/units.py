"""Unit conversions, written once.

Estimators return nats per sample. Reports use bits per dimension:

    bits/dim = nats / (d * ln 2)

CIFAR-10 pixels p in {0..255} are scaled to x = p / 127.5 - 1 in [-1, 1], a lattice of spacing
``PIXEL_BIN = 2/255``. A continuous density on [-1, 1]^d relates to a discrete probability of the
bin it falls in by  -log2 P(bin) ~ -log2 p(x) - d log2(PIXEL_BIN), i.e. per dimension
``bpd_discrete ~ bpd_continuous + DEQUANT_OFFSET_BPD`` with ``DEQUANT_OFFSET_BPD = log2(127.5)``
(about 6.994 bits/dim). Continuous bits/dim of CIFAR-10 are therefore negative (about -4).
"""

from __future__ import annotations

import math

import torch

LN2 = math.log(2.0)
PIXEL_BIN = 2.0 / 255.0
XINTERVAL = (-1.0, 1.0)  # the model range of pixels: the lattice is -1 + PIXEL_BIN * k
DEQUANT_OFFSET_BPD = math.log2(127.5)
# A per-image estimate or a loss above this many bits/dim is absurd (8-bit images need at most 8): an
# evaluation stops, a fine-tuning run counts as diverged.
ABSURD_BPD = 1e3


def nats_to_bpd(nats, dim: int):
    """nats per sample -> bits per dimension (works on floats, numpy arrays and tensors)."""
    return nats / (dim * LN2)


def bpd_to_nats(bpd, dim: int):
    """bits per dimension -> nats per sample."""
    return bpd * (dim * LN2)


def mean_and_stderr(values) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n), ddof=1) of a 1-D array of i.i.d. values.

    Returns ``stderr = nan`` for fewer than two values, never a made-up zero.
    """
    t = torch.as_tensor(values, dtype=torch.float64).flatten()
    if t.numel() == 0:
        raise ValueError("mean_and_stderr: no values")
    mean = t.mean().item()
    if t.numel() < 2:
        return mean, float("nan")
    return mean, (t.std(unbiased=True) / math.sqrt(t.numel())).item()
