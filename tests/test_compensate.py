"""Compensated (GPTQ-style) rounding: on the reference quantizer's grid, better than nearest.

The oracle is the one reference quantizer: the result must be a fixed point of
``fake_quantize`` (so packing writes exactly the integers chosen), an identity Hessian
(no correlation to exploit) must give nearest rounding back, and on correlated inputs
the layer's output error must drop well below nearest rounding's.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from test_awq_algorithm import FAST, HELD_OUT, QUANT, calib_ids, make_outlier_llama

from awq_plugin.algorithm.awq import AwqOptions, apply_awq_block, run_awq_block
from awq_plugin.algorithm.compensate import (
    NotPositiveDefinite,
    _permuted_copy,
    activation_order,
    compensated_rounding,
    compensated_rounding_shared,
    permute_rows_,
)
from awq_plugin.calibration.capture import (
    BlockInputs,
    InputRecorder,
    SamplePlan,
    capture_decoder_inputs,
    input_hessian,
)
from awq_plugin.errors import CheckpointError, ConfigError
from awq_plugin.numerics.quant_ref import compute_scales_zeros, fake_quantize
from awq_plugin.templates import resolve_template

# (N, K, group size, zero point): groups of 32/64/128, a group size that is not a power of two,
# per-channel (-1), K not a multiple of the 128-column blocks, odd N.
SHAPES = [
    (64, 256, 64, True),
    (33, 200, 40, True),
    (48, 96, -1, True),
    (64, 256, 32, False),
    (17, 320, 64, False),
    (40, 384, 128, True),
]


def _case(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight ``[n, k]`` and correlated inputs ``[2048, k]`` with a few loud channels."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    x = torch.randn(2048, k, generator=gen) @ (0.3 * torch.randn(k, k, generator=gen)) + torch.randn(
        k, generator=gen
    )
    x[:, :3] *= 10.0
    return w, x


def _output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float(((x @ (w_hat - w).t()) ** 2).mean())


@pytest.mark.parametrize(("n", "k", "group", "zero_point"), SHAPES)
def test_compensated_weights_sit_on_the_reference_grid(n, k, group, zero_point) -> None:
    w, x = _case(n, k)
    q = compensated_rounding(w, x.t() @ x, 4, group, zero_point)
    assert torch.equal(fake_quantize(q, 4, group, zero_point), q)  # packing writes these integers
    expected = compute_scales_zeros(w, 4, group, zero_point)  # the grid nearest rounding uses
    got = compute_scales_zeros(q, 4, group, zero_point)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize(("n", "k", "group", "zero_point"), SHAPES)
def test_compensation_lowers_the_layer_output_error(n, k, group, zero_point) -> None:
    w, x = _case(n, k, seed=1)
    nearest = _output_error(x, w, fake_quantize(w, 4, group, zero_point))
    compensated = _output_error(x, w, compensated_rounding(w, x.t() @ x, 4, group, zero_point))
    assert compensated < 0.75 * nearest, (compensated, nearest)


@pytest.mark.parametrize("zero_point", [True, False])
def test_an_identity_hessian_gives_nearest_rounding_back(zero_point) -> None:
    """Uncorrelated, equally loud inputs leave nothing to compensate. Only asymmetric groups whose
    largest weight nearest rounding leaves one level below the top differ: it is placed on the
    top level (one step), so that the grid stays the one the weights set."""
    w, _ = _case(64, 256)
    q = compensated_rounding(w, torch.eye(256), 4, 64, zero_point)
    nearest = fake_quantize(w, 4, 64, zero_point)
    differ = q != nearest
    if not zero_point:
        assert not differ.any()
        return
    scales = compute_scales_zeros(w, 4, 64, True)[0].float().repeat_interleave(64, dim=1)
    assert differ.sum() <= w.shape[0] * 4  # at most one weight per group
    assert torch.allclose((q - nearest)[differ], scales[differ])  # one step up
    grouped = w.reshape(64, 4, 64)
    largest = torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, grouped.argmax(-1, keepdim=True), True)
    assert not (differ & ~largest.reshape(64, 256)).any()  # and only the group's largest weight


def test_lazy_column_blocks_equal_one_column_at_a_time() -> None:
    w, x = _case(32, 200, seed=2)
    h = x.t() @ x
    blocked = compensated_rounding(w, h, 4, 40, True, column_block=128)
    single = compensated_rounding(w, h, 4, 40, True, column_block=1)
    odd = compensated_rounding(w, h, 4, 40, True, column_block=7)
    # The same algorithm in another summation order: rounding ties may flip a rare level.
    assert (blocked != single).float().mean() < 1e-3 and (blocked != odd).float().mean() < 1e-3


def test_dead_inputs_and_a_singular_hessian_stay_finite() -> None:
    w, x = _case(16, 64, seed=3)
    x[:, 5] = 0.0  # an input that never fires
    x[:, 7] = x[:, 6]  # two identical inputs: H is singular
    q = compensated_rounding(w, x.t() @ x, 4, 32, True)
    assert torch.isfinite(q).all() and torch.equal(fake_quantize(q, 4, 32, True), q)


def test_a_hessian_of_the_wrong_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="expected \\(64, 64\\)"):
        compensated_rounding(torch.randn(8, 64), torch.eye(32), 4, 32, True)


def test_rounding_option_is_checked() -> None:
    with pytest.raises(ConfigError, match="rounding must be one of"):
        AwqOptions(rounding="stochastic")


@pytest.fixture(scope="module")
def toy():
    model = make_outlier_llama()
    resolved = resolve_template(model)
    captured = capture_decoder_inputs(model, model.model.layers, calib_ids(n=32), micro_batch_size=4)
    return model, resolved, captured


def test_block_step_keeps_compensated_rounding_only_where_it_wins(toy) -> None:
    """Per block the compensated weights are judged on the held-out micro-batch against nearest
    rounding of the same scales and clips; what is kept is on the grid and no worse."""
    model, resolved, captured = toy
    compensated = AwqOptions(**{**HELD_OUT.to_dict(), "rounding": "compensated"})
    kept = []
    for i in range(len(model.model.layers)):
        nearest_block = copy.deepcopy(model.model.layers[i])
        nearest = run_awq_block(nearest_block, resolved.block(i), captured.for_layer(i), QUANT, HELD_OUT)
        block = copy.deepcopy(model.model.layers[i])
        result = run_awq_block(block, resolved.block(i), captured.for_layer(i), QUANT, compensated)
        assert result.choice == nearest.choice and result.mse_rtn == nearest.mse_rtn
        assert result.rounding in ("nearest", "compensated")
        assert result.mse_awq <= nearest.mse_awq
        for name in resolved.block(i).linears:
            weight = block.get_submodule(name).weight
            if result.rounding == "compensated":
                assert torch.equal(fake_quantize(weight.float(), 4, QUANT.group_size), weight.float()), name
            else:
                assert torch.equal(weight, nearest_block.get_submodule(name).weight), name
        kept.append(result.rounding)
    assert "compensated" in kept  # the outlier toy gains from it (on 32 sequences: both blocks)


def test_compensated_results_are_not_reapplied_from_their_scales(toy) -> None:
    model, resolved, captured = toy
    compensated = AwqOptions(**{**HELD_OUT.to_dict(), "rounding": "compensated"})
    block = copy.deepcopy(model.model.layers[0])
    result = run_awq_block(block, resolved.block(0), captured.for_layer(0), QUANT, compensated)
    result = dataclasses.replace(result, rounding="compensated")
    with pytest.raises(CheckpointError, match="compensated rounding"):
        apply_awq_block(copy.deepcopy(model.model.layers[0]), resolved.block(0), result)


def test_pipeline_writes_compensated_blocks_that_reload(tiny_llama_fp, tiny_llama_compensated) -> None:
    """quantize_checkpoint with rounding="compensated" (the fixture): each block records the
    rounding it kept, and the checkpoint's integers are the compensated weights (read back
    through the loader)."""
    from awq_plugin.algorithm.awq import AwqResults
    from awq_plugin.config import AwqQuantConfig
    from awq_plugin.pipeline.assemble import RESULTS_FILE
    from awq_plugin.runtime import modeling

    out = tiny_llama_compensated
    results = AwqResults.load(out / RESULTS_FILE)
    options = AwqOptions.from_dict(results.options)
    assert options.rounding == "compensated"
    assert {b.rounding for b in results.blocks} <= {"nearest", "compensated"}
    assert all(b.held_out for b in results.blocks)
    assert any(b.rounding == "compensated" for b in results.blocks)
    # The same run in memory (eval --fake-quant's path) gives the checkpoint's weights exactly.
    from transformers import AutoTokenizer

    from awq_plugin.api import fake_quantize_model

    memory = modeling.load_fp_model(tiny_llama_fp, torch.float32)
    fake_quantize_model(
        memory,
        AwqQuantConfig(bits=4, group_size=64),
        "enwiki",
        tokenizer=AutoTokenizer.from_pretrained(tiny_llama_fp),
        n_samples=32,
        seq_len=64,
        options=options,
        guard="warn",
    )
    loaded = modeling.load_awq_model(out, backend="reference")
    for name, module in loaded.named_modules():
        if hasattr(module, "dequantized_weight"):
            assert torch.equal(module.dequantized_weight(), memory.get_submodule(name).weight), name


def test_the_rounding_option_reaches_every_front_end() -> None:
    from awq_plugin.cli import build_parser
    from awq_plugin.integrations.transformers import AwqConfig
    from awq_plugin.pipeline.cache import QuantizeRequest

    args = build_parser().parse_args(["quantize", "src", "out", "--rounding", "compensated"])
    assert args.rounding == "compensated"
    assert AwqConfig(rounding="compensated").awq_options().rounding == "compensated"
    with pytest.raises(ConfigError, match="rounding must be one of"):
        AwqConfig(rounding="stochastic")
    request = QuantizeRequest.from_dict({"scheme": "uint4_wo_64", "rounding": "compensated"})
    assert request.options["rounding"] == "compensated"
    with pytest.raises(ConfigError, match="rounding must be one of"):
        QuantizeRequest.from_dict({"rounding": "stochastic"})


def test_without_held_out_micro_batches_compensation_is_not_tried(toy) -> None:
    """Compensation fits the calibration tokens; with none held out to judge it, nearest rounding."""
    model, resolved, captured = toy
    options = AwqOptions(**{**FAST.to_dict(), "rounding": "compensated"})  # every micro-batch searched
    block = copy.deepcopy(model.model.layers[0])
    result = run_awq_block(block, resolved.block(0), captured.for_layer(0), QUANT, options)
    assert not result.held_out and result.rounding == "nearest"


def test_a_bf16_hessian_compensates_as_well_as_the_fp32_one() -> None:
    """``input_hessian`` in bf16 (chunks of HESSIAN_CHUNK_ROWS, fp32 sum) is the fp32 product
    to bf16 accuracy, and the rounding it leads to loses no output error on held-out rows."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(48, 256, generator=gen) * 0.05
    x = torch.randn(3800, 256, generator=gen) @ (0.3 * torch.randn(256, 256, generator=gen)) + 1.0
    x[:, :3] *= 10.0
    fit, held_out = x[:2748], x[2748:]  # a full chunk and a partial one
    fp32 = input_hessian(fit)
    assert torch.equal(fp32, fit.t() @ fit)
    bf16 = input_hessian(fit, torch.bfloat16)
    assert bf16.dtype == torch.float32
    assert 0 < float((bf16 - fp32).norm() / fp32.norm()) < 1e-2
    errors = [_output_error(held_out, w, compensated_rounding(w, h, 4, 64, True)) for h in (fp32, bf16)]
    nearest = _output_error(held_out, w, fake_quantize(w, 4, 64, True))
    assert errors[1] < 0.8 * nearest
    assert errors[1] == pytest.approx(errors[0], rel=0.02)


