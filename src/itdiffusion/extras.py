"""Optional dependencies (pyproject.toml's extras): a one-line hint when a command needs a missing one."""

from __future__ import annotations

import importlib
import sys

# hydra/launcher=<option> -> (the module it needs, the extra that installs it)
LAUNCHER_EXTRAS = {
    "slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
}


def missing_extra(what: str, module: str, extra: str) -> str | None:
    """None when ``module`` imports, else the line that says to install the extra ``extra`` for ``what``."""
    try:
        importlib.import_module(module)
    except ImportError:
        return (f"{what} needs the optional dependencies [{extra}] ({module} is not installed): "
                f'pip install ".[{extra}]" in the repository')
    return None


def launcher_problem(overrides: list[str]) -> str | None:
    """The missing-extra line for a ``hydra/launcher=<option>`` among the command line's overrides."""
    for override in overrides:
        key, _, value = override.partition("=")
        if key.lstrip("+~") == "hydra/launcher" and value in LAUNCHER_EXTRAS:
            problem = missing_extra(f"hydra/launcher={value}", *LAUNCHER_EXTRAS[value])
            if problem:
                return problem
    return None


def check_command_line(argv: list[str] | None = None) -> None:
    """Exit with status 2 and the hint (before Hydra reads its config) when the command needs an extra."""
    problem = launcher_problem(sys.argv[1:] if argv is None else argv)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
