"""A masked denoiser over CIFAR-style images: every sub-pixel is a token
(:mod:`itdiffusion.discrete.tokens`), L = 3 s^2 tokens over V = 256 values; the mask id is 256. The
network is improved-diffusion's ``UNetModel``: each channel's tokens go through their own embedding
table (V + 1 rows, ``embed_dim`` wide), the 3 embeddings are stacked as 3 * embed_dim input channels,
and the U-Net returns 3 * V output channels, V logits per sub-pixel. Its "timestep" is the masked
fraction times 1000 (improved-diffusion's timestep range).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from itdiffusion.discrete.tokens import CHANNELS
from itdiffusion.models.upstream import improved_diffusion

_TIMESTEP_SCALE = 1000.0
# improved-diffusion's channel multipliers per image size (script_util.create_model)
_CHANNEL_MULT = {32: (1, 2, 2, 2), 64: (1, 2, 2, 2), 128: (1, 1, 2, 2, 2), 256: (1, 1, 2, 2, 2, 2)}


class MaskedPixelUNet(nn.Module):
    """``forward(tokens Long[B, 3 s^2]) -> logits [B, 3 s^2, V]``, the ``MaskedDenoiser`` protocol."""

    def __init__(self, unet: nn.Module, *, image_size: int, vocab_size: int, embed_dim: int):
        super().__init__()
        self.unet = unet
        self.image_size = image_size
        self.vocab_size = vocab_size
        self.embed_dim = embed_dim
        self.embed = nn.Embedding(CHANNELS * (vocab_size + 1), embed_dim)
        self.register_buffer("channel_offset", torch.arange(CHANNELS) * (vocab_size + 1), persistent=False)

    @property
    def length(self) -> int:
        return CHANNELS * self.image_size**2

    def forward(self, tokens: Tensor) -> Tensor:
        batch, s, v = tokens.shape[0], self.image_size, self.vocab_size
        if tokens.shape[1:] != (self.length,):
            raise ValueError(f"expected tokens [B, {self.length}], got {tuple(tokens.shape)}")
        grid = tokens.reshape(batch, CHANNELS, s, s) + self.channel_offset[:, None, None]
        h = self.embed(grid).permute(0, 1, 4, 2, 3).reshape(batch, CHANNELS * self.embed_dim, s, s)
        masked_fraction = (tokens == v).float().mean(dim=1)
        out = self.unet(h, masked_fraction * _TIMESTEP_SCALE)  # [B, 3 V, s, s]
        return out.reshape(batch, CHANNELS, v, s, s).permute(0, 1, 3, 4, 2).reshape(batch, self.length, v)


def build_masked_pixel_model(model_cfg) -> MaskedPixelUNet:
    """A ``MaskedPixelUNet`` from a ``MaskedPixelsModelConfig`` (any mapping with its keys)."""
    if model_cfg.kind != "masked_pixels":
        raise ValueError(f"build_masked_pixel_model needs model.kind=masked_pixels, got {model_cfg.kind!r}")
    size = model_cfg.image_size
    if size not in _CHANNEL_MULT:
        raise ValueError(f"unsupported image_size {size}; improved-diffusion's U-Net supports "
                         f"{list(_CHANNEL_MULT)}")
    unet = improved_diffusion().unet.UNetModel(
        in_channels=CHANNELS * model_cfg.embed_dim,
        model_channels=model_cfg.num_channels,
        out_channels=CHANNELS * model_cfg.vocab_size,
        num_res_blocks=model_cfg.num_res_blocks,
        attention_resolutions=tuple(size // int(r) for r in str(model_cfg.attention_resolutions).split(",")),
        dropout=model_cfg.dropout,
        channel_mult=_CHANNEL_MULT[size],
        use_checkpoint=model_cfg.use_checkpoint,
        num_heads=model_cfg.num_heads,
        num_heads_upsample=model_cfg.num_heads_upsample,
        use_scale_shift_norm=model_cfg.use_scale_shift_norm,
    )
    return MaskedPixelUNet(unet, image_size=size, vocab_size=model_cfg.vocab_size,
                           embed_dim=model_cfg.embed_dim)
