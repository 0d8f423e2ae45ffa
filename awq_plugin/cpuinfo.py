"""This machine's CPU feature flags, read once from ``/proc/cpuinfo`` (a base module: the kernels
pick their path from them, the AWQ search its matmul dtype)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SYSFS_CPU = Path("/sys/devices/system/cpu")


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


def cpu_description(cpuinfo: str | None = None) -> dict[str, Any]:
    """The CPU's model name and flags (``/proc/cpuinfo``'s first processor), with its matrix units."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = sorted(fields.get("flags", "").split())
    return {
        "model_name": fields.get("model name", "unknown"),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "flags": flags,
    }


def _cache_size_bytes(text: str) -> int:
    """sysfs cache sizes: ``"32768K"``, ``"1M"``, ``"512"`` (bytes)."""
    text = text.strip().upper()
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    if text and text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)


def last_level_cache_bytes(root: Path = SYSFS_CPU) -> int | None:
    """The machine's last-level cache in bytes, every instance counted once (``root``: sysfs's
    ``devices/system/cpu``); None where sysfs does not say.

    Instances are told apart by the CPUs that share them: an EPYC reports one L3 per core
    complex, and a benchmark whose threads run on two complexes can use both.
    """
    level_of: dict[int, dict[str, int]] = {}
    for index in root.glob("cpu[0-9]*/cache/index[0-9]*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            level = int((index / "level").read_text())
            shared = (index / "shared_cpu_list").read_text().strip()
            level_of.setdefault(level, {})[shared] = _cache_size_bytes((index / "size").read_text())
        except (OSError, ValueError):
            continue
    if not level_of:
        return None
    return sum(level_of[max(level_of)].values())
