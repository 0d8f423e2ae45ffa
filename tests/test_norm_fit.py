"""Refitting a norm to the rounded linears it feeds (``fit_norms``).

The oracle for the closed form is a dense least-squares solve over explicit calibration rows:
``min_d ||X_ref W^T - X diag(d) Q^T||^2`` is an ordinary least-squares problem in ``d`` once
each output is written as a linear function of it. The block-level tests check that the
refit changes only the norms that feed rounded runs, keeps the block's outputs where the
weights were not rounded, and is judged and undone with the walk.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from test_awq_algorithm import HELD_OUT, QUANT, calib_ids, make_outlier_llama
from torch import nn

from awq_plugin.algorithm.awq import AwqOptions
from awq_plugin.algorithm.block import BlockForwards, _HeldOutJudge, awq_block_step
from awq_plugin.algorithm.linears import quantized_linear_names
from awq_plugin.algorithm.norm_fit import NormRefit, fit_channel_factors
from awq_plugin.calibration.capture import capture_decoder_inputs, first_output, plan_samples
from awq_plugin.numerics.quant_ref import fake_quantize
from awq_plugin.templates import resolve_template


def _toy(k: int = 48, n: int = (40, 24), tokens: int = 600, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=gen) * (torch.rand(k, generator=gen) * 3 + 0.2)
    x_ref = x + 0.1 * torch.randn(tokens, k, generator=gen) + 0.05
    weights = [torch.randn(rows, k, generator=gen) * 0.1 for rows in n]
    rounded = [fake_quantize(w, 4, 16, True) for w in weights]
    return x, x_ref, weights, rounded


def _dense_least_squares(x, x_ref, weights, rounded, ridge):
    """``d`` from explicit rows: output (t, o) of linear l is ``sum_i x[t, i] q[o, i] d_i``."""
    design = torch.cat([(x[:, None, :] * q[None]).reshape(-1, x.shape[1]) for q in rounded]).double()
    target = torch.cat([(x_ref @ w.T).reshape(-1) for w in weights]).double()
    m = design.T @ design
    damp = ridge * m.diagonal().mean()
    system = m + damp * torch.eye(m.shape[0], dtype=m.dtype)
    return torch.linalg.solve(system, design.T @ target + damp).float(), design, target


def test_the_closed_form_is_the_least_squares_fit_of_the_target() -> None:
    x, x_ref, weights, rounded = _toy()
    ridge = 1e-3
    for paired in (False, True):
        target_x = x_ref if paired else x
        cross = (x_ref - x).T @ x if paired else None
        d, share = fit_channel_factors(x.T @ x, rounded, weights, cross, ridge=ridge)
        expected, design, target = _dense_least_squares(x, target_x, weights, rounded, ridge)
        torch.testing.assert_close(d, expected, rtol=2e-3, atol=2e-4)
        before = ((design.sum(1) - target) ** 2).sum()  # d = 1
        after = ((design @ d.double() - target) ** 2).sum()
        assert after < before
        rounding = sum(float(((x @ (w - q).T) ** 2).sum()) for w, q in zip(weights, rounded))
        torch.testing.assert_close(share, float(before - after) / rounding, rtol=1e-2, atol=1e-4)


def test_input_scales_divide_the_recorded_second_moments() -> None:
    """Recorded before an AWQ fold (inputs divided by ``s`` since), they are scaled here."""
    x, x_ref, weights, rounded = _toy(seed=1)
    s = torch.rand(x.shape[1], generator=torch.Generator().manual_seed(2)) + 0.5
    cross = (x_ref - x).T @ x
    d_scaled, _ = fit_channel_factors(x.T @ x, rounded, weights, cross, input_scale=s)
    xs, xs_ref = x / s, x_ref / s
    d_direct, _ = fit_channel_factors(xs.T @ xs, rounded, weights, (xs_ref - xs).T @ xs)
    torch.testing.assert_close(d_scaled, d_direct, rtol=1e-4, atol=1e-5)


def test_nothing_to_gain_returns_none() -> None:
    """Unrounded weights on their own inputs: d = 1 is already exact."""
    x, _, weights, _ = _toy(seed=3)
    assert fit_channel_factors(x.T @ x, weights, weights) is None


def _step(options: AwqOptions):
    model = make_outlier_llama()
    groups = resolve_template(model).block(0)
    captured = capture_decoder_inputs(model, model.model.layers, calib_ids(n=32), micro_batch_size=4)
    gen = torch.Generator().manual_seed(3)  # the model's stream, drifted from the block's inputs
    reference = [h + 0.02 * torch.randn(h.shape, generator=gen) for h in captured.hidden_states]
    block = copy.deepcopy(model.model.layers[0])
    inputs = captured.for_layer(0, captured.hidden_states, reference)
    result, _ = awq_block_step(block, groups, inputs, QUANT, options)
    return model.model.layers[0], groups, inputs, block, result


# true-sequential: on this toy block the one-recording walk loses to nearest rounding
BASE = {
    **HELD_OUT.to_dict(),
    "rounding": "compensated",
    "propagate": "quantized",
    "fit_to": "model",
    "sequential": True,
}


def test_the_norms_feeding_rounded_runs_are_refit_and_nothing_else_changes() -> None:
    """Same search, same walk: with ``fit_norms`` only the two norms differ, and the linears
    stay on the integers the walk chose."""
    _, groups, _, plain, plain_result = _step(AwqOptions(**BASE))
    _, _, _, fitted, fitted_result = _step(AwqOptions(**{**BASE, "fit_norms": True}))
    assert plain_result.rounding == "compensated"
    assert fitted_result.rounding == "compensated"
    assert fitted_result.mse_awq < plain_result.mse_awq  # the held-out block error
    before, after = plain.state_dict(), fitted.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    norms = {"input_layernorm.weight", "post_attention_layernorm.weight"}
    assert norms <= changed
    # the refit q/k/v norm changes what the later linears' walks see, so they may differ too;
    # nothing else in the block does
    assert changed <= norms | {f"{name}.weight" for name in groups.linears}


def test_auto_order_keeps_the_norms_of_the_walk_it_keeps() -> None:
    """``act_order="auto"`` walks twice; whichever it keeps, the block it leaves has the held-out
    error it recorded for that walk (norms and integers from the same walk)."""
    options = AwqOptions(**{**BASE, "fit_norms": True, "act_order": "auto"})
    source, groups, inputs, block, result = _step(options)
    assert result.rounding.startswith("compensated")
    # score the block as left with the step's own judge, on the same held-out micro-batches
    inputs = inputs.to(torch.float32)
    plan = plan_samples(inputs.tokens_per_batch(), options.search_tokens, options.clip_tokens, options.seed)
    with torch.no_grad():
        targets = [first_output(source(h, **kw)) for h, kw in zip(inputs.reference, inputs.kwargs)]
    names = quantized_linear_names(block, groups, QUANT)
    forwards = BlockForwards(block, inputs, torch.float32, names)
    judge = _HeldOutJudge(forwards, targets, plan.decision_batches, names, QUANT, options)
    assert judge.error() == result.mse_awq


def test_a_norm_refit_keeps_its_readers_outputs() -> None:
    """A router reading the norm's output (MoE) gets its input columns divided by the factors."""
    norm = nn.LayerNorm(8)
    router = nn.Linear(8, 3, bias=False)
    q = nn.Linear(8, 5, bias=False)
    block = nn.ModuleDict({"norm": norm, "router": router, "q": q})
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.2, 0.2)
    x = torch.randn(64, 8)
    before = router(norm(x))
    full = q.weight.detach().clone()
    with torch.no_grad():
        q.weight.copy_(fake_quantize(full, 4, 8, True))
    group = SimpleNamespace(
        prev_op="norm",
        prev_op_is_linear=False,
        layers=["q"],
        readers=["router"],
        expand_scales=lambda s: s,
        n_scales=8,
        norm_weight_offset=0.0,
    )
    refit = NormRefit(
        SimpleNamespace(groups=[group], index=0), [SimpleNamespace(scales=torch.ones(8))], {"q.weight": full}
    )
    h_in = norm(x).detach()
    refit.apply(block, group, h_in.T @ h_in, None, None)
    assert not torch.equal(norm.weight, torch.ones(8))
    torch.testing.assert_close(router(norm(x)), before, rtol=1e-5, atol=1e-5)


