"""Optional extras (pyproject's ``[project.optional-dependencies]``) that command-line choices need.

Hydra reports a launcher or sweeper whose plugin is not installed as "Could not load
'hydra/launcher/submitit_slurm'"; :func:`check_extras` looks at the overrides first and names the extra
to install instead (the stages' console scripts run it before Hydra starts).
"""

from __future__ import annotations

import importlib.util

from itdiffusion.errors import UserError

# extra -> (the module it installs, the Hydra plugin it provides)
EXTRAS = {
    "slurm": ("hydra_plugins.hydra_submitit_launcher", "Hydra's submitit launcher"),
    "search": ("hydra_plugins.hydra_optuna_sweeper", "Hydra's Optuna sweeper"),
}
# command-line choices -> the extra they need: (override key, value or None for any value)
NEEDS_EXTRA = {
    ("hydra/launcher", "slurm"): "slurm",
    ("hydra/launcher", "submitit_slurm"): "slurm",
    ("hydra/launcher", "submitit_local"): "slurm",
    ("hydra/sweeper", "optuna"): "search",
    ("hparams_search", None): "search",
}


def installed(extra: str) -> bool:
    """Whether the module of ``extra`` can be imported."""
    try:
        return importlib.util.find_spec(EXTRAS[extra][0]) is not None
    except ModuleNotFoundError:  # its parent package (hydra_plugins) is missing too
        return False


def missing_extra_hint(extra: str, why: str) -> str:
    """The one-line message for ``why`` (e.g. ``hydra/launcher=slurm``) needing the uninstalled ``extra``."""
    return (f"{why} needs {EXTRAS[extra][1]}, which is not installed: pip install \".[{extra}]\" in a "
            f"checkout (pip install \"itdiffusion[{extra}]\" for an installed package)")


def check_extras(overrides: list[str]) -> None:
    """UserError (:func:`missing_extra_hint`) for the first override that needs an extra not installed."""
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        extra = NEEDS_EXTRA.get((key, value)) or NEEDS_EXTRA.get((key, None))
        if extra is not None and value not in ("", "null") and not installed(extra):
            raise UserError(missing_extra_hint(extra, f"{key}={value}"))
