"""Weight files and stores that would give silently wrong results are refused with the real reason:
non-finite weights (naming the first bad tensor), files torch's safe unpickler refuses (not called
"truncated"), and a results store whose ``runs`` is not a mapping."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from itdiffusion.errors import UserError
from itdiffusion.models.iddpm import build_model_and_diffusion
from itdiffusion.models.weights import CheckpointError, load_checkpoint
from itdiffusion.results import FORMAT, ResultsStoreError, load_runs
from itdiffusion.stages import CONFIG_DIR

CONF = Path(CONFIG_DIR)


def tiny_model():
    cfg = OmegaConf.load(CONF / "model" / "iddpm_tiny.yaml")
    return build_model_and_diffusion(cfg)[0]


def test_nonfinite_weights_are_refused_naming_the_first_bad_tensor(tmp_path):
    model = tiny_model()
    state = model.state_dict()
    names = [k for k, v in state.items() if v.is_floating_point()]
    state[names[3]] = state[names[3]].clone()
    state[names[3]].view(-1)[:2] = torch.tensor([float("nan"), float("inf")])
    state[names[5]] = state[names[5]] * float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match=rf"non-finite weights \(first: {names[3]}: 2 non-finite of"):
        load_checkpoint(tiny_model(), tmp_path / "nan.pt")


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_a_malicious_file_is_reported_as_such_not_as_truncated(tmp_path, writer):
    marker, path = tmp_path / "code_ran", tmp_path / "weights.pt"
    payload = {"input_blocks.0.0.weight": torch.zeros(1), "x": _RunsCode(marker)}
    if writer == "torch":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tiny_model(), path)
    message = str(info.value)
    assert "torch.load(weights_only=True) refuses" in message and "none of its code ran" in message
    assert "truncated" not in message and "download it again" not in message
    if writer == "torch":
        assert "the global posix.system" in message or "the global os.system" in message
    assert not marker.exists()


def test_finetune_from_nonfinite_weights_is_a_user_error(tmp_path):
    from hydra import compose, initialize_config_dir

    from itdiffusion.models.families import family_of
    from itdiffusion.stages import CONFIG_DIR
    from itdiffusion.stages.finetune import load_initial_weights

    model = tiny_model()
    state = {k: v * float("nan") if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "nan.pt")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config",
                      overrides=["model=iddpm_tiny", f"finetune.init={tmp_path / 'nan.pt'}"])
    with pytest.raises(UserError, match="holds non-finite weights"):
        load_initial_weights(cfg, family_of(cfg.model), model)


def test_results_store_whose_runs_is_a_list_is_a_clear_error(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"format": FORMAT, "runs": [{"run_id": "a"}]}))
    with pytest.raises(ResultsStoreError, match=r"'runs' must map run ids to metrics objects, found list"):
        load_runs(tmp_path)
