"""Errors the example scripts report as one line (the message says what to do), not as a traceback."""

from __future__ import annotations


class UsageError(Exception):
    """A problem with the command line, the data or the environment that the message explains."""


class LayoutError(UsageError, ValueError):
    """A dataset directory or file does not have the expected layout; the message names the path."""


class ConfigError(UsageError, ValueError):
    """Settings that cannot work together (or with the data); the message names the flag to change."""


class WeightsError(UsageError, RuntimeError):
    """Pretrained weights that cannot be loaded; the message says where to put them or what to pass."""


class WeightsFileNotFound(WeightsError, FileNotFoundError):
    """A ``--weights`` path that does not exist."""


class MissingPackageError(UsageError, ModuleNotFoundError):
    """An optional package the chosen option needs; the message names the pip command."""
