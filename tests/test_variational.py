"""The variational bound against improved-diffusion's own GaussianDiffusion.calc_bpd_loop."""

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from itdiffusion.models.iddpm import build_model_and_diffusion
from itdiffusion.models.upstream import improved_diffusion
from itdiffusion.stages import CONFIG_DIR
from itdiffusion.variational import vlb

CONF = Path(CONFIG_DIR)


class ToyNet(nn.Module):
    """A cheap float64 network with the U-Net's interface: (x [N, 3, H, W], timesteps [N]) -> outputs.

    Its outputs depend on x and on the timestep it is fed, so any mismatch in x_t, noise or
    timestep scaling between two bound computations shows up.
    """

    def __init__(self, out_channels: int, seed: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(3, out_channels, 3, padding=1, dtype=torch.float64)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p, scale in ((self.conv.weight, 0.3), (self.conv.bias, 0.1)):
                p.copy_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64))

    def forward(self, x, timesteps):
        gain = 1 + 0.5 * torch.sin(timesteps.to(torch.float64) / 97.0)
        return torch.tanh(self.conv(x) * gain.view(-1, 1, 1, 1))


def pixels(n: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    """Images on the pixel lattice in [-1, 1] (float64), edge values included."""
    p = torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed))
    p[:, 0, 0, 0], p[:, 0, 0, 1] = 0, 255
    return p.to(torch.float64) / 127.5 - 1


def upstream_diffusion(**flags):
    script_util = improved_diffusion().script_util
    defaults = dict(
        steps=50,
        learn_sigma=True,
        noise_schedule="cosine",
        use_kl=False,
        rescale_timesteps=True,
        rescale_learned_sigmas=True,
    )
    return script_util.create_gaussian_diffusion(**{**defaults, **flags})


def reference_bound(model, diffusion, x, seed, **kwargs):
    torch.manual_seed(seed)  # calc_bpd_loop draws its noise from the global RNG
    with torch.no_grad():
        return diffusion.calc_bpd_loop(model, x, **kwargs)


def assert_matches(ours, ref, atol=1e-5):
    # calc_bpd_loop lists the terms from t = T-1 down to t = 0; ours are indexed by t
    terms = ref["vb"].flip(1)
    assert ours.terms_bpd.shape == terms.shape
    err = (ours.terms_bpd - terms).abs()
    worst = err.argmax() % terms.shape[1]
    assert err.max() < atol, f"max term error {err.max():.3g} bits/dim at step {worst}"
    torch.testing.assert_close(ours.prior_bpd, ref["prior_bpd"], rtol=0, atol=atol)
    torch.testing.assert_close(ours.decoder_bpd, terms[:, 0], rtol=0, atol=atol)
    torch.testing.assert_close(ours.total_bpd, ref["total_bpd"], rtol=0, atol=atol * 10)


@pytest.mark.parametrize("steps", [50, 200])
@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize("use_kl", [True, False])
def test_vlb_equals_calc_bpd_loop(steps, learn_sigma, use_kl):
    diffusion = upstream_diffusion(steps=steps, learn_sigma=learn_sigma, use_kl=use_kl)
    model = ToyNet(6 if learn_sigma else 3)
    x = pixels(3)
    ref = reference_bound(model, diffusion, x, seed=11)
    ours = vlb(model, diffusion, x, generator=torch.Generator().manual_seed(11), steps_per_batch=16)
    assert_matches(ours, ref)
    assert not ours.continuous_density


@pytest.mark.parametrize(
    "flags",
    [
        dict(learn_sigma=False, sigma_small=True),  # FIXED_SMALL variances
        dict(predict_xstart=True),  # the network predicts x_0
        dict(noise_schedule="linear", rescale_timesteps=False),  # raw integer timesteps
        dict(timestep_respacing="20"),  # 20 of the 50 steps (SpacedDiffusion's timestep map)
    ],
)
def test_vlb_equals_calc_bpd_loop_for_other_parametrizations(flags):
    diffusion = upstream_diffusion(**flags)
    model = ToyNet(6 if flags.get("learn_sigma", True) else 3, seed=1)
    x = pixels(2, seed=1)
    ref = reference_bound(model, diffusion, x, seed=5)
    assert_matches(vlb(model, diffusion, x, generator=torch.Generator().manual_seed(5)), ref)


