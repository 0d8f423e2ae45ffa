"""The AWQ algorithm core on toy models: it helps where outliers exist, its folds are exact, its
results round-trip, and it is deterministic.

The toy model is a tiny random Llama (hidden 128, 4 heads / 2 KV heads, so the v -> o group uses
the grouped-query generalisation) whose norm weights are multiplied by 50 on a few channels: the
input-channel outliers that make plain rounding of the next linears lossy and that AWQ protects.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from awq_plugin.algorithm.awq import (
    AwqOptions,
    AwqResults,
    BlockAwqResult,
    apply_awq,
    apply_awq_block,
    awq_block_step,
    run_awq,
    run_awq_block,
)
from awq_plugin.algorithm.block import CHOICES, _choose
from awq_plugin.algorithm.clip import (
    group_gram,
    partial_output_error,
    rescale_gram,
    search_clip_max,
    search_clip_range,
)
from awq_plugin.algorithm.forward_dtype import resolve_search_dtype
from awq_plugin.algorithm.phases import recording_phases
from awq_plugin.calibration.capture import capture_decoder_inputs, forward_block, plan_samples
from awq_plugin.errors import ConfigError
from awq_plugin.numerics.quant_ref import fake_quantize
from awq_plugin.templates import resolve_template
from awq_plugin.templates.folds import apply_group_scales, fold_scales_into_linear_rows, fold_scales_into_norm

torch.set_num_threads(1)

QUANT = SimpleNamespace(bits=4, group_size=32, zero_point=True, modules_to_not_convert=())
# The scale and clip search as llm-awq runs it: nearest rounding and full-precision block inputs
# (compensated rounding and quantized inputs, the defaults, have their own tests). Forwards in
# float32: "auto" means bf16 only where the CPU has bf16 units, and no verdict may depend on that.
FAST = AwqOptions(
    n_grid=10,
    clip_grid=10,
    search_tokens=None,
    clip_tokens=256,
    micro_batch_size=4,
    rounding="nearest",
    propagate="fp",
    search_dtype="float32",
)
# fp32 tolerance for "unchanged": every folded weight is rounded once more (relative 2^-24 ~ 6e-8)
# and dot products over K <= 256 terms accumulate ~sqrt(K) such errors; outputs are O(1-10), so
# 1e-5 relative / 1e-5 absolute is ~10x above the expected drift and far below any real change.
FP32_TOL = dict(rtol=1e-5, atol=1e-5)


def make_outlier_llama(seed: int = 0, layers: int = 2, dtype: torch.dtype = torch.float32) -> nn.Module:
    config = AutoConfig.for_model(
        "llama",
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 40, 77]] *= 50.0
            layer.post_attention_layernorm.weight[[5, 64, 100]] *= 50.0
            layer.mlp.up_proj.weight[[7, 200]] *= 20.0  # outliers in down_proj's input too
    return model.to(dtype)


def calib_ids(n: int = 8, seq: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def toy() -> tuple[nn.Module, object, object]:
    model = make_outlier_llama()
    resolved = resolve_template(model)
    captured = capture_decoder_inputs(model, model.model.layers, calib_ids(), micro_batch_size=4)
    return model, resolved, captured


def test_awq_block_error_is_below_plain_rounding(toy) -> None:
    model, resolved, captured = toy
    block = copy.deepcopy(model.model.layers[0])
    result = run_awq_block(block, resolved.block(0), captured.for_layer(0), QUANT, FAST)
    assert result.mse_awq < 0.7 * result.mse_rtn
    for group in result.groups:
        assert group.loss_awq <= group.loss_rtn
    assert any(g.alpha for g in result.groups)  # the outliers made a non-trivial scale win


@pytest.mark.parametrize("search_dtype", ["float32", "bfloat16"])
def test_whole_model_awq_beats_rtn_on_every_block(search_dtype: str) -> None:
    model = make_outlier_llama(seed=1)
    options = AwqOptions(**{**FAST.to_dict(), "search_dtype": search_dtype})
    results = run_awq(model, QUANT, calib_ids(seed=1), options=options)
    assert len(results.blocks) == 2
    for block in results.blocks:
        assert block.mse_awq < block.mse_rtn


def test_applied_scales_leave_the_fp_block_output_unchanged(toy) -> None:
    model, resolved, captured = toy
    inputs = captured.for_layer(0)
    block = copy.deepcopy(model.model.layers[0])
    reference = forward_block(block, inputs)
    result = run_awq_block(
        block, resolved.block(0), inputs, QUANT, AwqOptions(**{**FAST.to_dict(), "clip": False})
    )
    assert all(not torch.all(g.scales == 1) for g in result.groups[:1])
    for out, ref in zip(forward_block(block, inputs), reference):
        torch.testing.assert_close(out, ref, **FP32_TOL)


def test_dead_input_channels_get_a_finite_floor_scale() -> None:
    # Channels whose activation is exactly zero everywhere (a zeroed norm weight, an up_proj row of
    # zeros) have mean |x| = 0, so mean|x|^alpha = 0 and s^-1 would be infinite; the floor keeps
    # every scale finite and positive, and the folded full-precision block is still unchanged.
    model = make_outlier_llama(seed=2, layers=1)
    with torch.no_grad():
        layer = model.model.layers[0]
        layer.input_layernorm.weight[[0, 9, 50]] = 0.0
        layer.post_attention_layernorm.weight[[1, 64]] = 0.0
        layer.mlp.up_proj.weight[[11, 130]] = 0.0
    resolved = resolve_template(model)
    inputs = capture_decoder_inputs(model, model.model.layers, calib_ids(), micro_batch_size=4).for_layer(0)
    block = copy.deepcopy(model.model.layers[0])
    reference = forward_block(block, inputs)
    result = run_awq_block(
        block, resolved.block(0), inputs, QUANT, AwqOptions(**{**FAST.to_dict(), "clip": False})
    )
    # Without the floor the normalisation divides by sqrt(0) and every candidate of a group with a dead
    # channel falls back to s = 1: AWQ would be silently off for qkv, up/gate and down. With it, every
    # group still finds a real scale (measured: the qkv group's loss drops 16x, down's 2.7x).
    for group in result.groups:
        assert group.alpha is not None, [g.alpha for g in result.groups]
        assert torch.isfinite(group.scales).all() and (group.scales > 0).all(), group.scales
        assert group.loss_awq < group.loss_rtn
    assert all(torch.isfinite(p).all() for p in block.parameters())
    for out, ref in zip(forward_block(block, inputs), reference):
        torch.testing.assert_close(out, ref, **FP32_TOL)


def test_gqa_v_to_o_fold_is_exact(toy) -> None:
    model, resolved, captured = toy
    inputs = captured.for_layer(0)
    block = copy.deepcopy(model.model.layers[0])
    group = resolved.block(0).groups[1]
    assert group.prev_op == "self_attn.v_proj" and group.kv_repeat == 2  # 64 v channels -> 128 o columns
    reference = forward_block(block, inputs)
    apply_group_scales(
        block, group, torch.exp(torch.randn(group.n_scales, generator=torch.Generator().manual_seed(3)))
    )
    for out, ref in zip(forward_block(block, inputs), reference):
        torch.testing.assert_close(out, ref, **FP32_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_run_save_load_apply_gives_identical_weights(tmp_path, dtype: torch.dtype) -> None:
    model = make_outlier_llama(dtype=dtype)
    fresh = copy.deepcopy(model)
    results = run_awq(model, QUANT, calib_ids(), options=FAST)
    path = results.save(tmp_path / "awq.safetensors")
    loaded = AwqResults.load(path)
    assert loaded.summary() == results.summary() and loaded.quant_config == results.quant_config
    apply_awq(fresh, loaded)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert a.dtype == dtype and torch.equal(a, b), name


def test_block_result_state_round_trip(toy) -> None:
    model, resolved, captured = toy
    block = copy.deepcopy(model.model.layers[0])
    result = run_awq_block(block, resolved.block(0), captured.for_layer(0), QUANT, FAST)
    tensors, meta = result.to_state()
    back = BlockAwqResult.from_state(tensors, meta)
    assert back.mse_awq == result.mse_awq and list(back.clip_max) == list(result.clip_max)
    assert list(back.clip_min) == list(result.clip_min) == list(result.clip_max)  # asymmetric default
    for a, b in zip(back.groups, result.groups):
        assert torch.equal(a.scales, b.scales) and a.alpha == b.alpha


def test_clip_qk_option_follows_the_template_clip_skip(toy) -> None:
    model, resolved, captured = toy
    qk = {"self_attn.q_proj", "self_attn.k_proj"}
    assert resolved.block(0).clip_skip == qk
    runs = {}
    for clip_qk in (True, False):
        options = AwqOptions(**{**FAST.to_dict(), "clip_qk": clip_qk, "clip_asymmetric": False})
        block = copy.deepcopy(model.model.layers[0])
        runs[clip_qk] = run_awq_block(block, resolved.block(0), captured.for_layer(0), QUANT, options)
        assert not runs[clip_qk].clip_min  # the symmetric (llm-awq) clip stores upper bounds only
    assert qk <= set(runs[True].clip_max)
    assert set(runs[False].clip_max) == set(runs[True].clip_max) - qk  # llm-awq's choice


def test_apply_refuses_results_of_another_template(toy) -> None:
    model, resolved, captured = toy
    result = run_awq_block(
        copy.deepcopy(model.model.layers[0]), resolved.block(0), captured.for_layer(0), QUANT, FAST
    )
    result.groups = result.groups[:3]
    with pytest.raises(ValueError, match="re-run AWQ or use the template"):
        apply_awq_block(copy.deepcopy(model.model.layers[0]), resolved.block(0), result)


def test_results_are_deterministic(toy) -> None:
    model, resolved, captured = toy
    options = AwqOptions(**{**FAST.to_dict(), "search_tokens": 64, "clip_tokens": 64})
    blocks = [copy.deepcopy(model.model.layers[0]) for _ in range(2)]
    results = [run_awq_block(b, resolved.block(0), captured.for_layer(0), QUANT, options) for b in blocks]
    assert results[0].mse_awq == results[1].mse_awq
    for a, b in zip(blocks[0].state_dict().values(), blocks[1].state_dict().values()):
        assert torch.equal(a, b)


def test_search_subsample_covering_all_tokens_equals_full_search(toy) -> None:
    model, resolved, captured = toy
    inputs = captured.for_layer(0)
    runs = []
    for count in (None, inputs.n_tokens, 10 * inputs.n_tokens):
        options = AwqOptions(**{**FAST.to_dict(), "search_tokens": count, "clip_tokens": count})
        runs.append(
            run_awq_block(copy.deepcopy(model.model.layers[0]), resolved.block(0), inputs, QUANT, options)
        )
    for other in runs[1:]:
        assert other.mse_awq == runs[0].mse_awq
        for a, b in zip(other.groups, runs[0].groups):
            assert torch.equal(a.scales, b.scales)
        for name in runs[0].clip_max:
            assert torch.equal(other.clip_max[name], runs[0].clip_max[name])


def test_sample_plan_is_seeded_and_nested() -> None:
    plan = plan_samples([64, 64, 64], search_tokens=50, clip_tokens=20, seed=0)
    again = plan_samples([64, 64, 64], search_tokens=50, clip_tokens=20, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(plan.search_rows, again.search_rows))
    assert sum(len(r) for r in plan.search_rows) == 50 and sum(len(r) for r in plan.clip_rows) == 20
    for search, clip in zip(plan.search_rows, plan.clip_rows):  # the smaller sample is nested
        assert set(clip.tolist()) <= set(search.tolist())
    assert len(plan.search_batches) == 1  # one whole micro-batch (64 tokens) covers 50
    other = plan_samples([64, 64, 64], 50, 20, seed=1)
    assert any(not torch.equal(a, b) for a, b in zip(plan.search_rows, other.search_rows))
    assert plan_samples([64, 64], None, None, seed=0).clip_rows is None


def test_held_out_batches_are_disjoint_from_every_sample() -> None:
    """The micro-batches after the search's, as many tokens again, are held out: no search row,
    no clip row, no search batch comes from them; with nothing to spare, nothing is held out."""
    for seed in range(4):
        plan = plan_samples([64] * 6, search_tokens=100, clip_tokens=None, seed=seed)
        assert len(plan.search_batches) == 2 and len(plan.holdout_batches) == 2
        assert not set(plan.search_batches) & set(plan.holdout_batches)
        assert plan.decision_batches == plan.holdout_batches
        for m in plan.holdout_batches:
            assert plan.search_rows[m].numel() == 0
        assert sum(r.numel() for r in plan.search_rows) == 100
        sampled = plan_samples([64] * 6, 100, 50, seed=seed)
        assert all(sampled.clip_rows[m].numel() == 0 for m in sampled.holdout_batches)
    everything = plan_samples([64, 64], search_tokens=None, clip_tokens=None, seed=0)
    assert everything.holdout_batches == () and everything.decision_batches == (0, 1)
    assert plan_samples([64, 64], 100, None, seed=0).holdout_batches == ()  # both searched


def test_choice_is_the_lowest_held_out_error() -> None:
    assert _choose(mse_rtn=2.0, mse_awq=1.0) == "awq"
    assert _choose(mse_rtn=1.0, mse_awq=1.2) == "rounding"
    assert _choose(mse_rtn=1.0, mse_awq=1.0) == "awq"  # a tie keeps AWQ
    assert _choose(mse_rtn=1.0, mse_awq=math.nan) == "rounding"
    assert _choose(math.nan, math.nan) == "rounding"


def test_clips_that_lose_on_the_held_out_batch_leave_plain_rounding(toy, monkeypatch) -> None:
    """Clips that cut every group to a sliver lose on the held-out micro-batch: the block is
    put back to its full-precision weights (plain rounding follows from them)."""
    import awq_plugin.algorithm.block as block_module

    model, resolved, captured = toy
    groups = resolved.block(0)

    def slivers(block, names, *args, **kwargs):
        lo, hi = {}, {}
        for name in names:
            w = block.get_submodule(name).weight
            bound = torch.full((w.shape[0], w.shape[1] // QUANT.group_size), 1e-4)
            lo[name], hi[name] = -bound, bound
        return lo, hi

    monkeypatch.setattr(block_module, "_search_clips", slivers)
    block = copy.deepcopy(model.model.layers[0])
    result = run_awq_block(block, groups, captured.for_layer(0), QUANT, HELD_OUT)
    assert result.choice == "rounding" and not result.clip_max and result.mse_awq == result.mse_rtn
    assert all(torch.equal(g.scales, torch.ones_like(g.scales)) for g in result.groups)
    reference = model.model.layers[0]
    for name, param in block.named_parameters():  # unit scales fold to the same weights
        assert torch.allclose(param, reference.get_parameter(name), rtol=1e-6, atol=1e-7), name


@pytest.mark.parametrize("search_dtype", ["float32", "bfloat16"])
def test_next_inputs_follow_the_propagation_option(toy, search_dtype: str) -> None:
    """'fp': the unquantized block's output as the recording pass computes it (matmuls in the
    search dtype under autocast, the residual stream in fp32)."""
    model, resolved, captured = toy
    inputs = captured.for_layer(0)
    dtype = getattr(torch, search_dtype)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        fp_out = forward_block(copy.deepcopy(model.model.layers[0]), inputs)
    options = AwqOptions(**{**FAST.to_dict(), "search_dtype": search_dtype})
    _, nxt = awq_block_step(copy.deepcopy(model.model.layers[0]), resolved.block(0), inputs, QUANT, options)
    assert all(torch.equal(a, b) for a, b in zip(nxt.hidden_states, fp_out))
    quantized = AwqOptions(**{**options.to_dict(), "propagate": "quantized"})
    _, nxt_q = awq_block_step(
        copy.deepcopy(model.model.layers[0]), resolved.block(0), inputs, QUANT, quantized
    )
    gap = sum(float((a - b).pow(2).mean()) for a, b in zip(nxt_q.hidden_states, fp_out))
    assert 0 < gap < 1.0


def test_modules_to_not_convert_are_neither_searched_nor_clipped(toy) -> None:
    model, resolved, captured = toy
    quant = SimpleNamespace(**{**vars(QUANT), "modules_to_not_convert": ("mlp.down_proj",)})
    result = run_awq_block(
        copy.deepcopy(model.model.layers[0]), resolved.block(0), captured.for_layer(0), quant, FAST
    )
    assert "mlp.down_proj" not in result.clip_max
    assert result.groups[3].alpha is None and torch.all(result.groups[3].scales == 1)


# ---- the fold helpers, exactly -------------------------------------------------------------


def test_gemma_one_plus_weight_norm_fold_is_exact() -> None:
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    norm = GemmaRMSNorm(64)
    with torch.no_grad():
        norm.weight.normal_(0, 0.5)
    x = torch.randn(10, 64)
    s = torch.exp(torch.randn(64))
    expected = norm(x) / s
    fold_scales_into_norm(norm, s, weight_offset=1.0)
    torch.testing.assert_close(norm(x), expected, **FP32_TOL)


def test_layernorm_weight_and_bias_fold_is_exact() -> None:
    norm = nn.LayerNorm(64)
    with torch.no_grad():
        norm.weight.normal_(1, 0.5)
        norm.bias.normal_(0, 0.5)
    x = torch.randn(10, 64)
    s = torch.exp(torch.randn(64))
    expected = norm(x) / s
    fold_scales_into_norm(norm, s)
    torch.testing.assert_close(norm(x), expected, **FP32_TOL)


def test_fused_rows_fold_touches_only_the_last_rows() -> None:
    fused = nn.Linear(32, 96, bias=True)  # rows [q | k | v] or [gate | up]: the last 48 are scaled
    before = copy.deepcopy(fused)
    s = torch.exp(torch.randn(48))
    fold_scales_into_linear_rows(fused, s)
    x = torch.randn(5, 32)
    torch.testing.assert_close(fused(x)[:, :48], before(x)[:, :48], rtol=0, atol=0)
    torch.testing.assert_close(fused(x)[:, 48:], before(x)[:, 48:] / s, **FP32_TOL)


def test_phi3_fused_qkv_and_gate_up_folds_keep_the_block_exact() -> None:
    config = AutoConfig.for_model(
        "phi3", hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    resolved = resolve_template(model)
    inputs = capture_decoder_inputs(model, model.model.layers, calib_ids(2, 16), 2).for_layer(0)
    block = model.model.layers[0]
    reference = forward_block(block, inputs)
    for group in resolved.block(0).groups:
        apply_group_scales(block, group, torch.exp(torch.randn(group.n_scales)))
    for out, ref in zip(forward_block(block, inputs), reference):
        torch.testing.assert_close(out, ref, **FP32_TOL)


def test_clip_search_never_increases_the_partial_output_error() -> None:
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=generator)
    w[:, 5] *= 8  # a few outlying weights make clipping worthwhile
    x = torch.randn(128, 64, generator=generator)

    def quantize(t: torch.Tensor) -> torch.Tensor:
        return fake_quantize(t, 4, 32, True)

    gram = group_gram(x, 32).double() / x.shape[0]  # (2, 32, 32)
    bound = search_clip_max(w, gram, quantize, n_grid=20, max_shrink=0.5)
    org_max = w.reshape(16, 2, 32).abs().amax(-1)
    assert bound.shape == (16, 2) and torch.all(bound <= org_max) and torch.all(bound > 0.5 * org_max)
    c = bound[..., None]  # (16, 2, 1)
    clipped = torch.maximum(torch.minimum(w.reshape(16, 2, 32), c), -c).reshape(16, 64)
    err_clip = (x @ quantize(clipped).t() - x @ w.t()).pow(2).mean()
    err_plain = (x @ quantize(w).t() - x @ w.t()).pow(2).mean()
    assert err_clip < err_plain


def test_gram_form_equals_the_partial_output_error_over_tokens() -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(200, 96, generator=generator, dtype=torch.float64)
    delta = torch.randn(8, 96, generator=generator, dtype=torch.float64)
    s = torch.exp(torch.randn(96, generator=generator, dtype=torch.float64))
    direct = ((x / s).reshape(200, 1, 3, 32) * delta.reshape(1, 8, 3, 32)).sum(-1).pow(2).mean(0)  # (8, 3)
    gram = rescale_gram(group_gram(x, 32).double() / 200, s)
    torch.testing.assert_close(partial_output_error(delta, gram), direct, rtol=1e-5, atol=1e-8)


def test_asymmetric_clip_range_lies_inside_each_group_and_helps() -> None:
    generator = torch.Generator().manual_seed(2)
    w = torch.randn(16, 64, generator=generator) + 0.5  # skewed groups: min and max differ
    w[:, 9] *= 6
    x = torch.randn(256, 64, generator=generator)

    def quantize(t: torch.Tensor) -> torch.Tensor:
        return fake_quantize(t, 4, 32, True)

    gram = group_gram(x, 32).double() / x.shape[0]
    lo, hi = search_clip_range(w, gram, quantize, n_grid=20, max_shrink=0.5)
    grouped = w.reshape(16, 2, 32)  # (N, K/G, G)
    assert torch.all(lo >= grouped.amin(-1)) and torch.all(hi <= grouped.amax(-1)) and torch.all(lo < hi)
    clipped = torch.maximum(torch.minimum(grouped, hi[..., None]), lo[..., None]).reshape(16, 64)
    err = partial_output_error(quantize(clipped) - w, gram)
    err_plain = partial_output_error(quantize(w) - w, gram)
    assert torch.all(err <= err_plain) and err.sum() < err_plain.sum()


def test_asymmetric_clip_results_round_trip(tmp_path) -> None:
    model = make_outlier_llama(seed=2, layers=1)
    fresh = copy.deepcopy(model)
    options = AwqOptions(**{**FAST.to_dict(), "clip_asymmetric": True})
    results = run_awq(model, QUANT, calib_ids(seed=2), options=options)
    assert results.blocks[0].clip_min and set(results.blocks[0].clip_min) == set(results.blocks[0].clip_max)
    apply_awq(fresh, AwqResults.load(results.save(tmp_path / "asym.safetensors")))
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)


class _StatefulLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(
        self, hidden_states: torch.Tensor, state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, str]:
        return self.proj(hidden_states), "state"


class _UnpackingStack(nn.Module):
    """Like xLSTM's backbone: each layer's output is unpacked as (hidden, state)."""

    def __init__(self, n_layers: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.layers = nn.ModuleList(_StatefulLayer() for _ in range(n_layers))

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        hidden = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            hidden, _ = layer(hidden, state=torch.full((1,), float(i)))
        return hidden


@pytest.mark.parametrize("weights", ["real", "meta"])
def test_capture_works_where_the_model_unpacks_each_layer_output(weights: str) -> None:
    """A bare tensor cannot stand in for an (hidden, state) output; the capture still records every
    layer's call, with the layers bypassed (also when their weights are not loaded)."""
    torch.manual_seed(0)
    model = _UnpackingStack()
    ids = torch.randint(0, 16, (4, 5))
    want = model.embed(ids).detach()
    if weights == "meta":
        model.layers.to_empty(device="meta")
    captured = capture_decoder_inputs(model, model.layers, ids, micro_batch_size=2)
    torch.testing.assert_close(torch.cat(captured.hidden_states), want)
    for i in range(3):
        assert [float(kw["state"]) for kw in captured.layer_kwargs[i]] == [float(i)] * 2


