"""Tiny models, losses and data for the fine-tuning tests (CPU, milliseconds per step)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from itdiffusion.config import FinetuneConfig
from itdiffusion.training import Trainer

SIZE = 16
DIM = 3 * SIZE * SIZE


class TinyDenoiser(nn.Module):
    """Predicts the noise of z = 0.8 x + 0.6 eps; dropout draws from torch's global RNG."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Dropout(dropout),
                                 nn.Conv2d(8, 3, 3, padding=1))

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


def per_image_noise(seeds: Tensor, shape: torch.Size) -> Tensor:
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def denoising_loss(model: nn.Module, x: Tensor, seeds: Tensor) -> Tensor:
    """Per-image squared noise-prediction error; the noise of image i comes from seeds[i] only."""
    eps = per_image_noise(seeds, x.shape[1:]).to(x.device)
    eps_hat = model(0.8 * x + 0.6 * eps)
    return (eps_hat - eps).pow(2).flatten(1).sum(1)


def synthetic_images(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randint(0, 256, (n, 3, SIZE, SIZE), generator=g, dtype=torch.uint8))


BASE = FinetuneConfig(objective="it", epochs=2, batch_size=4, lr=1e-2, save_every_steps=2, heldout_images=8,
                      ema_decay=0.9, warmup_steps=3, seed=7)


def make_trainer(run_dir: Path, *, dropout: float = 0.1, n_train: int = 24, loss=denoising_loss,
                 on_step_end=None, **overrides) -> Trainer:
    """A trainer on 24 synthetic images (6 steps per epoch at batch 4), model initialised from seed 0."""
    torch.manual_seed(0)
    model = TinyDenoiser(dropout)
    torch.manual_seed(12345)  # a restarted process's global RNG differs; resuming must restore it
    return Trainer(model, loss, synthetic_images(n_train, seed=1), replace(BASE, **overrides), run_dir,
                   device=torch.device("cpu"), dim=DIM, heldout_set=synthetic_images(8, seed=2),
                   heldout_loss=denoising_loss, hflip=True, on_step_end=on_step_end)


