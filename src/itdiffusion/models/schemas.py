"""The config schemas of the model families (``model.*``): improved-diffusion's flags and where the weights
come from (:class:`ModelConfig`, the IDDPM family's), extended by the other families. Each family of
:mod:`itdiffusion.models.families` names its schema; Hydra's ConfigStore holds it as ``/schema/model/<kind>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

__all__ = ["DDPMModelConfig", "MaskedPixelsModelConfig", "ModelConfig"]


@dataclass
class ModelConfig:
    """Keys named exactly as improved-diffusion's flags, plus where the weights come from."""

    name: str = MISSING
    kind: str = "iddpm"  # iddpm | masked_pixels | ddpm
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
    checkpoint_sha256: str | None = None  # the download's expected sha256 (checked; None: not checked)
    checkpoint_bytes: int | None = None  # the download's expected size in bytes (checked; None: not checked)
    checkpoint_file: str | None = None  # file name of the download in <checkpoint_dir>/<kind>/ (None: URL's)
    training_objective: str = "L_vlb"  # label for the report's "training objective" column


@dataclass
class MaskedPixelsModelConfig(ModelConfig):
    """A masked (absorbing) diffusion model over sub-pixels: improved-diffusion's UNetModel with a
    token embedding in and ``vocab_size`` logits per channel out
    (:func:`itdiffusion.models.masked_unet.build_masked_pixel_model`).

    Uses the U-Net keys of ``ModelConfig`` (image_size, num_channels, num_res_blocks, num_heads,
    num_heads_upsample, attention_resolutions, dropout, use_checkpoint, use_scale_shift_norm) and
    ``checkpoint``; the Gaussian-diffusion keys do not apply.
    """

    kind: str = "masked_pixels"
    vocab_size: int = 256  # values per sub-pixel; the mask id is vocab_size
    embed_dim: int = 32  # token embedding width per colour channel (U-Net input: 3 * embed_dim)
    training_objective: str = "any-order (I-MDCE)"


@dataclass
class DDPMModelConfig(ModelConfig):
    """A diffusers ``UNet2DModel`` with DDPM's schedule (:mod:`itdiffusion.models.ddpm`).

    Weights: ``checkpoint`` (a diffusers directory or a ``.pt`` state dict), else ``checkpoint_url`` (a
    ``.pt`` state dict, downloaded into ``<checkpoint_dir>/ddpm/``), else ``pretrained`` (a Hugging Face
    hub id or a diffusers directory, through the hub's cache). The U-Net is built from the keys below
    (UNet2DModel's own names; ``image_size`` is its sample_size, ``dropout`` its dropout); a diffusers
    directory or hub id must agree with them. ``diffusion_steps`` is the chain of the variational bound
    (DDPM's betas rescaled to that many steps; ITD: 4000); ``noise_schedule`` must be linear. The other
    improved-diffusion keys of ``ModelConfig`` do not apply.
    """

    kind: str = "ddpm"
    pretrained: str | None = "google/ddpm-cifar10-32"  # hub id or diffusers directory (None: none)
    hub_revision: str | None = None  # hub branch, tag or commit (None: main)
    # UNet2DModel architecture (google/ddpm-cifar10-32's config.json)
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 256, 256])
    down_block_types: list[str] = field(
        default_factory=lambda: ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"])
    up_block_types: list[str] = field(
        default_factory=lambda: ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"])
    layers_per_block: int = 2
    attention_head_dim: int | None = None  # None: one head as wide as the block
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    act_fn: str = "silu"
    flip_sin_to_cos: bool = False
    freq_shift: int = 1
    downsample_padding: int = 0
    mid_block_scale_factor: float = 1.0
    center_input_sample: bool = False
    time_embedding_type: str = "positional"
    # DDPM's schedule (google/ddpm-cifar10-32's scheduler_config.json)
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "linear"  # only linear
    prediction_type: str = "epsilon"  # only epsilon
    variance_type: str = "fixed_large"  # fixed_large (DDPM's CIFAR-10, ITD's VLB) | fixed_small
    # ModelConfig keys with DDPM values
    dropout: float = 0.0
    learn_sigma: bool = False
    noise_schedule: str = "linear"
    diffusion_steps: int = 4000  # VLB chain: ITD's benchmark (1000: the model's own discrete chain)
    use_kl: bool = False
    training_objective: str = "L_simple"
