"""``--help`` through the real CLI: the groups a user picks from with their options (no internal schema/*
group), and the main keys with their defaults and the descriptions written beside the schema's fields."""

from __future__ import annotations

import dataclasses

import pytest

from conftest import run_cli
from itdiffusion import config
from itdiffusion.help import field_comments


@pytest.fixture(scope="module")
def help_page(tmp_path_factory):
    proc = run_cli("evaluate", "--help", cwd=tmp_path_factory.mktemp("help"), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_help_lists_the_groups_and_their_options_but_no_schema_group(help_page):
    assert "schema" not in help_page
    lines = help_page.splitlines()
    assert "  experiment: paper | paper_full | smoke   (optional)" in lines
    assert "  estimator: default | it | vlb   (default: default)" in lines
    assert "  hparams_search: estimator | finetune_lr   (optional)" in lines
    assert any(line.startswith("  hydra/launcher: slurm ") and '.[slurm]' in line for line in lines)
    assert "--multirun,-m" in help_page  # Hydra's own flags stay


def test_help_shows_the_main_keys_with_defaults_and_the_schemas_descriptions(help_page):
    lines = help_page.splitlines()
    for key, description in [
        ("estimator.npoints=1000", "log-SNR points per image for the IT estimates"),
        ("finetune.keep_epochs=2", "epoch_XXX.pt files kept (the newest); -1: all, 0: none"),
        ("finetune.lr=2.5e-05", "AdamW (= Adam at weight_decay 0)"),
        ("estimator.target_stderr_bpd=null", "dataset budget: the stderr each dataset mean must reach"),
        ("seed=0", "everything random in a stage"),
    ]:
        assert any(line.startswith(f"  {key} ") and description in line for line in lines), key
    # every commented field of the estimator and finetune schemas has its line (the field's own comment)
    for group, cls in (("estimator", config.EstimatorConfig), ("finetune", config.FinetuneConfig)):
        shown = {f.name for f in dataclasses.fields(cls) if f"  {group}.{f.name}=" in help_page}
        assert shown == set(field_comments(cls)) and len(shown) > 15
