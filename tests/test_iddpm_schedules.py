"""log-SNR <-> IDDPM timestep, against improved-diffusion's own alphas_cumprod."""

import math

import numpy as np
import pytest
import torch

from itdiffusion.models.iddpm import logsnr_to_timestep, timestep_to_logsnr
from itdiffusion.models.schedules import logsnr_to_step, step_to_logsnr
from itdiffusion.models.upstream import improved_diffusion


def upstream_alpha_bar(schedule: str, steps: int) -> torch.Tensor:
    """alphas_cumprod of the GaussianDiffusion improved-diffusion builds for these flags."""
    script_util = improved_diffusion().script_util
    diffusion = script_util.create_gaussian_diffusion(steps=steps, noise_schedule=schedule)
    return torch.from_numpy(diffusion.alphas_cumprod)


def logit(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p) - torch.log1p(-p)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("steps", [50, 1000, 4000])
def test_logsnr_of_each_discrete_step_maps_back_to_that_step(schedule, steps):
    abar = upstream_alpha_bar(schedule, steps)
    u = logsnr_to_step(logit(abar), schedule, steps)
    err = (u - torch.arange(steps, dtype=torch.float64)).abs()
    assert err.max() < 1.0  # the Done-means bound: below one step everywhere
    # exact (to rounding) except the cosine schedule's last step, where IDDPM clips beta at 0.999
    exact = err[:-1] if schedule == "cosine" else err
    assert exact.max() < 1e-6


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("steps", [50, 4000])
def test_discrete_steps_map_to_their_logsnr(schedule, steps):
    abar = upstream_alpha_bar(schedule, steps)
    a = step_to_logsnr(torch.arange(steps - 1), schedule, steps)  # last cosine step is clipped upstream
    torch.testing.assert_close(a, logit(abar[:-1]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_continuous_round_trip(schedule):
    steps = 1000
    u = torch.linspace(-0.9, steps - 1.5, 997, dtype=torch.float64)
    back = logsnr_to_step(step_to_logsnr(u, schedule, steps), schedule, steps)
    torch.testing.assert_close(back, u, rtol=0, atol=1e-6)
    a = step_to_logsnr(u, schedule, steps)
    assert (a.diff() < 0).all()  # more steps, more noise


def test_cosine_matches_itds_closed_form_up_to_iddpms_one_step_offset():
    # ITD's closed form: t = [acos(sqrt(abar) cos(pi/2 s/(1+s))) * 2(1+s)/pi - s] * 1000 (no step offset);
    # IDDPM's step i has abar = f((i+1)/T)/f(0), so the network's timestep is that minus 1000/T.
    s, steps = 0.008, 4000
    a = torch.linspace(-12, 12, 101, dtype=torch.float64)
    angle = torch.acos(torch.sigmoid(a).sqrt() * math.cos(math.pi / 2 * s / (1 + s)))
    itd = (angle * 2 * (1 + s) / math.pi - s) * 1000
    cfg = {
        **improved_diffusion().script_util.model_and_diffusion_defaults(),
        "noise_schedule": "cosine",
        "diffusion_steps": steps,
        "rescale_timesteps": True,
    }
    torch.testing.assert_close(logsnr_to_timestep(a, cfg), itd - 1000 / steps, rtol=0, atol=1e-7)


@pytest.mark.parametrize("rescale", [True, False])
def test_timestep_scale_follows_rescale_timesteps(rescale):
    steps = 200
    cfg = {
        **improved_diffusion().script_util.model_and_diffusion_defaults(),
        "noise_schedule": "linear",
        "diffusion_steps": steps,
        "rescale_timesteps": rescale,
    }
    abar = upstream_alpha_bar("linear", steps)
    i = torch.tensor([0, 17, 199])
    expected = i.double() * (1000 / steps) if rescale else i.double()
    torch.testing.assert_close(logsnr_to_timestep(logit(abar[i]), cfg), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(timestep_to_logsnr(expected, cfg), logit(abar[i]), rtol=0, atol=1e-6)


def test_cosine_map_stays_accurate_at_high_snr():
    # float64 atan2 form: no cancellation as abar -> 1 (acos(1 - tiny) loses digits)
    a = torch.tensor([20.0, 30.0], dtype=torch.float64)
    u = logsnr_to_step(a, "cosine", 4000)
    torch.testing.assert_close(step_to_logsnr(u, "cosine", 4000), a, rtol=0, atol=1e-6)
    assert np.all(u.numpy() > -1) and np.all(u.numpy() < 0)


def test_bad_schedule_is_rejected():
    with pytest.raises(ValueError, match="noise_schedule"):
        logsnr_to_step(torch.zeros(1), "quadratic", 100)
