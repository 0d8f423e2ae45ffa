"""Which dtype the block step's forwards run in: ``AwqOptions.search_dtype`` resolved for a device.

``"auto"`` means bf16 where the device multiplies bf16 in hardware (a CUDA device that supports
it; a CPU with AVX-512 BF16 or AMX tiles, read from ``/proc/cpuinfo``) and float32 elsewhere:
a CPU without bf16 units emulates bf16 matmuls more slowly than it runs float32 ones.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from awq_plugin.algorithm.options import SEARCH_DTYPE_NAMES
from awq_plugin.cpuinfo import cpu_flags

logger = logging.getLogger(__name__)

#: /proc/cpuinfo flags of a CPU that multiplies bf16 in hardware.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def has_bf16_matmul(device: torch.device, flags: Iterable[str] | None = None) -> bool:
    """Whether ``device`` runs bf16 matmuls in hardware (``flags``: the CPU's, default read here)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(BF16_CPU_FLAGS & frozenset(cpu_flags() if flags is None else flags))
    return False


def resolve_search_dtype(name: str, device: torch.device, flags: Iterable[str] | None = None) -> torch.dtype:
    """The torch dtype ``AwqOptions.search_dtype`` ``name`` means on ``device``."""
    if name not in SEARCH_DTYPE_NAMES:
        raise ValueError(f"search_dtype must be one of {sorted(SEARCH_DTYPE_NAMES)}, got {name!r}")
    if name == "auto":
        return torch.bfloat16 if has_bf16_matmul(device, flags) else torch.float32
    return getattr(torch, name)


def warn_float32_fallback(index: int, dtype: torch.dtype, exc: Exception, what: str) -> None:
    """Say that layer ``index``'s forward failed under ``dtype`` autocast and ``what`` runs in
    float32 instead (a block whose code writes a lower-precision result into a float32 tensor)."""
    logger.warning(
        "layer %d: the block's forward fails under %s autocast (%s); %s run in float32",
        index,
        str(dtype).removeprefix("torch."),
        str(exc).splitlines()[0],
        what,
    )
