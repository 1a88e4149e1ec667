"""Structured configs: the schema behind ``src/itdiffusion/conf/``.

Each config group has a dataclass registered in Hydra's ConfigStore, so a mistyped key or a value
of the wrong type in an override is an error (``estimator.npoint=5`` fails), never a silent default.
YAML files in ``conf/<group>/`` extend these schemas through their ``defaults`` list
(``- /schema/<group>@_here_``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from itdiffusion import run_ids, trajectory
from itdiffusion.models.schemas import ModelConfig

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")  # the Hydra config tree, in the package


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
    # seconds between writes of the run's local .wandb file (so that a run killed with SIGKILL keeps all but
    # the last ones; 0: only when a 32 KiB block fills or the run ends)
    flush_every_s: float = 15.0


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
    device: str = "auto"  # auto | cpu | cuda | cuda:N
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
