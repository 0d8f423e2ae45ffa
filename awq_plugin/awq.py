"""Deprecated alias of :mod:`awq_plugin.algorithm.awq`, kept for one release (0.1 -> 0.2).

The package was regrouped by stage; import from ``awq_plugin.algorithm.awq`` instead.
"""

import warnings

from awq_plugin.algorithm.awq import *  # noqa: F403
from awq_plugin.algorithm.awq import AwqOptions, AwqResults, apply_awq, run_awq  # noqa: F401

warnings.warn(
    "awq_plugin.awq moved to awq_plugin.algorithm.awq; the old name goes away in the next release",
    DeprecationWarning,
    stacklevel=2,
)
