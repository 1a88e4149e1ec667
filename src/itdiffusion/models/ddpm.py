"""DDPM (Ho et al. 2020) through diffusers' ``UNet2DModel``, behind this project's interfaces.

The model family of ITD's DDPM rows: Hugging Face's ``google/ddpm-cifar10-32`` (a port of the original
CIFAR-10 DDPM), an eps-predicting ``UNet2DModel`` trained on DDPM's linear schedule,
``beta_i = linspace(1e-4, 0.02, 1000)`` (float64 as in the original code; diffusers' scheduler holds
the same values in float32), ``abar_i = prod_{j<=i} (1 - beta_j)``; the network's timestep ``i`` in
0..999 sees ``x_i = sqrt(abar_i) x + sqrt(1 - abar_i) eps``. The hub's ``scheduler_config.json`` says
``variance_type: fixed_large`` (sigma_t^2 = beta_t, the original CIFAR-10 setting); ITD's variational
benchmark uses the same (its improved-diffusion flags learn_sigma=False, sigma_small=False).

- :func:`build_unet`, :func:`load_unet_weights`, :func:`load_unet`: the U-Net from the config, weights
  from a diffusers directory or hub id (``from_pretrained``, the hub's cache honoured) or a ``.pt`` state
  dict (``weights_only=True``; the keys of ITD's fine-tuned file mapped by :func:`map_state_dict_keys`).
- :class:`DDPMNetwork`: ``forward(x, timesteps) -> eps`` with timesteps on improved-diffusion's
  rescaled scale (1000 per process), so that improved-diffusion's ``GaussianDiffusion`` and
  :func:`itdiffusion.variational.vlb` run it unchanged.
- :class:`DDPMDenoiser`: the Denoiser protocol ``(z, logsnr[B]) -> eps_hat``. A log-SNR maps to the
  continuous step index of the model's own discrete schedule,
  :func:`itdiffusion.models.schedules.tabulated_logsnr_to_step`: exact at every training step
  (``u = i`` where ``logit(abar_i) = logsnr``), ``log abar`` linear between steps and up to
  ``abar_{-1} = 1`` at ``u = -1``. ITD instead takes the nearest entry ``k`` of a 10,000-step table of
  the linear schedule rescaled to 10,000 steps and feeds ``0.1 k``. That table's ``abar`` at ``k`` is not
  the 1000-step one's at ``0.1 k`` (an offset of one table step, and the rescaled betas' ``log(1 - beta)``
  differ at second order), so at the noise level of training step i ITD feeds i + 0.5 to i + 3.9 (mean
  +1.7 steps over the 1000 steps); pinned in tests/test_ddpm_model.py.
- :func:`build_vlb_diffusion`: improved-diffusion's ``GaussianDiffusion`` for the variational bound:
  DDPM's betas rescaled to ``model.diffusion_steps`` steps (``linspace(1e-4 T/S, 0.02 T/S, S)``, IDDPM's
  rule: improved-diffusion's linear schedule), eps prediction, fixed variance, KL loss, timesteps rescaled.
  The paper's DDPM VLB (3.37 bits/dim) is ITD's benchmark run ``--diffusion_steps 4000 --noise_schedule
  linear`` (learn_sigma and sigma_small False, rescale_timesteps True): a 4000-step chain over the same
  process whose step t is fed to the 1000-step network as timestep t/4 (0.43 to 3.3 steps more than the
  step of the network's schedule with the same noise level, for the reasons above). That is our default
  (``diffusion_steps: 4000``, same timesteps); ``diffusion_steps: 1000`` is the model's own discrete chain.
- :func:`load_ddpm`: everything an evaluation needs (network, diffusion, denoiser, checkpoint, sha256).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from itdiffusion.errors import UserError
from itdiffusion.models.checkpoints import (
    CheckpointError,
    file_sha256,
    load_checkpoint,
    load_state_checked,
    refused_by_weights_only,
    strip_wrapper_prefixes,
)
from itdiffusion.models.iddpm import _as_dict, resolve_checkpoint
from itdiffusion.models.schedules import linear_betas, tabulated_logsnr_to_step
from itdiffusion.models.upstream import improved_diffusion

__all__ = [
    "DDPMDenoiser",
    "DDPMNetwork",
    "DDPMParts",
    "build_network",
    "build_unet",
    "build_vlb_diffusion",
    "ddpm_settings",
    "load_ddpm",
    "load_unet",
    "load_unet_weights",
    "map_state_dict_keys",
    "train_alpha_bar",
]

# config key -> UNet2DModel argument (the config's image_size is the U-Net's sample_size)
ARCHITECTURE = {
    "image_size": "sample_size", "in_channels": "in_channels", "out_channels": "out_channels",
    "block_out_channels": "block_out_channels", "down_block_types": "down_block_types",
    "up_block_types": "up_block_types", "layers_per_block": "layers_per_block",
    "attention_head_dim": "attention_head_dim", "norm_num_groups": "norm_num_groups", "norm_eps": "norm_eps",
    "act_fn": "act_fn", "flip_sin_to_cos": "flip_sin_to_cos", "freq_shift": "freq_shift",
    "downsample_padding": "downsample_padding", "mid_block_scale_factor": "mid_block_scale_factor",
    "center_input_sample": "center_input_sample", "time_embedding_type": "time_embedding_type",
}
SCHEDULE = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
            "variance_type")
VARIANCE_TYPES = {"fixed_large": "FIXED_LARGE", "fixed_small": "FIXED_SMALL"}
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def ddpm_settings(model_cfg: Any) -> dict[str, Any]:
    """The config as a dict, checked: kind ddpm, DDPM's linear eps-predicting schedule, a fixed variance."""
    cfg = _as_dict(model_cfg)
    name = cfg.get("name")
    if cfg.get("kind") != "ddpm":
        raise ValueError(f"model {name!r} has kind={cfg.get('kind')!r}; the DDPM adapter needs kind=ddpm")
    missing = [k for k in (*ARCHITECTURE, *SCHEDULE, "diffusion_steps", "dropout") if k not in cfg]
    if missing:
        raise ValueError(f"model config {name!r} lacks DDPM keys {missing}")
    checks = {
        "beta_schedule": (cfg["beta_schedule"] == "linear", "linear"),
        "prediction_type": (cfg["prediction_type"] == "epsilon", "epsilon"),
        "variance_type": (cfg["variance_type"] in VARIANCE_TYPES, " or ".join(VARIANCE_TYPES)),
        "noise_schedule": (cfg.get("noise_schedule", "linear") == "linear", "linear"),
    }
    for key, (ok, allowed) in checks.items():
        if not ok:
            raise UserError(f"model.{key}={cfg[key]!r} (model {name}) is not supported: use {allowed}")
    linear_betas(cfg["beta_start"], cfg["beta_end"], cfg["num_train_timesteps"], cfg["diffusion_steps"])
    return cfg


