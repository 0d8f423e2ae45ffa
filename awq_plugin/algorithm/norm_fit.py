"""Refit a norm's per-channel weight after the linears it feeds are rounded.

A scaling group whose producer is a norm (``input_layernorm -> q/k/v``) reads ``x * g``, ``g``
the norm's weight. Once the group's linears sit on their integer grids (``Q``), the norm's
weight is still free: it is stored in full precision and multiplies the inputs of exactly the
group's linears (the template's fold proves that). A per-channel factor ``d`` on it changes the
linears' outputs from ``X Q^T`` to ``X diag(d) Q^T``, which is linear in ``d``; the ``d`` that
brings them closest to their target ``X_ref W^T`` on the calibration tokens is one ``[K, K]``
solve. This is Norm-Tweaking's idea (Li et al., AAAI 2024), which tunes the norms by gradient
steps on a block loss, here in closed form per group, with the same second moments the
compensated walk already holds, and with the walk's target (the full-precision weights ``W``
and, with ``fit_to="model"``, the full-precision model's inputs ``X_ref``).

The normal equations: with ``H = X^T X``, ``C = (X_ref - X)^T X`` (so ``X^T X_ref = H + C^T``)
and the group's linears stacked,

    ||X_ref W^T - X diag(d) Q^T||^2 = d^T M d - 2 c^T d + const,
    M = H * (Q^T Q)  (elementwise),   c_i = sum_o ((H + C^T) W^T)_io Q_oi.

``M`` is positive semi-definite (a Schur product of two), and a small ridge towards ``d = 1``
(no change) keeps channels with no signal where they are.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from types import SimpleNamespace

import torch
from torch import nn

from awq_plugin.algorithm.search import ScaleSearchResult
from awq_plugin.templates import BlockTemplate, ScalingGroup
from awq_plugin.templates.folds import (
    fold_scales_into_linear_rows,
    fold_scales_into_norm,
    scale_linear_inputs,
)

logger = logging.getLogger(__name__)

#: Ridge towards d = 1, as a share of the mean diagonal of M.
RIDGE = 1e-3
#: Output rows per linear on which the removed share of the rounding error is estimated (it is
#: only reported; on all rows it would cost a third of the fit at the 8B shape).
SHARE_ROWS = 512


@torch.no_grad()
def fit_channel_factors(
    hessian: torch.Tensor,
    rounded: Sequence[torch.Tensor],
    full_precision: Sequence[torch.Tensor],
    cross: torch.Tensor | None = None,
    input_scale: torch.Tensor | None = None,
    ridge: float = RIDGE,
) -> tuple[torch.Tensor, float] | None:
    """The per-input-channel factor ``d`` ``[K]`` for linears that read one input, and what it
    removes from their output error as a share of rounding's ``||X (W - Q)^T||^2`` (estimated on
    up to :data:`SHARE_ROWS` rows of each linear); None where it removes nothing (or the solve
    fails).

    ``hessian`` ``[K, K]``: ``X^T X`` of the linears' calibration inputs; ``cross``:
    ``(X_ref - X)^T X`` (asymmetric calibration), or None for the target ``X W^T``. With
    ``input_scale`` ``[K]`` both were recorded before the inputs were divided by it (an AWQ fold)
    and are divided here. ``rounded`` and ``full_precision``: each linear's weight ``[N_i, K]``
    on its grid, and the full-precision weight it stands for (in the same, scaled, space).
    """
    h = hessian.detach().float()
    if input_scale is not None:
        inv = 1.0 / input_scale.to(h)
        h = h * inv[:, None] * inv[None, :]
    target_cross = h  # X^T X_ref, in the scaled space
    if cross is not None:
        c_t = cross.detach().float().t()
        if input_scale is not None:
            c_t = c_t * inv[:, None] * inv[None, :]
        target_cross = h + c_t
    k = h.shape[0]
    gram = torch.zeros(k, k, dtype=torch.float32, device=h.device)  # Q^T Q
    c = torch.zeros(k, dtype=torch.float32, device=h.device)
    rounding_error = 0.0  # ||X (W - Q)^T||^2: what rounding cost on these inputs
    for q, w in zip(rounded, full_precision):
        q, w = q.detach().float(), w.detach().float()
        gram.addmm_(q.t(), q)
        towards = w @ target_cross.t()  # (N_i, K): row o is ((H + C^T) W^T)[:, o]
        c.add_((towards * q).sum(0))
        step = max(1, q.shape[0] // SHARE_ROWS)  # the share is only reported: estimated on rows
        gap = w[::step] - q[::step]
        rounding_error += float(((gap @ h) * gap).sum()) * q.shape[0] / gap.shape[0]
        del towards, gap
    m = gram.mul_(h)
    damp = ridge * float(m.diagonal().mean())
    if not damp > 0:
        return None
    ones = torch.ones(k, dtype=torch.float32, device=h.device)
    system = m.clone()
    system.diagonal().add_(damp)
    try:
        d = torch.linalg.solve(system, c + damp)
    except RuntimeError:  # singular even with the ridge
        return None
    gain = float(ones @ m @ ones - 2 * c @ ones) - float(d @ m @ d - 2 * c @ d)
    if not torch.isfinite(d).all() or not gain > 0 or not rounding_error > 0:
        return None
    return d, gain / rounding_error


class NormRefit:
    """The norms one block step refits: those of its scaling groups whose producer is a norm.

    ``searches``: each group's searched scales as folded (unit scales where the block went back
    to rounding); ``original``: the block's weights before any fold, from which the groups'
    full-precision weights are taken in the folded space (both folds that touch a linear: its
    input columns times its group's scales, its rows divided by the scales of a group it
    produces)."""

    def __init__(
        self,
        groups: BlockTemplate,
        searches: Sequence[ScaleSearchResult],
        original: Mapping[str, torch.Tensor],
    ) -> None:
        self._pairs = list(zip(groups.groups, searches))
        self._original = original
        self.index = groups.index

    def group_of(self, names: Sequence[str]) -> ScalingGroup | None:
        """The group whose linears are exactly ``names``, if its producer is a norm of one
        weight per input channel."""
        for group, _ in self._pairs:
            if not group.prev_op_is_linear and set(group.layers) == set(names):
                return group
        return None

    def full_precision(self, name: str) -> torch.Tensor:
        """``name``'s full-precision weight as the folds leave it (fp32, a new tensor)."""
        holder = SimpleNamespace(weight=self._original[f"{name}.weight"].float().clone(), bias=None)
        for group, found in self._pairs:
            if group.prev_op_is_linear and group.prev_op == name:
                fold_scales_into_linear_rows(holder, found.scales)
            if name in group.layers:
                scale_linear_inputs([holder], group.expand_scales(found.scales))
        return holder.weight

    @torch.no_grad()
    def apply(
        self,
        block: nn.Module,
        group: ScalingGroup,
        hessian: torch.Tensor,
        cross: torch.Tensor | None,
        input_scale: torch.Tensor | None,
    ) -> None:
        """Fit ``group``'s norm to its linears as they now stand on their grids, in place."""
        norm = block.get_submodule(group.prev_op)
        weight = getattr(norm, "weight", None)
        k = hessian.shape[0]
        if not isinstance(weight, torch.Tensor) or weight.shape != (k,) or group.n_scales != k:
            logger.debug("layer %d: %s has no weight per input channel; not refit", self.index, group.prev_op)
            return
        rounded = [block.get_submodule(name).weight for name in group.layers]
        full = [self.full_precision(name) for name in group.layers]
        found = fit_channel_factors(hessian, rounded, full, cross, input_scale)
        del full
        if found is None:
            logger.info("layer %d: %s kept (no refit lowers its linears' error)", self.index, group.prev_op)
            return
        d, share = found
        fold_scales_into_norm(norm, 1.0 / d, group.norm_weight_offset)
        # readers of the norm's output that are not quantized (MoE routers) keep their outputs
        scale_linear_inputs([block.get_submodule(name) for name in group.readers], 1.0 / d)
        logger.info(
            "layer %d: %s refit (factors %.3f to %.3f), %.1f%% of rounding's error on %s removed",
            self.index,
            group.prev_op,
            float(d.min()),
            float(d.max()),
            100 * share,
            ", ".join(group.layers),
        )

    def snapshot(self, block: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
        """The norms' (and their readers') parameters as they stand, to put back later."""
        names = {
            name
            for group, _ in self._pairs
            if not group.prev_op_is_linear
            for name in (group.prev_op, *group.readers)
        }
        return {
            name: {k: v.clone() for k, v in block.get_submodule(name).state_dict().items()} for name in names
        }

    @staticmethod
    def put(block: nn.Module, saved: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        for name, state in saved.items():
            block.get_submodule(name).load_state_dict(state)
