"""The one place that imports improved-diffusion.

Prefers the official ``improved_diffusion`` package (openai/improved-diffusion, installed from a
clone with ``pip install -e .``) when it is importable, else PyPI's ``improved-diffusion-for-smlm``,
which carries the same ``UNetModel`` and ``GaussianDiffusion`` on the unconditional path.
"""

from __future__ import annotations

import importlib
from functools import cache
from types import SimpleNamespace

_CANDIDATES = ("improved_diffusion", "improved_diffusion_for_SMLM.improved_diffusion")


@cache
def improved_diffusion() -> SimpleNamespace:
    """Modules ``script_util``, ``unet``, ``gaussian_diffusion``, ``losses``, ``nn`` and the source name."""
    errors = []
    for root in _CANDIDATES:
        try:
            mods = {m: importlib.import_module(f"{root}.{m}") for m in
                    ("script_util", "unet", "gaussian_diffusion", "losses", "nn")}
        except ImportError as e:  # try the next candidate
            errors.append(f"{root}: {e}")
            continue
        return SimpleNamespace(source=root, **mods)
    raise ImportError(
        "improved-diffusion is not importable. Install it with "
        "`pip install improved-diffusion-for-smlm==0.4.8` (done by `make setup`) or install "
        "openai/improved-diffusion from a clone. Tried: " + "; ".join(errors)
    )
