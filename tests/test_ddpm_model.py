"""DDPM through diffusers: the schedule, the denoiser's timestep map, the VLB against improved-diffusion's
calc_bpd_loop, weights from a diffusers directory / ITD-style .pt / a checked download, offline errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from itdiffusion.errors import CheckpointError, UserError
from itdiffusion.members import load_member
from itdiffusion.models import ddpm, ddpm_weights
from itdiffusion.models.iddpm import build_model_and_diffusion, load_checkpoint, resolve_checkpoint
from itdiffusion.models.schedules import linear_betas
from itdiffusion.models.upstream import improved_diffusion
from itdiffusion.stages import CONFIG_DIR
from itdiffusion.variational import vlb

DDPM_BETAS = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)  # Ho et al. 2020, the original float64 code


def model_cfg(name: str = "ddpm_tiny", *overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[f"model={name}", *overrides]).model


def small_cfg(*overrides: str):
    """ddpm_tiny at 16x16 pixels with a 60-step VLB chain: seconds on a CPU."""
    return model_cfg("ddpm_tiny", "model.image_size=16", "model.diffusion_steps=60", *overrides)


def logit(p):
    return torch.log(p) - torch.log1p(-p)


def pixels(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    p = torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed))
    p[:, 0, 0, 0], p[:, 0, 0, 1] = 0, 255
    return p.to(torch.float64) / 127.5 - 1


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory) -> Path:
    """A random tiny UNet2DModel saved with save_pretrained (the layout of a hub snapshot)."""
    torch.manual_seed(0)
    unet = ddpm.build_unet(small_cfg())
    with torch.no_grad():  # diffusers zero-initialises no output layer, but make every weight matter
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("hub") / "tiny-ddpm"
    unet.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------- schedule

@pytest.mark.parametrize("steps", [1000, 4000])
def test_linear_betas_are_ddpms_and_improved_diffusions(steps):
    ours = linear_betas(1e-4, 0.02, 1000, steps)
    upstream = improved_diffusion().gaussian_diffusion.get_named_beta_schedule("linear", steps)
    np.testing.assert_array_equal(ours, upstream)
    if steps == 1000:
        np.testing.assert_array_equal(ours, DDPM_BETAS)
        np.testing.assert_array_equal(ddpm.train_alpha_bar(small_cfg()), np.cumprod(1 - DDPM_BETAS))
    with pytest.raises(ValueError, match="must lie in"):
        linear_betas(1e-4, 0.02, 1000, 20)  # beta_end 1.0


def test_denoiser_timestep_is_exact_at_every_training_step():
    network = ddpm.build_network(torch.nn.Identity(), small_cfg())
    denoiser = ddpm.DDPMDenoiser(network)
    abar = torch.from_numpy(np.cumprod(1 - DDPM_BETAS))
    u = denoiser.timestep(logit(abar))
    torch.testing.assert_close(u, torch.arange(1000, dtype=torch.float64), rtol=0, atol=1e-9)
    # diffusers' scheduler holds the same schedule in float32: within a hundredth of a step
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    u32 = denoiser.timestep(logit(sched.alphas_cumprod.double()))
    assert (u32 - torch.arange(1000)).abs().max() < 1e-2
    # ends: clean data at u = -1, pure noise clamped to the last step; monotone in between
    ends = denoiser.timestep(torch.tensor([60.0, -60.0], dtype=torch.float64))
    torch.testing.assert_close(ends, torch.tensor([-1.0, 999.0], dtype=torch.float64), rtol=0, atol=1e-9)
    grid = denoiser.timestep(torch.linspace(-10, 15, 301, dtype=torch.float64))  # logit(abar_999) = -10.1
    assert (grid.diff() < 0).all()


def itd_logsnr2t(logsnr: torch.Tensor) -> torch.Tensor:
    """ITD's WrapUNet2DModel.logsnr2t (utilsitd/unet.py), restated: nearest abar of the linear schedule
    rescaled to 10,000 steps, times 0.1."""
    steps = 10_000
    table = torch.from_numpy(np.cumprod(1 - np.linspace(1e-5, 0.002, steps, dtype=np.float64)))
    return (table[None, :] - torch.sigmoid(logsnr)[:, None]).abs().argmin(1) * 0.1


def test_choice_versus_itds_10000_step_table():
    # Pins the documented difference: at the noise level of training step i, ITD feeds i + 0.5 .. i + 3.9
    abar = torch.from_numpy(np.cumprod(1 - DDPM_BETAS))
    diff = itd_logsnr2t(logit(abar)) - torch.arange(1000)
    assert diff.min() == pytest.approx(0.5, abs=1e-3) and diff.max() == pytest.approx(3.9, abs=1e-3)
    assert diff.mean() == pytest.approx(1.69, abs=0.01)


class RecordingUNet(torch.nn.Module):
    """Stands in for UNet2DModel: records the timesteps it is fed, returns z (float32)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.seen: list[torch.Tensor] = []

    def forward(self, x, t, return_dict=True):
        self.seen.append(t.detach().clone())
        return (x * self.w,)