def train_alpha_bar(model_cfg: Any) -> np.ndarray:
    """``abar_i`` (float64, i = 0..T-1) of the T steps the network was trained on."""
    cfg = ddpm_settings(model_cfg)
    return np.cumprod(1.0 - linear_betas(cfg["beta_start"], cfg["beta_end"], cfg["num_train_timesteps"]))


def unet_kwargs(model_cfg: Any) -> dict[str, Any]:
    """``UNet2DModel`` keyword arguments from the config."""
    cfg = ddpm_settings(model_cfg)
    kwargs = {arg: cfg[key] for key, arg in ARCHITECTURE.items()}
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        kwargs[key] = tuple(kwargs[key])
    return {**kwargs, "dropout": cfg["dropout"]}


def build_unet(model_cfg: Any) -> nn.Module:
    """A randomly initialised ``UNet2DModel`` from the config (the global RNG), in eval mode."""
    from diffusers import UNet2DModel

    return UNet2DModel(**unet_kwargs(model_cfg)).eval()


class DDPMNetwork(nn.Module):
    """``forward(x, timesteps) -> eps`` over a ``UNet2DModel`` (``self.unet``), improved-diffusion style.

    ``timesteps`` are on improved-diffusion's rescaled scale (``t * 1000 / S`` for step t of an S-step
    chain, ``rescale_timesteps=True``) and reach the U-Net as ``timesteps * T / 1000`` for a network
    trained on T steps (the identity for DDPM's T = 1000). ``x`` is cast to the U-Net's dtype; the
    output has the U-Net's dtype and ``x``'s shape (eps only: fixed variances).
    """

    def __init__(self, unet: nn.Module, alpha_bar: np.ndarray):
        super().__init__()
        self.unet = unet
        self.alpha_bar = np.asarray(alpha_bar, dtype=np.float64)  # the training schedule (not a weight)
        self.num_train_timesteps = len(self.alpha_bar)

    def forward(self, x: Tensor, timesteps: Tensor) -> Tensor:
        dtype = next(self.unet.parameters()).dtype
        scale = self.num_train_timesteps / 1000.0
        t = torch.as_tensor(timesteps, device=x.device).to(torch.float64) * scale
        return self.unet(x.to(dtype), t.to(torch.float32), return_dict=False)[0]


