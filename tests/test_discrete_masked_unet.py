"""The masked-pixel U-Net (improved-diffusion's UNetModel with token embeddings) and the image-level
estimators the pipeline calls."""

import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from itdiffusion.discrete import (
    any_order_loss,
    bottom_given_top_nll,
    bottom_half,
    corrupt_images,
    corrupted_log_ratio,
    images_to_tokens,
    masked_pixel_metrics,
    tokens_to_images,
)
from itdiffusion.models.masked_unet import build_masked_pixel_model
from itdiffusion.models.schemas import MaskedPixelsModelConfig
from itdiffusion.stages import CONFIG_DIR

CONF = Path(CONFIG_DIR)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _model_cfg(name):
    with initialize_config_dir(str(CONF), version_base=None):
        return compose(overrides=[f"+model={name}"]).model


@pytest.fixture(scope="module")
def tiny_cfg():
    return _model_cfg("masked_pixels_tiny")


def _images(n, seed):
    return torch.randint(0, 256, (n, 3, 32, 32), generator=_gen(seed), dtype=torch.uint8)


def test_configs_validate_against_the_schema(tiny_cfg):
    gpu_cfg = _model_cfg("masked_pixels_cifar10")
    for cfg in (tiny_cfg, gpu_cfg):
        assert cfg.kind == "masked_pixels" and cfg.vocab_size == 256
        assert set(cfg.keys()) == set(MaskedPixelsModelConfig.__dataclass_fields__)
    with pytest.raises(ValueError, match="kind=masked_pixels"):
        build_masked_pixel_model(MaskedPixelsModelConfig(name="x", kind="iddpm"))


def test_token_layout_round_trips():
    images = _images(2, 0)
    tokens = images_to_tokens(images)
    assert tokens.shape == (2, 3072) and tokens.dtype == torch.long
    assert tokens[1, 1024 + 32 * 5 + 7] == images[1, 1, 5, 7]  # channel-major
    assert torch.equal(tokens_to_images(tokens, 32), images)
    with pytest.raises(ValueError, match="uint8"):
        images_to_tokens(images.float())


def test_forward_backward_shapes_and_masked_fraction(tiny_cfg):
    model = build_masked_pixel_model(tiny_cfg)
    tokens = images_to_tokens(_images(2, 1))
    seen = {}
    model.unet.register_forward_pre_hook(lambda module, args: seen.update(t=args[1]))
    tokens[1, :768] = model.vocab_size  # a quarter masked
    logits = model(tokens)
    assert logits.shape == (2, 3072, 256)
    torch.testing.assert_close(seen["t"], torch.tensor([0.0, 250.0]))
    logits.sum().backward()
    assert model.embed.weight.grad is not None
    with pytest.raises(ValueError, match="3072"):
        model(tokens[:, :100])


def test_untrained_model_is_uniform_and_the_estimators_recover_8_bits(tiny_cfg):
    """improved-diffusion zero-initialises the U-Net's output layer, so the untrained model is exactly
    the uniform distribution over 256 values: -log p = 8 bits per sub-pixel, conditional included,
    and the log-ratio of any two images is exactly 0."""
    model = build_masked_pixel_model(tiny_cfg)
    images = _images(2, 2)
    metrics = masked_pixel_metrics(model, images, num_masks=8, image_seeds=[5, 6])
    for key in ("mdce", "mdce_timefree"):
        z = (metrics[f"{key}_bpd"] - 8.0) / metrics[f"{key}_bpd_stderr"]
        assert z.abs().max() < 3 and (metrics[f"{key}_bpd_stderr"] > 0).all()
        torch.testing.assert_close(metrics[f"{key}_nats"] / (3072 * math.log(2)), metrics[f"{key}_bpd"])
    assert torch.equal(metrics["mdce_timefree_network_evals"], torch.tensor([8, 8]))

    est, dim = bottom_given_top_nll(model, images, num_masks=4, generator=_gen(3))
    assert dim == 1536
    bpd, stderr = est.bpd(dim)
    assert ((bpd - 8.0) / stderr).abs().max() < 3

    corrupted, ratio = corrupted_log_ratio(model, images, num_masks=2, fraction=0.1, generator=_gen(4))
    assert not torch.equal(corrupted, images)
    assert ratio.nats.abs().max() < 1e-6 and torch.equal(ratio.network_evals, torch.tensor([4, 4]))


def test_bottom_half_and_corruption():
    mask = bottom_half(32).reshape(3, 32, 32)
    assert mask[:, 16:].all() and not mask[:, :16].any()
    images = _images(4, 5)
    corrupted = corrupt_images(images, fraction=0.2, generator=_gen(6))
    changed = (corrupted != images).double().mean().item()
    assert 0.2 * 255 / 256 - 0.02 < changed < 0.2 * 255 / 256 + 0.02
    with pytest.raises(ValueError, match="fraction"):
        corrupt_images(images, fraction=0.0)


def test_any_order_loss_decreases_on_a_trivial_dataset(tiny_cfg):
    torch.manual_seed(0)
    model = build_masked_pixel_model(tiny_cfg)
    colours = torch.tensor([[200, 30, 90], [10, 250, 120]], dtype=torch.uint8)
    images = colours[:, :, None, None].expand(2, 3, 32, 32).contiguous()
    tokens = images_to_tokens(images)

    def eval_loss():
        with torch.no_grad():
            return any_order_loss(model, tokens, generator=_gen(7)).mean().item()

    before = eval_loss()
    assert before == pytest.approx(3072 * math.log(256), rel=1e-5)  # uniform at initialisation
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(3):
        optimizer.zero_grad()
        any_order_loss(model, tokens, generator=_gen(100 + step)).mean().backward()
        optimizer.step()
    assert eval_loss() < 0.9 * before
