"""Keys that only matter under another setting (config.DEPENDENT_KEYS): given on the command line where that
setting is off, the launch fails naming the setting to add, instead of running without them."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from conftest import path_overrides, run_cli
from itdiffusion.config import (
    _ABSENT,
    DEPENDENT_KEYS,
    STAGE_GROUPS,
    _lookup,
    dependency_problems,
    override_keys,
)

# values of each condition key: the first one that satisfies a rule is its "good" value, the first that does
# not its "bad" one
CANDIDATES = {
    "estimator.budget": ["dataset", "per_image"],
    "estimator.target_stderr_bpd": [None, 0.01],
    "estimator.it": [True, False],
    "estimator.precision": ["fp32", "bf16"],
    "data.name": ["cifar10", "patches"],
    "finetune.skip_nonfinite": [True, False],
}


def _good(need):
    return next(v for v in CANDIDATES[need.other] if need.holds(v))


def _bad(need):
    return next(v for v in CANDIDATES[need.other] if not need.holds(v))


@pytest.fixture(scope="module")
def smoke_cfg():
    from hydra import compose, initialize_config_dir

    from itdiffusion.stages import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=["experiment=smoke", "logger=none"])


def test_every_rule_names_keys_of_the_schema(smoke_cfg):
    for need in DEPENDENT_KEYS:
        assert _lookup(smoke_cfg, need.key) is not _ABSENT, need.key
        assert _lookup(smoke_cfg, need.other) is not _ABSENT, need.other
        assert need.other in CANDIDATES


@pytest.mark.parametrize("need", DEPENDENT_KEYS, ids=[f"{n.key}-{n.other}" for n in DEPENDENT_KEYS])
def test_a_given_key_fails_exactly_when_its_condition_does(smoke_cfg, need):
    cfg = OmegaConf.create(OmegaConf.to_container(smoke_cfg))  # unresolved interpolations are not read
    for other in DEPENDENT_KEYS:  # every condition of this key holds ...
        if other.key == need.key:
            OmegaConf.update(cfg, other.other, _good(other), force_add=True)
    assert dependency_problems(cfg, {need.key}) == []
    assert dependency_problems(cfg, {"seed"}) == []  # not given: never checked
    OmegaConf.update(cfg, need.other, _bad(need))  # ... but this one
    (problem,) = dependency_problems(cfg, {need.key})
    assert problem.startswith(f"{need.key} applies only with {need.other}")
    assert problem.endswith(f"add that setting or drop {need.key}")
    assert dependency_problems(cfg, {need.key}, groups=("paths",)) == []  # a group the stage does not read


def test_the_messages_say_what_to_add(smoke_cfg):
    assert dependency_problems(smoke_cfg, {"estimator.pilot_images", "finetune.max_skipped_steps"}) == [
        "estimator.pilot_images applies only with estimator.budget=dataset (here "
        "estimator.budget=per_image): add that setting or drop estimator.pilot_images",
        "finetune.max_skipped_steps applies only with finetune.skip_nonfinite=true (here "
        "finetune.skip_nonfinite=false): add that setting or drop finetune.max_skipped_steps",
    ]
    cfg = OmegaConf.merge(smoke_cfg, {"estimator": {"precision": "fp32"}})
    assert dependency_problems(cfg, {"estimator.precision_check_images"}) == [
        "estimator.precision_check_images applies only with estimator.precision other than fp32 (here "
        "estimator.precision=fp32): add that setting or drop estimator.precision_check_images"]


def test_override_keys_reads_every_override_form():
    assert override_keys(["a.b=1", "+c.d=x", "++e=2", "~f.g", "h.i=[1,2]", "model=iddpm_tiny"]) == {
        "a.b", "c.d", "e", "f.g", "h.i", "model"}


def test_stages_read_their_groups_only():
    assert STAGE_GROUPS["evaluate"] == ("paths", "data", "model", "estimator", "logger")
    assert "estimator" not in STAGE_GROUPS["finetune"] and "finetune" not in STAGE_GROUPS["evaluate"]


@pytest.mark.parametrize(("stage", "overrides", "message"), [
    ("evaluate", ["estimator.target_stderr_bpd=0.01"],
     "estimator.target_stderr_bpd applies only with estimator.budget=dataset (here "
     "estimator.budget=per_image): add that setting or drop estimator.target_stderr_bpd"),
    ("evaluate", ["estimator.it=false", "estimator.pixel_maps=4"],
     "estimator.pixel_maps applies only with estimator.it=true (here estimator.it=false): add that setting "
     "or drop estimator.pixel_maps"),
    ("evaluate",
     ["estimator.budget=dataset", "estimator.target_stderr_bpd=0.01", "estimator.target_stderr_ratio=2"],
     "estimator.target_stderr_ratio applies only with estimator.target_stderr_bpd=null (here "
     "estimator.target_stderr_bpd=0.01): add that setting or drop estimator.target_stderr_ratio"),
    ("finetune", ["finetune.max_skipped_steps=3"],
     "finetune.max_skipped_steps applies only with finetune.skip_nonfinite=true (here "
     "finetune.skip_nonfinite=false): add that setting or drop finetune.max_skipped_steps"),
])
def test_the_cli_refuses_an_ignored_key_before_any_work(tmp_path, stage, overrides, message):
    proc = run_cli(stage, "experiment=smoke", "logger=none", "run_id=dep", *path_overrides(tmp_path),
                   *overrides, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [f"error: {message}"]
    assert not (tmp_path / "outputs" / stage).exists() and not (tmp_path / "checkpoints").exists()
