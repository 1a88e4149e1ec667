"""Bad settings fail before anything runs: one line on stderr naming the key, the value and what is
allowed, exit status 2, and no run dir, results row or wandb run left behind."""

from __future__ import annotations

import os
import time

import pytest

from conftest import path_overrides, run_cli
from itdiffusion import config
from itdiffusion.config import check_values, value_problems
from itdiffusion.errors import UserError
from itdiffusion.models import families
from itdiffusion.stages import value_rules
from itdiffusion.stages.output_dirs import check_writable_dir
from itdiffusion.stages.run_dir import created_by_this_process, remove_unused_run_dir

RULES = value_rules()  # what the stages check (the families' kinds and objectives too)

# (override, the message's text): every kind of rule, run through Hydra's parsing of the value
BAD_VALUES = [
    ("estimator.rounding=sotf", "estimator.rounding='sotf' is not one of soft, hard, none"),
    ("estimator.logsnr_sampling=grdi",
     "estimator.logsnr_sampling='grdi' is not one of stratified, random, grid"),
    ("estimator.clip=-1", "estimator.clip=-1.0 must be > 0"),
    ("estimator.clip=0", "estimator.clip=0.0 must be > 0"),
    ("estimator.clip=inf", "estimator.clip=inf must be > 0"),
    ("estimator.npoints=1", "estimator.npoints=1 must be >= 2"),
    ("estimator.batch_size=0", "estimator.batch_size=0 must be >= 1"),
    ("estimator.vlb_steps_per_batch=0", "estimator.vlb_steps_per_batch=0 must be >= 1"),
    ("estimator.precision=fp16", "estimator.precision='fp16' is not one of fp32, bf16, auto"),
    ("estimator.compile=max_autotune",
     "estimator.compile='max_autotune' is not one of none, default, reduce-overhead, max-autotune"),
    ("estimator.precision_tolerance_bpd=0", "estimator.precision_tolerance_bpd=0.0 must be > 0"),
    ("estimator.precision_tolerance_bpd=nan", "estimator.precision_tolerance_bpd=nan must be > 0"),
    ("estimator.precision_check_images=1", "estimator.precision_check_images=1 must be >= 2"),
    ("estimator.num_masks=1", "estimator.num_masks=1 must be >= 2"),
    ("estimator.corrupt_fraction=0", "estimator.corrupt_fraction=0.0 must be in (0, 1]"),
    ("estimator.corrupt_fraction=1.5", "estimator.corrupt_fraction=1.5 must be in (0, 1]"),
    ("finetune.objective=itt", "finetune.objective='itt' is not one of it, iddpm, any_order"),
    ("finetune.epochs=0", "finetune.epochs=0 must be >= 1"),
    ("finetune.lr=0", "finetune.lr=0.0 must be > 0"),
    ("finetune.lr=-1e-4", "finetune.lr=-0.0001 must be > 0"),
    ("finetune.batch_size=0", "finetune.batch_size=0 must be >= 1"),
    ("finetune.ema_decay=1.0", "finetune.ema_decay=1.0 must be in (0, 1) or null"),
    ("finetune.ema_decay=0", "finetune.ema_decay=0.0 must be in (0, 1) or null"),
    ("device=gpu", "device='gpu' is not one of auto, cpu, cuda, cuda:N"),
    ("device=cuda:x", "device='cuda:x' is not one of auto, cpu, cuda, cuda:N"),
    ("logger.backend=tensorboard", "logger.backend='tensorboard' is not one of wandb, none"),
    ("logger.mode=onlin", "logger.mode='onlin' is not one of offline, online, disabled"),
    ("logger.flush_every_s=-1", "logger.flush_every_s=-1.0 must be >= 0"),
    ("model.kind=ddpmm", "model.kind='ddpmm' is not one of iddpm, masked_pixels"),
    ("model.noise_schedule=quadratic", "model.noise_schedule='quadratic' is not one of cosine, linear"),
    ("data.name=cifar100", "data.name='cifar100' is not one of cifar10, image_folder, npz, patches"),
    ("data.num_images=0", "data.num_images=0 must be >= 1 or null"),
    ("data.num_train_images=-3", "data.num_train_images=-3 must be >= 1 or null"),
]

