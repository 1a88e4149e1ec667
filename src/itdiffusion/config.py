"""Structured configs: the schema behind ``src/itdiffusion/conf/``.

Each config group has a dataclass registered in Hydra's ConfigStore, so a mistyped key or a value
of the wrong type in an override is an error (``estimator.npoint=5`` fails), never a silent default.
YAML files in ``conf/<group>/`` extend these schemas through their ``defaults`` list
(``- /schema/<group>@_here_``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from itdiffusion import run_ids, trajectory
from itdiffusion.budget import BUDGETS
from itdiffusion.data import SOURCES
from itdiffusion.errors import UserError
from itdiffusion.information.curves import ROUNDING_MODES
from itdiffusion.information.proposal import SAMPLING_MODES
from itdiffusion.models.acceleration import COMPILE_MODES, PRECISIONS
from itdiffusion.models.schedules import SCHEDULES
from itdiffusion.models.schemas import ModelConfig

CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")  # the Hydra config tree, shipped in the package


@dataclass
class PathsConfig:
    data_dir: str = "data"
    checkpoint_dir: str = "checkpoints"
    output_dir: str = "outputs"
    cache_dir: str = "${paths.output_dir}/cache"
    results_dir: str = "${paths.output_dir}/results"


@dataclass
class DataConfig:
    """A dataset of RGB uint8 images, scaled to [-1, 1] by the loader (see :mod:`itdiffusion.data`)."""

    name: str = MISSING  # cifar10 | image_folder | npz | patches
    root: str = MISSING  # folder: cifar10 holds cifar-10-batches-py; image_folder <split>/; npz <split>.npz
    download: bool = False  # cifar10 only: fetch through torchvision
    verify: bool = True  # cifar10 only: check torchvision's md5 sums
    image_size: int = 32
    train_split: str = "train"  # split folder / file name (image_folder: cifar_train)
    test_split: str = "test"  # (image_folder: cifar_test)
    num_images: int | None = None  # limit on test images evaluated (None: all)
    num_train_images: int | None = None  # limit on training images used by finetune
    stats_images: int = 12500  # training images for the Gaussian reference (paper: 12,500)
    stats_diagonal: bool = False  # Gaussian reference with a diagonal covariance (else full SVD)
    hflip: bool = True  # random horizontal flips, fine-tuning only
    num_workers: int = 2
    # patches: 32x32 crops of scikit-image's photos, split into train / test by source photo
    patches_per_photo: int = 64
    patches_test_photos: list[str] = field(default_factory=lambda: ["chelsea", "coffee"])
    patch_photo_size: int = 256  # photos are resized so their shorter side has this many pixels
    seed: int = "${seed}"  # the reference's training subset, the patches' crops (default: the top-level seed)


@dataclass
class EstimatorConfig:
    """How bits/dim are estimated by the evaluate stage."""

    it: bool = True  # information-theoretic estimates (continuous, discrete, dequantized)
    vlb: bool = True  # IDDPM's variational bound (discrete and continuous-density)
    npoints: int = 1000  # log-SNR points per image for the IT estimates
    logsnr_sampling: str = "stratified"  # stratified | random
    rounding: str = "soft"  # soft | hard | none: how x_hat is rounded for the discrete estimate
    clip: float = 4.0  # truncate the logistic log-SNR proposal at this many scales
    batch_size: int = 256  # network inputs per forward pass
    vlb_steps_per_batch: int = 8  # VLB timesteps evaluated in one forward pass
    control_variate: bool = True  # IT: the reference's linear decoder on the same noise, minus its exact
    # mean, as a zero-mean control variate (no extra network calls; unbiased; docs/estimators.md)
    # how the U-Net runs (itdiffusion.models.acceleration); a fast path is checked against fp32 eager on
    # the first test images before the evaluation (itdiffusion.stages.precision, metrics.json precision_check)
    precision: str = "fp32"  # fp32 | bf16 (autocast) | auto (bf16 on CUDA if the check passes, else fp32)
    channels_last: bool = False  # channels_last (NHWC) U-Net inputs
    compile: str = "none"  # torch.compile mode: none | default | reduce-overhead | max-autotune
    precision_tolerance_bpd: float = 0.002  # the fast path's bits/dim must stay this close to fp32's
    precision_check_images: int = 8  # test images of the paired fp32-vs-fast check (>= 2)
    num_masks: int = 100  # masks per image for masked-diffusion models (I-MDCE; model.kind=masked_pixels)
    corrupt_fraction: float = 0.05  # masked models' log-ratio example: sub-pixels replaced by noise
    # an evaluate run whose log-SNR proposal this run uses instead of running the pilot (so that an ensemble
    # can combine both runs' stored curves: ensemble_curves); null: the pilot chooses the range
    logsnr_proposal_from: str | None = None
    # per-pixel information maps (itdiffusion.pixel_maps) of the first this many test images; 0: none
    pixel_maps: int = 16
    # log-SNR points of each map, drawn for the maps alone (pixel_maps x pixel_map_points network calls)
    pixel_map_points: int = 256
    # VLB middle terms: all (the exact T-step sum) or K sampled timesteps in geometric strata (unbiased, with
    # a Monte Carlo stderr; itdiffusion.variational.vlb_sampled)
    vlb_steps: str = "all"
    # per_image: npoints and vlb_steps as given, every image to full precision (per-image estimates, e.g. for
    # outlier detection). dataset: a pilot picks the fewest points and VLB steps per image that reach the
    # target stderr of each dataset mean (itdiffusion.budget; metrics.json "budget"); npoints and vlb_steps
    # are then the full-cost protocol it is compared with (and the caps)
    budget: str = "per_image"
    target_stderr_bpd: float | None = None  # dataset budget: the stderr each dataset mean must reach
    target_stderr_ratio: float = 1.1  # ... or (target_stderr_bpd null) this times the full-cost protocol's
    pilot_images: int = 16  # dataset budget: test images of the pilot (their own seeds)
    budget_from: str | None = None  # dataset budget: reuse this evaluate run's chosen npoints / vlb_steps
    seed: int = "${seed}"  # every image's log-SNR points and noises (default: the top-level seed)


@dataclass
class FinetuneConfig:
    """The ``finetune`` stage (see :mod:`itdiffusion.stages.finetune` and :mod:`itdiffusion.training`)."""

    objective: str = "it"  # it (IT bound) | iddpm (IDDPM's own loss) | any_order (masked-pixel models only)
    init: str | None = None  # starting weights: None = the model's checkpoint; a path; or "scratch"
    # run dir: <checkpoint_dir>/finetune/<run_name>; the default carries a hash of the settings that change
    # the training trajectory (itdiffusion.trajectory), so runs with other settings never share a directory
    run_name: str = "${model.name}_${finetune.objective}_${itd_settings_hash:}"
    epochs: int = 10
    max_steps: int | None = None  # stop after this many steps (None: epochs decide)
    batch_size: int = 32  # the global batch (all processes together): results do not depend on the GPU count
    micro_batch_size: int | None = None  # images per forward pass and process (None: its whole share);
    # smaller: gradient accumulation over passes (same update up to rounding)
    lr: float = 2.5e-5  # AdamW (= Adam at weight_decay 0)
    weight_decay: float = 0.0
    grad_clip: float | None = None  # clip the global gradient norm (None: no clipping)
    warmup_steps: int = 0  # linear LR warm-up from lr/warmup_steps to lr (0: constant lr, the paper)
    bf16: bool = False  # bfloat16 autocast for the forward pass
    ema_decay: float | None = None  # keep an EMA of the weights, exported as ema.pt (None: no EMA)
    save_every_steps: int | None = None  # mid-epoch checkpoints (last.pt); epoch ends always save
    keep_epochs: int = 2  # epoch_XXX.pt files kept (the newest); -1: all, 0: none (last.pt, model.pt always)
    heldout_images: int = 256  # first test images for the held-out loss curve (0: none)
    log_every_steps: int = 10  # tracker (wandb) rows: the mean train loss over this many steps
    skip_nonfinite: bool = False  # skip (and count) steps with a NaN/inf loss or gradient instead of stopping
    max_skipped_steps: int = 10  # with skip_nonfinite: give up (exit 2) when more steps than this are skipped
    seed: int = "${seed}"  # data order, flips, per-image noise, dropout, scratch init (default: the top seed)


@dataclass
class LoggerConfig:
    backend: str = "wandb"  # wandb | none
    # wandb's variables fill what is not set explicitly (an override wins): WANDB_PROJECT, WANDB_ENTITY,
    # WANDB_MODE, WANDB_DIR; WANDB_TAGS adds to tags (itdiffusion.tracking)
    project: str = "${oc.env:WANDB_PROJECT,itdiffusion}"
    entity: str | None = "${oc.env:WANDB_ENTITY,null}"
    mode: str = "${oc.env:WANDB_MODE,offline}"  # offline | online | disabled
    group: str | None = None  # runs of one reproduction share a group
    dir: str = "${oc.env:WANDB_DIR,${paths.output_dir}}"
    tags: list[str] = field(default_factory=list)
    init_timeout: float = 20.0  # seconds to wait for an online wandb.init before falling back to offline
    # evaluate: seconds between two running estimates (the dataset means so far, logged and printed while
    # the evaluation runs; each costs an estimate over the images done, kept under a tenth of the time)
    running_every_s: float = 30.0


@dataclass
class ReportConfig:
    """The ``report`` stage (:mod:`itdiffusion.stages.report`)."""

    # true: drop the rows of runs that no longer verify (metrics.json does not match per_image.npz, files
    # missing) and exit 0; false: such rows leave the tables, stay marked in the store, and the report exits 2
    allow_invalid: bool = False


@dataclass
class Config:
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    experiment: str = "default"
    run_id: str = "${itd_run_id:}"  # names the run dir; shared by all torchrun ranks (see default_run_id)
    label: str = "${model.name}"  # the row name in the results tables
    # the published row a run reproduces: DDPM, IDDPM, DDPM(tune), IDDPM(tune), Ensemble (results.PAPER)
    paper_row: str | None = None
    ensemble: list[str] = field(default_factory=list)  # evaluate: >= 2 checkpoints of `model` to ensemble
    # evaluate, ensembles across model families: one model config name (conf/model/) per `ensemble` entry,
    # e.g. [iddpm_cifar10_vlb,ddpm_cifar10]; empty: every checkpoint is a `model` (itdiffusion.members)
    ensemble_models: list[str] = field(default_factory=list)
    # evaluate, ensembles: one evaluate run per member (its run dir or per_image.npz, in `ensemble` order)
    # whose stored MMSE curves the ensemble reuses: no network evaluation (estimator.vlb=false; the runs
    # must share this run's checkpoints, test images and estimator settings, else a UserError says which)
    ensemble_curves: list[str] = field(default_factory=list)
    skip_done: bool = False  # skip a stage whose outputs already exist in its run dir (resumable chains)
    # the number of the stage's result that its main() returns, the objective of an optimizing sweeper
    # (conf/hparams_search/): e.g. finetune.json's final_heldout_loss_bpd, metrics.json's elapsed_s
    optimized_metric: str | None = None
    # evaluate: add this run to the results tables (results.{json,csv,md}); false keeps its run dir and
    # metrics.json but leaves it out of the tables, now and in every later report
    results: bool = True
    device: str = "auto"  # auto | cpu | cuda
    # everything random in a stage: data.seed, estimator.seed and finetune.seed follow it unless set
    seed: int = 0


def register_configs(model_schemas: Mapping[str, type] | None = None) -> None:
    """Register the schemas; YAML files name them in their defaults list (``- /schema/model@_here_``).
    ``model_schemas``: ``{kind: dataclass}`` of the model families (``/schema/model/<kind>``; the stages
    pass :func:`itdiffusion.models.families.model_schemas`)."""
    if not OmegaConf.has_resolver("itd_run_id"):
        OmegaConf.register_new_resolver("itd_run_id", run_ids.default_run_id)
    if not OmegaConf.has_resolver("itd_settings_hash"):
        OmegaConf.register_new_resolver("itd_settings_hash", trajectory.settings_hash_resolver)
    if not OmegaConf.has_resolver("itd_tasks_per_node"):  # conf/hydra/launcher/slurm.yaml
        OmegaConf.register_new_resolver("itd_tasks_per_node", lambda gpus: max(1, int(gpus or 0)))
    if not OmegaConf.has_resolver("itd_sweep_id"):
        OmegaConf.register_new_resolver("itd_sweep_id", run_ids.sweep_id)
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    schemas = {"paths": PathsConfig, "data": DataConfig, "model": ModelConfig, "estimator": EstimatorConfig,
               "finetune": FinetuneConfig, "logger": LoggerConfig}
    for group, node in schemas.items():
        # group files extend a schema with `- /schema/<group>@_here_` or `- /schema/<group>@_here_: <group>`
        cs.store(group="schema", name=group, node=node)
        cs.store(group=f"schema/{group}", name=group, node=node)
    for kind, node in (model_schemas or {}).items():
        cs.store(group="schema/model", name=kind, node=node)


# ----------------------------------------------------------------------------------------------
# Allowed values. The schemas above fix keys and types; OmegaConf does not check values (it ignores
# typing.Literal, and Enum fields would turn every value into an Enum in metrics.json). So every
# value check that needs nothing but the config lives in VALUE_RULES, and check_values(cfg) applies
# them before a stage runs (itdiffusion.stages.launch): a bad value is one line, exit 2, nothing written.
# Checks that need data, weights or several keys at once stay in the stages. model.kind and
# finetune.objective take the registered families' values (itdiffusion.models.families.value_rules); the
# other tuples are the library's own (data.SOURCES, information.ROUNDING_MODES, ...), never copies.
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# Settings that only matter under another one. A key given on the command line (or in a sweep job's
# overrides) whose condition does not hold would be silently ignored, so the launch fails instead,
# naming the key to add (dependency_problems, applied by itdiffusion.stages.launch to the groups the
# stage reads). Keys set in config files are not checked: experiment=paper_full inherits paper's
# dataset-budget settings on purpose and runs per image. Left out on purpose, because scripts/reproduce.sh
# hands the same overrides to evaluations where they apply and to others where they cannot: the VLB keys
# (vlb_steps, vlb_steps_per_batch; its ensemble steps run with estimator.vlb=false) and the masked-model
# keys (num_masks, corrupt_fraction; its IDDPM and DDPM evaluations).
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Needs:
    """``key`` applies only where ``other`` is one of ``values`` (with ``negate``: is none of them)."""

    key: str
    other: str
    values: tuple[Any, ...]
    negate: bool = False

    def holds(self, value: Any) -> bool:
        return (value in self.values) != self.negate

    def problem(self, value: Any) -> str:
        shown = "|".join(_yaml(v) for v in self.values)
        wanted = f"{self.other} other than {shown}" if self.negate else f"{self.other}={shown}"
        return (f"{self.key} applies only with {wanted} (here {self.other}={_yaml(value)}): "
                f"add that setting or drop {self.key}")


def _yaml(value: Any) -> str:
    """A value as an override writes it (null, true, false)."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


