"""True-sequential compensation: each run of linears after the first is fitted on its inputs as
the linears before it, already rounded, make them, and toward the inputs the target gives it.

The oracle is the block itself: once a step is done, the attention's linears stand as they were
when gate/up were recorded (gate/up do not feed themselves), so gate/up's ``x^T x`` must be that
of their inputs through the finished block, and their cross term ``(x_ref - x)^T x`` must pair
those with the full-precision block's inputs (divided by the searched input scales).
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_awq_algorithm import HELD_OUT, QUANT, calib_ids, make_outlier_llama

from awq_plugin.algorithm.awq import AwqOptions, run_awq
from awq_plugin.algorithm.block import _refit_runs, awq_block_step
from awq_plugin.calibration.capture import InputRecorder, capture_decoder_inputs, plan_samples
from awq_plugin.templates import resolve_template

BASE = {**HELD_OUT.to_dict(), "rounding": "compensated", "propagate": "quantized"}
SEQUENTIAL = AwqOptions(**{**BASE, "fit_to": "model", "sequential": True})


def _inputs_of(block, name, hidden, kwargs, batches):
    """``name``'s inputs, rows ``[n, K]``, over the micro-batches ``batches`` of ``hidden``."""
    seen = []
    handle = block.get_submodule(name).register_forward_pre_hook(
        lambda module, args: seen.append(args[0].reshape(-1, args[0].shape[-1]))
    )
    try:
        with torch.no_grad():
            for m in batches:
                block(hidden[m], **kwargs[m])
    finally:
        handle.remove()
    return torch.cat(seen)


def test_a_stopped_forward_records_what_a_whole_one_does() -> None:
    """``stop_after`` ends each forward at the last module it names (no outputs kept) with the
    same ``x^T x``; ``batches`` limits the micro-batches; ``keep_targets`` keeps the target
    stream's inputs (the reference forward's where one runs, else the block's own) outside the
    held-out micro-batches, and ``paired`` pairs them, divided by ``reference_scales``."""
    model = make_outlier_llama()
    block = model.model.layers[0]
    inputs = capture_decoder_inputs(model, model.model.layers, calib_ids(n=8), micro_batch_size=4).for_layer(
        0
    )
    plan = plan_samples(inputs.tokens_per_batch(), 64, None, 0)
    used = [m for m in range(2) if m not in plan.holdout_batches]
    names = ["self_attn.o_proj"]
    gen = torch.Generator().manual_seed(0)
    drifted = [h + 0.05 * torch.randn(h.shape, generator=gen) for h in inputs.hidden_states]
    scale = torch.rand(128, generator=gen) + 0.5
    whole = InputRecorder(block, plan, [], [], hessian_names=names).run(inputs)
    mlp = ["mlp.gate_proj", "mlp.up_proj"]
    own = InputRecorder(block, plan, [], [], keep_targets=[*names, *mlp]).run(inputs)
    x = _inputs_of(block, names[0], inputs.hidden_states, inputs.kwargs, used)
    assert sorted(own.target_inputs) == used
    assert all(own.target_inputs[m][mlp[0]] is own.target_inputs[m][mlp[1]] for m in used)  # one copy
    torch.testing.assert_close(torch.cat([own.target_inputs[m][names[0]] for m in used]), x)
    kept = InputRecorder(block, plan, [], [], keep_targets=names).run(inputs, drifted).target_inputs
    x_ref = _inputs_of(block, names[0], drifted, inputs.kwargs, used)
    torch.testing.assert_close(torch.cat([kept[m][names[0]] for m in used]), x_ref)
    stopped = InputRecorder(
        block, plan, [], [], hessian_names=names, stop_after=names, reference_scales={names[0]: scale}
    ).run(inputs, batches=used, paired=kept)
    assert stopped.outputs == [] and stopped.reference_outputs == []
    torch.testing.assert_close(stopped.hessian[names[0]], whole.hessian[names[0]])
    torch.testing.assert_close(stopped.cross[names[0]], (x_ref / scale - x).T @ x, rtol=1e-4, atol=1e-3)