GOOD_VALUES = [
    "device=cpu", "device=cuda", "device=cuda:1", "device=auto", "finetune.ema_decay=null",
    "finetune.ema_decay=0.5",
    "data.num_images=null", "data.num_images=1", "estimator.corrupt_fraction=1", "estimator.rounding=none",
    "estimator.logsnr_sampling=grid", "estimator.compile=reduce-overhead", "logger.mode=disabled",
    "model.noise_schedule=linear", "logger.flush_every_s=0",
]


@pytest.mark.parametrize(("override", "message"), BAD_VALUES, ids=[case[0] for case in BAD_VALUES])
def test_each_bad_value_is_named_with_what_is_allowed(make_cfg, override, message):
    problems = value_problems(make_cfg(override), rules=RULES)
    assert len(problems) == 1 and problems[0].startswith(message), problems  # may add why, e.g. "(bits/dim)"
    with pytest.raises(UserError) as info:
        check_values(make_cfg(override), rules=RULES)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_good_values_and_every_shipped_config_pass(make_cfg):
    assert value_problems(make_cfg(*GOOD_VALUES), rules=RULES) == []
    for overrides in (["experiment=smoke"], ["experiment=paper"], ["model=masked_pixels_tiny"],
                      ["model=masked_pixels_cifar10", "finetune=masked"], ["finetune=smoke_base"],
                      ["finetune=smoke_masked"], ["data=npz"], ["data=image_folder"], ["estimator=vlb"],
                      ["logger=wandb"]):
        assert value_problems(make_cfg(*overrides)) == [], overrides


def test_several_problems_are_one_line_and_conditions_apply(make_cfg):
    problems = value_problems(make_cfg("estimator.rounding=sotf", "finetune.lr=-1", "device=gpu"))
    assert len(problems) == 3
    with pytest.raises(UserError) as info:
        check_values(make_cfg("estimator.rounding=sotf", "finetune.lr=-1", "device=gpu"))
    assert str(info.value) == "; ".join(problems)
    # npoints only matters for the IT estimates
    assert value_problems(make_cfg("estimator.npoints=1", "estimator.it=false")) == []


def test_a_group_alone_is_checked_against_its_own_rules():
    from itdiffusion.config import FinetuneConfig

    assert value_problems(FinetuneConfig(), section="finetune") == []
    assert value_problems(FinetuneConfig(lr=float("nan"), epochs=0), section="finetune") == [
        "finetune.epochs=0 must be >= 1", "finetune.lr=nan must be > 0 (the paper uses 2.5e-5)"]


def test_allowed_sets_are_the_library_s():
    """Each allowed-values rule holds the very tuple the code that uses the value checks (no copy)."""
    from itdiffusion import budget, data, information
    from itdiffusion.models import acceleration, schedules

    rules = {rule.key: rule.check.values for rule in config.VALUE_RULES if hasattr(rule.check, "values")}
    assert rules["data.name"] is data.SOURCES
    assert rules["estimator.rounding"] is information.ROUNDING_MODES
    assert rules["estimator.logsnr_sampling"] is information.SAMPLING_MODES
    assert rules["estimator.precision"] is acceleration.PRECISIONS
    assert rules["estimator.compile"] is acceleration.COMPILE_MODES
    assert rules["model.noise_schedule"] is schedules.SCHEDULES
    assert rules["estimator.budget"] is budget.BUDGETS
    assert families.allowed_values() == {"model.kind": ("iddpm", "masked_pixels", "ddpm"),  # the registry's
                                         "finetune.objective": ("it", "iddpm", "any_order")}


# --- folders the stage writes --------------------------------------------------------------------------
def test_output_dirs_must_be_writable_folders(tmp_path):
    check_writable_dir(tmp_path / "new" / "results", "paths.results_dir")  # can be created: fine
    assert not (tmp_path / "new").exists()  # and nothing was created
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"paths.results_dir: .*/file is not a directory"):
        check_writable_dir(tmp_path / "file", "paths.results_dir")
    with pytest.raises(UserError, match=r"/file/results cannot be created: .*/file is not a directory"):
        check_writable_dir(tmp_path / "file" / "results", "paths.results_dir")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")
