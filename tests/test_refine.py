"""Coordinate descent after compensated rounding (``refine_passes``): on the same grid, never worse.

The oracles: the reference quantizer (the refined weights are a fixed point of
``fake_quantize`` with the grid nearest rounding takes from the weights), the walk's own
objective ``tr(R^T H R)`` (no pass raises it), and a plain one-column-at-a-time coordinate
descent that recomputes every gradient from scratch (the blocked updates give the same moves).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from test_compensate import SHAPES, _case, _output_error

from awq_plugin.algorithm.awq import AwqOptions
from awq_plugin.algorithm.compensate import (
    _range_setters,
    _refine_,
    _walk_order_hessian,
    compensated_rounding,
    compensated_rounding_shared,
)
from awq_plugin.errors import ConfigError
from awq_plugin.numerics.quant_ref import compute_scales_zeros, fake_quantize


def _objective(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor, damping: float = 0.01) -> float:
    """``tr((W - Q) H (W - Q)^T)`` with ``H`` the damped ``X^T X`` the walk and the passes use."""
    h = _walk_order_hessian(x.t() @ x, damping, None, None).double()
    r = (w - q).double()
    return float(((r @ h) * r).sum())


@pytest.mark.parametrize(("n", "k", "group", "zero_point"), SHAPES)
def test_refined_weights_keep_the_reference_grid(n, k, group, zero_point) -> None:
    w, x = _case(n, k, seed=2)
    q = compensated_rounding(w, x.t() @ x, 4, group, zero_point, refine_passes=2)
    assert torch.equal(fake_quantize(q, 4, group, zero_point), q)  # packing writes these integers
    expected = compute_scales_zeros(w, 4, group, zero_point)
    got = compute_scales_zeros(q, 4, group, zero_point)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize(("n", "k", "group", "zero_point"), SHAPES)
def test_each_pass_lowers_the_walks_objective(n, k, group, zero_point) -> None:
    w, x = _case(n, k, seed=3)
    h = x.t() @ x
    objectives = [
        _objective(x, w, compensated_rounding(w, h, 4, group, zero_point, refine_passes=p)) for p in range(4)
    ]
    for before, after in itertools.pairwise(objectives):
        assert after <= before * (1 + 1e-6), objectives
    assert objectives[1] < 0.97 * objectives[0], objectives  # the greedy walk leaves something to take
    nearest = _output_error(x, w, fake_quantize(w, 4, group, zero_point))
    refined = _output_error(x, w, compensated_rounding(w, h, 4, group, zero_point, refine_passes=3))
    assert refined < 0.75 * nearest


def _plain_descent(wt, target, h, pinned, scales_t, zeros_t, group_of, q_min, q_max, passes):
    """Column by column, each gradient ``H[j] (T - W)`` from scratch: the definition."""
    for _ in range(passes):
        for j in range(wt.shape[0]):
            s, z = scales_t[group_of[j]], zeros_t[group_of[j]]
            optimum = wt[j] + h[j] @ (target - wt) / h[j, j]
            level = (torch.round(optimum / s) + z).clamp(q_min, q_max)
            wt[j] = torch.where(pinned[j], wt[j], (level - z) * s)


@pytest.mark.parametrize(("n", "k", "group", "block", "passes"), [(33, 200, 40, 64, 1), (20, 96, 32, 40, 3)])
def test_blocked_updates_make_the_moves_of_the_plain_descent(n, k, group, block, passes) -> None:
    """Awkward sizes: blocks that are not a multiple of the sub-blocks or of K; float64 so that
    the two summation orders cannot split a tie."""
    w, x = _case(n, k, seed=4)
    w = w.double()
    h = _walk_order_hessian(x.t() @ x, 0.01, None, None).double()
    scales, zeros = compute_scales_zeros(w, 4, group, True)
    scales_t, zeros_t = scales.double().t().contiguous(), zeros.double().t().contiguous()
    start = fake_quantize(w, 4, group, True).t().contiguous()  # nearest rounding: much to move
    pinned = _range_setters(w, group, True).t().contiguous()
    group_of = [j // group for j in range(k)]
    expected = start.clone()
    _plain_descent(expected, w.t(), h, pinned, scales_t, zeros_t, group_of, 0, 15, passes)
    got = start.clone()
    _refine_(got, w.t() - got, h, pinned, scales_t, zeros_t, group_of, 0, 15, passes, column_block=block)
    assert not torch.equal(expected, start)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("act_order", [False, True])
def test_refining_a_fit_to_the_model_lowers_its_error_to_the_target(act_order) -> None:
    """With the cross term (asymmetric calibration) the passes descend on the distance to the
    full-precision model's outputs ``X_ref W^T``; a consumed X^T X gives the same weights."""
    w, x_ref = _case(24, 160, seed=5)
    gen = torch.Generator().manual_seed(6)
    x = (
        x_ref
        + 0.3 * torch.randn(x_ref.shape, generator=gen) @ torch.randn(160, 160, generator=gen) / 160**0.5
    )
    h, cross = x.t() @ x, (x_ref - x).t() @ x

    def error(q: torch.Tensor) -> float:
        return float(((x_ref @ w.t() - x @ q.t()) ** 2).mean())

    walked, refined = (
        compensated_rounding(w, h, 4, 32, True, act_order=act_order, cross=cross, refine_passes=p)
        for p in (0, 2)
    )
    assert error(refined) < 0.97 * error(walked)
    spent = h.clone()
    consumed = compensated_rounding(
        w, spent, 4, 32, True, act_order=act_order, cross=cross, refine_passes=2, consume_hessian=True
    )
    assert torch.equal(consumed, refined)


def test_linears_that_share_an_input_refine_as_each_alone() -> None:
    w, x = _case(40, 128, seed=7)
    h = x.t() @ x
    together = compensated_rounding_shared([w[:25], w[25:]], h, 4, 64, refine_passes=2)
    assert torch.equal(together[0], compensated_rounding(w[:25], h, 4, 64, refine_passes=2))
    assert torch.equal(together[1], compensated_rounding(w[25:], h, 4, 64, refine_passes=2))


def test_the_refine_option_is_checked_and_reaches_every_front_end() -> None:
    from awq_plugin.cli import _awq_options, build_parser
    from awq_plugin.integrations.transformers import AwqConfig
    from awq_plugin.pipeline.cache import QuantizeRequest

    for bad in (-1, True, 1.5, "2"):
        with pytest.raises(ConfigError, match="refine_passes must be a whole number >= 0"):
            AwqOptions(refine_passes=bad)
    assert AwqOptions.from_dict({"refine_passes": 3}).refine_passes == 3
    parser = build_parser()
    assert _awq_options(parser.parse_args(["quantize", "s", "o"])).refine_passes == AwqOptions().refine_passes
    assert _awq_options(parser.parse_args(["quantize", "--refine-passes", "2", "s", "o"])).refine_passes == 2
    assert AwqConfig(refine_passes=2).awq_options().refine_passes == 2
    assert QuantizeRequest.from_dict({"refine_passes": 2}).options["refine_passes"] == 2
