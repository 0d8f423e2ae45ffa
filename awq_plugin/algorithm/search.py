"""Search-best-scale: AWQ's grid search for one scaling group.

For ``alpha`` on a grid in ``[0, 1)`` the candidate scale is ``s = mean|x|^alpha``
(or, with duo scaling, ``mean|x|^alpha / mean|w|^(1 - alpha)``), normalised so
that ``sqrt(max(s) * min(s)) = 1``. Each candidate is scored by fake-quantizing
the scaled weights ``Q(W diag(s)) diag(s)^-1`` and comparing the output of the
inspected module with its full-precision output; the scale with the lowest
mean squared error wins. Plain rounding (``s = 1``) is scored too and kept when
no candidate beats it, so the search never makes a group worse on its sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from awq_plugin.numerics.quant_ref import resolve_group_size
from awq_plugin.numerics.search_quant import GroupFakeQuantizer, fake_quantize_scaled
from awq_plugin.templates import ScalingGroup

# Floor of a candidate per-channel AWQ scale (a dead channel would otherwise get s = 0). Distinct from
# the weight quantization step floor, numerics.quant_ref.MIN_QUANT_STEP.
MIN_CHANNEL_SCALE = 1e-4


@dataclass(frozen=True)
class ScaleSearchResult:
    """The outcome of one group's search (plain data)."""

    scales: torch.Tensor  # fp32 [n_scales]; all ones when plain rounding won
    alpha: float | None  # the winning grid point; None when plain rounding (s = 1) won
    loss_rtn: float  # loss with s = 1 (plain rounding of the group's layers)
    loss_awq: float  # loss with the chosen scales
    losses: tuple[float, ...]  # loss at every grid point, in grid order


def weight_magnitude(weights: Sequence[torch.Tensor], group_size: int) -> torch.Tensor:
    """Duo-scaling statistic: mean over output rows of ``|w|`` normalised by its group's max, ``[K]``."""
    w = torch.cat([wt.float() for wt in weights], dim=0)  # (sum N, K)
    n, k = w.shape
    g = resolve_group_size(group_size, k)
    grouped = w.abs().reshape(n, k // g, g)  # (N, K/G, G)
    normalised = grouped / (grouped.amax(dim=-1, keepdim=True) + 1e-6)
    return normalised.reshape(n, k).mean(dim=0)  # (K,)


def candidate_scales(
    x_mean: torch.Tensor, w_mean: torch.Tensor | None, alpha: float, duo_scaling: bool
) -> torch.Tensor:
    """The AWQ scale for one grid point, normalised to a geometric mid-range of 1."""
    if duo_scaling:
        if w_mean is None:
            raise ValueError("duo scaling needs the weight statistic")
        s = (x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + MIN_CHANNEL_SCALE)).clamp(min=MIN_CHANNEL_SCALE)
    else:
        s = x_mean.pow(alpha).clamp(min=MIN_CHANNEL_SCALE)
    s = s / (s.max() * s.min()).sqrt()
    # A degenerate statistic (inf/nan) must not poison the weights: fall back to 1 there.
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


def token_loss_weights(
    targets: Sequence[torch.Tensor], outlier_ratio: float | None
) -> list[torch.Tensor] | None:
    """Per-token weights of the search loss, so that a few outlier tokens cannot own it.

    ``targets``: the inspected module's full-precision outputs, each ``(..., T, H)``.
    A token whose output's squared norm is more than ``outlier_ratio`` times the
    median token's counts with weight ``outlier_ratio * median / ||y_t||^2``: by
    its error relative to its own size, as if it were a token of that capped
    size. The others keep weight 1 (plain squared error). Why: attention-sink
    tokens (the first of a window, in Qwen2.5 and SmolLM2) carry "massive
    activations" 10^3-10^5 times a normal token's squared norm and would hold
    97-100% of a plain MSE, so the search would tune the scales for them alone,
    although the next RMSNorm divides their error by that same huge norm.
    ``None``: every weight 1 (plain MSE, llm-awq's objective).
    """
    if outlier_ratio is None:
        return None
    norms = [t.float().pow(2).sum(dim=-1) for t in targets]  # (..., T) each
    median = torch.cat([n.reshape(-1) for n in norms]).median()
    cap = outlier_ratio * median
    return [torch.where(n > cap, cap / n, torch.ones_like(n)) for n in norms]


