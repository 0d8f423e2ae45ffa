"""Asymmetric calibration: compensation fits the full-precision model's outputs, not the block's.

The oracle is plain least squares: walking toward ``X_ref W^T`` from inputs ``X`` is walking the
weights ``W + W (X_ref - X)^T X H^-1`` with the damped ``H = X^T X``, so the move the walk makes
first is checked against a dense solve, and the recorded cross term against the product of the
inputs the hooks saw. The pipeline carries the full-precision stream beside the quantized one.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_awq_algorithm import HELD_OUT, QUANT, calib_ids, make_outlier_llama

from awq_plugin.algorithm.awq import AwqOptions, run_awq, run_awq_block
from awq_plugin.algorithm.block import awq_block_step
from awq_plugin.algorithm.compensate import (
    DAMPING,
    _asymmetric_shift,
    _reversed_inverse_factor,
    activation_order,
    compensated_rounding,
)
from awq_plugin.calibration.capture import (
    InputRecorder,
    capture_decoder_inputs,
    cross_product,
    first_output,
    plan_samples,
)
from awq_plugin.errors import ConfigError
from awq_plugin.numerics.quant_ref import fake_quantize
from awq_plugin.templates import resolve_template

# The one-recording walk (sequential off), which these tests are about; tests/test_sequential.py
# covers the runs recorded again before their walk.
ASYMMETRIC = AwqOptions(
    **{
        **HELD_OUT.to_dict(),
        "rounding": "compensated",
        "propagate": "quantized",
        "fit_to": "model",
        "sequential": False,
    }
)
SYMMETRIC = AwqOptions(**{**ASYMMETRIC.to_dict(), "fit_to": "block"})


def _drifted(t: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference inputs ``[t, k]`` and a systematic drift of them (a fixed linear distortion, as
    an upstream quantization error is a fixed function of the tokens): ``(x, x_ref)``."""
    gen = torch.Generator().manual_seed(seed)
    mix = 0.3 * torch.randn(k, k, generator=torch.Generator().manual_seed(99))
    x_ref = torch.randn(t, k, generator=gen) @ mix + torch.randn(
        k, generator=torch.Generator().manual_seed(98)
    )
    distortion = torch.eye(k) + 0.05 * torch.randn(k, k, generator=torch.Generator().manual_seed(97))
    return x_ref @ distortion, x_ref


@pytest.mark.parametrize("ordered", [False, True])
@pytest.mark.parametrize("scaled", [False, True])
def test_the_walks_first_move_is_the_damped_least_squares_fit(ordered, scaled) -> None:
    k, n = 96, 20
    x, x_ref = _drifted(400, k, seed=0)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1))
    s = torch.rand(k, generator=torch.Generator().manual_seed(2)) + 0.5 if scaled else None
    hessian, cross = x.T @ x, (x_ref - x).T @ x
    order = activation_order(hessian, s) if ordered else None
    m = _reversed_inverse_factor(hessian, DAMPING, s, order)
    wt = w.t().contiguous() if order is None else w.t()[order].contiguous()
    shift = _asymmetric_shift(wt, cross, s, m, order)
    inv = torch.ones(k) if s is None else 1.0 / s
    h_s, cross_s = hessian * inv[:, None] * inv[None, :], cross * inv[:, None] * inv[None, :]
    damped = h_s + DAMPING * h_s.diagonal().mean() * torch.eye(k)
    expected = torch.linalg.solve(damped, cross_s.T @ w.t())  # (W cross H^-1)^T
    expected = expected if order is None else expected[order]
    torch.testing.assert_close(shift, expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()))


def test_a_zero_cross_term_is_the_symmetric_walk_bit_for_bit() -> None:
    x, _ = _drifted(512, 128, seed=3)
    w = 0.05 * torch.randn(24, 128, generator=torch.Generator().manual_seed(4))
    hessian = x.T @ x
    plain = compensated_rounding(w, hessian, 4, 32)
    zero = compensated_rounding(w, hessian, 4, 32, cross=torch.zeros(128, 128))
    assert torch.equal(plain, zero)