def test_the_fit_norms_option_is_checked_and_reaches_every_front_end() -> None:
    from awq_plugin.cli import _awq_options, build_parser
    from awq_plugin.errors import ConfigError
    from awq_plugin.integrations.transformers import AwqConfig
    from awq_plugin.pipeline.cache import QuantizeRequest

    with pytest.raises(ConfigError, match="fit_norms must be True or False"):
        AwqOptions(fit_norms=1)
    default = AwqOptions().fit_norms
    parser = build_parser()
    for flag, value in (([], default), (["--fit-norms", "on"], True), (["--fit-norms", "off"], False)):
        assert _awq_options(parser.parse_args(["quantize", "src", "out", *flag])).fit_norms is value
    assert AwqConfig(fit_norms=not default).awq_options().fit_norms is (not default)
    assert QuantizeRequest.from_dict({"fit_norms": not default}).options["fit_norms"] is (not default)


@pytest.mark.parametrize("model_type", ["gemma3_text", "gpt_neox", "opt", "phi3", "llama"])
def test_each_norm_kind_is_scaled_by_the_fitted_factors(model_type, monkeypatch) -> None:
    """Gemma's ``1 + w`` weights, LayerNorm's bias (OPT, GPT-NeoX), RMSNorm (Phi-3, Llama): once
    refit, each norm's output is its output before times the factors the fit chose, per
    channel, and the block's output stays finite."""
    from awq_plugin.algorithm import norm_fit
    from awq_plugin.tools.bench_architectures import build_tiny_model

    model = build_tiny_model(model_type, "causal-lm").float().eval()
    resolved = resolve_template(model)
    layers = model.get_submodule(resolved.decoder_layers)
    ids = torch.randint(1, 400, (32, 16), generator=torch.Generator().manual_seed(0))
    inputs = capture_decoder_inputs(model, layers, ids, micro_batch_size=4).for_layer(0)
    probe = torch.randn(5, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    seen, fit = [], norm_fit.fit_channel_factors

    def spy_fit(*args, **kwargs):
        found = fit(*args, **kwargs)
        seen.append(found)
        return found

    apply = norm_fit.NormRefit.apply

    def spy_apply(self, block, group, *args):
        norm = block.get_submodule(group.prev_op)
        with torch.no_grad():
            before = norm(probe)
        count = len(seen)
        apply(self, block, group, *args)
        if len(seen) > count and seen[-1] is not None:
            with torch.no_grad():
                torch.testing.assert_close(norm(probe), before * seen[-1][0], rtol=1e-4, atol=1e-5)
            checked.append(group.prev_op)

    checked: list[str] = []
    monkeypatch.setattr(norm_fit, "fit_channel_factors", spy_fit)
    monkeypatch.setattr(norm_fit.NormRefit, "apply", spy_apply)
    block = layers[0]
    options = AwqOptions(**{**BASE, "fit_norms": True})
    awq_block_step(block, resolved.block(0), inputs, QUANT, options)
    assert checked, "no norm was refit"
    with torch.no_grad():
        out = first_output(block(inputs.hidden_states[0], **inputs.kwargs[0]))
    assert torch.isfinite(out).all()
