"""Fake quantization as the searches call it: quant_ref's numbers, bit for bit, in cache-sized pieces.

The AWQ searches fake-quantize every linear of a block once per candidate (21 scale
candidates, 100 clip candidates). :func:`awq_plugin.numerics.quant_ref.fake_quantize` does it
in about a dozen passes over the whole weight, each through memory and most allocating a
weight-sized temporary (a uint8 round trip included). Here the same arithmetic runs in place
over row pieces that stay in cache, and the integers never leave fp32::

    (clamp(round(w / s) + z, 0, q_max) - z) * s  ==  clamp(round(w / s), -z, q_max - z) * s

exactly, because every operand on the left is a small integer held exactly in fp32. The tests
compare both against quant_ref on awkward shapes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from awq_plugin.numerics.quant_ref import resolve_group_size, scales_zeros_from_range

# Weights per piece: 4 MiB in fp32, so a piece and its temporaries stay in a core's share of the
# last-level cache while every op runs over it.
PIECE_ELEMENTS = 1 << 20


def row_pieces(n_rows: int, n_cols: int) -> Iterator[slice]:
    """Consecutive row slices of about :data:`PIECE_ELEMENTS` weights each (at least one row)."""
    step = max(1, PIECE_ELEMENTS // max(n_cols, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


def quantize_grouped_(wg: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """In place: ``wg`` ``(..., G)`` fp32 -> its dequantized value on the grid ``scales``, ``zeros``
    ``(...)`` (``scales`` already rounded to their storage dtype and back to fp32). Returns ``wg``."""
    s = scales.unsqueeze(-1)  # (..., 1)
    z = zeros.unsqueeze(-1)
    wg.div_(s).round_()
    # clamp_ with tensor bounds, as two broadcast in-place extremes (the same numbers: clamp is
    # min(max(x, lo), hi)); tensor-bound clamp_ ran about 8x slower on the CPU.
    torch.maximum(wg, -z, out=wg)
    torch.minimum(wg, (2**bits - 1) - z, out=wg)
    return wg.mul_(s)


@torch.no_grad()
def fake_quantize_scaled(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    zero_point: bool = True,
    scale_dtype: torch.dtype = torch.float16,
    col_scales: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``fake_quantize(w * s) / s`` with ``s = col_scales`` ``[K]`` (none: 1), in ``out_dtype``.

    Bit-identical to ``quant_ref.fake_quantize(w.float() * s, ...) / s`` cast to ``out_dtype``
    (default ``w``'s dtype); ``w`` ``[N, K]`` is not modified.
    """
    n, k = w.shape
    g = resolve_group_size(group_size, k)
    out = torch.empty((n, k), dtype=out_dtype or w.dtype, device=w.device)
    s_row = None if col_scales is None else col_scales.float().reshape(1, k)  # (1, K)
    for rows in row_pieces(n, k):
        piece = w[rows].float() * s_row if s_row is not None else w[rows].to(torch.float32, copy=True)
        grouped = piece.view(-1, k // g, g)  # (R, K/G, G)
        scales, zeros = scales_zeros_from_range(
            grouped.amax(dim=-1), grouped.amin(dim=-1), bits, zero_point, scale_dtype
        )
        quantize_grouped_(grouped, scales.float(), zeros, bits)
        if s_row is not None:
            piece.div_(s_row)
        out[rows] = piece
    return out


@dataclass(frozen=True)
class GroupFakeQuantizer:
    """The reference quantize-dequantize of one scheme, as a callable the searches can also read.

    ``quantizer(w)`` equals ``quant_ref.fake_quantize(w, bits, group_size, zero_point,
    check_finite=False)``; the clip search reads the fields to run its fused candidates.
    """

    bits: int
    group_size: int
    zero_point: bool
    scale_dtype: torch.dtype = torch.float16

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quantize_scaled(w, self.bits, self.group_size, self.zero_point, self.scale_dtype)
