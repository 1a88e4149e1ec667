"""The sampled-timestep variational bound: unbiased for the full T-step sum, with an honest stderr."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from itdiffusion.models.iddpm import build_model_and_diffusion
from itdiffusion.stages import CONFIG_DIR
from itdiffusion.variational import geometric_strata, vlb, vlb_per_image, vlb_sampled

CONF = Path(CONFIG_DIR)


def tiny_unet(steps: int):
    """The iddpm_tiny U-Net (float32) with its weights perturbed so that every term is non-trivial."""
    cfg = OmegaConf.merge(OmegaConf.load(CONF / "model" / "iddpm_tiny.yaml"), {"diffusion_steps": steps})
    model, diffusion = build_model_and_diffusion(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model.eval(), diffusion


def image(seed: int = 0) -> torch.Tensor:
    """One 32x32 image on the pixel lattice in [-1, 1]: a smooth pattern plus noise."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linspace(-1, 1, 32)
    smooth = 0.6 * torch.sin(3 * u)[None, :, None] * torch.cos(2 * u)[None, None, :]
    x = (smooth + 0.1 * torch.randn(3, 32, 32, generator=g)).clamp(-1, 1)
    return (torch.round((x + 1) * 127.5) / 127.5 - 1)[None]


def test_geometric_strata_cover_the_middle_steps_once():
    for steps, k in ((4000, 16), (20, 16), (50, 49), (100, 1)):
        edges = geometric_strata(steps, k)
        assert edges[0] == 1 and edges[-1] == steps and len(edges) == k + 1
        assert bool(((edges[1:] - edges[:-1]) >= 1).all())
    widths = geometric_strata(4000, 16).diff().double()
    assert widths[-1] > 100 * widths[0]  # geometric: late strata are wide
    with pytest.raises(ValueError):
        geometric_strata(20, 20)


def test_all_single_step_strata_give_the_exact_sum_with_zero_stderr():
    model, diffusion = tiny_unet(12)
    x = image()
    sampled = vlb_sampled(model, diffusion, x, [3], 11)  # 11 strata of 11 middle steps
    assert float(sampled.mc_stderr_bpd) == 0.0
    # the same steps, other noise: equal to the full sum within its (noise-only) spread
    full = torch.stack([vlb(model, diffusion, x, generator=torch.Generator().manual_seed(s)).total(False)
                        for s in range(4)])
    assert abs(float(sampled.discrete_bpd) - float(full.mean())) < 6 * float(full.std()) + 1e-6


@pytest.mark.slow
def test_sampled_vlb_is_unbiased_for_the_full_sum_and_its_stderr_is_honest():
    steps, k, nseeds = 60, 8, 240
    model, diffusion = tiny_unet(steps)
    x = image()
    # the full sum (one noise draw per step), averaged over seeds: its mean and stderr
    full = vlb_per_image(model, diffusion, x.repeat(24, 1, 1, 1), list(range(24)), steps_per_batch=60)
    sampled = vlb_sampled(model, diffusion, x.repeat(nseeds, 1, 1, 1), list(range(1000, 1000 + nseeds)), k)
    for continuous in (False, True):
        f = full.total(continuous)
        s = sampled.total(continuous)
        combined = (s.var() / nseeds + f.var() / f.numel()).sqrt()
        assert abs(float(s.mean() - f.mean())) < 3 * float(combined), (float(s.mean()), float(f.mean()))
    # honest stderr: over 30 seeds the reported stderr matches the spread (collapsed strata: >= it)
    first30 = sampled.discrete_bpd[:30]
    reported = sampled.mc_stderr_bpd[:30].square().mean().sqrt()
    ratio = float(reported / first30.std())
    assert 0.75 < ratio < 1.8, ratio
    # and over all seeds the ratio is close to one
    assert 0.85 < float(sampled.mc_stderr_bpd.square().mean().sqrt() / sampled.discrete_bpd.std()) < 1.5


def test_sampled_vlb_does_not_depend_on_batching():
    model, diffusion = tiny_unet(40)
    x = torch.cat([image(0), image(1)])
    both = vlb_sampled(model, diffusion, x, [7, 8], 6, batch_size=5)
    one = vlb_sampled(model, diffusion, x[1:], [8], 6, batch_size=64)
    torch.testing.assert_close(both.discrete_bpd[1:], one.discrete_bpd, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(both.mc_stderr_bpd[1:], one.mc_stderr_bpd, rtol=1e-6, atol=1e-6)
    assert both.network_evals == 7


