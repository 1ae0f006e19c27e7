"""Errors that mbdml raises for bad input.

Every message names the problem and how to fix it; the command line prints the
message alone (no traceback) and exits with status 2.
"""

from __future__ import annotations


class MbdmlError(Exception):
    """Base class of every error a user can cause and fix."""


class DataError(MbdmlError, ValueError):
    """The data on disk, or its split, cannot be used as asked."""


class ConfigError(MbdmlError, ValueError):
    """A configuration value (or command-line flag) makes no sense."""


class CheckpointError(MbdmlError, RuntimeError):
    """A checkpoint or run folder cannot be read or written."""


class TrainingError(MbdmlError, RuntimeError):
    """Training cannot go on (a NaN loss, say); the last good checkpoint is kept."""
