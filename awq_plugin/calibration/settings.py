"""What to calibrate on: the one owner of the calibration defaults.

The API, the CLI, the streaming pipeline and transformers' ``AwqConfig`` all take
their defaults from :class:`CalibrationSettings`. The seed of the window draw is
``AwqOptions.seed`` (one seed for every sample a run draws). Torch-free, so that the CLI
can show these defaults without importing torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CalibrationSettings:
    """Calibration text and how much of it to use."""

    source: str | Path | Sequence[str] = "enwiki"  # built-in set, .txt/.jsonl file, or documents
    n_samples: int = 128  # windows drawn from the text
    seq_len: int = 512  # tokens per window


DEFAULTS = CalibrationSettings()
