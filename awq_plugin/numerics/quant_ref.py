"""The single numeric reference for group-wise integer weight quantization.

Everything numeric in the project is checked against this file: the AWQ search
fake-quantizes with it, the packing tests use it as the oracle, every kernel is
compared with `linear_ref`, and it is the fallback where no fast kernel exists.

Conventions (shared with AutoAWQ and vLLM):
- a linear weight is ``[N, K]`` (out_features, in_features), as in ``nn.Linear``;
- groups run along K: group ``g`` covers input columns ``g*G .. g*G+G-1``;
- asymmetric ("zero point"): ``q = clamp(round(w / s) + z, 0, 2^b - 1)`` and
  ``w_hat = (q - z) * s`` with an integer zero ``z`` in ``[0, 2^b - 1]``;
- symmetric: ``q_signed = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1)``; it is
  stored unsigned as ``q = q_signed + 2^(b-1)`` with the constant zero
  ``z = 2^(b-1)`` so that both schemes share one dequantization formula.
- scales are rounded to their storage dtype (fp16 in AWQ checkpoints) *before*
  the integers are computed, so fake quantization and pack -> dequantize give
  bit-identical weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from awq_plugin.numerics import effective_group_size

#: Smallest quantization step (scale) of a weight group; a constant group would otherwise divide by
#: zero. Not to be confused with the AWQ channel-scale floor, ``algorithm.search.MIN_CHANNEL_SCALE``.
MIN_QUANT_STEP = 1e-5


@dataclass(frozen=True)
class GroupQuantized:
    """Integer weights with their per-group scales and zeros.

    q:      uint8 ``[N, K]`` in ``[0, 2^bits - 1]``
    scales: ``[N, K // G]`` in the storage dtype
    zeros:  uint8 ``[N, K // G]`` (the constant ``2^(bits-1)`` when symmetric)
    """

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.q, self.scales, self.zeros, self.group_size, dtype)


def is_all_finite(tensor: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN or Inf, without a temporary as large as the tensor.

    ``torch.isfinite(t).all()`` allocates a bool mask (and, measured, ~1.7x an
    fp32 tensor's bytes transiently); min and max propagate NaN and reach Inf,
    so checking those two suffices.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) and torch.isfinite(high))


def resolve_group_size(group_size: int, in_features: int) -> int:
    """:func:`effective_group_size`, checked: G must be positive and divide K."""
    g = effective_group_size(group_size, in_features)
    if g <= 0 or in_features % g != 0:
        raise ValueError(
            f"group_size={group_size} does not divide in_features={in_features}; "
            "use a group size that divides K (or -1 for per-channel)"
        )
    return g


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = w.shape
    g = resolve_group_size(group_size, k)
    return w.reshape(n, k // g, g)  # (N, K/G, G)


def compute_scales_zeros(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    zero_point: bool,
    scale_dtype: torch.dtype = torch.float16,
    clip_max: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group scales and integer zeros for a weight ``[N, K]``.

    ``clip_max`` (``[N, K/G]``, optional) bounds each group's range to
    ``[-clip_max, clip_max]`` before the scale is taken: the result of the AWQ
    clip search. Returns ``scales`` in ``scale_dtype`` and ``zeros`` as float
    holding integers, both ``[N, K/G]``.
    """
    wg = _grouped(w.float(), group_size)  # (N, K/G, G)
    w_max = wg.amax(dim=-1)
    w_min = wg.amin(dim=-1)
    if clip_max is not None:
        c = clip_max.float().reshape(w_max.shape)
        w_max = torch.minimum(w_max, c)
        w_min = torch.maximum(w_min, -c)
    return scales_zeros_from_range(w_max, w_min, bits, zero_point, scale_dtype)


def scales_zeros_from_range(
    w_max: torch.Tensor,
    w_min: torch.Tensor,
    bits: int,
    zero_point: bool,
    scale_dtype: torch.dtype = torch.float16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales (``scale_dtype``) and float integer zeros of groups whose largest and smallest
    weights are ``w_max`` and ``w_min`` (fp32, any shape): :func:`compute_scales_zeros` after
    its reductions."""
    if zero_point:
        q_max = 2**bits - 1
        scales = ((w_max - w_min).clamp(min=MIN_QUANT_STEP) / q_max).to(scale_dtype).float()
        scales = scales.clamp(min=MIN_QUANT_STEP)
        zeros = (-torch.round(w_min / scales)).clamp(0, q_max)
    else:
        q_pos = 2 ** (bits - 1) - 1
        amax = torch.maximum(w_max.abs(), w_min.abs()).clamp(min=MIN_QUANT_STEP)
        scales = (amax / q_pos).to(scale_dtype).float().clamp(min=MIN_QUANT_STEP)
        zeros = torch.full_like(scales, float(2 ** (bits - 1)))
    return scales.to(scale_dtype), zeros


def quantize(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    zero_point: bool = True,
    scale_dtype: torch.dtype = torch.float16,
    clip_max: torch.Tensor | None = None,
    check_finite: bool = True,
) -> GroupQuantized:
    """Quantize a weight ``[N, K]`` group-wise along K (``check_finite``: refuse NaN/Inf)."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [N, K], got shape {tuple(w.shape)}")
    if check_finite and not is_all_finite(w):
        raise ValueError("weight contains NaN or Inf; refusing to quantize it")
    n, k = w.shape
    scales, zeros = compute_scales_zeros(w, bits, group_size, zero_point, scale_dtype, clip_max)
    wg = _grouped(w.float(), group_size)  # (N, K/G, G)
    s = scales.float().unsqueeze(-1)  # (N, K/G, 1)
    z = zeros.unsqueeze(-1)
    # clamp(round(w / s) + z): one weight-sized temporary, then in place (same bits, a
    # quarter of the memory: this runs on every linear of every block, and in every search step)
    q = torch.div(wg, s).round_().add_(z).clamp_(0, 2**bits - 1)
    return GroupQuantized(
        q=q.reshape(n, k).to(torch.uint8),
        scales=scales,
        zeros=zeros.to(torch.uint8),
        bits=bits,
        group_size=resolve_group_size(group_size, k),
    )


def dequantize(
    q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``w_hat[n, k] = (q[n, k] - z[n, k // G]) * s[n, k // G]``, computed in fp32."""
    n, k = q.shape
    g = resolve_group_size(group_size, k)
    w = q.to(torch.float32, copy=True).reshape(n, k // g, g)  # (N, K/G, G), ours to modify
    w.sub_(zeros.float().unsqueeze(-1)).mul_(scales.float().unsqueeze(-1))  # in place: same bits
    return w.reshape(n, k).to(dtype)


def fake_quantize(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    zero_point: bool = True,
    scale_dtype: torch.dtype = torch.float16,
    clip_max: torch.Tensor | None = None,
    check_finite: bool = True,
) -> torch.Tensor:
    """Quantize then dequantize, returning a tensor of ``w``'s dtype and shape.

    This is the quantizer the AWQ search evaluates; it is bit-identical to
    ``dequantize(quantize(w))``, which the packing path produces.
    """
    gq = quantize(w, bits, group_size, zero_point, scale_dtype, clip_max, check_finite)
    return gq.dequantize(w.dtype)


def linear_ref(
    x: torch.Tensor,
    q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x @ dequantize(q).T + bias``, accumulated in fp32, returned in x's dtype.

    x: ``[..., K]``; q: ``[N, K]`` integers; scales, zeros: ``[N, K/G]``.
    """
    w = dequantize(q, scales, zeros, group_size, torch.float32)  # (N, K)
    y = x.float() @ w.t()  # (..., N)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
