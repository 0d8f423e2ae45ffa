"""Clip search: shrink each weight group's range where that lowers the layer's output error.

Rounding error grows with a group's range, so clipping a few outlying weights
can pay for itself. For every output channel ``n`` and input group ``g``
independently, the max range ``m = max|w|`` is shrunk over
``m * (1 - i / n_grid)`` for ``i < max_shrink * n_grid``; the weights are
clamped to ``[-c, c]``, fake-quantized with the reference quantizer, and the
shrink that minimises the error of that group's partial dot product is kept
(the llm-awq / AutoAWQ objective)::

    err[n, g] = mean_t (x_tg . (q_ng - w_ng))^2 = d_ng^T C_g d_ng,   C_g = mean_t x_tg x_tg^T

llm-awq evaluates it on 512 sampled tokens by materialising ``[T, N, K/G]``
partial outputs. The quadratic form on the right is the same number computed
from the per-group Gram matrices ``C_g`` ``[G, G]``, which are accumulated
over all calibration tokens during the block's forward pass: the search then
costs ``O(N * K * G)`` per grid step whatever the token count, so it can use
every token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from awq_plugin.calibration.statistics import group_gram, rescale_gram  # noqa: F401 (part of this API)
from awq_plugin.numerics.quant_ref import scales_zeros_from_range
from awq_plugin.numerics.search_quant import GroupFakeQuantizer, quantize_grouped_, row_pieces

# A callable quantizer the clip search cannot see into is run candidate by candidate on the whole
# weight (the plain path); a GroupFakeQuantizer runs the fused path, bit-identical and in cache.


def partial_output_error(delta: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``d_ng^T C_g d_ng`` for ``delta`` ``[N, K]`` and mean Gram ``[K/G, G, G]``: ``[N, K/G]``."""
    n = delta.shape[0]
    n_groups, g, _ = gram.shape
    d = delta.to(gram.dtype).reshape(n, n_groups, g).transpose(0, 1)  # (K/G, N, G)
    return (torch.bmm(d, gram) * d).sum(dim=-1).t()  # (N, K/G)


