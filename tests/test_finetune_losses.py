"""Per-image seeding of the training losses: an image's loss must not depend on its batch, so that
N DDP processes see the same noise as one process with N times the batch."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from omegaconf import OmegaConf

from itdiffusion.denoisers import GaussianMixture
from itdiffusion.information import GaussianReference, it_loss
from itdiffusion.models.iddpm import build_model_and_diffusion, iddpm_training_loss
from itdiffusion.stages import CONFIG_DIR

CONF = Path(CONFIG_DIR)


def tiny_unet(**overrides):
    """The smoke U-Net (``iddpm_tiny``) with random weights everywhere."""
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
    torch.testing.assert_close(batch, ref)


def test_it_loss_with_image_seeds_is_unbiased_for_the_exact_nll():
    """Exact denoiser of a mixture (far from the Gaussian reference): mean loss over seeds = -log p(x)."""
    g = torch.Generator().manual_seed(0)
    mixture = GaussianMixture(1.5 * torch.randn(3, 2, dtype=torch.float64, generator=g),
                              0.3 + 0.7 * torch.rand(3, 2, dtype=torch.float64, generator=g),
                              torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    reference = GaussianReference.from_data(mixture.sample(20_000, g))
    x = mixture.sample(3, g)
    repeats = 6000
    seeds = torch.arange(3 * repeats)
    losses = it_loss(mixture, x.repeat(repeats, 1), reference, image_seeds=seeds).reshape(repeats, 3)
    mean, se = losses.mean(0), losses.std(0) / math.sqrt(repeats)
    truth = -mixture.log_prob(x)
    assert ((mean - truth).abs() < 3.5 * se).all(), f"{(mean - truth) / se}"
    alone = torch.cat([it_loss(mixture, x[i % 3:i % 3 + 1], reference, image_seeds=seeds[i:i + 1])
                       for i in range(6)])
    torch.testing.assert_close(alone, losses[:2].reshape(-1))

