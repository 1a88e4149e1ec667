"""Structured configs: the schema behind ``src/itdiffusion/conf/``.

Each config group has a dataclass registered in Hydra's ConfigStore, so a mistyped key or a value
of the wrong type in an override is an error (``estimator.npoint=5`` fails), never a silent default.
YAML files in ``conf/<group>/`` extend these schemas through their ``defaults`` list
(``- /schema/<group>@_here_``).
"""

from __future__ import annotations

import functools
import os
import secrets
import time
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


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
class ModelConfig:
    """Keys named exactly as improved-diffusion's flags, plus where the weights come from."""

    name: str = MISSING
    kind: str = "iddpm"  # iddpm | masked_pixels
    image_size: int = 32
    num_channels: int = 128
    num_res_blocks: int = 3
    num_heads: int = 4
    num_heads_upsample: int = -1
    attention_resolutions: str = "16,8"
    dropout: float = 0.3
    learn_sigma: bool = True
    sigma_small: bool = False
    class_cond: bool = False
    diffusion_steps: int = 4000
    noise_schedule: str = "cosine"
    timestep_respacing: str = ""
    use_kl: bool = True
    predict_xstart: bool = False
    rescale_timesteps: bool = True
    rescale_learned_sigmas: bool = True
    use_checkpoint: bool = False
    use_scale_shift_norm: bool = True
    checkpoint: str | None = None  # local path; None with checkpoint_url: download on first use
    checkpoint_url: str | None = None
    training_objective: str = "L_vlb"  # label for the report's "training objective" column


@dataclass
class MaskedPixelsModelConfig(ModelConfig):
    """A masked (absorbing) diffusion model over sub-pixels: improved-diffusion's UNetModel with a
    token embedding in and ``vocab_size`` logits per channel out (``discrete.build_masked_pixel_model``).

    Uses the U-Net keys of ``ModelConfig`` (image_size, num_channels, num_res_blocks, num_heads,
    num_heads_upsample, attention_resolutions, dropout, use_checkpoint, use_scale_shift_norm) and
    ``checkpoint``; the Gaussian-diffusion keys do not apply.
    """

    kind: str = "masked_pixels"
    vocab_size: int = 256  # values per sub-pixel; the mask id is vocab_size
    embed_dim: int = 32  # token embedding width per colour channel (U-Net input: 3 * embed_dim)
    training_objective: str = "any-order (I-MDCE)"


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
    # mean, as a zero-mean control variate (no extra network calls; unbiased; README, performance section)
    # how the U-Net runs (itdiffusion.models.acceleration); a fast path is checked against fp32 eager on
    # the first test images before the evaluation (itdiffusion.stages.precision, metrics.json precision_check)
    precision: str = "fp32"  # fp32 | bf16 (autocast) | auto (bf16 on CUDA if the check passes, else fp32)
    channels_last: bool = False  # channels_last (NHWC) U-Net inputs
    compile: str = "none"  # torch.compile mode: none | default | reduce-overhead | max-autotune
    precision_tolerance_bpd: float = 0.002  # the fast path's bits/dim must stay this close to fp32's
    precision_check_images: int = 8  # test images of the paired fp32-vs-fast check (>= 2)
    num_masks: int = 100  # masks per image for masked-diffusion models (I-MDCE; model.kind=masked_pixels)
    corrupt_fraction: float = 0.05  # masked models' log-ratio example: sub-pixels replaced by noise
    seed: int = "${seed}"  # every image's log-SNR points and noises (default: the top-level seed)


@dataclass
class FinetuneConfig:
    """The ``finetune`` stage (see :mod:`itdiffusion.stages.finetune` and :mod:`itdiffusion.training`)."""

    objective: str = "it"  # it (IT bound) | iddpm (IDDPM's own loss) | any_order (masked-pixel models only)
    init: str | None = None  # starting weights: None = the model's checkpoint; a path; or "scratch"
    run_name: str = "${model.name}_${finetune.objective}"  # run dir: <checkpoint_dir>/finetune/<run_name>
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
    heldout_images: int = 256  # first test images for the held-out loss curve (0: none)
    log_every_steps: int = 10  # tracker (wandb) rows: the mean train loss over this many steps
    skip_nonfinite: bool = False  # skip (and count) steps with a NaN/inf loss or gradient instead of stopping
    seed: int = "${seed}"  # data order, flips, per-image noise, dropout, scratch init (default: the top seed)