def test_capture_reports_the_model_error_when_no_way_of_bypassing_fits() -> None:
    class Triple(_UnpackingStack):
        def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
            hidden = self.embed(input_ids)
            for layer in self.layers:
                hidden, _, _ = layer(hidden)  # the layers return two values: the model itself is broken
            return hidden

    model = Triple()
    with pytest.raises(ValueError, match="not enough values to unpack"):
        capture_decoder_inputs(model, model.layers, torch.zeros(1, 3, dtype=torch.long))
    assert all("forward" not in vars(layer) for layer in model.layers)  # the bypass is removed again


def through_a_symmetric_grid(linear: nn.Linear, group_size: int = 32, shrink: float = 0.9) -> None:
    """What a symmetric 4-bit grid leaves behind (a K-quant, llm-awq's clip then rounding): each
    group clamped to [-c, c] and rounded to c/8 steps, so max == -min in many groups."""
    w = linear.weight.data
    n, k = w.shape
    grouped = w.reshape(n, k // group_size, group_size)
    c = grouped.abs().amax(dim=-1, keepdim=True) * shrink
    step = c / 8
    linear.weight.data = (grouped.clamp(-c, c) / step).round().clamp(-8, 8).mul(step).reshape(n, k)


HELD_OUT = AwqOptions(**{**FAST.to_dict(), "search_tokens": 64})  # 1 of 2 micro-batches searched, 1 held out


def test_weights_from_a_symmetric_grid_get_the_full_search(toy) -> None:
    """No fingerprint decides what runs: a block whose weights went through a symmetric grid
    (which an earlier release took for an earlier AWQ pass and did not search) gets the scale
    search in every group and the clip search on every linear, and keeps what its held-out
    micro-batch prefers."""
    model, resolved, captured = toy
    groups = resolved.block(0)
    block = copy.deepcopy(model.model.layers[0])
    for name in groups.linears:
        through_a_symmetric_grid(block.get_submodule(name))
    with recording_phases() as phases:
        result = run_awq_block(
            block, groups, captured.for_layer(0), QUANT, dataclasses.replace(HELD_OUT, search_dtype="auto")
        )
    assert result.held_out and result.choice in CHOICES
    # "auto" is recorded as what it resolved to on this CPU (bf16 units or not)
    assert result.search_dtype == str(resolve_search_dtype("auto", torch.device("cpu"))).removeprefix(
        "torch."
    )
    searched = {
        f"search {g.layers[0] if g.module2inspect is None else g.module2inspect}" for g in groups.groups
    }
    assert searched <= set(phases) and "clip search" in phases
    assert all(math.isfinite(g.loss_rtn) and math.isfinite(g.loss_awq) for g in result.groups)
    assert any(g.alpha is not None for g in result.groups) or result.choice == "rounding"
    assert result.mse_awq <= result.mse_rtn


def test_old_results_with_the_retired_fingerprint_option_still_load() -> None:
    options = AwqOptions.from_dict({**FAST.to_dict(), "prior_awq_share": 0.05})
    assert options == FAST
    with pytest.raises(ConfigError, match="unknown AWQ option"):
        AwqOptions.from_dict({"prior_awq_shares": 0.05})


def test_a_block_that_fails_under_autocast_is_recorded_in_float32(toy, caplog) -> None:
    """A block whose own code breaks under bf16 autocast (xmod writes a linear's bf16 output into
    a float32 tensor by index) gets its forwards in float32, with a warning naming the layer."""
    from awq_plugin.algorithm.block import BlockForwards, _record_forward
    from awq_plugin.calibration.capture import RecordedInputs

    model, _, captured = toy
    inputs = captured.for_layer(0)
    calls = []

    def recorder():
        class Recorder:
            def run(self, _inputs, _reference=None):
                calls.append(torch.is_autocast_enabled("cpu"))
                if calls[-1]:
                    raise RuntimeError("Index put requires the source and destination dtypes match")
                return RecordedInputs(outputs=[torch.zeros(1, dtype=torch.bfloat16)])

        return Recorder()

    forwards = BlockForwards(model.model.layers[0], inputs, torch.bfloat16)
    with caplog.at_level("WARNING"):
        recorded, used = _record_forward(recorder, forwards, {}, 7)
    assert calls == [True, False] and used.dtype == torch.float32
    assert recorded.outputs[0].dtype == torch.float32
    assert "layer 7: the block's forward fails under bfloat16 autocast" in caplog.text

    def broken():
        class Recorder:
            def run(self, _inputs, _reference=None):
                raise RuntimeError("the block is broken")

        return Recorder()

    with pytest.raises(RuntimeError, match="the block is broken"):  # float32 fails: the block's own error
        _record_forward(broken, forwards, {}, 7)


def test_fake_quantized_copies_in_the_forward_dtype_give_the_same_outputs(toy) -> None:
    """The held-out judge and the next-inputs pass fake-quantize straight into the forwards'
    dtype: under autocast the outputs are bit for bit those of float32 copies (which autocast
    casts on every call), and the block's own weights come back unchanged."""
    from awq_plugin.algorithm.block import BlockForwards
    from awq_plugin.algorithm.linears import fake_quantized

    model, resolved, captured = toy
    block = copy.deepcopy(model.model.layers[0]).float()
    names = list(resolved.block(0).linears)
    before = {n: block.get_submodule(n).weight.detach().clone() for n in names}
    forwards = BlockForwards(block, captured.for_layer(0), torch.bfloat16)
    with fake_quantized(block, names, QUANT):
        wide = forwards.forward([0, 1])
    with fake_quantized(block, names, QUANT, torch.bfloat16):
        assert all(block.get_submodule(n).weight.dtype == torch.bfloat16 for n in names)
        narrow = forwards.forward([0, 1])
    assert all(torch.equal(a, b) for a, b in zip(wide, narrow, strict=True))
    assert not torch.equal(wide[0], forwards.forward([0])[0])  # the quantization did change them
    assert all(torch.equal(block.get_submodule(n).weight, w) for n, w in before.items())


def test_a_panel_model_through_a_symmetric_grid_gets_the_full_search(default_model_dir) -> None:
    """The same on a real model: the embedded default model (SmolLM2-135M, one of the quality
    panel's models) with every linear of a block through a symmetric 4-bit grid, as a K-quant
    GGUF or llm-awq's clip-and-round leaves it (the signature the retired switch took for an
    earlier AWQ pass: max == -min in many groups). The block is searched in every group, clipped,
    judged on its held-out micro-batch, and AWQ still finds a gain there."""
    from transformers import AutoTokenizer

    from awq_plugin.calibration.text import calibration_windows

    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    resolved = resolve_template(model)
    ids = calibration_windows(AutoTokenizer.from_pretrained(default_model_dir), n_samples=8, seq_len=64)
    captured = capture_decoder_inputs(model, model.model.layers, ids, micro_batch_size=4)
    groups = resolved.block(0)
    block = model.model.layers[0]
    for name in groups.linears:
        through_a_symmetric_grid(block.get_submodule(name))
    gridded = block.self_attn.q_proj.weight.detach().reshape(-1, 32)
    # the signature is there, far above the retired switch's 5% threshold
    assert (gridded.amax(-1) == -gridded.amin(-1)).float().mean() > 0.2
    options = AwqOptions(**{**FAST.to_dict(), "search_tokens": 256})  # 1 of 2 micro-batches held out
    with recording_phases() as phases:
        result = run_awq_block(block, groups, captured.for_layer(0), QUANT, options)
    searched = {
        f"search {g.layers[0] if g.module2inspect is None else g.module2inspect}" for g in groups.groups
    }
    assert searched <= set(phases) and "clip search" in phases
    assert result.held_out
    assert any(g.alpha for g in result.groups)  # a non-trivial scale won somewhere
    assert result.choice == "awq" and result.mse_awq < result.mse_rtn  # on tokens the search did not fit
