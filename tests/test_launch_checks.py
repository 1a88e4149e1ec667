"""Every key of every schema with a bad value of its kind fails at launch: one line, exit 2, nothing created.

The bulk runs in-process through the function the command line runs before Hydra makes the run dir
(:func:`itdiffusion.stages.check_before_run_dir`, after Hydra's composition): one CLI process per key would
take minutes. A sample per schema, and every value the fault campaign found, go through the real command line.
"""

from __future__ import annotations

import dataclasses
import typing

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from conftest import path_overrides, run_cli
from itdiffusion import config
from itdiffusion.errors import UserError
from itdiffusion.models import schemas
from itdiffusion.stages import CONFIG_DIR, check_before_run_dir, value_rules

# schema section -> (its dataclass, the overrides that select it)
SCHEMAS = {
    "paths": (config.PathsConfig, []),
    "data": (config.DataConfig, ["data=patches"]),
    "model": (schemas.ModelConfig, ["model=iddpm_tiny"]),
    "model(masked)": (schemas.MaskedPixelsModelConfig, ["model=masked_pixels_tiny"]),
    "model(ddpm)": (schemas.DDPMModelConfig, ["model=ddpm_tiny"]),
    "estimator": (config.EstimatorConfig, []),
    "finetune": (config.FinetuneConfig, []),
    "logger": (config.LoggerConfig, []),
    "report": (config.ReportConfig, []),
    "": (config.Config, []),
}
# Free text: any string is a value of its kind (labels, names of things looked up later, URLs, paths checked
# where they are used). Listed so that a new key must be classified here or get a rule.
FREE_TEXT = {
    "paths.data_dir", "paths.checkpoint_dir", "paths.output_dir", "paths.cache_dir", "paths.results_dir",
    "data.root", "data.train_split", "data.test_split", "model.name", "model.attention_resolutions",
    "model.timestep_respacing", "model.checkpoint", "model.checkpoint_url", "model.checkpoint_sha256",
    "model.checkpoint_file", "model.training_objective", "model.pretrained", "model.hub_revision",
    "model.act_fn", "model.time_embedding_type", "model.beta_schedule", "model.prediction_type",
    "model.variance_type", "estimator.logsnr_proposal_from", "estimator.budget_from", "finetune.init",
    "logger.project", "logger.entity", "logger.group", "logger.dir", "experiment", "label", "paper_row",
    "optimized_metric",
}


def _rule_value(rule: config.Rule):
    """A value the rule refuses (of the key's own type)."""
    check = rule.check
    if isinstance(check, config.OneOf):
        return "nope"
    if isinstance(check, config.Name):
        return "../escaped"
    if isinstance(check, config.AllOrCount):
        return check.low - 1
    if isinstance(check, config.WholeNumber):
        return check.low + 1 if check.multiple_of > 1 else check.low - 1
    if check.low is not None:
        return check.low - (0 if check.low_open else 1)
    return check.high + (0 if check.high_open else 1)


def _bad_value(key: str, kind):
    rule = next((r for r in value_rules() if r.key == key), None)  # the families' kinds and objectives too
    if rule is not None:
        return _rule_value(rule)
    if typing.get_origin(kind) is list:
        return "notalist"
    args = set(typing.get_args(kind)) - {type(None)}  # X | None
    base = next(iter(args)) if args else kind
    return {bool: "maybe", int: "abc", float: "abc"}.get(base)


def _cases():
    cases = []
    for section, (schema, selectors) in SCHEMAS.items():
        hints = typing.get_type_hints(schema)
        for f in dataclasses.fields(schema):
            if section == "" and f.name in SCHEMAS or section.startswith("model(") and f.name in {
                    g.name for g in dataclasses.fields(schemas.ModelConfig)}:
                continue  # the groups themselves; the model schemas' shared keys are tested once
            key = f"{section.split('(')[0]}.{f.name}" if section else f.name
            value = _bad_value(key, hints[f.name])
            if value is None:
                assert key in FREE_TEXT, f"{key}: add a value rule or list it as free text"
                continue
            cases.append((key, value, selectors))
    return cases