def build_network(unet: nn.Module, model_cfg: Any) -> DDPMNetwork:
    """:class:`DDPMNetwork` over ``unet`` with the config's training schedule."""
    return DDPMNetwork(unet, train_alpha_bar(model_cfg))


class DDPMDenoiser(nn.Module):
    """Denoiser protocol over a :class:`DDPMNetwork`: ``eps_hat = denoiser(z, logsnr)``.

    ``z = sqrt(sigmoid(a)) x + sqrt(sigmoid(-a)) eps`` is DDPM's ``x_u`` at the continuous step
    ``u = tabulated_logsnr_to_step(a, abar)`` of the network's own schedule (exact at the training
    steps; module docstring). ``eps_hat`` is returned in ``z``'s dtype.
    """

    def __init__(self, network: nn.Module, alpha_bar: np.ndarray | None = None):
        super().__init__()
        self.network = network  # a DDPMNetwork, or one wrapped by models.acceleration (pass alpha_bar then)
        self.alpha_bar = np.asarray(network.alpha_bar if alpha_bar is None else alpha_bar, dtype=np.float64)

    def timestep(self, logsnr: Tensor) -> Tensor:
        """The U-Net's own timestep (float64, in [-1, T-1]) for each log-SNR."""
        return tabulated_logsnr_to_step(logsnr, self.alpha_bar)

    def forward(self, z: Tensor, logsnr: Tensor) -> Tensor:
        if logsnr.ndim != 1 or logsnr.shape[0] != z.shape[0]:
            raise ValueError(f"logsnr must have shape [B] = [{z.shape[0]}], got {tuple(logsnr.shape)}")
        scale = 1000.0 / len(self.alpha_bar)  # DDPMNetwork takes the rescaled timestep
        out = self.network(z, self.timestep(logsnr).to(z.device) * scale)
        if out.shape != z.shape:
            raise ValueError(f"the U-Net returned shape {tuple(out.shape)} for inputs {tuple(z.shape)}")
        return out.to(z.dtype)


def build_vlb_diffusion(model_cfg: Any) -> Any:
    """improved-diffusion's ``GaussianDiffusion`` of the variational bound (module docstring).

    S = ``model.diffusion_steps`` steps of DDPM's betas rescaled by T/S, ``ModelMeanType.EPSILON``, the
    config's fixed ``ModelVarType`` (FIXED_LARGE: sigma_t^2 = beta_t, DDPM's CIFAR-10 and ITD's choice),
    ``LossType.KL``, ``rescale_timesteps=True`` (step t reaches :class:`DDPMNetwork` as ``t * 1000 / S``).
    """
    cfg = ddpm_settings(model_cfg)
    gd = improved_diffusion().gaussian_diffusion
    betas = linear_betas(cfg["beta_start"], cfg["beta_end"], cfg["num_train_timesteps"],
                         cfg["diffusion_steps"])
    return gd.GaussianDiffusion(
        betas=betas, model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=getattr(gd.ModelVarType, VARIANCE_TYPES[cfg["variance_type"]]),
        loss_type=gd.LossType.KL, rescale_timesteps=True)