def test_the_runs_after_the_first_group_are_refit_and_experts_are_not() -> None:
    from test_moe import make_moe_model

    from awq_plugin.algorithm.linears import quantized_linear_names
    from awq_plugin.models.experts import routed_experts_in

    model = make_outlier_llama()
    groups = resolve_template(model).block(0)
    names = quantized_linear_names(model.model.layers[0], groups, QUANT)
    assert _refit_runs(groups, names, {}) == [
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]
    moe = make_moe_model("qwen3_moe")
    groups = resolve_template(moe).block(0)
    block = moe.model.layers[0]
    runs = _refit_runs(
        groups, quantized_linear_names(block, groups, QUANT), routed_experts_in(block, groups.experts)
    )
    assert runs == [["self_attn.o_proj"]]


def test_each_run_is_fitted_on_its_inputs_through_the_rounded_linears_before_it(monkeypatch) -> None:
    """gate/up's and down_proj's walks get ``x^T x`` and ``(x_ref - x)^T x`` of the inputs the
    finished block gives them (q/k/v/o rounded as they ended), paired with the full-precision
    block's on the model's stream, divided by their searched input scales."""
    from awq_plugin.algorithm import block as block_module

    model = make_outlier_llama()
    resolved = resolve_template(model)
    captured = capture_decoder_inputs(model, model.model.layers, calib_ids(n=32), micro_batch_size=4)
    gen = torch.Generator().manual_seed(3)  # a model's stream, drifted from the block's inputs
    reference = [h + 0.02 * torch.randn(h.shape, generator=gen) for h in captured.hidden_states]
    inputs = captured.for_layer(0, captured.hidden_states, reference)
    block = model.model.layers[0]
    fp_block = copy.deepcopy(block)
    walk = block_module.compensated_rounding_shared
    given = []

    def spy(weights, hessian, *args, **kwargs):
        given.append((weights[0], hessian.clone(), kwargs.get("cross"), kwargs.get("input_scale")))
        return walk(weights, hessian, *args, **kwargs)

    monkeypatch.setattr(block_module, "compensated_rounding_shared", spy)
    result, _ = awq_block_step(block, resolved.block(0), inputs, QUANT, SEQUENTIAL)
    assert result.rounding == "compensated" and result.choice == "awq"
    by_name = {n: g for g in given for n, m in block.named_modules() if getattr(m, "weight", None) is g[0]}
    assert list(by_name) == ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]
    plan = plan_samples(inputs.tokens_per_batch(), SEQUENTIAL.search_tokens, None, SEQUENTIAL.seed)
    used = [m for m in range(len(inputs.hidden_states)) if m not in plan.holdout_batches]
    for name, group in (("mlp.gate_proj", 2), ("mlp.down_proj", 3)):
        _, hessian, cross, input_scale = by_name[name]
        assert input_scale is None  # recorded on the scaled block
        x = _inputs_of(block, name, inputs.hidden_states, inputs.kwargs, used)
        x_ref = _inputs_of(fp_block, name, inputs.reference, inputs.kwargs, used)
        x_ref = x_ref / result.groups[group].scales.float()
        tol = 1e-4 * float((x.T @ x).abs().max())
        torch.testing.assert_close(hessian, x.T @ x, rtol=1e-4, atol=tol)
        torch.testing.assert_close(cross, (x_ref - x).T @ x, rtol=1e-3, atol=tol)


def test_sequential_fits_the_held_out_blocks_better_than_one_recording() -> None:
    """On the toy model with an outlier channel the refit blocks' held-out errors against the
    full-precision model are lower than those of one recording pass (the same search)."""
    model = make_outlier_llama(layers=3)
    ids = calib_ids(n=32)
    errors = {}
    for sequential in (False, True):
        options = AwqOptions(**{**SEQUENTIAL.to_dict(), "sequential": sequential})
        results = run_awq(copy.deepcopy(model), QUANT, ids, options=options, progress=False)
        errors[sequential] = [b.mse_awq for b in results.blocks]
    assert errors[True][0] < 0.7 * errors[False][0]
    assert sum(errors[True]) < sum(errors[False])