DATASET_BUDGET = ("estimator.budget", ("dataset",))
DEPENDENT_KEYS: tuple[Needs, ...] = (
    *(Needs(f"estimator.{k}", *DATASET_BUDGET)
      for k in ("target_stderr_bpd", "target_stderr_ratio", "pilot_images", "budget_from")),
    Needs("estimator.target_stderr_ratio", "estimator.target_stderr_bpd", (None,)),  # the bpd target wins
    *(Needs(f"estimator.{k}", "estimator.it", (True,))
      for k in ("npoints", "logsnr_sampling", "rounding", "clip", "control_variate", "pixel_maps",
                "pixel_map_points", "logsnr_proposal_from")),
    *(Needs(f"estimator.{k}", "estimator.precision", ("fp32",), negate=True)
      for k in ("precision_tolerance_bpd", "precision_check_images")),
    *(Needs(f"data.{k}", "data.name", ("cifar10",)) for k in ("download", "verify")),
    *(Needs(f"data.{k}", "data.name", ("patches",))
      for k in ("patches_per_photo", "patches_test_photos", "patch_photo_size")),
    Needs("finetune.max_skipped_steps", "finetune.skip_nonfinite", (True,)),
)


def dependency_problems(cfg: Any, given: set[str], groups: tuple[str, ...] | None = None) -> list[str]:
    """One message per key in ``given`` (dotted keys set by the command line) whose :data:`DEPENDENT_KEYS`
    condition fails in ``cfg``; with ``groups``, only keys of those config groups are checked."""
    problems = []
    for need in DEPENDENT_KEYS:
        if need.key not in given or (groups is not None and need.key.split(".")[0] not in groups):
            continue
        value = _lookup(cfg, need.other)
        if value is not _ABSENT and not need.holds(value):
            problems.append(need.problem(value))
    return problems


