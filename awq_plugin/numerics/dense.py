"""Dense-matrix moves the quantizer's linear algebra shares: transposing copies and the
completion of a symmetric matrix from its upper triangle, both a strip at a time."""

from __future__ import annotations

import torch


def copy_transposed(dst: torch.Tensor, src: torch.Tensor, rows: int = 64) -> None:
    """``dst.copy_(src.t())`` a strip of ``src``'s rows at a time. One copy walks either side with a
    stride of a whole row per element; strips keep both sides' lines in cache (a 14336 x 4096
    float32 weight into half of a wider buffer, 1 thread: 0.72 -> 0.12 s)."""
    for start in range(0, src.shape[0], rows):
        dst[:, start : start + rows].copy_(src[start : start + rows].t())


def symmetrize_upper_(m: torch.Tensor, panel: int = 1024) -> torch.Tensor:
    """Copy the upper triangle of square ``m`` onto its lower one, in place, ``panel`` rows at a time."""
    k = m.shape[0]
    for row in range(0, k, panel):
        end = min(row + panel, k)
        diagonal = m[row:end, row:end]
        diagonal.copy_(diagonal.triu() + diagonal.triu(1).t())
        if end < k:
            copy_transposed(m[end:, row:end], m[row:end, end:])
    return m
