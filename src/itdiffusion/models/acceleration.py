"""Fast execution of the IDDPM U-Net: bfloat16 autocast, channels_last inputs, ``torch.compile``.

:class:`AcceleratedUNet` wraps the U-Net itself (``forward(x, timesteps)``), so every caller that
runs ``model(x_t, t)`` goes through it: :class:`~itdiffusion.models.iddpm.IDDPMDenoiser` (the IT
estimates), :func:`itdiffusion.variational.vlb` and improved-diffusion's ``GaussianDiffusion``.
:func:`fast_path_from_config` (or :func:`resolve_fast_path`) turns the estimator config (``precision``,
``channels_last``, ``compile``) into a :class:`FastPath` for a device, and :func:`accelerate` applies it.

Whether a fast path keeps the numbers is decided at run time by the evaluate stage's paired check
(:mod:`itdiffusion.stages.precision`): bits/dim on the fast path within
``estimator.precision_tolerance_bpd`` of fp32 eager on the same images, points and noise.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

PRECISIONS = ("fp32", "bf16", "auto")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")

__all__ = [
    "COMPILE_MODES",
    "PRECISIONS",
    "AcceleratedUNet",
    "FastPath",
    "accelerate",
    "fast_path_from_config",
    "resolve_fast_path",
]


@dataclass(frozen=True)
class FastPath:
    """How the U-Net runs: ``dtype`` of autocast (None: float32 throughout), channels_last inputs,
    and the ``torch.compile`` mode (``"none"``: eager)."""

    dtype: torch.dtype | None = None
    channels_last: bool = False
    compile: str = "none"

    @property
    def plain(self) -> bool:
        """fp32 eager with contiguous inputs: the reference path."""
        return self.dtype is None and not self.channels_last and self.compile == "none"

    def describe(self) -> str:
        """E.g. ``"bf16 autocast, channels_last, compile(max-autotune)"`` or ``"fp32, contiguous, eager"``."""
        precision = "fp32" if self.dtype is None else f"{_DTYPE_NAMES.get(self.dtype, self.dtype)} autocast"
        layout = "channels_last" if self.channels_last else "contiguous"
        compiled = "eager" if self.compile == "none" else f"compile({self.compile})"
        return f"{precision}, {layout}, {compiled}"


_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def resolve_fast_path(precision: str, channels_last: bool, compile: str, device: torch.device) -> FastPath:
    """The :class:`FastPath` of the config values ``precision`` (fp32 | bf16 | auto), ``channels_last``
    and ``compile`` (none | default | reduce-overhead | max-autotune) on ``device``.

    ``auto`` is bf16 autocast with the given ``channels_last`` and ``compile`` on CUDA, and plain fp32
    eager elsewhere (on a CPU bf16 is rarely faster and compiling costs minutes). ``fp32`` and ``bf16``
    apply the options as given on any device. Raises ValueError naming the allowed values.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"estimator.precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    if compile not in COMPILE_MODES:
        raise ValueError(f"estimator.compile={compile!r} is not one of {', '.join(COMPILE_MODES)}")
    if precision == "auto" and torch.device(device).type != "cuda":
        return FastPath()
    dtype = None if precision == "fp32" else torch.bfloat16
    return FastPath(dtype=dtype, channels_last=bool(channels_last), compile=compile)


def fast_path_from_config(est_cfg: Any, device: torch.device) -> FastPath:
    """:func:`resolve_fast_path` of an estimator config's ``precision``, ``channels_last`` and ``compile``;
    ``accelerate(unet, fast_path_from_config(cfg.estimator, device))`` builds the U-Net the stage runs."""
    return resolve_fast_path(est_cfg.precision, est_cfg.channels_last, est_cfg.compile, device)


class AcceleratedUNet(nn.Module):
    """The U-Net ``unet`` run on a fast path; same call signature ``forward(x, timesteps)``.

    - ``dtype`` (e.g. ``torch.bfloat16``): the forward pass runs under ``torch.autocast(device, dtype)``:
      convolutions and matrix products compute in ``dtype`` (tensor cores), normalizations and softmax
      stay in float32 (autocast's lists, and improved-diffusion's GroupNorm32). None: float32 throughout.
    - ``channels_last``: ``x`` is passed in channels_last (NHWC) memory format, so convolutions pick
      their NHWC kernels (cuDNN converts the weights per call; the parameters keep their layout).
    - ``compile`` (default | reduce-overhead | max-autotune): the U-Net's forward is compiled by
      ``torch.compile(mode=...)`` on first use (``reduce-overhead`` and ``max-autotune`` also capture
      CUDA graphs on GPUs); ``"none"``: eager.

    The weights are ``unet``'s own parameters (float32, shared, not copied; ``parameters()`` yields
    them), so a checkpoint loaded into ``unet`` is what runs here. The output is returned as a
    contiguous float32 tensor whatever ``dtype`` computed it: the estimators square and integrate
    it in float32/float64, and improved-diffusion's diffusion code expects the model's dtype.
    With ``dtype=None``, no channels_last and no compile the output is bit-identical to ``unet(x, t)``.
    """

    def __init__(self, unet: nn.Module, *, dtype: torch.dtype | None = None, channels_last: bool = False,
                 compile: str = "none"):
        super().__init__()
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile={compile!r} is not one of {', '.join(COMPILE_MODES)}")
        self.unet = unet
        self.dtype = dtype
        self.channels_last = channels_last
        self.compile_mode = compile
        # a compiled forward, kept out of the module tree so that the state dict holds the weights once
        self._forward = (unet.forward if compile == "none" else
                         torch.compile(unet.forward, mode=None if compile == "default" else compile))

    def forward(self, x: Tensor, timesteps: Tensor, **kwargs: Any) -> Tensor:
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = (torch.autocast(x.device.type, dtype=self.dtype) if self.dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            out = self._forward(x, timesteps, **kwargs)
        return out.float().contiguous()

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}, channels_last={self.channels_last}, compile={self.compile_mode!r}"


def accelerate(unet: nn.Module, fast: FastPath) -> nn.Module:
    """``unet`` itself for the plain path, else an :class:`AcceleratedUNet` around it."""
    if fast.plain:
        return unet
    return AcceleratedUNet(unet, dtype=fast.dtype, channels_last=fast.channels_last, compile=fast.compile)
