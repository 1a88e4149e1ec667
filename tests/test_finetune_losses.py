"""Per-image seeding of the training losses: an image's loss must not depend on its batch, so that
N DDP processes see the same noise as one process with N times the batch."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from itdiffusion.models.iddpm import build_model_and_diffusion, iddpm_training_loss

CONF = Path(__file__).resolve().parent.parent / "conf"


def tiny_unet(**overrides):
    cfg = OmegaConf.merge(OmegaConf.load(CONF / "model" / "iddpm_tiny.yaml"), overrides)
    torch.manual_seed(0)
    model, diffusion = build_model_and_diffusion(cfg)
    with torch.no_grad():  # give the zero-initialised output layers weights too
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return cfg, model, diffusion


def images(n: int) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_iddpm_loss_with_image_seeds_draws_each_images_step_and_noise_from_its_seed():
    _, model, diffusion = tiny_unet(diffusion_steps=50)
    x, seeds = images(3), torch.tensor([11, 22, 33])
    # the draws written out: timestep, then noise, from a generator seeded with the image's seed
    gens = [torch.Generator().manual_seed(s) for s in (11, 22, 33)]
    t = torch.cat([torch.randint(0, 50, (1,), generator=g) for g in gens])
    noise = torch.stack([torch.randn(3, 32, 32, generator=g) for g in gens])
    with torch.no_grad():
        ref = diffusion.training_losses(model, x, t, noise=noise)["loss"]
        batch = iddpm_training_loss(model, diffusion, x, image_seeds=seeds)
        alone = torch.cat([iddpm_training_loss(model, diffusion, x[i:i + 1], image_seeds=seeds[i:i + 1])
                           for i in range(3)])
    torch.testing.assert_close(batch, ref)
    torch.testing.assert_close(alone, batch, rtol=1e-5, atol=1e-6)