# ---------------------------------------------------------------------------------------------- weights

_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_ATTENTION_KEY = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")


def map_state_dict_keys(state: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Keys of a saved ``UNet2DModel`` state dict renamed to those of this diffusers version.

    - wrapper prefixes: ``model.``/``module.``/``_orig_mod.`` (``strip_wrapper_prefixes``) and ``unet.``
      (a :class:`DDPMNetwork`'s own state dict);
    - attention blocks saved by diffusers before 0.15 (ITD's fine-tuned DDPM was saved in 2022-23 with
      ``diffusers>=0.7.2``): ``query``/``key``/``value``/``proj_attn`` are today's
      ``to_q``/``to_k``/``to_v``/``to_out.0`` (same shapes; ``group_norm`` kept).

    ITD saves ``self.model.state_dict()`` of ``WrapUNet2DModel``, a subclass of ``UNet2DModel`` with no
    weights of its own, so its keys are the U-Net's own, unprefixed.
    """
    state = strip_wrapper_prefixes(state, expected)
    if set(state) != set(expected) and state and all(k.startswith("unet.") for k in state):
        state = {k[len("unet."):]: v for k, v in state.items()}
    mapped = {}
    for key, value in state.items():
        m = _ATTENTION_KEY.match(key)
        mapped[f"{m[1]}.{_DEPRECATED_ATTENTION[m[2]]}.{m[3]}" if m else key] = value
    return mapped


def _architecture_hint(unet: nn.Module, state: Mapping[str, Tensor]) -> list[str]:
    return ["It is not a UNet2DModel of this config: check the architecture keys (block_out_channels, "
            "down_block_types, up_block_types, layers_per_block, ...)."]


def _hub_cache(cache_dir: str | Path | None) -> str:
    from huggingface_hub import constants

    return str(cache_dir) if cache_dir is not None else constants.HF_HUB_CACHE


def _offline_error(repo_id: str, revision: str | None, cache_dir: str | Path | None,
                   e: Exception) -> UserError:
    at = f"@{revision}" if revision else ""
    return UserError(
        f"could not load the diffusers model {repo_id}{at} from the Hugging Face hub or its cache "
        f"{_hub_cache(cache_dir)} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
        f"Without network access, fetch it on a machine with network (`hf download {repo_id} config.json "
        f"diffusion_pytorch_model.safetensors --local-dir DIR`, or config.json and "
        f"diffusion_pytorch_model.safetensors or .bin from https://huggingface.co/{repo_id}/tree/main) and "
        f"set model.pretrained=DIR (or model.checkpoint=DIR), or copy a filled hub cache to "
        f"{_hub_cache(cache_dir)} (the HF_HOME / HF_HUB_CACHE environment variables move it).")


def _hub_snapshot(repo_id: str, revision: str | None, cache_dir: str | Path | None,
                  local_files_only: bool | None) -> Path:
    """The cache folder holding the hub repo's config.json and weights (downloaded when missing)."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    offline = constants.HF_HUB_OFFLINE if local_files_only is None else local_files_only
    kwargs = {"repo_id": repo_id, "revision": revision, "cache_dir": cache_dir, "local_files_only": offline}
    try:
        config = Path(hf_hub_download(filename="config.json", **kwargs))
        for i, name in enumerate(WEIGHT_FILES):
            try:
                hf_hub_download(filename=name, **kwargs)
                break
            except (EntryNotFoundError, LocalEntryNotFoundError):
                if i == len(WEIGHT_FILES) - 1:
                    raise
        try:
            hf_hub_download(filename="scheduler_config.json", **kwargs)
        except (EntryNotFoundError, LocalEntryNotFoundError):
            pass  # optional: checked against the config when present
    except (OSError, ValueError, HfHubHTTPError) as e:  # connection errors and cache misses are OSErrors
        raise _offline_error(repo_id, revision, cache_dir, e) from e
    return config.parent


def pretrained_dir(model_cfg: Any, cache_dir: str | Path | None = None,
                   local_files_only: bool | None = None) -> Path:
    """The diffusers folder of ``model.pretrained``: that directory, or the hub cache's snapshot of the hub
    id (config.json, the weights, scheduler_config.json; downloaded when missing). The reproduction passes
    it as ``model.checkpoint`` so that base, fine-tuning and ensembles name the same weights."""
    pretrained, revision = model_cfg.get("pretrained"), model_cfg.get("hub_revision")
    if not pretrained:
        raise UserError(f"model {model_cfg.get('name')} has no model.pretrained (hub id or diffusers "
                        "directory)")
    folder = Path(pretrained).expanduser()
    return folder if folder.is_dir() else _hub_snapshot(pretrained, revision, cache_dir, local_files_only)


def _check_diffusers_dir(folder: Path, cfg: dict[str, Any]) -> None:
    """A diffusers folder's config.json (and scheduler_config.json, if any) must agree with the config.

    The U-Net is always built from the config and the folder's weights loaded into it, so an architecture
    key the folder's config.json omits (diffusers would use its default) is not compared.
    """
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(f"{folder} holds no config.json: not a diffusers model directory")
    found = json.loads(config_file.read_text())
    differ = []
    for key, arg in ARCHITECTURE.items():
        if arg not in found:
            continue  # the U-Net is built from the config; only keys the file states are compared
        want, got = cfg[key], found[arg]
        if isinstance(got, list | tuple):
            want, got = list(want) if isinstance(want, list | tuple) else want, list(got)
        if want != got:
            differ.append(f"{key}: {folder.name} has {got!r}, the config {want!r}")
    scheduler_file = folder / "scheduler_config.json"
    if scheduler_file.is_file():
        sched = json.loads(scheduler_file.read_text())
        for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type"):
            if key in sched and sched[key] != cfg[key]:
                differ.append(f"{key}: {scheduler_file.name} has {sched[key]!r}, the config {cfg[key]!r}")
    if differ:
        raise UserError(f"the diffusers model in {folder} does not match model {cfg.get('name')}: "
                        + "; ".join(differ))


def _load_diffusers_dir(unet: nn.Module, folder: Path, cfg: dict[str, Any]) -> Path:
    """Load a diffusers folder's weights (``from_pretrained``) into ``unet``; returns the weight file."""
    from diffusers import UNet2DModel

    _check_diffusers_dir(folder, cfg)
    weights = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if weights is None:
        raise UserError(f"{folder} holds none of {WEIGHT_FILES}")
    try:
        loaded = UNet2DModel.from_pretrained(folder, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as e:
        chain, cause = [], e  # diffusers wraps torch's UnpicklingError in errors of its own
        while cause is not None and len(chain) < 10:
            chain.append(str(cause))
            cause = cause.__cause__ or cause.__context__
        refused = refused_by_weights_only(" ".join(chain), weights) if weights.suffix == ".bin" else None
        if refused:  # a well-formed pickle asking for more than tensors: not a damaged download
            raise CheckpointError(
                f"{weights} asks to unpickle {refused}: refused as unsafe by the weights-only loader, so it "
                "was not loaded and none of its code ran. Use weights from a trusted source (a .safetensors "
                "file holds no code)") from e
        raise CheckpointError(f"diffusers could not load {folder} ({type(e).__name__}: "
                              f"{' '.join(str(e).split())}); delete and download it again") from e
    load_state_checked(unet, loaded.state_dict(), folder, _architecture_hint)
    return weights


def load_unet_weights(unet: nn.Module, model_cfg: Any, checkpoint_dir: str | Path, *, progress: bool = True,
                      cache_dir: str | Path | None = None, local_files_only: bool | None = None
                      ) -> tuple[str, str]:
    """Load the model's weights into ``unet``; returns (where from, sha256 of the weight file).

    Order: ``model.checkpoint`` (a diffusers directory or a ``.pt`` state dict), else
    ``model.checkpoint_url`` (a ``.pt``, downloaded into ``<checkpoint_dir>/ddpm/`` and checked against
    ``checkpoint_sha256``/``checkpoint_bytes``), else ``model.pretrained`` (a diffusers directory, else a
    hub id: files from the hub's cache, ``cache_dir`` or the default; downloaded when missing unless
    offline: ``local_files_only`` or ``HF_HUB_OFFLINE=1``). Raises :class:`UserError` (bad names, offline)
    or :class:`CheckpointError` (a file that does not fit).
    """
    cfg = ddpm_settings(model_cfg)
    local, url, pretrained = cfg.get("checkpoint"), cfg.get("checkpoint_url"), cfg.get("pretrained")
    if local and Path(local).expanduser().is_dir():
        folder = Path(local).expanduser()
        return str(folder), file_sha256(_load_diffusers_dir(unet, folder, cfg))
    if local or url:
        try:
            path = resolve_checkpoint(cfg, checkpoint_dir, progress=progress)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(str(e)) from e
        sha256 = load_checkpoint(unet, path, map_keys=map_state_dict_keys, explain=_architecture_hint)
        return str(path), sha256
    if not pretrained:
        raise UserError(f"model {cfg.get('name')} names no weights: set model.pretrained=<hub id or "
                        f"diffusers directory> or model.checkpoint=<directory or .pt state dict>")
    folder = Path(pretrained).expanduser()
    if not folder.is_dir():
        if pretrained.startswith((".", "/", "~")) or pretrained.count("/") != 1:
            raise UserError(f"model.pretrained={pretrained} is neither a directory nor a hub id (owner/name)")
        folder = _hub_snapshot(pretrained, cfg.get("hub_revision"), cache_dir, local_files_only)
        source = f"hf://{pretrained}" + (f"@{cfg['hub_revision']}" if cfg.get("hub_revision") else "")
        return source, file_sha256(_load_diffusers_dir(unet, folder, cfg))
    return str(folder), file_sha256(_load_diffusers_dir(unet, folder, cfg))


def load_unet(model_cfg: Any, checkpoint_dir: str | Path, **kwargs: Any) -> tuple[nn.Module, str, str]:
    """(``UNet2DModel`` with the weights, eval mode; where from; sha256): see :func:`load_unet_weights`."""
    unet = build_unet(model_cfg)
    source, sha256 = load_unet_weights(unet, model_cfg, checkpoint_dir, **kwargs)
    return unet.eval(), source, sha256


@dataclass
class DDPMParts:
    """What evaluating a DDPM needs; the field names are those of the evaluate stage's ``Member``."""

    network: DDPMNetwork  # forward(x, timesteps) -> eps, for the VLB
    diffusion: Any  # improved-diffusion GaussianDiffusion of the VLB (build_vlb_diffusion)
    denoiser: DDPMDenoiser  # the Denoiser protocol, for the IT estimates
    checkpoint: str  # where the weights came from (path, or hf://<id>)
    sha256: str  # of the weight file


def load_ddpm(model_cfg: Any, checkpoint_dir: str | Path, **kwargs: Any) -> DDPMParts:
    """The model's weights (:func:`load_unet`) with its VLB diffusion and denoiser; eval mode, on the CPU."""
    unet, source, sha256 = load_unet(model_cfg, checkpoint_dir, **kwargs)
    network = build_network(unet, model_cfg)
    return DDPMParts(network=network, diffusion=build_vlb_diffusion(model_cfg),
                     denoiser=DDPMDenoiser(network), checkpoint=source, sha256=sha256)
