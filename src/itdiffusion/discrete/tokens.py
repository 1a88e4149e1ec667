"""Images as token sequences: an image uint8 [3, s, s] is ``image.flatten()`` (channel-major, L = 3 s^2
tokens over V = 256 values)."""

from __future__ import annotations

import torch
from torch import Tensor

CHANNELS = 3


def images_to_tokens(images: Tensor) -> Tensor:
    """uint8 images [B, 3, s, s] -> tokens Long[B, 3 s^2] (channel-major flatten)."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != CHANNELS:
        raise ValueError(f"expected uint8 images [B, 3, s, s], got {images.dtype} {tuple(images.shape)}")
    return images.reshape(images.shape[0], -1).long()


def tokens_to_images(tokens: Tensor, image_size: int) -> Tensor:
    """Inverse of ``images_to_tokens`` (clean tokens only)."""
    return tokens.reshape(tokens.shape[0], CHANNELS, image_size, image_size).to(torch.uint8)
