"""Training objectives, one class per objective (EDM's habit): ``loss(net, x, seeds) -> Tensor[B]``.

``net`` is the module being trained (a family's :meth:`~itdiffusion.models.families.Family.build`), ``x``
images in [-1, 1] (``x = p / 127.5 - 1``), ``seeds`` one integer per image: every image's randomness comes
from its own seed, so its loss does not depend on its batch. A family lists the objectives it trains with
(:attr:`~itdiffusion.models.families.Family.objectives`, keyed by ``finetune.objective``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from itdiffusion.discrete import any_order_loss, images_to_tokens
from itdiffusion.information import GaussianReference, it_loss
from itdiffusion.models.iddpm import iddpm_training_loss


class Objective:
    """Built from the family, the model config, the family's diffusion (or None) and the Gaussian reference
    (None unless :attr:`needs_reference`)."""

    nll: ClassVar[bool]  # an upper bound on -log p(x) in nats per image (the loss curve's bits/dim)
    needs_reference: ClassVar[bool] = False

    def __init__(self, family: Any, model_cfg: Any, diffusion: Any, reference: GaussianReference | None):
        self.family, self.model_cfg, self.diffusion, self.reference = family, model_cfg, diffusion, reference

    def __call__(self, net: nn.Module, x: Tensor, seeds: Tensor) -> Tensor:
        raise NotImplementedError


class ITLoss(Objective):
    """The continuous IT bound with one log-SNR per image, in nats per image:
    ``h_G + (1/2) w(a) [||eps - eps_hat(z, a)||^2 - mmse_G(a)]``, ``a ~ q``, ``w = 1/q``
    (:func:`itdiffusion.information.it_loss`), through the family's denoiser."""

    nll = True
    needs_reference = True

    def __call__(self, net: nn.Module, x: Tensor, seeds: Tensor) -> Tensor:
        denoiser = self.family.denoiser(self.family.network(net, self.model_cfg), self.model_cfg)
        return it_loss(denoiser, x, self.reference, image_seeds=seeds)


class IDDPMLoss(Objective):
    """IDDPM's own training loss, one timestep per image
    (:func:`itdiffusion.models.iddpm.iddpm_training_loss`)."""

    nll = False

    def __call__(self, net: nn.Module, x: Tensor, seeds: Tensor) -> Tensor:
        return iddpm_training_loss(net, self.diffusion, x, image_seeds=seeds)


def model_range_to_tokens(x: Tensor) -> Tensor:
    """Images in [-1, 1] (``x = p / 127.5 - 1``) -> their sub-pixel tokens Long[B, 3 s^2] (exact inverse)."""
    pixels = ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return images_to_tokens(pixels)


class AnyOrderLoss(Objective):
    """The any-order (time-free I-MDCE) loss of a masked-pixel model, an upper bound on -log P(x) in nats
    per image (every sub-pixel a token), one random mask per image
    (:func:`itdiffusion.discrete.any_order_loss`)."""

    nll = True

    def __call__(self, net: nn.Module, x: Tensor, seeds: Tensor) -> Tensor:
        return any_order_loss(net, model_range_to_tokens(x), image_seeds=seeds.tolist())
