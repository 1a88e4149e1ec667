"""A model family registered in a plug-in module alone (ITDIFFUSION_PLUGINS) goes through the real
evaluate and finetune command lines: the stages know no family by name.

The toy family: x ~ N(0, s^2 I) in the model range, one trainable parameter log s, and its exact denoiser
E[eps | z] = sigma z / (alpha^2 s^2 + sigma^2) (alpha^2 = sigmoid(a), sigma^2 = sigmoid(-a)). Ground truth:
the IT estimate of a model with its exact denoiser is its own -log p(x) (I-MMSE), here the closed form
d/2 log(2 pi s^2) + ||x||^2 / (2 s^2) nats.
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

from itdiffusion.config import ModelConfig
from itdiffusion.models import families
from itdiffusion.models.objectives import ITLoss


@dataclass
class ToyGaussConfig(ModelConfig):
    kind: str = "toy_gauss"
    scale: float = 1.0  # the initial s


class LogScale(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(float(scale)).log())


class ExactDenoiser(nn.Module):
    def __init__(self, network):
        super().__init__()
        self.network = network

    def forward(self, z, logsnr):
        a = logsnr.to(z.dtype).view(-1, *([1] * (z.dim() - 1)))
        alpha2, sigma2 = torch.sigmoid(a), torch.sigmoid(-a)
        s2 = (2 * self.network.log_scale).exp().to(z.dtype)
        return sigma2.sqrt() * z / (alpha2 * s2 + sigma2)


class ToyGaussFamily(families.Family):
    kind = "toy_gauss"
    schema = ToyGaussConfig
    objectives = {"it": ITLoss}
    vlb = False

    def build(self, model_cfg):
        return LogScale(model_cfg.scale), None

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


def _run(stage, plugin, tmp_path, *overrides):
    env = {"ITDIFFUSION_PLUGINS": "toy_gauss_family",
           "PYTHONPATH": f"{Path(__file__).resolve().parents[1] / 'src'}:{plugin}"}
    common = [f"hydra.searchpath=[file://{plugin / 'conf'}]", "model=toy_gauss", "data=patches",
              "data.patches_per_photo=8", "data.stats_images=32", "data.stats_diagonal=true",
              "data.num_workers=0", "device=cpu", "logger=none", f"paths.output_dir={tmp_path / 'out'}",
              f"paths.checkpoint_dir={tmp_path / 'ckpt'}"]
    return run_cli(stage, *common, *overrides, cwd=tmp_path, env=env)


def _test_images(tmp_path_or_cfg):
    from hydra import compose, initialize_config_dir

    from itdiffusion.data import load_images, to_model_range
    from itdiffusion.stages import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["data=patches", "data.patches_per_photo=8", "data.num_images=6"])
    test = load_images(cfg.data, "test")
    return to_model_range(torch.stack([test[i][0] for i in range(len(test))])).double()


def _closed_form_bpd(x: torch.Tensor, s: float) -> np.ndarray:
    d = x[0].numel()
    nats = 0.5 * d * math.log(2 * math.pi * s * s) + x.flatten(1).square().sum(1) / (2 * s * s)
    return (nats / (d * math.log(2))).numpy()


def test_a_plugin_family_is_evaluated_and_fine_tuned_through_the_command_line(plugin, tmp_path):
    weights = tmp_path / "s.pt"
    torch.save({"log_scale": torch.tensor(0.4).log()}, weights)  # s = 0.4
    proc = _run("evaluate", plugin, tmp_path, "run_id=toy", f"model.checkpoint={weights}",
                "estimator.vlb=false", "estimator.npoints=512", "data.num_images=6", "estimator.pixel_maps=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(next((tmp_path / "out").rglob("metrics.json")).read_text())
    expected = _closed_form_bpd(_test_images(tmp_path), 0.4).mean()
    stderr = metrics["it_continuous_bpd_mc_stderr"]
    print("toy evaluate:", metrics["it_continuous_bpd"], expected, stderr)
    assert metrics["it_continuous_bpd"] == pytest.approx(expected, abs=4 * stderr + 0.01)

    proc = _run("finetune", plugin, tmp_path, "run_id=tune", "finetune.objective=it",
                "finetune.init=scratch", "model.scale=0.05", "finetune.epochs=1", "finetune.max_steps=20",
                "finetune.batch_size=8", "finetune.lr=0.05", "finetune.heldout_images=4",
                "data.num_train_images=64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = torch.load(next((tmp_path / "ckpt" / "finetune").rglob("model.pt")), weights_only=True)
    learned = exported["log_scale"].exp().item()
    # the IT loss in expectation is -log N(x; 0, s^2 I): gradient steps move s from 0.05 towards the
    # training images' RMS in the model range
    rms = _test_images(tmp_path).square().mean().sqrt().item()
    assert 0.05 < learned and abs(learned - rms) < abs(0.05 - rms)


def test_a_plugin_that_cannot_be_imported_is_one_message(plugin, tmp_path):
    env = {"ITDIFFUSION_PLUGINS": "no_such_family_module"}
    proc = run_cli("evaluate", "logger=none", cwd=tmp_path, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: ITDIFFUSION_PLUGINS: cannot import 'no_such_family_module' (No module named "
        "'no_such_family_module')"]
