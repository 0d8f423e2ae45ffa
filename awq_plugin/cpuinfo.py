"""This machine's CPU feature flags, read once from ``/proc/cpuinfo`` (a base module: the kernels
pick their path from them, the AWQ search its matmul dtype)."""

from __future__ import annotations

from pathlib import Path


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of this machine (empty where /proc/cpuinfo is absent)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        # x86 says "flags", ARM says "Features" (asimd, asimddp, ...).
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()
