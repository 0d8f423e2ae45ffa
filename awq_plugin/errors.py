"""The exceptions this package raises for bad input.

Every error a user can cause derives from :class:`AwqPluginError`, so callers
(the CLI, the fuzz tests) can tell "your input is wrong" from a bug. They also
derive from ``ValueError`` where that is the conventional type, so code that
already catches ``ValueError`` keeps working.
"""

from __future__ import annotations


class AwqPluginError(Exception):
    """Base class of every user-facing error raised by awq_plugin."""


class ConfigError(AwqPluginError, ValueError):
    """A quantization config has a missing, unknown or invalid field."""


class TemplateError(AwqPluginError, ValueError):
    """An architecture template is malformed or names a module the model lacks."""


class CheckpointError(AwqPluginError, ValueError):
    """A checkpoint folder is missing files or holds tensors of the wrong kind."""


class CalibrationError(AwqPluginError, ValueError):
    """Calibration or evaluation text is missing, empty or too short."""


class OutputExistsError(AwqPluginError, FileExistsError):
    """The output location already holds a model and overwriting was not asked for."""
