"""The stages' ``--help``: the config groups a user chooses from (not the internal ``schema/*`` ones), with
their options and defaults, and the main keys with their defaults and one-line descriptions taken from the
comments of the dataclass fields in :mod:`itdiffusion.config` (the schema is the one place they are
written). ``conf/config.yaml`` sets ``hydra.help.template: ${itd_help:}`` (the resolver is :func:`help_text`).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

from omegaconf import MISSING, OmegaConf

from itdiffusion import config as schema

CONFIG_DIR = Path(__file__).resolve().parent / "conf"
GROUP_SCHEMAS = {"data": schema.DataConfig, "model": schema.ModelConfig,
                 "estimator": schema.EstimatorConfig, "finetune": schema.FinetuneConfig,
                 "logger": schema.LoggerConfig, "paths": schema.PathsConfig}
EXTRA_GROUPS = {"hydra/launcher": 'SLURM and local processes through submitit (pip install ".[slurm]")'}
_FIELD = re.compile(r"^    (\w+): [^=]+=.*?(?:#\s*(.*))?$")
WIDTH = 110


def field_comments(cls: type) -> dict[str, str]:
    """``{field: description}`` of a dataclass: its line's trailing comment, else the comment lines just
    above it (fields without either are left out)."""
    out, above = {}, []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
            continue
        match = _FIELD.match(line)
        if match:
            text = match.group(2) or " ".join(above)
            if text:
                out[match.group(1)] = text
        above = []
    return out


def _default(cls: type, name: str) -> str:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return "???" if value is MISSING else OmegaConf.to_yaml({"v": value}).strip()[3:].strip() or "''"


def _one_line(text: str, room: int) -> str:
    return text if len(text) <= room else text[: room - 3].rsplit(" ", 1)[0] + "..."


def group_lines() -> list[str]:
    """``group: option | option ... (default: x)`` for each group of ``conf/`` and the extra ones."""
    defaults = {}
    for entry in OmegaConf.load(CONFIG_DIR / "config.yaml").defaults:
        if isinstance(entry, dict) or OmegaConf.is_dict(entry):
            ((key, value),) = entry.items()
            defaults[key.removeprefix("optional ")] = value
    lines = []
    for folder in sorted(p for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name != "hydra"):
        options = " | ".join(sorted(p.stem for p in folder.glob("*.yaml")))
        default = defaults.get(folder.name)
        chosen = f"(default: {default})" if default else "(optional)"
        lines.append(f"  {folder.name}: {options}   {chosen}")
    for group, what in EXTRA_GROUPS.items():
        options = " | ".join(sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml")))
        lines.append(f"  {group}: {options}   ({what})")
    return lines


def key_lines() -> list[str]:
    """``group.key=default  description`` for every described key of the schema (top-level keys first)."""
    lines = []
    for prefix, cls in [("", schema.Config), *((f"{g}.", c) for g, c in GROUP_SCHEMAS.items())]:
        for name, text in field_comments(cls).items():
            key = f"{prefix}{name}={_default(cls, name)}"
            lines.append(f"  {key:<40} " + _one_line(text, WIDTH - 43) if len(key) < 40
                         else f"  {key}\n  {'':<40} " + _one_line(text, WIDTH - 43))
    return lines


def help_text() -> str:
    """The ``--help`` page (a :class:`string.Template` for Hydra: ``$FLAGS_HELP`` is Hydra's flags)."""
    text = "\n".join([
        "itdiffusion: CIFAR-10 density estimation with information-theoretic diffusion.",
        "Usage: itdiffusion-<stats|evaluate|finetune|report> [group=option ...] [key=value ...]",
        "       (or python -m itdiffusion.stages.<stage>; -m runs a sweep; --cfg job prints the config)",
        "",
        "== Config groups (group=option) ==",
        *group_lines(),
        "",
        "== Main keys (key=default: description; every key: --cfg job) ==",
        *key_lines(),
        "",
    ])
    return text.replace("$", "$$") + "== Hydra flags ==\n$FLAGS_HELP"
