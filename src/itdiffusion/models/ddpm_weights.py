"""A DDPM's weights into a ``UNet2DModel``: a diffusers directory or Hugging Face hub id (through the hub's
cache), or a ``.pt`` state dict (``weights_only=True``) whose diffusers 0.7-0.14 attention key names (ITD's
fine-tuned file) are mapped to today's (:func:`map_state_dict_keys`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from itdiffusion.errors import UserError
from itdiffusion.models.ddpm import ARCHITECTURE, build_unet, ddpm_settings
from itdiffusion.models.iddpm import resolve_checkpoint
from itdiffusion.models.weights import (
    CheckpointError,
    file_sha256,
    load_checkpoint,
    load_state_checked,
    refused_by_weights_only,
    strip_wrapper_prefixes,
)

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


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