@pytest.mark.parametrize(("k", "leaf"), [(50, 7), (97, 16), (600, 512)])
def test_the_inverse_factor_is_the_upper_cholesky_factor_of_the_damped_inverse(k, leaf) -> None:
    """U with U^T U = (H + damping)^-1, upper triangular with a positive diagonal, through the
    in-place triangular inverse by halves (odd splits and several levels with the small leaves)."""
    from awq_plugin.algorithm import compensate

    _, x = _case(8, k, seed=5)
    h = (x.t() @ x).double()
    damped = h + 0.01 * h.diagonal().mean() * torch.eye(k, dtype=torch.float64)
    lower = torch.linalg.cholesky(damped.flip(0, 1))
    by_halves = lower.clone()
    compensate._invert_lower_(by_halves, leaf)  # in place
    assert torch.allclose(by_halves @ lower, torch.eye(k, dtype=torch.float64), atol=1e-9)
    u = compensate._reversed_inverse_factor(h.float(), 0.01).double().flip(0, 1)
    assert torch.equal(u, u.triu()) and bool((u.diagonal() > 0).all())
    expected = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)
    assert torch.allclose(u, expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize(("n", "k", "rows"), [(1, 5, 64), (130, 33, 64), (200, 70, 16)])
def test_copy_transposed_equals_a_plain_transposing_copy(n, k, rows) -> None:
    """Strip by strip, into a strided part of a wider buffer (as the column walk's), with strips
    that do not divide the rows; bool too (the pinned mask)."""
    from awq_plugin.numerics.dense import copy_transposed

    for src in (torch.randn(n, k), torch.randn(n, k) > 0):
        wide = torch.zeros(k, n + 3, dtype=src.dtype)
        copy_transposed(wide[:, 2 : n + 2], src, rows)
        assert torch.equal(wide[:, 2 : n + 2], src.t())
        assert not wide[:, :2].any() and not wide[:, n + 2 :].any()  # nothing outside the slice


def test_the_sweeps_reference_reaches_a_compensated_checkpoint(tiny_llama_fp, tiny_llama_compensated) -> None:
    """The architecture sweep's in-memory reference (its search run again on the same ids, as
    compensated integers are not in the saved results) equals what the pipeline packed."""
    from transformers import AutoTokenizer

    from awq_plugin.calibration.text import calibration_ids
    from awq_plugin.runtime import modeling
    from awq_plugin.tools.bench_architectures import fake_quant_reference

    ids = calibration_ids("enwiki", AutoTokenizer.from_pretrained(tiny_llama_fp), 32, 64)
    reference = fake_quant_reference(
        modeling.load_fp_model(tiny_llama_fp, torch.float32), tiny_llama_compensated, ids
    )
    loaded = modeling.load_awq_model(tiny_llama_compensated, backend="reference")
    compared = 0
    for name, module in loaded.named_modules():
        if hasattr(module, "dequantized_weight"):
            assert torch.equal(module.dequantized_weight().float(), reference.get_submodule(name).weight), (
                name
            )
            compared += 1
    assert compared == 7 * len(reference.model.layers)


def test_an_input_scale_is_the_hessian_of_the_scaled_inputs() -> None:
    """X^T X recorded before a scale fold, with the fold's scale given, rounds exactly as the
    X^T X of the scaled inputs does (the pipeline keeps one matrix per linear, not two)."""
    w, x = _case(32, 128, seed=6)
    s = torch.rand(128, generator=torch.Generator().manual_seed(7)) + 0.5
    scaled = x / s
    direct = compensated_rounding(w, scaled.t() @ scaled, 4, 64, True)
    lazy = compensated_rounding(w, x.t() @ x, 4, 64, True, input_scale=s)
    assert (direct != lazy).float().mean() < 1e-3  # fp32 products in another order
    assert torch.equal(fake_quantize(lazy, 4, 64, True), lazy)


def test_a_losing_compensation_puts_the_searched_weights_back_bit_for_bit(toy, monkeypatch) -> None:
    """Where compensation loses on the held-out batch, the block's weights are rebuilt from its
    original weights and the search's scales and clips (no copy is kept): bit for bit those of
    the same search with nearest rounding."""
    from awq_plugin.algorithm import block as block_step

    model, resolved, captured = toy
    compensated = AwqOptions(**{**HELD_OUT.to_dict(), "rounding": "compensated"})
    monkeypatch.setattr(
        block_step,
        "compensated_rounding_shared",
        lambda weights, *a, **k: [torch.zeros_like(w) for w in weights],
    )
    for i in range(len(model.model.layers)):
        nearest_block = copy.deepcopy(model.model.layers[i])
        nearest = run_awq_block(nearest_block, resolved.block(i), captured.for_layer(i), QUANT, HELD_OUT)
        block = copy.deepcopy(model.model.layers[i])
        result = run_awq_block(block, resolved.block(i), captured.for_layer(i), QUANT, compensated)
        assert (result.rounding, result.mse_awq) == ("nearest", nearest.mse_awq)
        for name, tensor in nearest_block.state_dict().items():
            assert torch.equal(block.state_dict()[name], tensor), name


@pytest.mark.parametrize("zero_point", [True, False])
def test_linears_that_read_one_input_round_in_one_walk_as_each_alone(zero_point) -> None:
    """q/k/v (or gate/up) stacked in one walk: bit for bit what each gets on its own, scaled
    inputs included (compensation treats each output row on its own)."""
    _, x = _case(8, 200, seed=8)
    gen = torch.Generator().manual_seed(9)
    weights = [torch.randn(n, 200, generator=gen) * 0.05 for n in (33, 17, 64)]
    scale = torch.rand(200, generator=gen) + 0.5
    h = x.t() @ x
    together = compensated_rounding_shared(weights, h, 4, 40, zero_point, input_scale=scale)
    for w, result in zip(weights, together, strict=True):
        assert result.shape == w.shape
        assert torch.equal(result, compensated_rounding(w, h, 4, 40, zero_point, input_scale=scale))


class _ThreeReaders(torch.nn.Module):
    """a and b read the block input; c reads it in micro-batch 0 and another tensor after."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = (torch.nn.Linear(16, 8, bias=False) for _ in range(3))

    def forward(self, x: torch.Tensor, other: bool) -> torch.Tensor:
        return self.a(x) + self.b(x) + self.c(x * 2.0 if other else x)


def test_linears_that_read_one_input_share_one_hessian_and_part_when_they_stop() -> None:
    """The recorder keeps one X^T X for linears reading the same tensor (the same object), and
    gives a linear that later reads another input its own, each equal to its inputs' X^T X."""
    torch.manual_seed(0)
    block = _ThreeReaders()
    xs = [torch.randn(2, 5, 16) for _ in range(3)]
    inputs = BlockInputs(hidden_states=xs, kwargs=[{"other": m > 0} for m in range(3)])
    plan = SamplePlan(search_rows=tuple(torch.arange(10) for _ in xs), clip_rows=None, search_batches=(0,))
    names = ["a", "b", "c"]
    recorded = InputRecorder(block, plan, [], [], hessian_names=names).run(inputs)
    assert recorded.hessian["a"] is recorded.hessian["b"]
    assert recorded.hessian["c"] is not recorded.hessian["a"]
    flat = [x.reshape(-1, 16) for x in xs]
    shared = sum(f.t() @ f for f in flat)
    parted = flat[0].t() @ flat[0] + sum((2 * f).t() @ (2 * f) for f in flat[1:])
    assert torch.allclose(recorded.hessian["a"], shared, rtol=1e-5)
    assert torch.allclose(recorded.hessian["c"], parted, rtol=1e-5)
    for h in recorded.hessian.values():  # summed as upper triangles, completed after the pass
        assert torch.equal(h, h.t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_x_t_x_by_upper_panels(monkeypatch, dtype) -> None:
    """Panels that do not divide the width and chunks that do not divide the rows: ``upper``
    adds the upper triangle right and leaves what lies below the panels' diagonal blocks as it
    was; the default completes it, symmetric bit for bit and the product to the dtype's accuracy."""
    from awq_plugin.calibration import capture
    from awq_plugin.numerics.dense import symmetrize_upper_

    monkeypatch.setattr(capture, "HESSIAN_PANEL", 48)
    monkeypatch.setattr(capture, "HESSIAN_CHUNK_ROWS", 70)
    x = torch.randn(150, 200, generator=torch.Generator().manual_seed(1))
    exact = (x.double().t() @ x.double()).float()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    start = torch.full((200, 200), 7.0)
    upper = input_hessian(x, dtype, out=start.clone(), upper=True)
    block = torch.arange(200) // 48
    below = block[:, None] > block[None, :]
    assert torch.equal(upper[below], start[below])  # below the diagonal blocks: untouched
    assert torch.allclose(upper.triu(), (exact + 7.0).triu(), rtol=tolerance, atol=tolerance * 150)
    full = input_hessian(x, dtype)
    assert torch.equal(full, full.t())
    assert float((full - exact).norm() / exact.norm()) < tolerance
    m = torch.randn(101, 101)
    assert torch.equal(symmetrize_upper_(m.clone(), 32), m.triu() + m.triu(1).t())


def test_rows_permute_in_place_along_the_cycles() -> None:
    gen = torch.Generator().manual_seed(4)
    t = torch.randn(9, 5, generator=gen)
    order = torch.tensor([3, 0, 6, 1, 2, 5, 8, 4, 7])  # a 6-cycle, a fixed point, a 2-cycle
    expected = t[order]
    assert permute_rows_(t, order) is t and torch.equal(t, expected)
    permute_rows_(t, torch.argsort(order))
    assert torch.equal(t[order], expected)  # and back
    with pytest.raises(ValueError, match="not a permutation of 9 rows"):
        permute_rows_(t, torch.tensor([0, 0, 1, 2, 3, 4, 5, 6, 7]))
    h = torch.randn(70, 70, generator=gen)
    o = torch.randperm(70, generator=gen)
    assert torch.equal(_permuted_copy(h, o, slab=16), h[o][:, o])


def test_act_order_puts_the_loudest_inputs_first() -> None:
    h = torch.diag(torch.tensor([1.0, 9.0, 4.0, 9.0, 0.0]))
    assert activation_order(h).tolist() == [1, 3, 2, 0, 4]  # ties in index order
    # of the scaled inputs: x / s has second moment diag(H) / s^2
    assert activation_order(h, torch.tensor([1.0, 3.0, 1.0, 1.0, 1.0])).tolist() == [3, 2, 0, 1, 4]


@pytest.mark.parametrize(("n", "k", "group", "zero_point"), SHAPES)
def test_act_order_keeps_the_grid_and_lowers_the_error_further(n, k, group, zero_point) -> None:
    """The loud inputs moved to random columns: walked first, their rounding errors reach every
    other column, and the layer's output error drops below the index-order walk's, on the same
    grid (static groups: each column keeps its own group's scale and zero point)."""
    w, x = _case(n, k, seed=5)
    x = x[:, torch.randperm(k, generator=torch.Generator().manual_seed(6))]
    h = x.t() @ x
    ordered = compensated_rounding(w, h, 4, group, zero_point, act_order=True)
    assert torch.equal(fake_quantize(ordered, 4, group, zero_point), ordered)
    expected = compute_scales_zeros(w, 4, group, zero_point)
    got = compute_scales_zeros(ordered, 4, group, zero_point)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    in_index_order = _output_error(x, w, compensated_rounding(w, h, 4, group, zero_point))
    assert _output_error(x, w, ordered) < 0.9 * in_index_order


@pytest.mark.parametrize("zero_point", [True, False])
def test_act_order_on_inputs_already_in_that_order_is_the_plain_walk(zero_point) -> None:
    """A diagonal already decreasing: the permuted factor and walk are the plain ones bit for bit
    (the permutation code moves values and never computes with them), scaled inputs included."""
    w, x = _case(24, 200, seed=7)
    scale = torch.rand(200, generator=torch.Generator().manual_seed(8)) + 0.5
    loudness = (x / scale).square().sum(0)
    order = torch.argsort(loudness, descending=True)
    x, scale, w = x[:, order], scale[order], w[:, order]
    h = x.t() @ x
    assert torch.equal(activation_order(h, scale), torch.arange(200))
    plain = compensated_rounding(w, h, 4, 40, zero_point, input_scale=scale)
    assert torch.equal(
        compensated_rounding(w, h, 4, 40, zero_point, input_scale=scale, act_order=True), plain
    )


def test_the_act_order_option_is_checked_and_reaches_every_front_end() -> None:
    from awq_plugin.cli import _awq_options, build_parser
    from awq_plugin.integrations.transformers import AwqConfig
    from awq_plugin.pipeline.cache import QuantizeRequest

    with pytest.raises(ConfigError, match="act_order must be True, False or 'auto'"):
        AwqOptions(act_order="yes")
    assert AwqOptions(act_order="auto").act_order == "auto"
    assert AwqOptions.from_dict({"act_order": True}).act_order is True
    default = AwqOptions().act_order
    parser = build_parser()
    for flag, value in (([], default), (["--act-order", "on"], True), (["--act-order", "off"], False)):
        assert _awq_options(parser.parse_args(["quantize", "src", "out", *flag])).act_order == value
    assert _awq_options(parser.parse_args(["quantize", "--act-order", "auto", "s", "o"])).act_order == "auto"
    assert AwqConfig(act_order=not default).awq_options().act_order is (not default)
    assert QuantizeRequest.from_dict({"act_order": not default}).options["act_order"] is (not default)


def test_the_block_step_walks_in_act_order_when_asked(toy, monkeypatch) -> None:
    """The option reaches the walk: the block step's compensation asks for act-order exactly
    when the options do, and what it keeps is on the grid."""
    from awq_plugin.algorithm import block as block_module

    model, resolved, captured = toy
    asked = []
    walk = block_module.compensated_rounding_shared

    def spy(*args, **kwargs):
        asked.append(kwargs["act_order"])
        return walk(*args, **kwargs)

    monkeypatch.setattr(block_module, "compensated_rounding_shared", spy)
    for act_order in (False, True):
        options = AwqOptions(**{**HELD_OUT.to_dict(), "rounding": "compensated", "act_order": act_order})
        block = copy.deepcopy(model.model.layers[0])
        result = run_awq_block(block, resolved.block(0), captured.for_layer(0), QUANT, options)
        assert asked and set(asked) == {act_order}
        asked.clear()
        if result.rounding == "compensated":
            for name in resolved.block(0).linears:
                weight = block.get_submodule(name).weight.float()
                assert torch.equal(fake_quantize(weight, 4, QUANT.group_size), weight), name


def test_the_block_step_refines_every_walk_when_asked(toy, monkeypatch) -> None:
    """The option reaches every walk of the block step (true-sequential runs included), and
    what the block keeps is on the grid."""
    from awq_plugin.algorithm import block as block_module

    model, resolved, captured = toy
    asked = []
    walk = block_module.compensated_rounding_shared

    def spy(*args, **kwargs):
        asked.append(kwargs["refine_passes"])
        return walk(*args, **kwargs)

    monkeypatch.setattr(block_module, "compensated_rounding_shared", spy)
    for passes in (0, 2):
        options = AwqOptions(**{**HELD_OUT.to_dict(), "rounding": "compensated", "refine_passes": passes})
        block = copy.deepcopy(model.model.layers[0])
        result = run_awq_block(block, resolved.block(0), captured.for_layer(0), QUANT, options)
        assert len(asked) == 4 and set(asked) == {passes}  # q/k/v, o_proj, gate/up, down_proj
        asked.clear()
        if result.rounding == "compensated":
            for name in resolved.block(0).linears:
                weight = block.get_submodule(name).weight.float()
                assert torch.equal(fake_quantize(weight, 4, QUANT.group_size), weight), name


@pytest.mark.parametrize("handicap", ["index", "activation"])
def test_auto_order_keeps_the_walk_the_held_out_error_prefers_bit_for_bit(toy, monkeypatch, handicap):
    """``act_order="auto"`` walks both orders and keeps the one with the lower held-out error,
    the block ending bit for bit as the run with that order alone. The judge is handicapped
    against one order so that each outcome is reached, the index walk's (held as levels while
    the second walk runs, then put back) included."""
    from awq_plugin.algorithm import block as block_module

    model, resolved, captured = toy
    plain = {}
    for act_order in (False, True):
        options = AwqOptions(**{**HELD_OUT.to_dict(), "rounding": "compensated", "act_order": act_order})
        block = copy.deepcopy(model.model.layers[0])
        plain[act_order] = (
            run_awq_block(block, resolved.block(0), captured.for_layer(0), QUANT, options),
            block,
        )
    last_walk = []
    walk = block_module.compensated_rounding_shared

    def spy(*args, **kwargs):
        last_walk[:] = [kwargs["act_order"]]
        return walk(*args, **kwargs)

    error = block_module._HeldOutJudge.error

    def judged(self):
        handicapped = bool(last_walk) and last_walk[0] == (handicap == "activation")
        return error(self) + (1.0 if handicapped else 0.0)

    monkeypatch.setattr(block_module, "compensated_rounding_shared", spy)
    monkeypatch.setattr(block_module._HeldOutJudge, "error", judged)
    options = AwqOptions(**{**HELD_OUT.to_dict(), "rounding": "compensated", "act_order": "auto"})
    block = copy.deepcopy(model.model.layers[0])
    result = run_awq_block(block, resolved.block(0), captured.for_layer(0), QUANT, options)
    winner = handicap == "index"  # the order not handicapped
    expected, expected_block = plain[winner]
    assert expected.rounding.startswith("compensated"), "the toy block must keep compensation"
    assert result.rounding == expected.rounding and result.mse_awq == expected.mse_awq
    for name, tensor in expected_block.state_dict().items():
        assert torch.equal(block.state_dict()[name], tensor), name


@pytest.mark.parametrize("act_order", [False, True])
def test_a_consumed_hessian_gives_the_same_rounding_and_holds_the_factor(act_order) -> None:
    """Factoring in the caller's X^T X (reordered in place) instead of a copy: bit for bit the
    same weights, scaled inputs included; the matrix is spent afterwards."""
    w, x = _case(24, 200, seed=10)
    scale = torch.rand(200, generator=torch.Generator().manual_seed(11)) + 0.5
    h = x.t() @ x
    kept = compensated_rounding(w, h.clone(), 4, 40, True, input_scale=scale, act_order=act_order)
    spent = h.clone()
    got = compensated_rounding(
        w, spent, 4, 40, True, input_scale=scale, act_order=act_order, consume_hessian=True
    )
    assert torch.equal(got, kept)
    assert not torch.equal(spent, h) and torch.equal(spent, spent.tril())  # now the factor


def test_a_consumed_hessian_that_cannot_be_factored_raises_before_any_weight_moves() -> None:
    w, _ = _case(8, 64, seed=12)
    before = w.clone()
    with pytest.raises(NotPositiveDefinite, match="not positive definite"):
        compensated_rounding(w, -torch.eye(64), 4, 32, True, consume_hessian=True)
    assert torch.equal(w, before)
    # a copy can be damped further and retried: -I never factors, so the copy path raises too
    with pytest.raises(NotPositiveDefinite):
        compensated_rounding(w, -torch.eye(64), 4, 32, True)


def test_the_block_step_factors_each_x_t_x_in_place_on_its_last_walk(toy, monkeypatch) -> None:
    """q/k/v share one X^T X, gate/up another: each is consumed by its one walk (its last),
    and the block ends bit for bit as it does when every walk factors a copy."""
    from awq_plugin.algorithm import block as block_module

    model, resolved, captured = toy
    seen = []
    walk = block_module.compensated_rounding_shared

    def copying(weights, hessian, *args, **kwargs):
        return walk(weights, hessian, *args, **{**kwargs, "consume_hessian": False})

    def spy(weights, hessian, *args, **kwargs):
        seen.append((len(weights), kwargs["consume_hessian"]))
        return walk(weights, hessian, *args, **kwargs)

    options = AwqOptions(**{**HELD_OUT.to_dict(), "rounding": "compensated"})
    reference = copy.deepcopy(model.model.layers[0])
    monkeypatch.setattr(block_module, "compensated_rounding_shared", copying)
    expected = run_awq_block(reference, resolved.block(0), captured.for_layer(0), QUANT, options)
    monkeypatch.setattr(block_module, "compensated_rounding_shared", spy)
    block = copy.deepcopy(model.model.layers[0])
    result = run_awq_block(block, resolved.block(0), captured.for_layer(0), QUANT, options)
    assert all(consumed for _, consumed in seen) and sorted(n for n, _ in seen) == [1, 1, 2, 3]
    assert result.rounding == expected.rounding and result.mse_awq == expected.mse_awq
    for name, tensor in reference.state_dict().items():
        assert torch.equal(block.state_dict()[name], tensor), name