@pytest.mark.parametrize("zero_point", [True, False])
def test_asymmetric_rounding_fits_the_reference_outputs_better_on_unseen_tokens(zero_point) -> None:
    """Against a systematic drift, the asymmetric walk lands closer to the full-precision outputs
    than the symmetric one, on tokens neither saw, and its weights sit on the reference grid."""
    k, n, group = 128, 48, 32
    x, x_ref = _drifted(4096, k, seed=5)
    x_new, x_ref_new = _drifted(4096, k, seed=6)
    w = 0.05 * torch.randn(n, k, generator=torch.Generator().manual_seed(7))
    hessian, cross = x.T @ x, (x_ref - x).T @ x

    def error(q: torch.Tensor) -> float:
        return float(((x_ref_new @ w.T - x_new @ q.T) ** 2).mean())

    symmetric = compensated_rounding(w, hessian, 4, group, zero_point).contiguous()
    asymmetric = compensated_rounding(w, hessian, 4, group, zero_point, cross=cross).contiguous()
    assert torch.equal(fake_quantize(asymmetric, 4, group, zero_point), asymmetric)
    assert error(asymmetric) < 0.8 * error(symmetric)


def test_the_recorder_pairs_each_linears_inputs_from_both_streams() -> None:
    """``cross`` is ``(x_ref - x)^T x`` of the inputs each linear got on the reference hidden
    states and on the block's own, summed outside the held-out micro-batch; linears reading one
    tensor share it as they share ``x^T x``; the reference outputs are the block's on them."""
    model = make_outlier_llama()
    block = model.model.layers[0]
    captured = capture_decoder_inputs(model, model.model.layers, calib_ids(n=8), micro_batch_size=4)
    inputs = captured.for_layer(0)
    gen = torch.Generator().manual_seed(0)
    reference = [h + 0.05 * torch.randn(h.shape, generator=gen) for h in inputs.hidden_states]
    names = ["self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"]
    plan = plan_samples(inputs.tokens_per_batch(), 64, None, 0)
    (held,) = plan.holdout_batches
    used = 1 - held
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def spy(name):
        def hook(module, args):
            seen[name].append(args[0].reshape(-1, args[0].shape[-1]))

        return hook

    recorder = InputRecorder(block, plan, [], [], hessian_names=names)
    with torch.no_grad():
        recorded = recorder.run(inputs, reference)
        handles = [block.get_submodule(n).register_forward_pre_hook(spy(n)) for n in names]
        try:  # the same order as the recorder: reference, then own, per micro-batch
            for m in range(2):
                block(reference[m], **inputs.kwargs[m])
                block(inputs.hidden_states[m], **inputs.kwargs[m])
        finally:
            for handle in handles:
                handle.remove()
        expected_out = [first_output(block(reference[m], **inputs.kwargs[m])) for m in range(2)]
    for name in names:
        x_ref, x = seen[name][2 * used], seen[name][2 * used + 1]  # the micro-batch not held out
        torch.testing.assert_close(recorded.cross[name], (x_ref - x).T @ x, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(recorded.hessian[name], x.T @ x, rtol=1e-5, atol=1e-3)
    assert recorded.cross["self_attn.q_proj"] is recorded.cross["self_attn.k_proj"]
    for got, want in zip(recorded.reference_outputs, expected_out):
        torch.testing.assert_close(got, want)


def test_cross_product_in_chunks_and_in_bf16() -> None:
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(5000, 64, generator=gen)
    x_ref = x + 0.1 * torch.randn(5000, 64, generator=gen)
    exact = (x_ref - x).double().T @ x.double()
    torch.testing.assert_close(cross_product(x_ref, x).double(), exact, rtol=1e-4, atol=1e-3)
    low = cross_product(x_ref, x, torch.bfloat16).double()
    assert float((low - exact).norm() / exact.norm()) < 1e-2


def test_block_zero_has_one_stream_and_is_the_symmetric_step_bit_for_bit() -> None:
    """Before any block is quantized the two streams are one: the first block's result and
    weights equal the symmetric run's, and it hands the next block both streams."""
    model = make_outlier_llama()
    resolved = resolve_template(model)
    captured = capture_decoder_inputs(model, model.model.layers, calib_ids(n=32), micro_batch_size=4)
    a, b = copy.deepcopy(model.model.layers[0]), copy.deepcopy(model.model.layers[0])
    result_a, next_a = awq_block_step(a, resolved.block(0), captured.for_layer(0), QUANT, ASYMMETRIC)
    result_b, next_b = awq_block_step(b, resolved.block(0), captured.for_layer(0), QUANT, SYMMETRIC)
    assert result_a.mse_awq == result_b.mse_awq and result_a.rounding == result_b.rounding
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert next_b.reference is None
    for h_a, h_b in zip(next_a.hidden_states, next_b.hidden_states):
        assert torch.equal(h_a, h_b)
    with torch.no_grad():  # the reference stream: block 0 in full precision
        layer = model.model.layers[0]
        fp = [first_output(layer(h, **kw)) for h, kw in zip(captured.hidden_states, captured.layer_kwargs[0])]
    for got, want in zip(next_a.reference, fp):
        torch.testing.assert_close(got, want)


def test_later_blocks_are_judged_against_the_full_precision_model() -> None:
    """From block 1 on, the held-out error is measured against the full-precision model's own
    outputs: rounding's error then includes what the quantized blocks before it changed, so it
    is larger than the symmetric run's, and a run over the model keeps every block on the grid."""
    model = make_outlier_llama(layers=3)
    ids = calib_ids(n=32)
    runs = {}
    for options in (SYMMETRIC, ASYMMETRIC):
        work = copy.deepcopy(model)
        results = run_awq(work, QUANT, ids, options=options, progress=False)
        runs[options.fit_to] = results.blocks
        for i, block in enumerate(work.model.layers):
            if results.blocks[i].rounding != "compensated":
                continue
            for name in resolve_template(work).block(i).linears:
                weight = block.get_submodule(name).weight.float()
                assert torch.equal(fake_quantize(weight, 4, QUANT.group_size), weight), name
    assert runs["model"][0].mse_rtn == runs["block"][0].mse_rtn
    for later_a, later_s in zip(runs["model"][1:], runs["block"][1:]):
        assert later_a.mse_rtn > later_s.mse_rtn


def test_the_fit_to_option_is_checked_and_reaches_every_front_end() -> None:
    from awq_plugin.cli import _awq_options, build_parser
    from awq_plugin.integrations.transformers import AwqConfig
    from awq_plugin.pipeline.cache import QuantizeRequest

    with pytest.raises(ConfigError, match="fit_to must be one of"):
        AwqOptions(fit_to="layer")
    assert AwqOptions.from_dict({"fit_to": "model"}).fit_to == "model"
    default = AwqOptions().fit_to
    other = "model" if default == "block" else "block"
    parser = build_parser()
    for flag, value in (([], default), (["--fit-to", other], other)):
        assert _awq_options(parser.parse_args(["quantize", "src", "out", *flag])).fit_to == value
    assert AwqConfig(fit_to=other).awq_options().fit_to == other
    assert QuantizeRequest.from_dict({"fit_to": other}).options["fit_to"] == other


def test_a_run_without_a_reference_stream_still_runs_one_block() -> None:
    """A caller that runs one block by hand (no reference hidden states) gets the symmetric
    step: asymmetric calibration needs the stream the drivers carry."""
    model = make_outlier_llama()
    resolved = resolve_template(model)
    captured = capture_decoder_inputs(model, model.model.layers, calib_ids(n=32), micro_batch_size=4)
    a, b = copy.deepcopy(model.model.layers[1]), copy.deepcopy(model.model.layers[1])
    result_a = run_awq_block(a, resolved.block(1), captured.for_layer(1), QUANT, ASYMMETRIC)
    result_b = run_awq_block(b, resolved.block(1), captured.for_layer(1), QUANT, SYMMETRIC)
    assert result_a.mse_awq == result_b.mse_awq


def test_only_the_linears_reading_the_block_input_fit_the_model(monkeypatch) -> None:
    """The linears after others in the block (o_proj, gate/up, down_proj) had their inputs
    recorded with the full-precision linears before them: they keep the symmetric fit, and
    those of the first scaling group (q/k/v) get the cross term."""
    from awq_plugin.algorithm import block as block_module

    model = make_outlier_llama()
    resolved = resolve_template(model)
    captured = capture_decoder_inputs(model, model.model.layers, calib_ids(n=32), micro_batch_size=4)
    walk = block_module.compensated_rounding_shared
    crossed = {}

    def spy(weights, *args, **kwargs):
        names = [
            n for n, m in model.model.layers[1].named_modules() if getattr(m, "weight", None) is weights[0]
        ]
        crossed[names[0] if names else len(crossed)] = kwargs.get("cross") is not None
        return walk(weights, *args, **kwargs)

    _, next_inputs = awq_block_step(
        copy.deepcopy(model.model.layers[0]), resolved.block(0), captured.for_layer(0), QUANT, ASYMMETRIC
    )
    monkeypatch.setattr(block_module, "compensated_rounding_shared", spy)
    inputs = captured.for_layer(1, next_inputs.hidden_states, next_inputs.reference)
    awq_block_step(model.model.layers[1], resolved.block(1), inputs, QUANT, ASYMMETRIC)
    assert crossed == {
        "self_attn.q_proj": True,
        "self_attn.o_proj": False,
        "mlp.gate_proj": False,
        "mlp.down_proj": False,
    }


def test_an_moe_block_pairs_its_attention_and_counts_only_its_own_routing() -> None:
    """In an MoE block the experts see other tokens in the two streams: they get no cross term,
    and the reference forward's routing does not add to the experts' token counts (which pick
    the under-used experts for the all-tokens fallback); the attention's linears are paired."""
    from test_moe import make_moe_model

    from awq_plugin.models.experts import routed_experts_in, row_positions_lookup

    model = make_moe_model("qwen3_moe")
    resolved = resolve_template(model)
    ids = torch.randint(0, 257, (8, 32), generator=torch.Generator().manual_seed(1))
    inputs = capture_decoder_inputs(model, model.model.layers, ids, micro_batch_size=2).for_layer(0)
    block = model.model.layers[0]
    experts = routed_experts_in(block, resolved.block(0).experts)
    gen = torch.Generator().manual_seed(2)
    reference = [h + 0.3 * torch.randn(h.shape, generator=gen) for h in inputs.hidden_states]
    plan = plan_samples(inputs.tokens_per_batch(), 64, None, 0)
    names = ["self_attn.q_proj", "mlp.experts.0.down_proj", "mlp.experts.1.down_proj"]
    counts = {}
    for label, ref in (("one stream", None), ("two streams", reference)):
        for routed in experts.values():
            routed.reset_token_counts()
        recorder = InputRecorder(
            block,
            plan,
            [],
            [],
            hessian_names=names,
            row_positions=row_positions_lookup(experts),
            uncounted=list(experts.values()),
        )
        with torch.no_grad():
            recorded = recorder.run(inputs, ref)
        counts[label] = [list(r.token_counts) for r in experts.values()]
    assert counts["one stream"] == counts["two streams"] and sum(counts["one stream"][0]) > 0
    assert set(recorded.cross) == {"self_attn.q_proj"}
    assert set(recorded.hessian) >= set(names)


def test_with_full_precision_inputs_the_model_and_the_block_are_one(monkeypatch) -> None:
    """Under ``propagate="fp"`` each block's inputs are the full-precision model's: fitting the
    model is fitting the block, with no second stream and the same bytes."""
    real, streams = InputRecorder.run, []

    def spy(self, inputs, reference=None):
        streams.append(reference is not None)
        return real(self, inputs, reference)

    monkeypatch.setattr(InputRecorder, "run", spy)
    model = make_outlier_llama(layers=3)
    ids = calib_ids(n=32)
    weights = {}
    for fit_to in ("model", "block"):
        options = AwqOptions(**{**ASYMMETRIC.to_dict(), "propagate": "fp", "fit_to": fit_to})
        work = copy.deepcopy(model)
        run_awq(work, QUANT, ids, options=options, progress=False)
        weights[fit_to] = work.state_dict()
    assert streams and not any(streams)
    for name, value in weights["model"].items():
        assert torch.equal(value, weights["block"][name]), name