def test_a_read_only_folder_is_refused(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(UserError, match="is not writable"):
            check_writable_dir(folder / "results", "paths.results_dir")
    finally:
        folder.chmod(0o755)


# --- the run dir ---------------------------------------------------------------------------------------
def _hydra_files(run_dir, log_text=""):
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("a: 1\n")
    (run_dir / "stats.log").write_text(log_text)


def test_only_a_run_dir_of_hydra_files_is_removed(tmp_path):
    outputs = tmp_path / "outputs"
    bare, used = outputs / "stats" / "bare", outputs / "stats" / "used"
    _hydra_files(bare)
    _hydra_files(used)
    (used / "stats.json").write_text("{}")
    assert not remove_unused_run_dir(used, "stats", outputs) and (used / "stats.json").is_file()
    assert remove_unused_run_dir(bare, "stats", outputs) and not bare.exists()
    assert (outputs / "stats").is_dir()  # still holds `used`
    assert remove_unused_run_dir(outputs / "stats" / "other", "stats", outputs) is False  # absent
    (used / "stats.json").unlink()
    assert remove_unused_run_dir(used, "stats", outputs)
    assert outputs.is_dir() and not (outputs / "stats").exists()  # empty parents go, output_dir stays


def test_a_run_dir_of_an_earlier_process_counts_as_not_ours(tmp_path):
    _hydra_files(tmp_path / "old", "[earlier run] started\n")
    past = time.time() - 3600
    os.utime(tmp_path / "old", (past, past))
    assert not created_by_this_process(tmp_path / "old")
    (tmp_path / "new").mkdir()  # made after this process (and the stages package) started
    assert created_by_this_process(tmp_path / "new")


# --- the real command line -----------------------------------------------------------------------------
CLI_CASES = [  # (stage, overrides, the message's text)
    ("stats", ["estimator.rounding=sotf"], "estimator.rounding='sotf' is not one of soft, hard, none"),
    ("evaluate", ["estimator.logsnr_sampling=grdi", "estimator.clip=-1"],
     "estimator.logsnr_sampling='grdi' is not one of stratified, random, grid; "
     "estimator.clip=-1.0 must be > 0 (scales of the log-SNR proposal)"),
    ("finetune", ["finetune.objective=itt"], "finetune.objective='itt' is not one of it, iddpm, any_order"),
    ("report", ["logger=wandb", "logger.mode=onlin"],
     "logger.mode='onlin' is not one of offline, online, disabled"),
]


def _cli(stage, tmp_path, *overrides):
    return run_cli(stage, "experiment=smoke", "run_id=bad", *path_overrides(tmp_path), *overrides,
                   cwd=tmp_path, timeout=120)


def _assert_one_error_line(proc, message):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [f"error: {message}"]
    assert "Traceback" not in proc.stdout


def _leftovers(tmp_path):
    """Files the failed launch left under outputs/ (the empty output_dir itself may remain)."""
    outputs = tmp_path / "outputs"
    return sorted(str(p.relative_to(outputs)) for p in outputs.rglob("*")) if outputs.exists() else []


@pytest.mark.parametrize(("stage", "overrides", "message"), CLI_CASES,
                         ids=[f"{c[0]}-{c[1][-1]}" for c in CLI_CASES])
def test_a_bad_value_on_the_command_line_leaves_nothing(tmp_path, stage, overrides, message):
    proc = _cli(stage, tmp_path, *overrides)
    _assert_one_error_line(proc, message)
    assert _leftovers(tmp_path) == []  # no run dir, results row, wandb run, cache or lock file
    assert not (tmp_path / "checkpoints").exists()


def test_a_results_dir_that_is_a_file_fails_at_start(tmp_path):
    results = tmp_path / "results"
    results.write_text("not a folder")
    proc = _cli("evaluate", tmp_path, f"paths.results_dir={results}")
    _assert_one_error_line(proc, f"paths.results_dir: {results} is not a directory")
    assert _leftovers(tmp_path) == [] and results.read_text() == "not a folder"


def test_a_later_user_error_also_leaves_no_run_dir(tmp_path):
    proc = _cli("stats", tmp_path, "data=cifar10", "logger=none")  # no CIFAR-10 under data_dir
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1
    assert "data.download=true" in proc.stderr
    assert not (tmp_path / "outputs" / "stats").exists()  # (stats takes its cache lock before loading)


def test_a_run_dir_with_earlier_outputs_is_kept_and_logs_the_error(tmp_path):
    run_dir = tmp_path / "outputs" / "stats" / "bad"
    run_dir.mkdir(parents=True)
    (run_dir / "stats.json").write_text("{}")
    proc = _cli("stats", tmp_path, "estimator.rounding=sotf")
    _assert_one_error_line(proc, "estimator.rounding='sotf' is not one of soft, hard, none")
    assert (run_dir / "stats.json").read_text() == "{}"
    assert "estimator.rounding='sotf'" in (run_dir / "stats.log").read_text()
