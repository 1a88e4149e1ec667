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
    Name,
    OneOf,
    Rule,
    WholeNumber,
    check_values,
    unknown_keys,
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
    ReportConfig,
    register_configs,
)

__all__ = [
    "AllOrCount", "Bounds", "CONFIG_DIR", "Config", "DEPENDENT_KEYS", "DEVICES", "DataConfig",
    "EstimatorConfig", "FinetuneConfig", "GROUPS", "LoggerConfig", "Name", "Needs", "OneOf", "PathsConfig",
    "ReportConfig", "Rule", "STAGE_GROUPS", "VALUE_RULES", "WholeNumber", "check_values",
    "dependency_problems", "override_keys", "register_configs", "stage_config", "unknown_keys",
    "value_problems",
]
