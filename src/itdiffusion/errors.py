"""Errors the user can fix (bad input, missing files): stages print the message, not a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a missing file, with a message that says what to do about it.

    The stage entry points catch it, log the message and exit with status 2.
    """


class DatasetError(UserError):
    """A dataset is missing, corrupted, empty, or holds images of the wrong size or channel count."""


class Preempted(Exception):  # noqa: N818 (a control-flow signal, not an error)
    """SIGTERM arrived and the stage saved what it had (a checkpoint, finished evaluation chunks): the
    stage exits with status 143 (128 + SIGTERM) and the same command resumes it."""

    EXIT_STATUS = 143


class CheckpointError(RuntimeError):
    """A weights or training-state file that cannot be read, downloaded or loaded into the configured model
    (unreadable, truncated, foreign, or of another format version). Stages turn it into a UserError."""
