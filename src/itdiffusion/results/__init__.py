"""The results store and its tables (:mod:`itdiffusion.results.store`)."""

from itdiffusion.results.store import *  # noqa: F403
