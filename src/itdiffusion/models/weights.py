"""IDDPM weight files: find or download them, verify them, load them with clear errors.

The official files are ``torch.save(model.state_dict())`` of improved-diffusion's ``UNetModel``.
They are loaded with ``torch.load(..., weights_only=True)``. A file that does not fit the model
built from the config fails with the flags that are probably wrong (read off the file's tensor
shapes) and the first mismatched keys; an unreadable file fails saying to delete and re-download it;
a file that torch's safe unpickler refuses (it would run code or build arbitrary objects) fails
saying so; a file holding NaN or infinite weights fails naming the first such tensor.
"""

from __future__ import annotations

import hashlib
import http.client
import pickle
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor, nn

from itdiffusion.errors import CheckpointError
from itdiffusion.fsio import atomic_write, file_lock

_SHOW_KEYS = 5  # mismatched keys listed per kind in an error message



def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: str | Path, *, progress: bool = True, timeout: float = 60.0) -> str:
    """Stream ``url`` to ``dest`` atomically (tqdm progress bar); returns the file's sha256.

    A short read (fewer bytes than Content-Length) raises and leaves no file behind.
    """
    from tqdm.auto import tqdm

    dest = Path(dest)
    sha = hashlib.sha256()
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "itdiffusion"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length else None

            def write(f: IO[bytes]) -> None:
                received = 0
                bar = tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress)
                with bar:
                    while chunk := response.read(1 << 20):
                        f.write(chunk)
                        sha.update(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
                if total is not None and received != total:
                    raise CheckpointError(f"download of {url} stopped after {received} of {total} bytes; "
                                          f"nothing was written to {dest}: run it again")

            atomic_write(dest, write)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        raise CheckpointError(
            f"could not download {url} to {dest} ({e}). Without network access, fetch the file "
            f"elsewhere and place it at {dest}, or point model.checkpoint at a local copy."
        ) from e
    return sha.hexdigest()


def verify_file(path: str | Path, *, sha256: str | None = None, size: int | None = None) -> str:
    """Check a file's size (bytes) and sha256 (hex) where given; returns its sha256.

    Raises :class:`CheckpointError` saying what was expected and to delete the file and fetch it again.
    """
    path = Path(path)
    got_size = path.stat().st_size
    if size is not None and got_size != size:
        raise CheckpointError(f"{path} has {got_size} bytes, expected {size}: it is incomplete or another "
                              f"file. Delete it and download it again.")
    got = file_sha256(path)
    if sha256 is not None and got != sha256.lower():
        raise CheckpointError(f"{path} has sha256 {got}, expected {sha256.lower()}: it is damaged or another "
                              f"file. Delete it and download it again.")
    return got


def fetch(url: str, dest: str | Path, *, sha256: str | None = None, size: int | None = None,
          progress: bool = True) -> Path:
    """``dest``, downloaded from ``url`` first when missing, checked against ``sha256`` and ``size``.

    Concurrent callers (one per torchrun rank) are serialized by a lock file: one downloads, the others
    then find the finished file. A download that fails the check is deleted; a file already present that
    fails it is kept and reported (it may have been placed by hand).
    """
    dest = Path(dest)
    with file_lock(dest.parent / f".{dest.name}.lock", remove_on_error=True):
        if dest.is_file():
            verify_file(dest, sha256=sha256, size=size)
            return dest
        print(f"downloading {url} -> {dest}", flush=True)
        download(url, dest, progress=progress)
        try:
            got = verify_file(dest, sha256=sha256, size=size)
        except CheckpointError as e:
            dest.unlink()
            raise CheckpointError(f"the download of {url} failed its check and was deleted: {e}") from e
        print(f"saved {dest} (sha256 {got})", flush=True)
    return dest


WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")  # DataParallel/DDP, wrapper classes, torch.compile


def strip_wrapper_prefixes(state: Mapping[str, Tensor], expected: Iterable[str]) -> dict[str, Tensor]:
    """``state`` with the prefixes of wrapper modules removed from its keys while every key carries one
    and the keys do not already fit ``expected`` (e.g. ``model.input_blocks.0.0.weight`` of a class that
    holds the U-Net as ``self.model``, or ``module.`` of DistributedDataParallel)."""
    state, expected = dict(state), set(expected)
    while set(state) != expected:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The state_dict in a file, loaded with ``weights_only=True`` (a training checkpoint's ``"model"``
    entry); :class:`CheckpointError` for an unreadable file or one that holds no state_dict."""
    return _read_state_dict(Path(path))


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = refused_by_weights_only(str(e), path)
        if refused:  # a well-formed pickle asking for more than tensors
            raise CheckpointError(
                f"{path} asks to unpickle {refused}, which torch.load(weights_only=True) refuses: it "
                f"was not loaded and none of its code ran. This is not a damaged download; a weights "
                f"file must hold plain tensors (a state_dict). Do not load it with weights_only=False "
                f"unless you trust its source."
            ) from e
        raise _unreadable(path, e) from e
    except Exception as e:  # truncated zip, random bytes, empty file: torch raises many types
        raise _unreadable(path, e) from e
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]  # a training checkpoint holding the weights under "model"
    if not (isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values())):
        raise CheckpointError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return dict(obj)


def refused_by_weights_only(message: str, path: Path) -> str | None:
    """What torch's weights-only unpickler refused in a well-formed file (a global, or the instructions
    of a plain pickle), else None (damaged or random bytes).

    Torch words it differently across versions: "Unsupported global: GLOBAL os.system ...",
    "Trying to load unsupported GLOBAL posix.system whose module posix is blocked", or, for a plain
    pickle (not a torch.save zip file), "WeightsUnpickler error: Unsupported operand 149"."""
    found = re.search(r"(?:Unsupported global: |unsupported )GLOBAL (\S+?)(?=[\s.,]*(?:\s|$))", message)
    if found:
        return f"the global {found.group(1)}"
    with open(path, "rb") as f:
        head = f.read(2)
    operand = re.search(r"WeightsUnpickler error:\s*(Unsupported operand \d+)", message)
    if operand and len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # a pickle's PROTO header
        return (f"a plain Python pickle (protocol {head[1]}, not a torch.save file) whose instructions it "
                f"does not allow ({operand.group(1)})")
    return None


def first_nonfinite(state: Mapping[str, Tensor]) -> str | None:
    """``"<name>: <count> non-finite of <numel>"`` for the first float tensor holding NaN/inf, else None."""
    for name, value in state.items():
        if isinstance(value, Tensor) and value.is_floating_point():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                return f"{name}: {bad} non-finite of {value.numel()}"
    return None


def _unreadable(path: Path, e: Exception) -> CheckpointError:
    return CheckpointError(
        f"{path} ({path.stat().st_size} bytes) is not a readable PyTorch file ({type(e).__name__}). "
        f"It is probably truncated or corrupted, e.g. by an interrupted download: delete it and "
        f"download it again (python scripts/download_checkpoints.py)."
    )


def load_checkpoint(model: nn.Module, path: str | Path, *,
                    map_keys: Callable[[Mapping[str, Tensor], Mapping[str, Tensor]], dict] | None = None,
                    explain: Callable[[nn.Module, Mapping[str, Tensor]], list[str]] | None = None) -> str:
    """Load a state_dict file into ``model`` (strict); returns the file's sha256 (hex).

    ``map_keys(state, expected)`` maps the file's keys onto the model's (default: the prefixes of wrapper
    modules, ``model.``, ``module.``, removed: :func:`strip_wrapper_prefixes`); ``explain(model, state)``
    says in a few lines what may be wrong when the file does not fit (default: the improved-diffusion flags
    its shapes show). Raises :class:`CheckpointError` for an unreadable file, one that does not fit the
    model, or one holding NaN or infinite weights.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    expected = model.state_dict()
    state = (map_keys or strip_wrapper_prefixes)(_read_state_dict(path), expected)
    load_state_checked(model, state, path, explain or _iddpm_suspects)
    return file_sha256(path)


