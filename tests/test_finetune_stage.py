"""The finetune stage through Hydra's compose API: the smoke chain (IDDPM loss from scratch, then IT
fine-tuning from the exported weights), the exported checkpoint, the loss curve, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from itdiffusion.artifacts import read_loss_curve
from itdiffusion.errors import UserError
from itdiffusion.models.iddpm import build_model_and_diffusion, load_checkpoint
from itdiffusion.models.weights import file_sha256
from itdiffusion.stages import CONFIG_DIR, evaluate
from itdiffusion.stages.finetune import SUMMARY, run
from itdiffusion.training import NonFiniteError


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")  # the Gaussian reference of the patches, computed once


def smoke_cfg(tmp_path: Path, cache_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[
            "model=iddpm_tiny", "data=patches", "finetune=smoke", "logger=none", "device=cpu", "run_id=test",
            "data.num_workers=0", "data.stats_diagonal=true", f"paths.output_dir={tmp_path / 'outputs'}",
            f"paths.cache_dir={cache_dir}", f"paths.checkpoint_dir={tmp_path / 'checkpoints'}",
            "finetune.batch_size=4", "finetune.max_steps=2", "finetune.heldout_images=4", *overrides])


def test_smoke_chain_base_then_it_finetune(tmp_path, cache_dir):
    base_cfg = smoke_cfg(tmp_path, cache_dir, "finetune=smoke_base")
    base = run(base_cfg, tmp_path / "run_base")
    base_dir = tmp_path / "checkpoints" / "finetune" / "iddpm_tiny_iddpm"
    assert base["model_path"] == str(base_dir / "model.pt") and base["steps"] == 2
    curve = read_loss_curve(base_dir / "loss_curve.json")
    assert [p["step"] for p in curve] == [0, 2]
    assert curve[1]["train_loss_bpd"] is None and math.isfinite(curve[1]["train_loss_iddpm"])
    assert all(math.isfinite(p["heldout_loss_bpd"]) for p in curve)  # held-out: always the IT bound

    tuned = run(smoke_cfg(tmp_path, cache_dir), tmp_path / "run_tuned")  # finetune=smoke: init = base weights
    assert tuned["init"].startswith(str(base_dir / "model.pt"))
    tuned_dir = Path(tuned["checkpoint_dir"])
    assert tuned_dir.name.startswith("iddpm_tiny_it_")  # plus the hash of the trajectory settings
    summary = json.loads((tmp_path / "run_tuned" / SUMMARY).read_text())
    assert summary["steps"] == 2 and summary["objective"] == "it"
    curve = read_loss_curve(tuned_dir / "loss_curve.json")
    for point in curve[1:]:
        assert point["train_loss_bpd"] == pytest.approx(point["train_loss_nats"] / (3072 * math.log(2)))

    # the exported weights load like an official checkpoint, and they moved away from the base model
    model, _ = build_model_and_diffusion(smoke_cfg(tmp_path, cache_dir).model)
    load_checkpoint(model, tuned_dir / "model.pt")
    base_weights = torch.load(base_dir / "model.pt", weights_only=True)
    assert any(not torch.equal(v, base_weights[k]) for k, v in model.state_dict().items())

    # each export says what produced it, and an evaluation of the tuned weights with the base model config
    # (iddpm_tiny: "L_hybrid") takes its training objective from there, not from the config
    base_export = json.loads((base_dir / "export.json").read_text())
    assert base_export["training_objective"] == "L_hybrid"  # iddpm_tiny's IDDPM loss, from scratch
    assert base_export["weights"]["model.pt"] == file_sha256(base_dir / "model.pt")
    label = json.loads((tuned_dir / "export.json").read_text())["training_objective"]
    assert label == "L_hybrid + IT fine-tuning"
    eval_overrides = ["estimator.npoints=4", "data.num_images=2", "model.diffusion_steps=4",
                      "estimator.vlb=false", "estimator.pixel_maps=0"]
    tuned_eval = evaluate.run(smoke_cfg(tmp_path, cache_dir, f"model.checkpoint={tuned_dir / 'model.pt'}",
                                        "run_id=eval-tuned", *eval_overrides), tmp_path / "eval_tuned")
    assert tuned_eval["training_objective"] == label and tuned_eval["training_objective_from"] == "checkpoint"
    # the same file elsewhere (no export.json beside it) keeps the model config's label
    copy = tmp_path / "elsewhere" / "model.pt"
    copy.parent.mkdir()
    copy.write_bytes((tuned_dir / "model.pt").read_bytes())
    plain = evaluate.run(smoke_cfg(tmp_path, cache_dir, f"model.checkpoint={copy}", "run_id=eval-copy",
                                   *eval_overrides), tmp_path / "eval_copy")
    assert plain["training_objective"] == "L_hybrid" and plain["training_objective_from"] == "model config"


@pytest.mark.parametrize(("override", "message"), [
    ("finetune.lr=-1e-4", "finetune.lr=-0.0001 must be > 0"),
    ("finetune.init=/nonexistent/weights.pt", "finetune.init=/nonexistent/weights.pt does not exist"),
    ("data.num_train_images=3", "3 images, fewer than one global batch of 4"),
    ("finetune.objective=mse", "finetune.objective='mse' is not one of"),
])
def test_bad_input_is_a_user_error(tmp_path, cache_dir, override, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")):
        run(smoke_cfg(tmp_path, cache_dir, "finetune.init=scratch", override), tmp_path / "run")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_requested_without_gpu_is_a_user_error(tmp_path, cache_dir):
    with pytest.raises(UserError, match="no CUDA GPU is visible"):
        run(smoke_cfg(tmp_path, cache_dir, "device=cuda"), tmp_path / "run")


def test_divergence_stops_naming_the_step(tmp_path, cache_dir):
    # Adam moves every weight by ~lr on its first update: lr = 1e30 overflows the next forward pass
    cfg = smoke_cfg(tmp_path, cache_dir, "finetune.init=scratch", "finetune.lr=1e30",
                    "finetune.save_every_steps=1", "finetune.max_steps=4")
    with pytest.raises(NonFiniteError, match="non-finite loss or gradient at step 2 ") as info:
        run(cfg, tmp_path / "run")
    assert isinstance(info.value, UserError) and info.value.step == 2
    assert not list((tmp_path / "checkpoints" / "finetune").glob("*/model.pt"))