@dataclass
class LoggerConfig:
    backend: str = "wandb"  # wandb | none
    project: str = "itdiffusion"
    entity: str | None = None
    mode: str = "offline"  # offline | online | disabled
    group: str | None = None  # runs of one reproduction share a group
    dir: str = "${paths.output_dir}"
    tags: list[str] = field(default_factory=list)
    init_timeout: float = 60.0  # seconds to wait for wandb.init before falling back to offline


@dataclass
class Config:
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    experiment: str = "default"
    run_id: str = "${itd_run_id:}"  # names the run dir; shared by all torchrun ranks (see default_run_id)
    label: str = "${model.name}"  # the row name in the results tables
    paper_row: str | None = None  # the published row this run reproduces (IDDPM, IDDPM(tune), Ensemble)
    ensemble: list[str] = field(default_factory=list)  # evaluate: >= 2 checkpoints of `model` to ensemble
    # evaluate, ensembles: one evaluate run per member (its run dir or per_image.npz, in `ensemble` order)
    # whose stored MMSE curves the ensemble reuses: no network evaluation (estimator.vlb=false; the runs
    # must share this run's checkpoints, test images and estimator settings, else a UserError says which)
    ensemble_curves: list[str] = field(default_factory=list)
    skip_done: bool = False  # skip a stage whose outputs already exist in its run dir (resumable chains)
    device: str = "auto"  # auto | cpu | cuda
    # everything random in a stage: data.seed, estimator.seed and finetune.seed follow it unless set
    seed: int = 0


def default_run_id() -> str:
    """The run id when none is given: in a Hydra multirun job ``<sweep id>-<job number>``
    (:mod:`itdiffusion.sweeps`), else :func:`process_run_id`."""
    from itdiffusion.sweeps import job_run_id

    return job_run_id() or process_run_id()


@functools.cache
def process_run_id() -> str:
    """This process's run id: ``ITD_RUN_ID``, else one that every torchrun rank agrees on.

    A single process gets a timestamp plus a random suffix. Under ``torchrun --standalone`` the
    ranks share torchelastic's rendezvous id; other multi-process launches must pass ``run_id=...``
    (``scripts/reproduce.sh`` always does), since ranks cannot talk before Hydra picks the run dir.
    """
    if os.environ.get("ITD_RUN_ID"):
        return os.environ["ITD_RUN_ID"]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        rdzv = os.environ.get("TORCHELASTIC_RUN_ID", "none")
        if rdzv in ("", "none") and os.environ.get("SLURM_JOB_ID") and os.environ.get("SLURM_STEP_ID"):
            return f"slurm-{os.environ['SLURM_JOB_ID']}-{os.environ['SLURM_STEP_ID']}"  # srun: one step
        if rdzv in ("", "none"):
            raise ValueError("launched with several processes: pass run_id=<name> (or set ITD_RUN_ID) "
                             "so that all ranks write to one run dir")
        return "torchrun-" + rdzv.replace("-", "")[:12]
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def register_configs() -> None:
    """Register the schemas; YAML files name them in their defaults list (``- /schema/model@_here_``)."""
    if not OmegaConf.has_resolver("itd_run_id"):
        OmegaConf.register_new_resolver("itd_run_id", default_run_id)
    if not OmegaConf.has_resolver("itd_sweep_id"):
        from itdiffusion.sweeps import sweep_id

        OmegaConf.register_new_resolver("itd_sweep_id", sweep_id)
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    schemas = {"paths": PathsConfig, "data": DataConfig, "model": ModelConfig, "estimator": EstimatorConfig,
               "finetune": FinetuneConfig, "logger": LoggerConfig}
    for group, node in schemas.items():
        # group files extend a schema with `- /schema/<group>@_here_` or `- /schema/<group>@_here_: <group>`
        cs.store(group="schema", name=group, node=node)
        cs.store(group=f"schema/{group}", name=group, node=node)
    cs.store(group="schema/model", name="masked_pixels", node=MaskedPixelsModelConfig)
