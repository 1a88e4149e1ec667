"""The one random-stream policy: every random draw of a stage comes from a seed hashed from
``(seed, index, stream, *more)``, so results do not depend on batching, sharding or process count.

``index`` is the dataset index of the image the draw belongs to (or a step / rank for process-wide
draws), ``stream`` one of :class:`Stream` (independent draws for independent purposes), ``more`` any
further coordinate (the epoch in training). The hash is numpy's ``SeedSequence`` (well mixed: nearby
inputs give unrelated seeds), truncated to 63 bits so that it fits ``torch.Generator.manual_seed``.
``SeedSequence`` ignores trailing zeros of its input, so every stream always passes the same number of
coordinates (training streams always pass the epoch).
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum

import numpy as np
import torch


class Stream(IntEnum):
    """Independent random streams. Values are part of the hash: never renumber an existing stream."""

    POINTS = 0  # evaluate: an image's log-SNR points and channel noise (and its dequantization noise)
    DEQUANT = 1  # evaluate (until format 1): the dequantization noise of an image
    VLB = 2  # evaluate: the VLB's per-timestep noise of an image
    MASKS = 3  # evaluate, masked models: I-MDCE masks
    CONDITIONAL = 4  # evaluate, masked models: masks of the conditional example
    CORRUPT = 5  # evaluate, masked models: corruption of the log-ratio example
    TRAIN_LOSS = 6  # finetune: an image's log-SNR and noise in the loss (per epoch)
    TRAIN_FLIP = 7  # finetune: an image's horizontal flip (per epoch)
    HELDOUT = 8  # finetune: the held-out loss's draws
    DROPOUT = 9  # finetune: the process RNG (dropout) from a step and rank
    PILOT_POINTS = 10  # evaluate, dataset budget: a pilot image's points and noise (more: the rung's K)
    PILOT_VLB = 11  # evaluate, dataset budget: a pilot image's sampled VLB steps and noise (more: the K)
    PIXEL_MAP = 12  # evaluate: a mapped image's own log-SNR points and noise (itdiffusion.pixel_maps)


def stream_seed(seed: int, index: int, stream: Stream | int, *more: int) -> int:
    """A 63-bit seed for ``(seed, index, stream, *more)``; distinct inputs give unrelated seeds."""
    hi, lo = np.random.SeedSequence([int(seed), int(index), int(stream), *map(int, more)]).generate_state(2)
    return ((int(hi) << 32) | int(lo)) & (2**63 - 1)


def stream_seeds(seed: int, indices: Iterable[int], stream: Stream | int, *more: int) -> list[int]:
    """:func:`stream_seed` of every index."""
    return [stream_seed(seed, int(i), stream, *more) for i in indices]


def stream_seed_tensor(seed: int, indices: torch.Tensor, stream: Stream | int, *more: int) -> torch.Tensor:
    """:func:`stream_seeds` as an int64 tensor (one per image of a batch)."""
    return torch.tensor(stream_seeds(seed, indices.tolist(), stream, *more), dtype=torch.int64)
