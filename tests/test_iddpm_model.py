"""The IDDPM adapter: configs, model building, the Denoiser wrapper and the training loss."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from itdiffusion.models.iddpm import (
    IDDPMDenoiser,
    build_model_and_diffusion,
    iddpm_flags,
    iddpm_training_loss,
    timestep_to_logsnr,
)
from itdiffusion.models.schemas import ModelConfig
from itdiffusion.models.upstream import improved_diffusion
from itdiffusion.stages import CONFIG_DIR

CONF = Path(CONFIG_DIR)


def tiny_cfg(**overrides):
    cfg = OmegaConf.load(CONF / "model" / "iddpm_tiny.yaml")
    return OmegaConf.merge(cfg, overrides)


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give the zero-initialized layers (output conv, residual outputs) random weights too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def test_cifar10_configs_build_exactly_improved_diffusions_model_on_meta():
    # The official flags, written out from improved-diffusion's README (not read from our YAMLs).
    readme = dict(
        image_size=32,
        num_channels=128,
        num_res_blocks=3,
        learn_sigma=True,
        dropout=0.3,
        diffusion_steps=4000,
        noise_schedule="cosine",
    )
    script_util = improved_diffusion().script_util
    for name, use_kl in [("iddpm_cifar10_vlb", True), ("iddpm_cifar10_hybrid", False)]:
        flags = {**script_util.model_and_diffusion_defaults(), **readme, "use_kl": use_kl}
        cfg = OmegaConf.load(CONF / "model" / f"{name}.yaml")
        assert iddpm_flags(cfg) == flags  # every flag, dropout and diffusion flags included
        with torch.device("meta"):
            reference, ref_diffusion = script_util.create_model_and_diffusion(**flags)
            model, diffusion = build_model_and_diffusion(cfg)
        got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        want = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
        assert list(got) == list(want) and got == want
        assert 52_000_000 < sum(p.numel() for p in model.parameters()) < 53_000_000
        assert diffusion.loss_type == ref_diffusion.loss_type
        assert diffusion.num_timesteps == 4000 and diffusion.model_var_type.name == "LEARNED_RANGE"
        assert not model.training  # built for evaluation: dropout 0.3 off


def test_model_yamls_compose_with_hydra_against_the_schema(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    from itdiffusion.stages import register_configs

    register_configs()
    (tmp_path / "config.yaml").write_text(
        f"defaults:\n  - model: iddpm_tiny\n  - _self_\nhydra:\n  searchpath:\n    - file://{CONF}\n"
    )
    with initialize_config_dir(config_dir=str(tmp_path), version_base=None):
        for name in ("iddpm_tiny", "iddpm_cifar10_vlb", "iddpm_cifar10_hybrid"):
            cfg = compose("config", overrides=[f"model={name}"])
            assert OmegaConf.get_type(cfg.model) is ModelConfig and cfg.model.name == name
            assert cfg.model.training_objective in ("L_vlb", "L_hybrid")
            build_model_and_diffusion(cfg.model) if name == "iddpm_tiny" else iddpm_flags(cfg.model)
        assert compose("config", overrides=["model.num_channels=64"]).model.num_channels == 64
        with pytest.raises(ConfigCompositionException):
            compose("config", overrides=["model.num_channel=64"])  # a typo is an error
        with pytest.raises(ConfigCompositionException):
            compose("config", overrides=["model.learn_sigma=maybe"])  # so is a wrong type


def test_flags_accept_dict_omegaconf_and_dataclass_and_reject_incomplete():
    as_dict = OmegaConf.to_container(tiny_cfg())
    dataclass = ModelConfig(**{k: v for k, v in as_dict.items() if k != "defaults"})
    assert iddpm_flags(as_dict) == iddpm_flags(tiny_cfg()) == iddpm_flags(dataclass)
    incomplete = {k: v for k, v in as_dict.items() if k != "learn_sigma"}
    with pytest.raises(ValueError, match="learn_sigma"):
        iddpm_flags(incomplete)
    with pytest.raises(ValueError, match="kind"):
        iddpm_flags({**as_dict, "kind": "masked_pixels"})


@pytest.mark.parametrize(
    "learn_sigma,predict_xstart,schedule",
    [(True, False, "cosine"), (False, False, "linear"), (True, True, "cosine")],
)
def test_denoiser_at_a_discrete_steps_logsnr_is_the_networks_eps_at_that_step(
    learn_sigma, predict_xstart, schedule
):
    cfg = tiny_cfg(
        learn_sigma=learn_sigma, predict_xstart=predict_xstart, noise_schedule=schedule, diffusion_steps=50
    )
    model, diffusion = build_model_and_diffusion(cfg)
    model = randomized(model)
    steps = torch.tensor([0, 13, 48])  # not 49: IDDPM clips the last cosine step (beta <= 0.999)
    abar = torch.from_numpy(diffusion.alphas_cumprod)[steps]
    logsnr = torch.log(abar) - torch.log1p(-abar)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    eps = torch.randn(3, 3, 32, 32, generator=g)
    z = abar.sqrt().view(-1, 1, 1, 1).float() * x + (1 - abar).sqrt().view(-1, 1, 1, 1).float() * eps
    with torch.no_grad():
        got = IDDPMDenoiser(model, cfg)(z, logsnr.float())
        out = diffusion._wrap_model(model)(z, steps)[:, :3]  # the timesteps improved-diffusion feeds it
        if predict_xstart:  # improved-diffusion's own x_0 -> eps conversion
            out = diffusion._predict_eps_from_xstart(z, steps, out)
    assert got.shape == z.shape and got.dtype == z.dtype
    torch.testing.assert_close(got, out, rtol=1e-4, atol=1e-4)


def test_denoiser_checks_shapes_and_keeps_input_dtype():
    cfg = tiny_cfg(diffusion_steps=50)
    model, _ = build_model_and_diffusion(cfg)
    den = IDDPMDenoiser(model, cfg)
    z = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert den(z, torch.zeros(2, dtype=torch.float64)).dtype == torch.float64
    with pytest.raises(ValueError, match="logsnr must have shape"):
        den(z, torch.zeros(3))
    wrong = IDDPMDenoiser(model, tiny_cfg(diffusion_steps=50, learn_sigma=False))  # model has 6 channels
    with pytest.raises(ValueError, match="learn_sigma"):
        wrong(z, torch.zeros(2))


def test_denoiser_is_differentiable_for_fine_tuning():
    cfg = tiny_cfg(diffusion_steps=50)
    model, _ = build_model_and_diffusion(cfg)
    den = IDDPMDenoiser(model.train(), cfg)
    den(torch.randn(1, 3, 32, 32), torch.tensor([3.0])).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_timestep_to_logsnr_is_the_schedules_logsnr():
    cfg = tiny_cfg(diffusion_steps=50)
    _, diffusion = build_model_and_diffusion(cfg)
    abar = torch.from_numpy(diffusion.alphas_cumprod[:-1])  # the last cosine step is clipped upstream
    # the timesteps improved-diffusion feeds the U-Net at steps 0..48
    timesteps = diffusion._wrap_model(lambda x, ts: ts)(None, torch.arange(49)).double()
    torch.testing.assert_close(
        timestep_to_logsnr(timesteps, cfg), torch.log(abar) - torch.log1p(-abar), rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("use_kl", [False, True])
def test_training_loss_is_improved_diffusions_loss_on_uniform_steps(use_kl):
    cfg = tiny_cfg(diffusion_steps=50, use_kl=use_kl)
    model, diffusion = build_model_and_diffusion(cfg)
    model = randomized(model)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    # the same draws (t uniform on 0..T-1, then eps) handed to improved-diffusion's training_losses
    g = torch.Generator().manual_seed(7)
    t = torch.randint(0, 50, (2,), generator=g)
    noise = torch.randn(x.shape, generator=g)
    with torch.no_grad():
        ref = diffusion.training_losses(model, x, t, noise=noise)["loss"]
    loss = iddpm_training_loss(model, diffusion, x, generator=torch.Generator().manual_seed(7))
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    torch.testing.assert_close(loss.detach(), ref)
    loss.mean().backward()
    assert model.input_blocks[0][0].weight.grad.abs().sum() > 0