def test_vlb_equals_calc_bpd_loop_on_the_iddpm_unet():
    # The real network in float32 (its GroupNorms are float32 by design); the bound in float64.
    cfg = OmegaConf.merge(OmegaConf.load(CONF / "model" / "iddpm_tiny.yaml"), {"diffusion_steps": 8})
    model, diffusion = build_model_and_diffusion(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))

    class Float32(nn.Module):  # calc_bpd_loop hands the model float64 x_t
        def forward(self, x, t):
            return model(x.float(), t).double()

    x = pixels(1, size=32)
    ref = reference_bound(Float32(), diffusion, x, seed=3)
    ours = vlb(model, diffusion, x, generator=torch.Generator().manual_seed(3), steps_per_batch=4)
    assert_matches(ours, ref)


def test_continuous_density_replaces_the_decoder_by_the_gaussian_density_of_x0():
    steps, seed = 50, 4
    diffusion = upstream_diffusion(steps=steps)
    model = ToyNet(6, seed=2)
    x = pixels(2, seed=2)
    discrete = vlb(model, diffusion, x, generator=torch.Generator().manual_seed(seed))
    continuous = vlb(
        model, diffusion, x, continuous_density=True, generator=torch.Generator().manual_seed(seed)
    )
    assert continuous.continuous_density
    torch.testing.assert_close(continuous.terms_bpd[:, 1:], discrete.terms_bpd[:, 1:], rtol=0, atol=0)
    torch.testing.assert_close(continuous.prior_bpd, discrete.prior_bpd, rtol=0, atol=0)
    # Ground truth: p(x_0 | x_1) from improved-diffusion's p_mean_variance at step 0, with the noise
    # of the last draw (t = 0 comes last), as a torch Normal density.
    g = torch.Generator().manual_seed(seed)
    noise = [torch.randn(x.shape, generator=g, dtype=torch.float64) for _ in range(steps)][-1]
    t0 = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        out = diffusion.p_mean_variance(model, diffusion.q_sample(x, t0, noise=noise), t0, clip_denoised=True)
    density = torch.distributions.Normal(out["mean"], torch.exp(0.5 * out["log_variance"]))
    expected = -density.log_prob(x).mean(dim=(1, 2, 3)) / math.log(2)
    torch.testing.assert_close(continuous.decoder_bpd, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(continuous.total_bpd, continuous.prior_bpd + continuous.terms_bpd.sum(1))


def test_oracle_denoiser_of_a_point_mass_has_zero_kl_terms_and_the_closed_form_prior():
    diffusion = upstream_diffusion(steps=50)
    x0 = pixels(1, seed=3)
    sqrt_abar = torch.from_numpy(diffusion.sqrt_alphas_cumprod)
    sqrt_1m = torch.from_numpy(diffusion.sqrt_one_minus_alphas_cumprod)

    class Oracle(nn.Module):  # exact eps for data = x0, variance = the true posterior's (output -1)
        def __init__(self):
            super().__init__()
            self.unused = nn.Parameter(torch.zeros(1, dtype=torch.float64))

        def forward(self, xt, timesteps):
            t = (timesteps * 50 / 1000).round().long()
            eps = (xt - sqrt_abar[t].view(-1, 1, 1, 1) * x0) / sqrt_1m[t].view(-1, 1, 1, 1)
            return torch.cat([eps, -torch.ones_like(eps)], dim=1)

    result = vlb(Oracle(), diffusion, x0, generator=torch.Generator().manual_seed(0))
    assert result.terms_bpd[:, 1:].abs().max() < 1e-9
    q_last = torch.distributions.Normal(sqrt_abar[-1] * x0, sqrt_1m[-1])
    prior = torch.distributions.kl_divergence(q_last, torch.distributions.Normal(0.0, 1.0))
    torch.testing.assert_close(result.prior_bpd, prior.mean(dim=(1, 2, 3)) / math.log(2))


def test_batching_of_steps_and_the_rng_do_not_change_the_result():
    diffusion = upstream_diffusion(steps=30)
    model, x = ToyNet(6, seed=5), pixels(2, seed=5)
    one = vlb(model, diffusion, x, steps_per_batch=1, generator=torch.Generator().manual_seed(9))
    seven = vlb(
        model, diffusion, x, steps_per_batch=7, generator=torch.Generator().manual_seed(9), progress=True
    )
    torch.testing.assert_close(one.terms_bpd, seven.terms_bpd, rtol=0, atol=1e-12)
    torch.manual_seed(9)
    global_rng = vlb(model, diffusion, x, steps_per_batch=30)
    torch.testing.assert_close(global_rng.terms_bpd, one.terms_bpd, rtol=0, atol=1e-12)
    other = vlb(model, diffusion, x, generator=torch.Generator().manual_seed(10))
    assert not torch.allclose(other.terms_bpd, one.terms_bpd)  # the noise does come from the generator


def test_bad_inputs_are_rejected():
    diffusion = upstream_diffusion(steps=10, learn_sigma=True)
    with pytest.raises(ValueError, match="learn_sigma"):
        vlb(ToyNet(3), diffusion, pixels(1))
    with pytest.raises(ValueError, match="steps_per_batch"):
        vlb(ToyNet(6), diffusion, pixels(1), steps_per_batch=0)


def test_one_pass_returns_both_decoders():
    """``total(continuous_density)`` of one call equals the bound of a call made with that decoder."""
    diffusion = upstream_diffusion(steps=20)
    model = ToyNet(6, seed=5)
    x = pixels(3, seed=5)
    one = vlb(model, diffusion, x, generator=torch.Generator().manual_seed(7), steps_per_batch=3)
    for density in (False, True):
        alone = vlb(model, diffusion, x, continuous_density=density,
                    generator=torch.Generator().manual_seed(7), steps_per_batch=3)
        torch.testing.assert_close(one.total(density), alone.total_bpd, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(one.decoder_bpd, one.discrete_decoder_bpd, rtol=0, atol=0)


def test_float32_images_get_calc_bpd_loops_noise():
    """calc_bpd_loop draws randn_like(x): float32 noise for float32 images; vlb draws the same."""
    diffusion = upstream_diffusion(steps=20)
    model = ToyNet(6, seed=3)

    class Float32(nn.Module):
        def forward(self, x, t):
            return model(x.double(), t).float()

    x = pixels(2, seed=3).float()
    ref = reference_bound(Float32(), diffusion, x, seed=7)
    ours = vlb(model, diffusion, x, generator=torch.Generator().manual_seed(7))
    assert_matches(ours, {k: v.double() for k, v in ref.items()}, atol=1e-4)


def test_vlb_mc_stderr_is_honest():
    """Over 30 noise seeds, each image's spread of totals matches its reported Monte Carlo stderr."""
    diffusion = upstream_diffusion(steps=50)
    model = ToyNet(6, seed=5)
    x = pixels(4, seed=5)
    runs = [vlb(model, diffusion, x, generator=torch.Generator().manual_seed(100 + s), steps_per_batch=25)
            for s in range(30)]
    for density in (False, True):
        totals = torch.stack([r.total(density) for r in runs])
        stderrs = torch.stack([r.mc_stderr(density) for r in runs])
        ratio = totals.std(0) / stderrs.square().mean(0).sqrt()
        assert ((ratio > 1 / 1.5) & (ratio < 1.5)).all(), f"spread / stderr per image: {ratio.tolist()}"
