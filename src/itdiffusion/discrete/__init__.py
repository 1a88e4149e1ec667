"""Masked (absorbing) diffusion: I-MDCE / I-MDSE likelihood estimators (Jeon et al., 2025), exact
discrete distributions to test them against, and CIFAR-10 images as sub-pixel tokens (the network:
:mod:`itdiffusion.models.masked_unet`).

All estimates are per-sequence nats; ``MaskedEstimate.bpd(dim)`` converts to bits/dim.
"""

from .estimators import (
    SCHEDULES,
    MaskedEstimate,
    any_order_loss,
    conditional_nll,
    coupled_log_ratio,
    imdse_nll,
    masked_nll,
    time_free_nll,
    time_integral_nll,
)
from .exact import ExactScore, IndependentCategorical, JointTable, MarkovChain
from .masking import MaskedDenoiser, harmonic_number, vocab_size_of
from .pixels import (
    bottom_given_top_nll,
    bottom_half,
    corrupt_images,
    corrupted_log_ratio,
    masked_pixel_metrics,
)
from .tokens import images_to_tokens, tokens_to_images

__all__ = [
    "SCHEDULES",
    "ExactScore",
    "IndependentCategorical",
    "JointTable",
    "MarkovChain",
    "MaskedDenoiser",
    "MaskedEstimate",
    "any_order_loss",
    "bottom_given_top_nll",
    "bottom_half",
    "conditional_nll",
    "corrupt_images",
    "corrupted_log_ratio",
    "coupled_log_ratio",
    "harmonic_number",
    "images_to_tokens",
    "imdse_nll",
    "masked_nll",
    "masked_pixel_metrics",
    "time_free_nll",
    "time_integral_nll",
    "tokens_to_images",
    "vocab_size_of",
]
