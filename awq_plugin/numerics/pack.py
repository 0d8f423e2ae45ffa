"""Pack and unpack 4-bit integers in the AutoAWQ "GEMM" checkpoint layout.

The layout, written out once (stock vLLM and transformers read exactly this):

- ``qweight``: int32 ``[K, N/8]``. Row k holds the integers of input channel k
  for all N output channels, eight per int32.
- ``qzeros``:  int32 ``[K/G, N/8]``, the integer zeros packed the same way.
- ``scales``:  fp16  ``[K/G, N]``.

Inside one int32 holding output channels ``8j .. 8j+7``, AWQ does *not* store
channel ``8j+i`` at bits ``4i``. It interleaves them: nibble ``i`` (bits
``4i .. 4i+3``) holds channel ``8j + AWQ_PACK_ORDER[i]``::

    nibble:   0  1  2  3  4  5  6  7
    channel:  0  2  4  6  1  3  5  7

so unpacking channel ``c`` reads nibble ``AWQ_UNPACK_ORDER[c]``
(``[0, 4, 1, 5, 2, 6, 3, 7]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from awq_plugin.numerics import check_packable
from awq_plugin.numerics.quant_ref import GroupQuantized

PACK_FACTOR = 8  # 4-bit values per int32
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i holds channel AWQ_PACK_ORDER[i]
AWQ_UNPACK_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # channel c lives in nibble AWQ_UNPACK_ORDER[c]


@dataclass(frozen=True)
class AwqPacked:
    """The three tensors one quantized linear layer stores in a checkpoint."""

    qweight: torch.Tensor  # int32 [K, N/8]
    qzeros: torch.Tensor  # int32 [K/G, N/8]
    scales: torch.Tensor  # fp16  [K/G, N]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1] * PACK_FACTOR

    @property
    def group_size(self) -> int:
        return self.in_features // self.scales.shape[0]


def pack_int4_columns(values: torch.Tensor) -> torch.Tensor:
    """Pack integers ``[R, C]`` (0..15, C a multiple of 8) into int32 ``[R, C/8]``."""
    r, c = values.shape
    if c % PACK_FACTOR != 0:
        raise ValueError(f"cannot pack {c} columns: the count must be a multiple of 8")
    v = values.to(torch.int64).reshape(r, c // PACK_FACTOR, PACK_FACTOR)  # (R, C/8, 8)
    order = torch.tensor(AWQ_PACK_ORDER, device=values.device)
    v = v[:, :, order]  # nibble-major: v[..., i] is channel AWQ_PACK_ORDER[i]
    shifts = torch.arange(0, 32, 4, device=values.device, dtype=torch.int64)
    packed = (v << shifts).sum(dim=-1)  # (R, C/8), fits in uint32
    # Reinterpret the uint32 bit pattern as int32 (two's complement).
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def unpack_int4_columns(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4_columns`: int32 ``[R, C/8]`` -> uint8 ``[R, C]``."""
    r, c8 = packed.shape
    shifts = torch.tensor([4 * i for i in AWQ_UNPACK_ORDER], device=packed.device, dtype=torch.int32)
    v = (packed.unsqueeze(-1) >> shifts) & 0xF  # (R, C/8, 8), channel-major
    return v.reshape(r, c8 * PACK_FACTOR).to(torch.uint8)


def pack(gq: GroupQuantized) -> AwqPacked:
    """Pack a :class:`GroupQuantized` weight (``q`` is ``[N, K]``) into the AWQ layout."""
    check_packable(gq.bits)
    n = gq.q.shape[0]
    if n % PACK_FACTOR != 0:
        raise ValueError(f"out_features={n} is not a multiple of 8; AWQ packing needs that")
    return AwqPacked(
        qweight=pack_int4_columns(gq.q.t()),  # (K, N) -> (K, N/8)
        qzeros=pack_int4_columns(gq.zeros.t()),  # (K/G, N) -> (K/G, N/8)
        scales=gq.scales.t().contiguous().to(torch.float16),  # (K/G, N)
    )


def unpack(packed: AwqPacked, bits: int = 4) -> GroupQuantized:
    """Unpack the AWQ layout back into ``q [N, K]``, ``scales``/``zeros [N, K/G]``."""
    check_packable(bits)
    q = unpack_int4_columns(packed.qweight).t().contiguous()  # (N, K)
    zeros = unpack_int4_columns(packed.qzeros).t().contiguous()  # (N, K/G)
    scales = packed.scales.t().contiguous()  # (N, K/G)
    return GroupQuantized(q=q, scales=scales, zeros=zeros, bits=bits, group_size=packed.group_size)


def dequantize_packed(packed: AwqPacked, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense weight ``[N, K]`` a packed layer stands for."""
    return unpack(packed).dequantize(dtype)