@pytest.mark.parametrize("train_steps", [1000, 500])
def test_network_and_denoiser_feed_the_unet_its_own_step(train_steps):
    scale = train_steps / 1000
    cfg = small_cfg(f"model.num_train_timesteps={train_steps}", "model.diffusion_steps=4000",
                    f"model.beta_end={0.02 * scale}", f"model.beta_start={1e-4 * scale}")
    unet = RecordingUNet()
    network = ddpm.build_network(unet, cfg)
    abar = torch.from_numpy(ddpm.train_alpha_bar(cfg))
    i = torch.tensor([0, 17, train_steps - 1])
    ddpm.DDPMDenoiser(network)(torch.zeros(3, 3, 4, 4), logit(abar[i]))
    torch.testing.assert_close(unet.seen[-1].double(), i.double(), rtol=0, atol=1e-3)
    # the VLB chain: improved-diffusion passes step t of S = 4000 as t * 1000 / S; the U-Net gets t * T / S
    diffusion = ddpm.build_vlb_diffusion(cfg)
    t = torch.tensor([0, 1, 3999])
    network(torch.zeros(3, 3, 4, 4), diffusion._scale_timesteps(t))
    torch.testing.assert_close(unet.seen[-1].double(), t.double() * train_steps / 4000, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------------- VLB

@pytest.mark.parametrize("variance_type", ["fixed_large", "fixed_small"])
def test_vlb_equals_calc_bpd_loop_on_a_saved_diffusers_model(pretrained_dir, variance_type):
    cfg = small_cfg(f"model.pretrained={pretrained_dir}", f"model.variance_type={variance_type}")
    parts = load_member(cfg, "unused", None, torch.device("cpu"))
    gd = improved_diffusion().gaussian_diffusion
    assert parts.diffusion.model_mean_type == gd.ModelMeanType.EPSILON
    assert parts.diffusion.model_var_type.name == variance_type.upper()
    assert parts.diffusion.loss_type == gd.LossType.KL and parts.diffusion.num_timesteps == 60
    x = pixels(2)
    generator = torch.Generator().manual_seed(3)
    ours = vlb(parts.network, parts.diffusion, x, generator=generator, steps_per_batch=7)
    torch.manual_seed(3)  # calc_bpd_loop draws its noise from the global RNG, in the same order
    with torch.no_grad():
        ref = parts.diffusion.calc_bpd_loop(parts.network, x)
    err = (ours.terms_bpd - ref["vb"].flip(1)).abs()
    assert err.max() <= 1e-5, f"max term error {err.max():.3g} bits/dim"
    torch.testing.assert_close(ours.prior_bpd, ref["prior_bpd"], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.total_bpd, ref["total_bpd"], rtol=0, atol=1e-4)
    assert ours.total_bpd.min() > 1.0  # a random network: far from good, but the bound is a real number


# --------------------------------------------------------------------------------------------- weights

def test_diffusers_directory_loads_exactly(pretrained_dir):
    saved = UNet2DModel.from_pretrained(pretrained_dir, low_cpu_mem_usage=False).eval()
    unet, source, sha = ddpm_weights.load_unet(small_cfg(f"model.pretrained={pretrained_dir}"), "unused")
    assert source == str(pretrained_dir)
    weights = pretrained_dir / "diffusion_pytorch_model.safetensors"
    assert sha == hashlib.sha256(weights.read_bytes()).hexdigest()
    z, t = torch.randn(2, 3, 16, 16), torch.tensor([3.0, 700.0])
    with torch.no_grad():
        torch.testing.assert_close(unet(z, t).sample, saved(z, t).sample, rtol=0, atol=0)
    # the same directory as model.checkpoint
    _, source, _ = ddpm_weights.load_unet(small_cfg(f"model.checkpoint={pretrained_dir}"), "unused")
    assert source == str(pretrained_dir)


def test_diffusers_directory_that_disagrees_with_the_config_is_a_user_error(pretrained_dir):
    with pytest.raises(UserError, match=r"block_out_channels: tiny-ddpm has \[32, 64\], the config \[32, 1"):
        ddpm_weights.load_unet(
            small_cfg(f"model.pretrained={pretrained_dir}", "model.block_out_channels=[32,128]"), "unused")


def old_diffusers_keys(state: dict) -> dict:
    """A state dict as diffusers < 0.15 named it (AttentionBlock: query/key/value/proj_attn)."""
    new_to_old = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    out = {}
    for k, v in state.items():
        for new, old in new_to_old.items():
            if ".attentions." in k and new in k:
                k = k.replace(new, old)
        out[k] = v
    return out


@pytest.mark.parametrize("prefix", ["", "module.", "unet."])
def test_itd_style_state_dict_maps_to_the_unet(pretrained_dir, tmp_path, prefix):
    # ITD: torch.save(WrapUNet2DModel(...).state_dict()); WrapUNet2DModel subclasses UNet2DModel (no weights
    # of its own), saved by a diffusers of 2022-23: old attention names. "module." (DDP) and "unet." (a
    # DDPMNetwork) stand for the wrappers other code puts around it.
    class WrapUNet2DModel(UNet2DModel):
        pass

    source = WrapUNet2DModel.from_pretrained(pretrained_dir, low_cpu_mem_usage=False)
    state = old_diffusers_keys(source.state_dict())
    assert any(".attentions.0.query.weight" in k for k in state)
    path = tmp_path / "model_epoch10.pt"
    torch.save({prefix + k: v for k, v in state.items()}, path)
    unet, where, sha = ddpm_weights.load_unet(small_cfg(f"model.checkpoint={path}"), "unused")
    assert where == str(path) and sha == hashlib.sha256(path.read_bytes()).hexdigest()
    for k, v in source.state_dict().items():
        assert torch.equal(unet.state_dict()[k], v), k


def test_state_dict_that_does_not_fit_names_keys(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"conv_in.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="(?s)Shape mismatches .*conv_in.weight.*Missing from the file"):
        ddpm_weights.load_unet(small_cfg(f"model.checkpoint={path}"), "unused")


def test_published_weights_download_is_checked(pretrained_dir, tmp_path):
    # file:// stands in for the LFS media URL; size and sha256 as in the repository's LFS pointer
    state = UNet2DModel.from_pretrained(pretrained_dir, low_cpu_mem_usage=False).state_dict()
    src = tmp_path / "model_epoch10.pt"
    torch.save(old_diffusers_keys(state), src)
    sha, size = hashlib.sha256(src.read_bytes()).hexdigest(), src.stat().st_size
    good = (f"model.checkpoint_url={src.as_uri()}", f"model.checkpoint_sha256={sha}",
            f"model.checkpoint_bytes={size}", "model.checkpoint_file=itd_ddpm.pt")
    _, where, got = ddpm_weights.load_unet(small_cfg(*good), tmp_path / "ckpts", progress=False)
    assert where == str(tmp_path / "ckpts" / "ddpm" / "itd_ddpm.pt") and got == sha

    bad = (*good[:1], f"model.checkpoint_sha256={'0' * 64}", *good[2:3], "model.checkpoint_file=bad.pt")
    with pytest.raises(CheckpointError, match="failed its check and was deleted.*expected 0000"):
        ddpm_weights.load_unet(small_cfg(*bad), tmp_path / "ckpts", progress=False)
    assert not (tmp_path / "ckpts" / "ddpm" / "bad.pt").exists()
    short = (*good[:2], f"model.checkpoint_bytes={size + 1}", "model.checkpoint_file=short.pt")
    with pytest.raises(CheckpointError, match=f"has {size} bytes, expected {size + 1}"):
        ddpm_weights.load_unet(small_cfg(*short), tmp_path / "ckpts", progress=False)


def test_itd_tuned_iddpm_state_dict_loads_through_the_iddpm_path(tmp_path):
    # IDDPM(tune): torch.save(WrapUNetModel.state_dict()) = improved-diffusion UNetModel keys; a "model."
    # prefix (a wrapper holding the U-Net as self.model) is mapped too
    cfg = OmegaConf.merge(model_cfg("iddpm_tiny"), {"checkpoint_file": "itd_iddpm.pt"})
    torch.manual_seed(1)
    source, _ = build_model_and_diffusion(cfg)
    for prefix in ("", "model."):
        src = tmp_path / f"src{prefix}pt"
        torch.save({prefix + k: v for k, v in source.state_dict().items()}, src)
        sha = hashlib.sha256(src.read_bytes()).hexdigest()
        cfg_url = OmegaConf.merge(cfg, {"checkpoint_url": src.as_uri(), "checkpoint_sha256": sha,
                                        "checkpoint_bytes": src.stat().st_size,
                                        "checkpoint_file": f"itd{prefix}pt"})
        path = resolve_checkpoint(cfg_url, tmp_path / "ckpts", progress=False)
        assert path == tmp_path / "ckpts" / "iddpm" / f"itd{prefix}pt"
        model, _ = build_model_and_diffusion(cfg)
        assert load_checkpoint(model, path) == sha
        for k, v in source.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), k


def test_offline_hub_failure_names_id_cache_and_what_to_do(tmp_path):
    cfg = small_cfg("model.pretrained=google/ddpm-cifar10-32")
    with pytest.raises(UserError) as e:
        ddpm_weights.load_unet(cfg, "unused", cache_dir=tmp_path / "hf-cache", local_files_only=True)
    message = str(e.value)
    for part in ("google/ddpm-cifar10-32", str(tmp_path / "hf-cache"), "model.pretrained=DIR",
                 "hf download google/ddpm-cifar10-32", "https://huggingface.co/google/ddpm-cifar10-32"):
        assert part in message


@pytest.mark.parametrize(("override", "message"), [
    ("model.variance_type=learned", "model.variance_type='learned'.*fixed_large or fixed_small"),
    ("model.beta_schedule=scaled_linear", "model.beta_schedule='scaled_linear'.*use linear"),
    ("model.prediction_type=v_prediction", "use epsilon"),
    ("model.pretrained=null", "names no weights"),
    ("model.pretrained=not/a/hub/id", "neither a directory nor a hub id"),
])
def test_bad_settings_are_user_errors(override, message):
    with pytest.raises(UserError, match=message):
        ddpm_weights.load_unet(small_cfg(override), "unused")


@pytest.mark.parametrize(("name", "published_bytes"), [
    ("ddpm_cifar10_itd_tuned", 143_106_097), ("iddpm_cifar10_itd_tuned", 210_357_829)])
def test_published_file_sizes_fit_the_configured_architectures(name, published_bytes):
    # float32 weights plus ~370-390 bytes of zip/pickle per tensor: the configs describe the published files
    cfg = model_cfg(name)
    assert cfg.checkpoint_bytes == published_bytes and len(cfg.checkpoint_sha256) == 64
    model = ddpm.build_unet(cfg) if cfg.kind == "ddpm" else build_model_and_diffusion(cfg)[0]
    state = model.state_dict()
    overhead = published_bytes - 4 * sum(v.numel() for v in state.values())
    assert 300 * len(state) < overhead < 450 * len(state)


def test_nonfinite_weights_are_refused_from_a_state_dict_and_a_diffusers_folder(pretrained_dir, tmp_path):
    source = UNet2DModel.from_pretrained(pretrained_dir, low_cpu_mem_usage=False)
    state = source.state_dict()
    state["conv_in.bias"] = state["conv_in.bias"].clone().fill_(float("nan"))
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match="non-finite weights .*conv_in.bias"):
        ddpm_weights.load_unet(small_cfg(f"model.checkpoint={tmp_path / 'nan.pt'}"), "unused")
    source.load_state_dict(state)
    source.save_pretrained(tmp_path / "nan_folder")
    with pytest.raises(CheckpointError, match="non-finite weights .*conv_in.bias"):
        ddpm_weights.load_unet(small_cfg(f"model.checkpoint={tmp_path / 'nan_folder'}"), "unused")


class _RunsCode:
    """Unpickling this calls ``os.system``: a weights file must never get that far."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_malicious_diffusers_bin_is_refused_as_unsafe(pretrained_dir, tmp_path):
    import shutil

    folder = tmp_path / "evil"
    shutil.copytree(pretrained_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    marker = tmp_path / "code_ran"
    torch.save({"conv_in.weight": _RunsCode(marker)}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError) as info:
        ddpm_weights.load_unet(small_cfg(f"model.checkpoint={folder}"), "unused")
    message = str(info.value)
    assert "refused as unsafe" in message and "none of its code ran" in message
    assert "download it again" not in message and "\n" not in message
    assert not marker.exists()
