"""Apply-scale: what a template's fold does. Divide an AWQ scale out of a group's producer and into
its linears so that the block's full-precision output is unchanged.

For a scaling group with scale ``s`` (one value per channel of ``prev_op``'s
output), ``prev_op``'s output is divided by ``s`` and the consuming linears'
input columns are multiplied by ``s``: ``W diag(s) (x / s) = W x``. All
arithmetic is done in fp32 and written back in each parameter's own dtype, so
re-applying saved scales to a fresh copy gives the same bits.
"""

from __future__ import annotations

import torch
from torch import nn

from awq_plugin.templates.schema import ScalingGroup


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data.copy_(value.to(param.dtype))


@torch.no_grad()
def fold_scales_into_norm(norm: nn.Module, s: torch.Tensor, weight_offset: float = 0.0) -> None:
    """Divide a norm's output by ``s``: ``weight`` (and ``bias``, LayerNorm) per channel.

    ``weight_offset`` is 1 for norms computing ``x_hat * (1 + weight)`` (Gemma):
    the new weight is ``(1 + weight) / s - 1``.
    """
    s = s.float()
    _set(norm.weight, (norm.weight.float() + weight_offset) / s - weight_offset)
    bias = getattr(norm, "bias", None)
    if isinstance(bias, torch.Tensor):
        _set(bias, bias.float() / s)


@torch.no_grad()
def fold_scales_into_linear_rows(prev: nn.Linear, s: torch.Tensor) -> None:
    """Divide the LAST ``len(s)`` output rows (and bias entries) of a linear by ``s``.

    For an unfused linear that is every row; for a fused one (qkv, gate_up) it is
    the trailing part that feeds the scaled layers (v, up).
    """
    n = s.numel()
    s = s.float()
    rows = prev.weight.data[-n:]  # (n, K) view of the trailing rows
    _set(rows, rows.float() / s[:, None])
    if prev.bias is not None:
        tail = prev.bias.data[-n:]
        _set(tail, tail.float() / s)


@torch.no_grad()
def scale_linear_inputs(linears: list[nn.Module], s_cols: torch.Tensor) -> None:
    """Multiply the input columns of every module's 2-D ``weight`` ``[N, K]`` by ``s_cols`` ``[K]``.

    The modules are linears, or routers that hold a linear's weight without being one.
    """
    s_cols = s_cols.float()
    for linear in linears:
        _set(linear.weight, linear.weight.float() * s_cols[None, :])


def apply_group_scales(block: nn.Module, group: ScalingGroup, s: torch.Tensor) -> None:
    """Fold ``s`` ``[group.n_scales]`` into ``group.prev_op`` and ``group.layers`` of ``block``.

    The group's unquantized readers (MoE routers) get their input columns scaled
    too: they read the same divided output of ``prev_op``.
    """
    if s.shape != (group.n_scales,):
        raise ValueError(f"group {group.name}: expected {group.n_scales} scales, got shape {tuple(s.shape)}")
    prev = block.get_submodule(group.prev_op)
    if group.prev_op_is_linear:
        fold_scales_into_linear_rows(prev, s)
    else:
        fold_scales_into_norm(prev, s, group.norm_weight_offset)
    scaled = [block.get_submodule(name) for name in (*group.layers, *group.readers)]
    scale_linear_inputs(scaled, group.expand_scales(s))


@torch.no_grad()
def clamp_weight(linear: nn.Linear, clip_max: torch.Tensor, clip_min: torch.Tensor | None = None) -> None:
    """Clip each weight group to ``[clip_min, clip_max]`` (each ``[N, K/G]``; ``clip_min`` defaults to ``-clip_max``)."""
    n, k = linear.weight.shape
    groups = clip_max.shape[1]
    w = linear.weight.float().reshape(n, groups, k // groups)  # (N, K/G, G)
    hi = clip_max.float()[:, :, None]  # (N, K/G, 1)
    lo = -hi if clip_min is None else clip_min.float()[:, :, None]
    _set(linear.weight, torch.maximum(torch.minimum(w, hi), lo).reshape(n, k))