@torch.no_grad()
def search_clip_max(
    weight: torch.Tensor,
    gram: torch.Tensor,
    fake_quantize: Callable[[torch.Tensor], torch.Tensor],
    n_grid: int = 20,
    max_shrink: float = 0.5,
    product_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Best clip bound per output channel and group: ``[N, K/G]`` fp32.

    ``weight`` ``[N, K]``; ``gram`` ``[K/G, G, G]`` the mean per-group Gram
    matrix of the layer's (already scaled) inputs, see :func:`group_gram`;
    ``fake_quantize`` the reference quantizer for ``[N, K]`` weights.
    """
    w = weight.float()
    n, k = w.shape
    n_groups, g, _ = gram.shape
    org_max = w.reshape(n, n_groups, g).abs().amax(dim=-1)  # (N, K/G)
    if isinstance(fake_quantize, GroupFakeQuantizer):
        steps = [(1 - i / n_grid, None) for i in range(int(max_shrink * n_grid))]
        _, hi = _fused_clip_search(w, gram, fake_quantize, steps, org_max, product_dtype)
        return hi
    best = org_max.clone()
    min_err = torch.full_like(org_max, float("inf"))
    for i in range(int(max_shrink * n_grid)):
        max_val = org_max * (1 - i / n_grid)  # (N, K/G)
        c = max_val[:, :, None]  # (N, K/G, 1)
        clipped = torch.maximum(torch.minimum(w.reshape(n, n_groups, g), c), -c).reshape(n, k)
        err = partial_output_error(fake_quantize(clipped) - w, gram).float()  # (N, K/G)
        better = err < min_err
        min_err = torch.where(better, err, min_err)
        best = torch.where(better, max_val, best)
    return best.contiguous()


@torch.no_grad()
def search_clip_range(
    weight: torch.Tensor,
    gram: torch.Tensor,
    fake_quantize: Callable[[torch.Tensor], torch.Tensor],
    n_grid: int = 20,
    max_shrink: float = 0.5,
    product_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best clamp range ``[lo, hi]`` per output channel and group, each ``[N, K/G]`` fp32.

    The asymmetric variant of :func:`search_clip_max` for zero-point
    quantization, whose grid spans ``[min, max]`` rather than ``[-m, m]``: the
    group's max and min are shrunk independently, ``max * (1 - i / n_grid)``
    and ``min * (1 - j / n_grid)`` over the same steps, and every pair
    ``(i, j)`` is scored with the same partial-output error. One candidate at
    a time on purpose: each step's tensors stay in cache (stacking candidates
    measured 5x slower here).
    """
    w = weight.float()
    n, k = w.shape
    n_groups, g, _ = gram.shape
    grouped = w.reshape(n, n_groups, g)  # (N, K/G, G)
    steps = int(max_shrink * n_grid)
    if isinstance(fake_quantize, GroupFakeQuantizer):
        pairs = [(1 - i / n_grid, 1 - j / n_grid) for i in range(steps) for j in range(steps)]
        return _fused_clip_search(w, gram, fake_quantize, pairs, None, product_dtype)
    w_max, w_min = grouped.amax(dim=-1), grouped.amin(dim=-1)  # (N, K/G) each
    best_lo, best_hi = w_min.clone(), w_max.clone()
    min_err = torch.full_like(w_max, float("inf"))
    for i in range(steps):
        hi = w_max * (1 - i / n_grid)  # (N, K/G)
        upper = torch.minimum(grouped, hi[:, :, None])  # (N, K/G, G)
        for j in range(steps):
            lo = w_min * (1 - j / n_grid)  # (N, K/G)
            clipped = torch.maximum(upper, lo[:, :, None]).reshape(n, k)
            err = partial_output_error(fake_quantize(clipped) - w, gram).float()  # (N, K/G)
            better = err < min_err
            min_err = torch.where(better, err, min_err)
            best_lo = torch.where(better, lo, best_lo)
            best_hi = torch.where(better, hi, best_hi)
    return best_lo.contiguous(), best_hi.contiguous()


def _fused_steps(device: torch.device) -> Any:
    """The compiled one-pass candidate steps for tensors on ``device``, or None (PyTorch's)."""
    if device.type != "cpu":
        return None
    from awq_plugin.kernels import search_ops

    return search_ops()


def _fused_clip_search(
    w: torch.Tensor,
    gram: torch.Tensor,
    quantizer: GroupFakeQuantizer,
    factors: list[tuple[float, float | None]],
    symmetric_bound: torch.Tensor | None = None,
    product_dtype: torch.dtype | None = None,
    use_fused: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clip searches' candidates, piece by piece: best ``(lo, hi)`` ``[N, K/G]`` each.

    ``factors`` are the candidates in the plain paths' order: ``(f_hi, f_lo)`` clamps each group
    to ``[w_min * f_lo, w_max * f_hi]``; with ``symmetric_bound`` ``m`` (``f_lo`` None) to
    ``[-m * f_hi, m * f_hi]``. A candidate's grid comes from its clamped range without a pass
    over the weights: clamping is monotone, so the clamped group's max is the clamped max. Every
    piece's rows are transposed once to ``(K/G, R, G)`` for the Gram products, and every
    candidate runs in place in one buffer; the numbers are the plain paths' (the tests compare).

    ``product_dtype`` (None: the Gram's dtype, the plain paths' numbers) runs the Gram
    products ``C d`` in that dtype instead (bf16: 2-3x faster matmuls where the device has bf16
    units); each group's ``d^T C d`` is still summed in fp32, ranking the candidates to about
    2^-8 relative, below the gaps that decide a clip.

    On the CPU each candidate's clamp, rounding and difference run as one fused pass
    (``kernels/cpu/search_ops.cpp``, the same IEEE steps: the tests compare bit for bit;
    ``use_fused=False`` or a failed build: PyTorch's steps). 8B shapes, 1 thread: about 2x.
    """
    n, k = w.shape
    n_groups, g, _ = gram.shape
    grouped = w.reshape(n, n_groups, g)  # (N, K/G, G)
    best_lo = torch.empty((n_groups, n), dtype=torch.float32, device=w.device)  # (K/G, N)
    best_hi = torch.empty_like(best_lo)
    product_gram = gram if product_dtype is None else gram.to(product_dtype)
    # the compiled steps write float32 or bf16 differences (a float64 Gram keeps PyTorch's)
    compiled = use_fused and product_gram.dtype in (torch.float32, torch.bfloat16)
    fused = _fused_steps(w.device) if compiled else None
    for rows in row_pieces(n, k):
        piece = grouped[rows].transpose(0, 1).contiguous()  # (K/G, R, G)
        top, bottom = piece.amax(dim=-1), piece.amin(dim=-1)  # (K/G, R) each
        if symmetric_bound is not None:
            bound = symmetric_bound[rows].t()  # (K/G, R)
            lo_best, hi_best = -bound, bound.clone()
        else:
            lo_best, hi_best = bottom.clone(), top.clone()
        min_err = torch.full_like(top, float("inf"))
        if fused is None:
            delta = torch.empty_like(piece)  # (K/G, R, G): the candidate's q - w
            upper = torch.empty_like(piece)  # min(w, hi), shared by the candidates of one hi
        else:
            d_fused = torch.empty_like(piece, dtype=product_gram.dtype)  # q - w for the products
            err_fused = torch.empty_like(top)
        last_f_hi = None
        for f_hi, f_lo in factors:
            if symmetric_bound is None:
                hi, lo = top * f_hi, bottom * f_lo  # (K/G, R)
            else:
                hi = (bound * f_hi).contiguous()
                lo = -hi
            # The clamped group's extremes, as the reference quantizer's amax/amin would find them.
            c_max = torch.maximum(torch.minimum(top, hi), lo)
            c_min = torch.maximum(torch.minimum(bottom, hi), lo)
            scales, zeros = scales_zeros_from_range(
                c_max, c_min, quantizer.bits, quantizer.zero_point, quantizer.scale_dtype
            )
            if fused is not None:  # PyTorch's steps below in one pass each, the same numbers
                q_max = 2**quantizer.bits - 1
                d = fused.clip_candidate_delta(
                    piece, hi, lo, scales.float().contiguous(), zeros.float().contiguous(), q_max, d_fused
                )
                err = fused.clip_candidate_error(torch.bmm(d, product_gram), d, err_fused)  # d^T C d
            else:
                if f_hi != last_f_hi or symmetric_bound is not None:
                    torch.minimum(piece, hi.unsqueeze(-1), out=upper)
                    last_f_hi = f_hi
                torch.maximum(upper, lo.unsqueeze(-1), out=delta)
                quantize_grouped_(delta, scales.float(), zeros, quantizer.bits).sub_(piece)
                d = delta.to(product_gram.dtype)  # no copy in the plain fp32 case
                prod = torch.bmm(d, product_gram) * d  # (K/G, R, G)
                # d^T C d per group, summed in fp32 (or as the plain paths do, then cast)
                err = (
                    prod.sum(dim=-1).float()
                    if product_dtype is None
                    else prod.sum(dim=-1, dtype=torch.float32)
                )
            better = err < min_err
            min_err = torch.where(better, err, min_err)
            lo_best = torch.where(better, lo, lo_best)
            hi_best = torch.where(better, hi, hi_best)
        best_lo[:, rows] = lo_best
        best_hi[:, rows] = hi_best
    return best_lo.t().contiguous(), best_hi.t().contiguous()
