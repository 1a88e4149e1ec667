"""The allowed value of every config key (:data:`VALUE_RULES`), checked before a stage runs.

The schemas (:mod:`itdiffusion.config.schema`) fix keys and types; OmegaConf does not check values (it
ignores typing.Literal, and Enum fields would turn every value into an Enum in metrics.json). So every
value check that needs nothing but the config lives in VALUE_RULES, and check_values(cfg) applies
them before a stage runs (itdiffusion.stages.launch): a bad value is one line, exit 2, nothing written.
Checks that need data, weights or several keys at once stay in the stages. model.kind and
finetune.objective take the registered families' values (itdiffusion.models.families.value_rules); the
other tuples are the library's own (data.SOURCES, information.ROUNDING_MODES, ...), never copies.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from itdiffusion.budget import BUDGETS
from itdiffusion.data import SOURCES
from itdiffusion.errors import UserError
from itdiffusion.information.curves import ROUNDING_MODES
from itdiffusion.information.proposal import SAMPLING_MODES
from itdiffusion.models.acceleration import COMPILE_MODES, PRECISIONS
from itdiffusion.models.schedules import SCHEDULES

DEVICES = ("auto", "cpu", "cuda", "cuda:N")  # cuda:N: GPU number N


@dataclass(frozen=True)
class OneOf:
    """A string from ``values``; the entry ``cuda:N`` stands for ``cuda:`` followed by digits."""

    values: tuple[str, ...]

    def allows(self, value: Any) -> bool:
        if value in self.values and not str(value).endswith(":N"):
            return True
        prefixes = [v[:-1] for v in self.values if v.endswith(":N")]
        return isinstance(value, str) and any(
            value.startswith(p) and value[len(p):].isdigit() for p in prefixes
        )

    def problem(self, key: str, value: Any) -> str:
        return f"{key}={value!r} is not one of {', '.join(self.values)}"


@dataclass(frozen=True)
class Bounds:
    """A finite number within ``low`` / ``high`` (open or closed ends), or null where ``nullable``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # value > low (else value >= low)
    high_open: bool = False  # value < high (else value <= high)
    nullable: bool = False
    why: str = ""  # appended to the message, e.g. "(a standard error needs two images)"

    def allows(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text = f"in {left}{self.low:g}, {self.high:g}{right}"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {self.low:g}"
        else:
            text = f"{'<' if self.high_open else '<='} {self.high:g}"
        return text + (" or null" if self.nullable else "")

    def problem(self, key: str, value: Any) -> str:
        return f"{key}={value!r} must be {self.describe()}" + (f" {self.why}" if self.why else "")


@dataclass(frozen=True)
class AllOrCount:
    """The string ``all`` or a whole number >= ``low`` (given as an int or its digits)."""

    low: int = 1

    def allows(self, value: Any) -> bool:
        if value == "all":
            return True
        text = str(value)
        return not isinstance(value, bool) and text.isdigit() and int(text) >= self.low

    def problem(self, key: str, value: Any) -> str:
        return f"{key}={value!r} must be 'all' or a whole number >= {self.low}"


@dataclass(frozen=True)
class WholeNumber:
    """A whole number in [``low``, ``high``], or one of ``also`` (e.g. -1 for "the default")."""

    low: int
    high: int | None = None
    also: tuple[int, ...] = ()
    multiple_of: int = 1
    why: str = ""

    def allows(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, int):
            return False
        if value in self.also:
            return True
        within = value >= self.low and (self.high is None or value <= self.high)
        return within and value % self.multiple_of == 0

    def problem(self, key: str, value: Any) -> str:
        text = f"a whole number >= {self.low}" if self.high is None else f"a whole number in [{self.low}, " \
            f"{self.high}]"
        text += f" divisible by {self.multiple_of}" if self.multiple_of > 1 else ""
        text += "".join(f" or {v}" for v in self.also)
        return f"{key}={value!r} must be {text}" + (f" {self.why}" if self.why else "")


NAME_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class Name:
    """A folder name: one path component of letters, digits, ``.``, ``_``, ``-``, not starting with ``.``."""

    def allows(self, value: Any) -> bool:
        return isinstance(value, str) and NAME_PATTERN.fullmatch(value) is not None

    def problem(self, key: str, value: Any) -> str:
        return (f"{key}={value!r} must be a folder name: letters, digits, '.', '_', '-', not empty and not "
                "starting with '.'")


POSITIVE = Bounds(low=0, low_open=True)
AT_LEAST_ONE = Bounds(low=1)
AT_LEAST_ONE_OR_NULL = Bounds(low=1, nullable=True)
NON_NEGATIVE = Bounds(low=0)


@dataclass(frozen=True)
class Rule:
    """``key`` (dotted, from the config root) must satisfy ``check``; only when the key ``when`` is true."""

    key: str
    check: OneOf | Bounds | AllOrCount | WholeNumber | Name
    when: str | None = None


SEED = WholeNumber(0, 2**32 - 1)  # numpy's and torch's seeds; the patches' crops scale it (data.py)

VALUE_RULES: tuple[Rule, ...] = (
    Rule("device", OneOf(DEVICES)),
    Rule("seed", SEED),
    Rule("run_id", Name()),  # the run dir's name under <output_dir>/<stage>/
    Rule("data.seed", SEED),
    Rule("estimator.seed", SEED),
    Rule("finetune.seed", SEED),
    Rule("finetune.run_name", Name()),  # the folder under <checkpoint_dir>/finetune/
    Rule("data.name", OneOf(SOURCES)),
    Rule("data.image_size", AT_LEAST_ONE),
    Rule("data.num_images", AT_LEAST_ONE_OR_NULL),
    Rule("data.num_train_images", AT_LEAST_ONE_OR_NULL),
    Rule("data.stats_images", Bounds(low=2, why="(a covariance needs two images)")),
    Rule("data.num_workers", NON_NEGATIVE),
    Rule("data.patches_per_photo", AT_LEAST_ONE),
    Rule("data.patch_photo_size", AT_LEAST_ONE),
    Rule("model.noise_schedule", OneOf(SCHEDULES)),
    Rule("model.image_size", AT_LEAST_ONE),
    Rule("model.diffusion_steps", AT_LEAST_ONE),
    # the U-Net's GroupNorm has 32 groups (improved-diffusion's normalization); heads: -1 = num_heads
    Rule("model.num_channels", WholeNumber(32, multiple_of=32, why="(the U-Net normalizes in 32 groups)")),
    Rule("model.num_res_blocks", WholeNumber(1)),
    Rule("model.num_heads", WholeNumber(1)),
    Rule("model.num_heads_upsample", WholeNumber(1, also=(-1,), why="(-1: num_heads)")),
    Rule("model.dropout", Bounds(low=0, high=1, high_open=True)),
    Rule("model.vocab_size", Bounds(low=2)),  # masked_pixels models only
    Rule("model.embed_dim", AT_LEAST_ONE),
    Rule("estimator.npoints", Bounds(low=2, why="(a standard error needs two points)"), when="estimator.it"),
    Rule("estimator.logsnr_sampling", OneOf(SAMPLING_MODES)),
    Rule("estimator.rounding", OneOf(ROUNDING_MODES)),
    Rule("estimator.clip", Bounds(low=0, low_open=True, why="(scales of the log-SNR proposal)")),
    Rule("estimator.batch_size", AT_LEAST_ONE),
    Rule("estimator.vlb_steps_per_batch", AT_LEAST_ONE),
    Rule("estimator.precision", OneOf(PRECISIONS)),
    Rule("estimator.compile", OneOf(COMPILE_MODES)),
    Rule("estimator.precision_tolerance_bpd", Bounds(low=0, low_open=True, why="(bits/dim)")),
    Rule("estimator.precision_check_images", Bounds(low=2, why="(a standard error needs two images)")),
    Rule("estimator.num_masks", Bounds(low=2, why="(a standard error needs two masks)")),
    Rule("estimator.corrupt_fraction", Bounds(low=0, high=1, low_open=True)),
    Rule("estimator.pixel_maps", NON_NEGATIVE),
    Rule("logger.running_every_s", Bounds(low=0, why="(seconds between running estimates)")),
    Rule("logger.flush_every_s", Bounds(low=0, why="(seconds between writes of the run file; 0: when full)")),
    Rule("estimator.pixel_map_points", Bounds(low=2, why="(a standard error needs two points)"),
         when="estimator.it"),
    Rule("estimator.vlb_steps", AllOrCount(low=2), when="estimator.vlb"),
    Rule("estimator.budget", OneOf(BUDGETS)),
    Rule("estimator.target_stderr_bpd", Bounds(low=0, low_open=True, nullable=True,
                                               why="(bits/dim; null: target_stderr_ratio)")),
    Rule("estimator.target_stderr_ratio", Bounds(low=1, low_open=True, why="(times the full-cost stderr)")),
    Rule("estimator.pilot_images", Bounds(low=2, why="(a between-image variance needs two images)")),
    Rule("finetune.epochs", AT_LEAST_ONE),
    Rule("finetune.max_steps", AT_LEAST_ONE_OR_NULL),
    Rule("finetune.batch_size", Bounds(low=1, why="(images per step, all processes together)")),
    Rule("finetune.micro_batch_size", AT_LEAST_ONE_OR_NULL),
    Rule("finetune.lr", Bounds(low=0, low_open=True, why="(the paper uses 2.5e-5)")),
    Rule("finetune.weight_decay", NON_NEGATIVE),
    Rule("finetune.grad_clip", Bounds(low=0, low_open=True, nullable=True, why="(null: no clipping)")),
    Rule("finetune.warmup_steps", NON_NEGATIVE),
    Rule("finetune.ema_decay", Bounds(low=0, high=1, low_open=True, high_open=True, nullable=True,
                                      why="(null: no EMA)")),
    Rule("finetune.keep_epochs", Bounds(low=-1, why="(-1: all epoch files, 0: none)")),
    Rule("finetune.save_every_steps", Bounds(low=1, nullable=True, why="(null: at epoch ends)")),
    Rule("finetune.heldout_images", NON_NEGATIVE),
    Rule("finetune.max_skipped_steps", NON_NEGATIVE),
    Rule("finetune.log_every_steps", AT_LEAST_ONE),
    Rule("logger.backend", OneOf(("wandb", "none"))),
    Rule("logger.mode", OneOf(("offline", "online", "disabled"))),
    Rule("logger.init_timeout", POSITIVE),
)


ABSENT = object()


def lookup(cfg: Any, dotted: str) -> Any:
    """``cfg.a.b`` for ``"a.b"`` on a DictConfig or dataclass; ``ABSENT`` where a key does not exist."""
    node = cfg
    for part in dotted.split("."):
        try:
            node = getattr(node, part)
        except AttributeError:  # also OmegaConf's ConfigAttributeError: a key this config lacks
            return ABSENT
    return node


def value_problems(cfg: Any, section: str | None = None, rules: tuple[Rule, ...] = VALUE_RULES) -> list[str]:
    """One message per value of ``cfg`` outside :data:`VALUE_RULES` (empty: all good).

    ``cfg`` is the whole config, or with ``section`` (e.g. ``"finetune"``) that group alone (a
    DictConfig or its dataclass, e.g. :class:`FinetuneConfig`): then only that group's rules apply.
    """
    prefix = "" if section is None else section + "."
    problems = []
    for rule in rules:
        if not rule.key.startswith(prefix):
            continue
        value = lookup(cfg, rule.key.removeprefix(prefix))
        if value is ABSENT or (rule.when and not lookup(cfg, rule.when.removeprefix(prefix))):
            continue
        if isinstance(value, str) and value.startswith("${"):  # a dataclass's unresolved default (run_name)
            continue
        if not rule.check.allows(value):
            problems.append(rule.check.problem(rule.key, value))
    return problems


def unknown_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Keys of a composed config that its schema lacks: Hydra lets ``+key=value`` add them even to a
    structured config (``+estimator.npoint=5``), where they would be silently ignored."""
    import dataclasses

    from omegaconf import DictConfig

    if not isinstance(cfg, DictConfig):
        return []
    schema = OmegaConf.get_type(cfg)
    fields = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    found = []
    for key in cfg.keys():
        if key == "hydra":
            continue
        if fields is not None and key not in fields:
            found.append(f"{prefix}{key}")
        elif OmegaConf.is_dict(cfg._get_node(key)):
            found += unknown_keys(cfg._get_node(key), f"{prefix}{key}.")
    return found


def check_values(cfg: Any, section: str | None = None, rules: tuple[Rule, ...] = VALUE_RULES) -> None:
    """:func:`value_problems` (and, for a whole config, :func:`unknown_keys`) as one
    :class:`~itdiffusion.errors.UserError` (all problems, one line)."""
    problems = [] if section is not None else [
        f"{key} is not a key of the config (a typo? the schemas are in itdiffusion/config/schema.py and "
        "itdiffusion/models/schemas.py)"
        for key in unknown_keys(cfg)]
    problems += value_problems(cfg, section, rules)
    if problems:
        raise UserError("; ".join(problems))
