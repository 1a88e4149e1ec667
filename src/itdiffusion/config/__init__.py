"""The config schema (:mod:`itdiffusion.config.schema`)."""

from itdiffusion.config.schema import *  # noqa: F403
