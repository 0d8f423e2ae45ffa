"""Per-group activation statistics the searches consume.

The clip search scores a candidate range through ``d^T C d`` with ``C`` the Gram matrix of a
layer's inputs per quantization group, so the recorder accumulates these once per block and
the scale search rescales them instead of re-running the block.
"""

from __future__ import annotations

import torch

from awq_plugin.numerics.quant_ref import resolve_group_size


def group_gram(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Sum over tokens of ``x_g x_g^T`` per input group: ``x`` ``[T, K]`` -> ``[K/G, G, G]`` (fp32)."""
    t, k = x.shape
    g = resolve_group_size(group_size, k)
    xg = x.float().reshape(t, k // g, g).permute(1, 2, 0)  # (K/G, G, T)
    return torch.bmm(xg, xg.transpose(1, 2))  # (K/G, G, G)


def rescale_gram(gram: torch.Tensor, s_cols: torch.Tensor) -> torch.Tensor:
    """The Gram matrices of ``x / s_cols``: ``C[g, i, j] / (s_i s_j)``."""
    n_groups, g, _ = gram.shape
    inv = (1.0 / s_cols.to(gram.dtype)).reshape(n_groups, g)  # (K/G, G)
    return gram * inv[:, :, None] * inv[:, None, :]
