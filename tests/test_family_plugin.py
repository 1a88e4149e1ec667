"""A model family registered in a plug-in module alone (ITDIFFUSION_PLUGINS) goes through the real
evaluate and finetune command lines: the stages know no family by name.

The toy family: the diagonal Gaussian N(mu, diag(v) t^2) in the model range, ``mu`` and ``v`` stored
weights and one trainable parameter ``log t``, with its exact denoiser
E[eps | z] = sigma (z - alpha mu) / (alpha^2 v t^2 + sigma^2) (alpha^2 = sigmoid(a), sigma^2 = sigmoid(-a)).
Ground truth: the IT estimate of a model with its exact denoiser is its own -log p(x) (pointwise I-MMSE),
here 1/2 sum_i [log(2 pi v_i t^2) + (x_i - mu_i)^2 / (v_i t^2)] nats; and with mu, v the maximum-likelihood
fit of the training images, the IT loss is least at t = 1, so fine-tuning moves t towards 1.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli

TOY_MODULE = '''
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from itdiffusion.models.schemas import ModelConfig
from itdiffusion.models import families
from itdiffusion.models.objectives import ITLoss


@dataclass
class ToyGaussConfig(ModelConfig):
    kind: str = "toy_gauss"


class DiagonalGaussian(nn.Module):
    def __init__(self, image_size):
        super().__init__()
        self.register_buffer("mean", torch.zeros(3, image_size, image_size, dtype=torch.float64))
        self.register_buffer("var", torch.ones(3, image_size, image_size, dtype=torch.float64))
        self.log_t = nn.Parameter(torch.zeros((), dtype=torch.float64))


class ExactDenoiser(nn.Module):
    def __init__(self, network):
        super().__init__()
        self.network = network

    def forward(self, z, logsnr):
        net = self.network
        a = logsnr.to(torch.float64).view(-1, 1, 1, 1)
        alpha2, sigma2 = torch.sigmoid(a), torch.sigmoid(-a)
        w = net.var * (2 * net.log_t).exp()
        eps = sigma2.sqrt() * (z.to(torch.float64) - alpha2.sqrt() * net.mean) / (alpha2 * w + sigma2)
        return eps.to(z.dtype)


class ToyGaussFamily(families.Family):
    kind = "toy_gauss"
    schema = ToyGaussConfig
    objectives = {"it": ITLoss}
    vlb = False

    def build(self, model_cfg):
        return DiagonalGaussian(model_cfg.image_size), None

    def has_own_weights(self, model_cfg):
        return bool(model_cfg.checkpoint)

    def own_checkpoint(self, model_cfg, checkpoint_dir):
        return Path(model_cfg.checkpoint)

    def denoiser(self, network, model_cfg):
        return ExactDenoiser(network)


families.register(ToyGaussFamily())
'''

TOY_CONFIG = """\
# @package model
defaults:
  - /schema/model/toy_gauss@_here_
  - _self_
name: toy_gauss
"""


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin")
    (root / "toy_gauss_family.py").write_text(textwrap.dedent(TOY_MODULE))
    (root / "conf" / "model").mkdir(parents=True)
    (root / "conf" / "model" / "toy_gauss.yaml").write_text(TOY_CONFIG)
    return root


def _write_data(root: Path) -> dict[str, torch.Tensor]:
    """uint8 images well inside [0, 255] (pixel = 128 + offset + 12 N(0, 1)), so that no decoder output is
    clamped to the pixel range; returns them in the model range ``x = p / 127.5 - 1`` by split."""
    gen = torch.Generator().manual_seed(0)
    offset = torch.linspace(-24, 24, 32).view(1, 32, 1, 1)
    out = {}
    for split, n in (("train", 48), ("test", 6)):
        pixels = (128 + offset + 12 * torch.randn(n, 32, 32, 3, generator=gen)).round().clamp(0, 255)
        (root / "npz").mkdir(parents=True, exist_ok=True)
        np.savez(root / "npz" / f"{split}.npz", x=pixels.to(torch.uint8).numpy())
        out[split] = (pixels.double() / 127.5 - 1).permute(0, 3, 1, 2)
    return out


def _run(stage, plugin, tmp_path, *overrides):
    env = {"ITDIFFUSION_PLUGINS": "toy_gauss_family",
           "PYTHONPATH": f"{Path(__file__).resolve().parents[1] / 'src'}:{plugin}"}
    common = [f"hydra.searchpath=[file://{plugin / 'conf'}]", "model=toy_gauss", "data=npz",
              f"data.root={tmp_path / 'npz'}", "data.hflip=false", "data.num_workers=0",
              "data.stats_images=48", "data.stats_diagonal=true", "device=cpu", "logger=none",
              f"paths.output_dir={tmp_path / 'out'}", f"paths.checkpoint_dir={tmp_path / 'ckpt'}"]
    return run_cli(stage, *common, *overrides, cwd=tmp_path, env=env)


def _gaussian_bpd(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """-log N(x; mean, diag(var)) per image, in bits/dim (the closed form)."""
    nats = 0.5 * (torch.log(2 * math.pi * var) + (x - mean).square() / var).flatten(1).sum(1)
    return nats / (x[0].numel() * math.log(2))


def test_a_plugin_family_is_evaluated_and_fine_tuned_through_the_command_line(plugin, tmp_path):
    images = _write_data(tmp_path)
    train = images["train"]
    mean, var = train.mean(0), train.var(0, unbiased=False)  # the maximum-likelihood fit
    weights = tmp_path / "fit.pt"
    torch.save({"mean": mean, "var": var, "log_t": torch.zeros((), dtype=torch.float64)}, weights)
    proc = _run("evaluate", plugin, tmp_path, "run_id=toy", f"model.checkpoint={weights}",
                "estimator.vlb=false", "estimator.npoints=64", "data.num_images=6", "estimator.pixel_maps=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(next((tmp_path / "out").rglob("metrics.json")).read_text())
    expected = _gaussian_bpd(images["test"], mean, var).mean().item()
    stderr = metrics["it_continuous_bpd_mc_stderr"]
    assert metrics["it_continuous_bpd"] == pytest.approx(expected, abs=4 * stderr)

    start = tmp_path / "start.pt"  # the fit with its variances shrunk by t^2 = 0.3^2
    torch.save({"mean": mean, "var": var, "log_t": torch.tensor(0.3, dtype=torch.float64).log()}, start)
    proc = _run("finetune", plugin, tmp_path, "run_id=tune", "finetune.objective=it",
                f"finetune.init={start}",
                "finetune.epochs=2", "finetune.max_steps=10", "finetune.batch_size=8", "finetune.lr=0.05",
                "finetune.heldout_images=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(next((tmp_path / "out").rglob("finetune.json")).read_text())
    assert summary["steps"] == 10 and str(start) in summary["init"]
    exported = torch.load(summary["model_path"], weights_only=True)
    assert torch.equal(exported["mean"], mean) and torch.equal(exported["var"], var)  # buffers: not trained
    t = exported["log_t"].exp().item()
    assert 0.3 < t < 1.0 + 1e-6  # towards the likelihood's optimum t = 1, from 0.3


def test_a_plugin_that_cannot_be_imported_is_one_message(tmp_path):
    env = {"ITDIFFUSION_PLUGINS": "no_such_family_module"}
    proc = run_cli("evaluate", "logger=none", cwd=tmp_path, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: ITDIFFUSION_PLUGINS: cannot import 'no_such_family_module' (No module named "
        "'no_such_family_module')"]
