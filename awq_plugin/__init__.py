"""awq-plugin: Activation-aware Weight Quantization for vLLM and transformers.

Importing this package is cheap: it builds no kernel and imports neither vLLM
nor transformers. Heavy pieces load on first use.
"""

from __future__ import annotations

from awq_plugin.config import AwqQuantConfig
from awq_plugin.errors import (
    AwqPluginError,
    CalibrationError,
    CheckpointError,
    ConfigError,
    OutputExistsError,
    TemplateError,
)

__version__ = "0.1.0"

__all__ = [
    "AwqPluginError",
    "AwqQuantConfig",
    "CalibrationError",
    "CheckpointError",
    "ConfigError",
    "OutputExistsError",
    "TemplateError",
    "__version__",
]
