"""The two other 4-bit checkpoint layouts: compressed-tensors "pack-quantized" and GPTQ.

Both hold the same numbers as the AutoAWQ layout (:mod:`awq_plugin.numerics.pack`): unsigned
4-bit integers ``q``, per-group scales ``s`` and integer zeros ``z`` with
``w = (q - z) * s`` over contiguous groups of ``G`` input channels. Only the packing differs,
and it is written out once here, as :mod:`~awq_plugin.numerics.pack` does for AutoAWQ.
Unlike AutoAWQ, both pack eight values per int32 in order: value ``i`` of eight sits at bits
``4i .. 4i+3`` ("sequential" nibbles).

compressed-tensors, ``format: "pack-quantized"`` (llm-compressor's W4A16 output), per linear:

- ``weight_packed``: int32 ``[N, K/8]``, packed along the input dimension;
- ``weight_scale``: ``[N, K/G]`` in the model's dtype (``[N, 1]`` for the channel strategy);
- ``weight_zero_point``: int32 ``[N/8, K/G]``, packed along the *output* dimension, present
  only for asymmetric schemes;
- ``weight_shape``: int64 ``[2]``, ``(N, K)``.

The library stores signed integers (``-8 .. 7``) plus 8, so the stored nibbles are exactly
the unsigned ``q`` and ``z`` above; a symmetric scheme has no zero point tensor and means
``z = 8``.

GPTQ (AutoGPTQ, GPTQModel), per linear:

- ``qweight``: int32 ``[K/8, N]``, packed along the input dimension;
- ``qzeros``: int32 ``[K/G, N/8]``, packed along the output dimension;
- ``scales``: fp16 ``[K/G, N]``;
- ``g_idx``: int32 ``[K]``, the group of each input channel.

The original ("v1", ``checkpoint_format: "gptq"``) format stores ``z - 1`` in ``qzeros``, so
a zero point of 0 cannot be stored (it would wrap to 15 and read back as 16); the "v2" format
(``checkpoint_format: "gptq_v2"``) stores ``z``; reading a v1 ``15`` is refused. Only contiguous groups map onto the other
layouts: ``g_idx[k] == k // G`` (act-order with static groups keeps that; act-order without
them permutes channels across groups, which :func:`check_contiguous_groups` refuses).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from awq_plugin.numerics import check_packable
from awq_plugin.numerics.quant_ref import GroupQuantized

NIBBLES = 8  # 4-bit values per int32
#: The zero point a symmetric 4-bit scheme means (and the signed-to-unsigned offset).
SYMMETRIC_ZERO = 8
#: ``checkpoint_format`` values of GPTQ configs, and whether they store ``z - 1``.
GPTQ_FORMATS = {"gptq": True, "gptq_v2": False}


def pack_sequential(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Pack integers 0..15 of a 2-D tensor eight to an int32 along ``dim``, value ``i`` of
    eight at bits ``4i``; ``values.shape[dim]`` must be a multiple of 8."""
    v = values.to(torch.int64)
    if dim == 0:
        v = v.t()
    r, c = v.shape
    if c % NIBBLES != 0:
        raise ValueError(f"cannot pack {c} values along dimension {dim}: the count must be a multiple of 8")
    if v.numel() and (int(v.min()) < 0 or int(v.max()) > 15):
        raise ValueError("only integers 0..15 can be packed into 4-bit nibbles")
    shifts = torch.arange(0, 32, 4, device=v.device, dtype=torch.int64)
    packed = (v.reshape(r, c // NIBBLES, NIBBLES) << shifts).sum(dim=-1)  # (R, C/8), fits in uint32
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # same bits, signed
    return packed.t().contiguous() if dim == 0 else packed


def unpack_sequential(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of :func:`pack_sequential`: int32 -> uint8, eight times longer along ``dim``."""
    p = packed.t() if dim == 0 else packed
    r, c8 = p.shape
    shifts = torch.arange(0, 32, 4, device=p.device, dtype=torch.int32)
    v = ((p.unsqueeze(-1) >> shifts) & 0xF).reshape(r, c8 * NIBBLES).to(torch.uint8)
    return v.t().contiguous() if dim == 0 else v


def _check_symmetric(gq: GroupQuantized, layout: str) -> None:
    if not bool((gq.zeros == SYMMETRIC_ZERO).all()):
        raise ValueError(
            f"a symmetric {layout} scheme stores no zero points (it means z = {SYMMETRIC_ZERO}), but these "
            f"weights have zero points other than {SYMMETRIC_ZERO}: write them as asymmetric"
        )


# ---------------------------------------------------------------------------------------------
# compressed-tensors pack-quantized
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompressedTensorsPacked:
    """One linear's tensors in compressed-tensors' pack-quantized layout."""

    weight_packed: torch.Tensor  # int32 [N, K/8]
    weight_scale: torch.Tensor  # [N, K/G]
    weight_zero_point: torch.Tensor | None  # int32 [N/8, K/G]; None when symmetric
    weight_shape: torch.Tensor  # int64 [2]: (N, K)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {
            "weight_packed": self.weight_packed,
            "weight_scale": self.weight_scale,
            "weight_shape": self.weight_shape,
        }
        if self.weight_zero_point is not None:
            out["weight_zero_point"] = self.weight_zero_point
        return out


def pack_compressed_tensors(
    gq: GroupQuantized, symmetric: bool, scale_dtype: torch.dtype = torch.float16
) -> CompressedTensorsPacked:
    """``gq`` (``q`` ``[N, K]``) in the pack-quantized layout; ``symmetric`` drops the zero points
    (refused unless every one is 8)."""
    check_packable(gq.bits)
    if symmetric:
        _check_symmetric(gq, "compressed-tensors")
    n, k = gq.q.shape
    return CompressedTensorsPacked(
        weight_packed=pack_sequential(gq.q, dim=1),
        weight_scale=gq.scales.to(scale_dtype).contiguous(),
        weight_zero_point=None if symmetric else pack_sequential(gq.zeros, dim=0),
        weight_shape=torch.tensor([n, k], dtype=torch.int64),
    )


def unpack_compressed_tensors(packed: CompressedTensorsPacked, bits: int = 4) -> GroupQuantized:
    """The integers, scales and zeros a pack-quantized linear holds (``q`` ``[N, K]``)."""
    check_packable(bits)
    n, k = (int(x) for x in packed.weight_shape.tolist())
    q = unpack_sequential(packed.weight_packed, dim=1)
    if q.shape[0] != n or q.shape[1] < k:
        raise ValueError(
            f"weight_packed {tuple(packed.weight_packed.shape)} does not hold weight_shape ({n}, {k})"
        )
    q = q[:, :k].contiguous()
    groups = packed.weight_scale.shape[1]
    if packed.weight_scale.shape[0] != n or k % groups != 0:
        raise ValueError(
            f"weight_scale {tuple(packed.weight_scale.shape)} does not fit weight_shape ({n}, {k})"
        )
    if packed.weight_zero_point is None:
        zeros = torch.full((n, groups), SYMMETRIC_ZERO, dtype=torch.uint8, device=q.device)
    else:
        zeros = unpack_sequential(packed.weight_zero_point, dim=0)[:n].contiguous()
        if zeros.shape != (n, groups):
            raise ValueError(
                f"weight_zero_point {tuple(packed.weight_zero_point.shape)} does not fit weight_scale "
                f"{tuple(packed.weight_scale.shape)}"
            )
    return GroupQuantized(q=q, scales=packed.weight_scale, zeros=zeros, bits=bits, group_size=k // groups)


# ---------------------------------------------------------------------------------------------
# GPTQ
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GptqPacked:
    """One linear's tensors in the GPTQ layout."""

    qweight: torch.Tensor  # int32 [K/8, N]
    qzeros: torch.Tensor  # int32 [K/G, N/8]
    scales: torch.Tensor  # fp16 [K/G, N]
    g_idx: torch.Tensor  # int32 [K]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales, "g_idx": self.g_idx}


def contiguous_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    """``g_idx`` of contiguous groups: input channel ``k`` in group ``k // G``."""
    return (torch.arange(in_features) // group_size).to(torch.int32)


def check_contiguous_groups(g_idx: torch.Tensor, group_size: int) -> None:
    """Refuse a ``g_idx`` whose groups are not the contiguous runs of ``group_size`` channels."""
    expected = contiguous_g_idx(g_idx.numel(), group_size).to(g_idx.device)
    if not torch.equal(g_idx.to(torch.int32), expected):
        raise ValueError(
            "g_idx assigns input channels to groups out of order (act-order without static groups); "
            "only contiguous groups (g_idx[k] == k // group_size) map onto this layout"
        )


def pack_gptq(gq: GroupQuantized, checkpoint_format: str = "gptq") -> GptqPacked:
    """``gq`` in the GPTQ layout; ``checkpoint_format`` ``"gptq"`` (v1) stores ``z - 1`` and so
    refuses a zero point of 0, ``"gptq_v2"`` stores ``z``."""
    check_packable(gq.bits)
    minus_one = _gptq_minus_one(checkpoint_format)
    zeros = gq.zeros.to(torch.int64)
    if minus_one:
        if bool((zeros == 0).any()):
            raise ValueError(
                "a zero point of 0 cannot be stored in the GPTQ v1 format (it stores z - 1); "
                "write checkpoint_format 'gptq_v2'"
            )
        zeros = zeros - 1
    k = gq.q.shape[1]
    return GptqPacked(
        qweight=pack_sequential(gq.q, dim=1).t().contiguous(),  # (N, K/8) -> (K/8, N)
        qzeros=pack_sequential(zeros.t(), dim=1),  # (K/G, N) -> (K/G, N/8)
        scales=gq.scales.t().to(torch.float16).contiguous(),
        g_idx=contiguous_g_idx(k, gq.group_size),
    )


def unpack_gptq(packed: GptqPacked, checkpoint_format: str = "gptq", bits: int = 4) -> GroupQuantized:
    """The integers, scales and zeros a GPTQ linear holds (``q`` ``[N, K]``); refuses
    non-contiguous groups (see :func:`check_contiguous_groups`)."""
    check_packable(bits)
    minus_one = _gptq_minus_one(checkpoint_format)
    q = unpack_sequential(packed.qweight.t(), dim=1)  # (N, K)
    n, k = q.shape
    groups = packed.scales.shape[0]
    if packed.scales.shape[1] != n or k % groups != 0:
        raise ValueError(
            f"scales {tuple(packed.scales.shape)} do not fit qweight {tuple(packed.qweight.shape)}"
        )
    group_size = k // groups
    check_contiguous_groups(packed.g_idx, group_size)
    zeros = unpack_sequential(packed.qzeros, dim=1).to(torch.int64)  # (K/G, N)
    if zeros.shape != (groups, n):
        raise ValueError(
            f"qzeros {tuple(packed.qzeros.shape)} do not fit scales {tuple(packed.scales.shape)}"
        )
    if minus_one:
        if bool((zeros == 15).any()):
            # v1 readers take a stored 15 as z = 16 (a zero point of 0 wrapped), which no 4-bit
            # zero point holds: the weights are not what their writer meant, and not ours to guess.
            raise ValueError(
                "qzeros store 15 in the GPTQ v1 format, which reads as a zero point of 16 (a zero point "
                "of 0 that its writer could not store): these groups have no exact 4-bit form"
            )
        zeros = zeros + 1
    return GroupQuantized(
        q=q,
        scales=packed.scales.t().contiguous(),
        zeros=zeros.t().to(torch.uint8).contiguous(),
        bits=bits,
        group_size=group_size,
    )


def _gptq_minus_one(checkpoint_format: str) -> bool:
    if checkpoint_format not in GPTQ_FORMATS:
        raise ValueError(
            f"checkpoint_format must be one of {sorted(GPTQ_FORMATS)}, got {checkpoint_format!r}"
        )
    return GPTQ_FORMATS[checkpoint_format]
