"""Structured configs and their checks: the schemas behind ``src/itdiffusion/conf/``
(:mod:`~itdiffusion.config.schema`), the allowed values (:mod:`~itdiffusion.config.rules`), and the keys that
need another setting with the groups each stage reads (:mod:`~itdiffusion.config.dependent`)."""

from itdiffusion.config.dependent import (
    DEPENDENT_KEYS,
    GROUPS,
    STAGE_GROUPS,
    Needs,
    dependency_problems,
    override_keys,
    stage_config,
)
from itdiffusion.config.rules import (
    DEVICES,
    VALUE_RULES,
    AllOrCount,
    Bounds,
    OneOf,
    Rule,
    check_values,
    value_problems,
)
from itdiffusion.config.schema import (
    CONFIG_DIR,
    Config,
    DataConfig,
    EstimatorConfig,
    FinetuneConfig,
    LoggerConfig,
    PathsConfig,
    register_configs,
)

__all__ = [
    "CONFIG_DIR", "DEPENDENT_KEYS", "DEVICES", "GROUPS", "STAGE_GROUPS", "VALUE_RULES", "AllOrCount",
    "Bounds",
    "Config", "DataConfig", "EstimatorConfig", "FinetuneConfig", "LoggerConfig", "Needs", "OneOf",
    "PathsConfig", "Rule", "check_values", "dependency_problems", "override_keys", "register_configs",
    "stage_config", "value_problems",
]