CASES = _cases()


def _override(key, value) -> str:
    return f"{key}={value}" if value != "" else f"{key}="


def test_every_key_is_tested_or_free_text():
    keys = {c[0] for c in CASES}
    assert len(keys) > 100 and not keys & FREE_TEXT
    assert {"seed", "run_id", "finetune.run_name", "model.num_heads", "model.num_channels"} <= keys


@pytest.mark.parametrize(("key", "value", "selectors"), CASES, ids=[f"{c[0]}={c[1]}" for c in CASES])
def test_a_bad_value_of_any_key_fails_before_the_run_dir(tmp_path, key, value, selectors):
    """Hydra refuses a value of the wrong type while composing (the command line: one line, exit 2); a value
    of the right type outside its rule fails check_before_run_dir with one line naming the key."""
    overrides = [*path_overrides(tmp_path), "logger=none", *selectors, _override(key, value)]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3", job_name="evaluate"):
        try:
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
        except (HydraException, OmegaConfBaseException) as e:
            assert key.split(".")[-1] in str(e) or str(value) in str(e), e
            return
        with pytest.raises(UserError) as info:
            check_before_run_dir(cfg)
    message = str(info.value)
    assert f"{key}=" in message and "\n" not in message
    assert not (tmp_path / "outputs").exists()


# --- through the real command line ------------------------------------------------------------------------
CLI_CASES = [  # (stage, overrides, text of the one line)
    ("evaluate", ["seed=-1"], "seed=-1 must be a whole number in [0, 4294967295]"),
    ("evaluate", ["seed=99999999999999999999"], "seed=99999999999999999999 must be a whole number"),
    ("evaluate", ["run_id="], "run_id='' must be a folder name"),
    ("evaluate", ["run_id=../../../escaped"], "run_id='../../../escaped' must be a folder name"),
    ("finetune", ["finetune.run_name=../../../ftescape"], "finetune.run_name='../../../ftescape' must be"),
    ("evaluate", ["model.num_heads=0"], "model.num_heads=0 must be a whole number >= 1"),
    ("finetune", ["model.num_channels=48"], "model.num_channels=48 must be a whole number >= 32 divisible"),
    ("evaluate", ["+estimator.npoint=5"], "estimator.npoint is not a key of the config"),
    ("evaluate", ["estimator.npoints=five"], "Value 'five' of type 'str' could not be converted to Integer"),
    ("stats", ["data.stats_diagonal=maybe"], "Value 'maybe' is not a valid bool"),
    ("report", ["report.allow_invalid=maybe"], "Value 'maybe' is not a valid bool"),
    ("finetune", ["finetune.lr=abc"], "finetune.lr=abc"),
    ("report", ["logger.tags=notalist"], "str is not a ListConfig"),
    ("evaluate", ["model=ddpm_tiny", "model.norm_eps=abc"], "model.norm_eps=abc"),
    ("evaluate", ["model=masked_pixels_tiny", "model.vocab_size=1"], "model.vocab_size=1 must be >= 2"),
]


@pytest.mark.parametrize(("stage", "overrides", "message"), CLI_CASES, ids=[c[1][-1] for c in CLI_CASES])
def test_a_bad_value_on_the_command_line_is_one_line_and_creates_nothing(tmp_path, stage, overrides, message):
    work = tmp_path / "a" / "b" / "c"  # ../../../escaped from outputs/<stage>/ lands in tmp_path/a
    work.mkdir(parents=True)
    proc = run_cli(stage, "experiment=smoke", "logger=none", *path_overrides(work), *overrides, cwd=work,
                   timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert "Traceback" not in proc.stdout
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b", "c"]  # no run dir, no escaped folder