@pytest.mark.parametrize("fit_to", ["block", "model"])
def test_an_moe_block_keeps_its_expert_counts_and_pairs_only_dense_linears(fit_to, monkeypatch) -> None:
    from test_moe import make_moe_model

    from awq_plugin.algorithm import block as block_module
    from awq_plugin.models.experts import routed_experts_in

    model = make_moe_model("qwen3_moe")
    resolved = resolve_template(model)
    ids = torch.randint(0, 257, (16, 32), generator=torch.Generator().manual_seed(1))
    inputs = capture_decoder_inputs(model, model.model.layers, ids, micro_batch_size=2).for_layer(0)
    block = model.model.layers[0]
    experts = routed_experts_in(block, resolved.block(0).experts)
    record = block_module._Refitter.record
    counts = []

    def spy(self, run, before, scale, consume=True):
        out = record(self, run, before, scale, consume)
        counts.append([list(r.token_counts) for r in experts.values()])
        return out

    monkeypatch.setattr(block_module._Refitter, "record", spy)
    options = AwqOptions(**{**SEQUENTIAL.to_dict(), "fit_to": fit_to})
    awq_block_step(block, resolved.block(0), inputs, QUANT, options)
    assert counts and all(c == counts[0] for c in counts) and sum(counts[0][0]) > 0


def test_the_sequential_option_is_checked_and_reaches_every_front_end() -> None:
    from awq_plugin.cli import _awq_options, build_parser
    from awq_plugin.errors import ConfigError
    from awq_plugin.integrations.transformers import AwqConfig
    from awq_plugin.pipeline.cache import QuantizeRequest

    with pytest.raises(ConfigError, match="sequential must be True or False"):
        AwqOptions(sequential="yes")
    default = AwqOptions().sequential
    parser = build_parser()
    for flag, value in (([], default), (["--sequential", "on"], True), (["--sequential", "off"], False)):
        assert _awq_options(parser.parse_args(["quantize", "src", "out", *flag])).sequential is value
    assert AwqConfig(sequential=not default).awq_options().sequential is (not default)
    assert QuantizeRequest.from_dict({"sequential": not default}).options["sequential"] is (not default)


@pytest.mark.parametrize("model_type", ["gemma3_text", "gpt_neox", "opt", "phi3"])
def test_other_block_layouts_pair_every_refit_run_and_free_the_kept_inputs(model_type, monkeypatch) -> None:
    """Sandwich norms (Gemma 3), a parallel residual (GPT-NeoX), fc1/fc2 (OPT), a fused
    gate_up (Phi-3): each refit run's walk gets a cross term against the kept target inputs,
    and none of those inputs is left once the block is done."""
    from awq_plugin.algorithm import block as block_module
    from awq_plugin.tools.bench_architectures import build_tiny_model

    model = build_tiny_model(model_type, "causal-lm").float().eval()
    resolved = resolve_template(model)
    layers = model.get_submodule(resolved.decoder_layers)
    ids = torch.randint(1, 400, (32, 16), generator=torch.Generator().manual_seed(0))
    inputs = capture_decoder_inputs(model, layers, ids, micro_batch_size=4).for_layer(0)
    kept, crosses = [], {}
    refitter, walk = block_module._Refitter.__init__, block_module.compensated_rounding_shared

    def keep(self, runs, block, inputs, targets, *args, **kwargs):
        kept.append((runs, targets))
        refitter(self, runs, block, inputs, targets, *args, **kwargs)

    def spy(weights, hessian, *args, **kwargs):
        crosses[id(weights[0])] = kwargs.get("cross")
        return walk(weights, hessian, *args, **kwargs)

    monkeypatch.setattr(block_module._Refitter, "__init__", keep)
    monkeypatch.setattr(block_module, "compensated_rounding_shared", spy)
    block = layers[0]
    awq_block_step(block, resolved.block(0), inputs, QUANT, SEQUENTIAL)
    ((runs, targets),) = kept
    assert runs and targets and all(not by_name for by_name in targets.values())
    for run in runs:
        cross = crosses[id(block.get_submodule(run[0]).weight)]
        assert cross is not None and float(cross.abs().sum()) > 0, run