def override_keys(overrides: list[str]) -> set[str]:
    """The dotted keys that Hydra overrides (``a.b=1``, ``+a.b=1``, ``++a.b=1``, ``~a.b``) set."""
    return {o.lstrip("+~").split("=", 1)[0] for o in overrides}


# The config groups each stage reads: its wandb config carries these (and the top-level keys) only, and
# only their keys are checked against DEPENDENT_KEYS (scripts/reproduce.sh hands its overrides to every
# stage).
GROUPS = ("paths", "data", "model", "estimator", "finetune", "logger", "report")
STAGE_GROUPS: dict[str, tuple[str, ...]] = {
    "stats": ("paths", "data", "logger"),
    "evaluate": ("paths", "data", "model", "estimator", "logger"),
    "finetune": ("paths", "data", "model", "finetune", "logger"),
    "report": ("paths", "logger", "report"),
}


def stage_config(config: dict, stage: str) -> dict:
    """``config`` (a resolved config as a dict) without the groups that ``stage`` does not read."""
    used = STAGE_GROUPS[stage]
    return {k: v for k, v in config.items() if k not in GROUPS or k in used}


_ABSENT = object()


def _lookup(cfg: Any, dotted: str) -> Any:
    """``cfg.a.b`` for ``"a.b"`` on a DictConfig or dataclass; ``_ABSENT`` where a key does not exist."""
    node = cfg
    for part in dotted.split("."):
        try:
            node = getattr(node, part)
        except AttributeError:  # also OmegaConf's ConfigAttributeError: a key this config lacks
            return _ABSENT
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
        value = _lookup(cfg, rule.key.removeprefix(prefix))
        if value is _ABSENT or (rule.when and not _lookup(cfg, rule.when.removeprefix(prefix))):
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
        f"{key} is not a key of the config (a typo? the schemas are in itdiffusion/config.py and "
        "itdiffusion/models/schemas.py)"
        for key in unknown_keys(cfg)]
    problems += value_problems(cfg, section, rules)
    if problems:
        raise UserError("; ".join(problems))
