"""The top-level ``seed`` seeds everything random in a stage; a key nothing reads is not accepted."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException

from conftest import TINY
from itdiffusion.stages import stats


def test_seed_reaches_every_stream_unless_one_is_set(make_cfg):
    cfg = make_cfg("seed=7")
    assert (cfg.data.seed, cfg.estimator.seed, cfg.finetune.seed) == (7, 7, 7)
    cfg = make_cfg("seed=7", "estimator.seed=3", "finetune=smoke")
    assert (cfg.data.seed, cfg.estimator.seed, cfg.finetune.seed) == (7, 3, 7)
    assert make_cfg().estimator.seed == 0


def test_extra_is_gone(make_cfg):
    with pytest.raises(ConfigCompositionException):
        make_cfg("extra={}")  # no longer a key (nothing read it)


def test_seed_changes_the_stats_stage_and_each_seed_is_reproducible(make_cfg, tmp_path):
    def entropy(seed: int, run: str) -> float:
        cfg = make_cfg(*TINY, f"seed={seed}", "data.stats_images=20", f"paths.cache_dir={tmp_path / run}")
        return stats.run(cfg, tmp_path / run / "run")["entropy_nats"]

    assert entropy(1, "a") == entropy(1, "b")  # computed twice from scratch: the same subset
    assert entropy(1, "a") != entropy(2, "a")  # another seed: another subset (and cache file)