def load_state_checked(model: nn.Module, state: Mapping[str, Tensor], source: str | Path,
                       explain: Callable[[nn.Module, Mapping[str, Tensor]], list[str]]) -> None:
    """``model.load_state_dict(state)`` after checking that every key and shape fits and every weight is
    finite (:class:`CheckpointError` naming ``source`` otherwise)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        raise CheckpointError(_mismatch_message(source, explain(model, state), expected, state, missing,
                                                unexpected, mismatched))
    bad = first_nonfinite(state)
    if bad is not None:
        raise CheckpointError(f"{source} holds non-finite weights (first: {bad}); every estimate from it "
                              f"would be NaN. Use the weights of a run that finished without divergence.")
    model.load_state_dict(state)


def _iddpm_suspects(model: nn.Module, state: Mapping[str, Tensor]) -> list[str]:
    suspects = suspect_flags(model, state)
    if suspects:
        return [f"Probably wrong flag(s): {' | '.join(suspects)}."]
    return ["No flag could be read off the file's shapes (num_heads, dropout and the diffusion flags do not "
            "show in the weights); compare the keys that follow."]


def _mismatch_message(source: str | Path, explanation: list[str], expected: Mapping[str, Tensor],
                      state: Mapping[str, Tensor], missing: list[str], unexpected: list[str],
                      mismatched: list[str]) -> str:
    lines = [f"{source} does not fit the model built from the config.", *explanation]
    if mismatched:
        lines.append(f"Shape mismatches ({len(mismatched)}): " + "; ".join(
            f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
            for k in mismatched[:_SHOW_KEYS]))
    if missing:
        lines.append(f"Missing from the file ({len(missing)}): {', '.join(missing[:_SHOW_KEYS])}")
    if unexpected:
        lines.append(f"Unexpected in the file ({len(unexpected)}): {', '.join(unexpected[:_SHOW_KEYS])}")
    return " ".join(lines)  # one line, as every error a stage reports


def _unet_structure(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """What an improved-diffusion UNetModel state_dict shows of its flags (keys absent if unknown)."""
    found: dict[str, Any] = {}
    if "out.2.weight" in state:
        found["out_channels"] = state["out.2.weight"].shape[0]
    if "input_blocks.0.0.weight" not in state:
        return found
    width = state["input_blocks.0.0.weight"].shape[0]
    found["model_channels"] = width
    found["class_cond"] = "label_emb.weight" in state
    blocks = sorted({int(k.split(".")[1]) for k in state if k.startswith("input_blocks.")})
    # Walk the encoder: ResBlocks ("i.0.in_layers"), optionally followed by attention ("i.1.qkv"),
    # levels separated by Downsample blocks ("i.0.op").
    levels: list[list[int]] = [[]]
    for i in blocks[1:]:
        if f"input_blocks.{i}.0.op.weight" in state:
            levels.append([])
        elif f"input_blocks.{i}.0.in_layers.2.weight" in state:
            levels[-1].append(i)
    if not all(levels):
        return found
    if len({len(level) for level in levels}) == 1:
        found["num_res_blocks"] = len(levels[0])
    found["channel_mult"] = tuple(
        state[f"input_blocks.{level[0]}.0.in_layers.2.weight"].shape[0] // width for level in levels)
    found["attention_ds"] = tuple(2**n for n, level in enumerate(levels)
                                  if any(f"input_blocks.{i}.1.qkv.weight" in state for i in level))
    first = levels[0][0]
    emb_out = state.get(f"input_blocks.{first}.0.emb_layers.1.weight")
    if emb_out is not None:
        out = state[f"input_blocks.{first}.0.in_layers.2.weight"].shape[0]
        found["use_scale_shift_norm"] = emb_out.shape[0] == 2 * out
    return found


def _fractions(ds: tuple[int, ...]) -> str:
    if not ds:
        return "no attention"
    at = ", ".join(f"1/{d}" for d in sorted(ds))
    for32 = ",".join(str(32 // d) for d in sorted(ds))
    return f"attention at {at} of image_size (attention_resolutions={for32} for 32x32 images)"


# structure key -> (flag, how a value reads)
_FLAGS = {
    "out_channels": ("learn_sigma", lambda v: f"learn_sigma={v == 6} ({v} output channels)"),
    "model_channels": ("num_channels", lambda v: f"num_channels={v}"),
    "num_res_blocks": ("num_res_blocks", lambda v: f"num_res_blocks={v}"),
    "attention_ds": ("attention_resolutions", _fractions),
    "use_scale_shift_norm": ("use_scale_shift_norm", lambda v: f"use_scale_shift_norm={v}"),
    "class_cond": ("class_cond", lambda v: f"class_cond={v}"),
    "channel_mult": ("image_size", lambda v: f"channel_mult={v} (improved-diffusion sets it by image_size)"),
}


def suspect_flags(model: nn.Module, state: Mapping[str, Tensor]) -> list[str]:
    """Sentences naming the flags whose config value disagrees with what the file's shapes show."""
    got = _unet_structure(state)
    if "model_channels" not in got:
        return ["the file does not look like an improved-diffusion UNetModel (no input_blocks.0.0.weight)"]
    want = {
        "out_channels": model.out_channels,
        "model_channels": model.model_channels,
        "num_res_blocks": model.num_res_blocks,
        "attention_ds": tuple(sorted(model.attention_resolutions)),
        "use_scale_shift_norm": model.input_blocks[1][0].use_scale_shift_norm,
        "class_cond": model.num_classes is not None,
        "channel_mult": tuple(model.channel_mult),
    }
    differ = [k for k in _FLAGS if k in got and got[k] != want[k]]
    out = []
    if "attention_ds" in differ and _scaled(got["attention_ds"], want["attention_ds"]):
        # the same attention_resolutions at another image_size (the widths do not show image_size): name both
        factor = want["attention_ds"][0] / got["attention_ds"][0]
        differ.remove("attention_ds")
        out.append(f"image_size (or attention_resolutions): the file has {_fractions(got['attention_ds'])}, "
                   f"the config gives {_fractions(want['attention_ds'])}: its image_size is {factor:g}x the "
                   "file's, if attention_resolutions is the same")
    return out + [f"{flag}: the file has {describe(got[k])}, the config gives {describe(want[k])}"
                  for k, (flag, describe) in _FLAGS.items() if k in differ]


def _scaled(got: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """Whether two attention depth sets differ by one factor (what another image_size does)."""
    return bool(got) and len(got) == len(want) and len({w / g for g, w in zip(got, want, strict=True)}) == 1