def weighted_output_mse(
    outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], weights: Sequence[torch.Tensor] | None
) -> float:
    """Mean squared error over all elements, each token's squared error times its weight: per
    token in fp32 (one vector of H), over tokens in fp64. In place on one fp32 difference: the
    search scores every candidate this way (an fp64 sum of every element took twice as long)."""
    total, count = 0.0, 0
    for i, (out, ref) in enumerate(zip(outputs, targets)):
        err = out - ref.float()  # fp32 (type promotion), whatever out's dtype: one new tensor
        per_token = err.pow_(2).sum(dim=-1)  # (..., T)
        if weights is not None:
            per_token.mul_(weights[i])
        total += float(per_token.sum(dtype=torch.float64))
        count += ref.numel()
    return total / max(count, 1)


@contextmanager
def replaced_weights(linears: Sequence[nn.Linear], weights: Sequence[torch.Tensor]) -> Iterator[None]:
    """Temporarily give each linear another weight tensor (restored on exit)."""
    originals = [lin.weight.data for lin in linears]
    try:
        for lin, w in zip(linears, weights):
            lin.weight.data = w
        yield
    finally:
        for lin, w in zip(linears, originals):
            lin.weight.data = w


def scaled_fake_quant_weights(
    weights: Sequence[torch.Tensor],
    s_cols: torch.Tensor,
    fake_quantize: Callable[[torch.Tensor], torch.Tensor],
    dtype: torch.dtype,
) -> list[torch.Tensor]:
    """``Q(W diag(s)) diag(s)^-1`` for each weight, in ``dtype``: what a layer computes once scaled and quantized."""
    if isinstance(fake_quantize, GroupFakeQuantizer):  # the same bits, fused in cache-sized pieces
        q = fake_quantize
        return [
            fake_quantize_scaled(w, q.bits, q.group_size, q.zero_point, q.scale_dtype, s_cols, dtype)
            for w in weights
        ]
    s_row = s_cols.float()[None, :]  # (1, K)
    return [(fake_quantize(w.float() * s_row) / s_row).to(dtype) for w in weights]


@torch.no_grad()
def search_best_scale(
    group: ScalingGroup,
    weights: Sequence[torch.Tensor],
    probes: Sequence[nn.Linear],
    x_mean: torch.Tensor,
    loss_fn: Callable[[], float],
    fake_quantize: Callable[[torch.Tensor], torch.Tensor],
    n_grid: int = 20,
    duo_scaling: bool = False,
    group_size: int = 128,
) -> ScaleSearchResult:
    """Grid-search the scale of one group.

    ``weights``: the full-precision weights of the group's layers that will be
    quantized; ``probes``: the linears (same order) inside the module that
    ``loss_fn`` runs, which receive each candidate's fake-quantized weights, cast
    to their dtype (the probes may be a lower-precision copy, see
    ``AwqOptions.search_dtype``). ``x_mean``: mean ``|x|`` per scale channel
    ``[group.n_scales]``. ``loss_fn()`` returns the inspected module's MSE on the
    search sample against its output with the original weights.
    """
    ones = torch.ones(group.n_scales, dtype=torch.float32, device=x_mean.device)
    if not weights:
        return ScaleSearchResult(scales=ones, alpha=None, loss_rtn=0.0, loss_awq=0.0, losses=())
    w_mean = group.reduce_columns(weight_magnitude(weights, group_size)) if duo_scaling else None
    dtype = probes[0].weight.dtype

    def score(s: torch.Tensor) -> float:
        new = scaled_fake_quant_weights(weights, group.expand_scales(s), fake_quantize, dtype)
        with replaced_weights(probes, new):
            return loss_fn()

    loss_rtn = score(ones)
    best_scales, best_alpha, best_loss = ones, None, loss_rtn
    losses = []
    for i in range(n_grid):
        alpha = i / n_grid
        s = candidate_scales(x_mean, w_mean, alpha, duo_scaling)
        # alpha = 0 without duo scaling is s = 1 again: plain rounding, already scored (same number)
        loss = loss_rtn if torch.equal(s, ones) else score(s)
        losses.append(loss)
        if loss < best_loss:
            best_scales, best_alpha, best_loss = s, alpha, loss
    return ScaleSearchResult(
        scales=best_scales.float().contiguous(),
        alpha=best_alpha,
        loss_rtn=loss_rtn,
        loss_awq=best_loss,
        losses=tuple(losses),
    )
