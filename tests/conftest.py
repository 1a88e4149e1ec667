"""Shared fixtures: Hydra composition with every path inside a temporary folder, synthetic datasets."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from itdiffusion.stages import CONFIG_DIR, register_configs

register_configs()  # what each stage's main does before Hydra composes (tests compose configs themselves)

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slurm`` need a running SLURM: they run only when selected (``-m slurm``,
    ``make test-slurm``), never in a plain ``pytest`` or ``make test``."""
    if "slurm" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="needs a SLURM cluster: make test-slurm (scripts/local_slurm.sh up)")
    for item in items:
        if item.get_closest_marker("slurm") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """The suite's tensors and convolutions are small: one thread is fastest on the 2-core CI machine
    and does not fight subprocesses (torchrun, CLI stages) started by other tests."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def path_overrides(root: Path) -> list[str]:
    return [
        f"paths.data_dir={root / 'data'}",
        f"paths.checkpoint_dir={root / 'checkpoints'}",
        f"paths.output_dir={root / 'outputs'}",
    ]


@pytest.fixture
def make_cfg(tmp_path):
    """``make_cfg(*overrides)``: the composed config with data, checkpoints and outputs under tmp_path."""

    def make(*overrides: str):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose("config", overrides=[*path_overrides(tmp_path), "logger=none", *overrides])

    return make


def run_cli(
    module: str, *overrides: str, cwd: Path, env: dict | None = None, torchrun: int = 0, timeout: float = 300
):
    """``python -m itdiffusion.stages.<module> overrides...`` in ``cwd`` (under torchrun with that many
    processes if ``torchrun``); returns the CompletedProcess."""
    import subprocess

    full_env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "WANDB_SILENT": "true", **(env or {})}
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
    return subprocess.run(
        [*launcher, "-m", f"itdiffusion.stages.{module}", *overrides],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def random_images(n: int, seed: int = 0, size: int = 32) -> np.ndarray:
    """uint8 [n, size, size, 3] with smooth structure (a random colour ramp plus noise per image)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size)[None, :, None, None] * rng.uniform(0, 255, (n, 1, 1, 3))
    noise = rng.normal(0, 20, (n, size, size, 3))
    return np.clip(ramp + noise + rng.uniform(0, 100, (n, 1, 1, 3)), 0, 255).astype(np.uint8)


def write_cifar_pickles(root: Path, train: np.ndarray, test: np.ndarray) -> Path:
    """CIFAR-10's python format: data_batch_1..5 (train split in five parts), test_batch, batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def dump(name: str, images: np.ndarray) -> None:
        rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # CIFAR rows: R plane, G plane, B plane
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rows, "labels": [0] * len(images)}, f)

    for k, part in enumerate(np.array_split(train, 5), start=1):
        dump(f"data_batch_{k}", part)
    dump("test_batch", test)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return folder


def write_png_folder(folder: Path, images: np.ndarray) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = folder / f"img_{i:05d}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


# Tiny end-to-end settings: 4 test crops, 4 log-SNR points, a 4-step chain, a diagonal reference.
TINY = [
    "experiment=smoke",
    "device=cpu",
    "logger=none",
    "data.patches_per_photo=8",
    "data.stats_images=40",
    "data.stats_diagonal=true",
    "data.num_images=4",
    "estimator.npoints=4",
    "estimator.pixel_map_points=8",
    "estimator.batch_size=16",
    "model.diffusion_steps=4",
    "estimator.vlb_steps_per_batch=4",
]


def random_tiny_unet(seed: int = 0):
    """iddpm_tiny with every weight random: improved-diffusion zero-initialises its output layers (eps_hat = 0
    for any other weights), so those get small random values too."""
    import torch
    from omegaconf import OmegaConf

    from itdiffusion.models.iddpm import build_model_and_diffusion

    torch.manual_seed(seed)
    model, _ = build_model_and_diffusion(OmegaConf.load(Path(CONFIG_DIR) / "model" / "iddpm_tiny.yaml"))
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.normal_(0.0, 0.05)
    return model


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Two iddpm_tiny checkpoints of :func:`random_tiny_unet` (plain state_dicts): two different networks
    predicting nonzero noise."""
    import torch

    folder = tmp_path_factory.mktemp("tiny_checkpoints")
    paths = []
    for seed in (0, 1):
        paths.append(folder / f"tiny_{seed}.pt")
        torch.save(random_tiny_unet(seed).state_dict(), paths[-1])
    return paths


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One reference cache for the whole session (the reference of the TINY patches is computed once)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def optimistic_pilot(monkeypatch):
    """The dataset budget's pilot says the fewest points (4) reach every target, whatever the variances:
    the main run then misses its targets and the top-ups must correct it."""
    import dataclasses

    from itdiffusion.stages import budget_pilot

    real = budget_pilot.choose_k
    monkeypatch.setattr(budget_pilot, "choose_k",
                        lambda *a, **kw: dataclasses.replace(real(*a, **kw), k=4, reached=True))
