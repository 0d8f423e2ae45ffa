"""Templates are claims about data flow: the numerical fold check proves or refuses each group.

Tiny random models (hidden 64, 2 layers) of the shipped families and of
architectures whose data flow differs from Llama's (BitNet's sub-norms, OLMo 2's
post-norms); every check runs in float32 on the live decoder layer.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_templates import FAMILIES, llama_template, make_tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

from awq_plugin.calibration.capture import BlockInputs, capture_decoder_inputs
from awq_plugin.errors import TemplateError
from awq_plugin.runtime.modeling import decode_special_floats, hf_config_from_dict
from awq_plugin.templates import resolve_template
from awq_plugin.templates.verify import (
    FOLD_TOLERANCE,
    check_block_folds,
    verify_block_folds,
    verify_block_folds_at_once,
)

torch.set_num_threads(1)

SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
)


def block_inputs(model: torch.nn.Module, layers_path: str) -> tuple[torch.nn.ModuleList, object]:
    layers = model.get_submodule(layers_path)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    return layers, capture_decoder_inputs(model, layers, ids, micro_batch_size=2)


def make_model(model_type: str, config: object | None = None) -> torch.nn.Module:
    """A seeded random model (``config``, else the type's defaults with SMALL) with perturbed norms."""
    config = config if config is not None else AutoConfig.for_model(model_type, **SMALL)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:  # norms start at 1: perturb them so that a wrong fold shows
                param.add_(0.3 * torch.randn_like(param))
    return model


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_shipped_fold_is_proven_exact(model_type: str) -> None:
    model = make_tiny_model(model_type)
    resolved = resolve_template(model)
    layers, captured = block_inputs(model, resolved.decoder_layers)
    for i, block in enumerate(layers):
        checks = verify_block_folds(block, resolved.block(i), captured.for_layer(i), resolved.source)
        assert len(checks) == len(resolved.block(i).groups)
        assert all(c.error < 1e-5 for c in checks), checks
        # Dense groups always influence the output; only experts nobody was routed to may not.
        assert all(c.observed for c in checks if "experts" not in c.group), checks


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_at_once_check_on_one_sequence_passes_every_shipped_family(
    model_type: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fold proof's fast path: one sequence of the first micro-batch, and it is what ran."""
    import awq_plugin.templates.verify as verify

    model = make_tiny_model(model_type)
    resolved = resolve_template(model)
    layers, captured = block_inputs(model, resolved.decoder_layers)
    seen: list[int] = []
    real = verify._folds_hold_at_once

    def spy(block, template, inputs, seed, max_batches):
        seen.append(inputs.hidden_states[0].shape[0])
        return real(block, template, inputs, seed, max_batches)

    monkeypatch.setattr(verify, "_folds_hold_at_once", spy)
    for i, block in enumerate(layers):
        verify_block_folds_at_once(block, resolved.block(i), captured.for_layer(i), max_batches=1)
    expected = [2] if resolved.block(0).experts else [1]  # MoE blocks run the whole micro-batch
    assert seen == expected * len(layers)


def test_first_sequence_cuts_the_batch_dimension_only() -> None:
    hidden = torch.randn(3, 5, 8)
    rotary = (torch.randn(3, 5, 4), torch.randn(3, 5, 4))
    kwargs = {
        "position_embeddings": rotary,
        "cache_position": torch.arange(3),
        "position_ids": torch.zeros(1, 5),
    }
    one = BlockInputs([hidden, hidden], [kwargs, kwargs]).first_sequence()
    assert one is not None and len(one.hidden_states) == 1
    assert torch.equal(one.hidden_states[0], hidden[:1])
    assert torch.equal(one.kwargs[0]["position_embeddings"][1], rotary[1][:1])
    assert one.kwargs[0]["cache_position"].shape == (3,)  # one dimension: not a batch
    assert one.kwargs[0]["position_ids"].shape == (1, 5)
    assert BlockInputs([hidden[:1]], [kwargs]).first_sequence() is None


def test_a_keyword_the_cut_gets_wrong_falls_back_to_the_whole_micro_batch() -> None:
    """A [batch, ...]-looking keyword that is not batched makes the cut block fail: the check
    must then run on the whole micro-batch and pass, not refuse a correct template."""
    model = make_tiny_model("llama")
    resolved = resolve_template(model)
    layers, captured = block_inputs(model, resolved.decoder_layers)
    inputs = captured.for_layer(0)
    cos, sin = inputs.kwargs[0]["position_embeddings"]
    shared = (cos[:1].expand(2, -1, -1), sin[:1].expand(2, -1, -1))  # [2, T, D] with T != 2
    kwargs = {**inputs.kwargs[0], "position_embeddings": shared}
    block = layers[0]
    original_forward = block.forward

    def strict(hidden_states, **kw):
        if kw["position_embeddings"][0].shape[0] != 2:
            raise RuntimeError("rotary table cut to the wrong batch")
        return original_forward(hidden_states, **kw)

    block.forward = strict
    verify_block_folds_at_once(
        block, resolved.block(0), BlockInputs(inputs.hidden_states[:1], [kwargs]), max_batches=1
    )


def test_llama_template_renamed_for_bitnet_is_refused_naming_the_group() -> None:
    """BitNet normalises between v_proj and o_proj (attn_sub_norm) and before down_proj."""
    model = make_model("bitnet")
    template = llama_template()
    template.update(name="bitnet-from-llama", architectures=["BitNetForCausalLM"], model_types=["bitnet"])
    resolved = resolve_template(model, template)  # names and shapes all match ...
    layers, captured = block_inputs(model, resolved.decoder_layers)
    checks = check_block_folds(layers[0], resolved.block(0), captured.for_layer(0))
    by_group = {c.group: c for c in checks}
    assert by_group["input_layernorm -> self_attn.q_proj, self_attn.k_proj, self_attn.v_proj"].exact
    assert by_group["post_attention_layernorm -> mlp.gate_proj, mlp.up_proj"].exact
    assert by_group["self_attn.v_proj -> self_attn.o_proj"].error > 100 * FOLD_TOLERANCE
    assert by_group["mlp.up_proj -> mlp.down_proj"].error > 100 * FOLD_TOLERANCE
    with pytest.raises(TemplateError, match=r"'self_attn\.v_proj -> self_attn\.o_proj' of decoder layer 0"):
        verify_block_folds(layers[0], resolved.block(0), captured.for_layer(0), "'bitnet-from-llama'")
    with pytest.raises(TemplateError, match=r"^'bitnet-from-llama': scaling group"):
        verify_block_folds(
            layers[0], resolved.block(0), captured.for_layer(0), "'bitnet-from-llama'", max_batches=1
        )
    with pytest.raises(TemplateError, match=r"'self_attn\.v_proj -> self_attn\.o_proj' of decoder layer 0"):
        verify_block_folds_at_once(
            layers[0], resolved.block(0), captured.for_layer(0), "'bitnet-from-llama'", max_batches=1
        )


def test_norm_that_does_not_feed_qkv_is_refused() -> None:
    """OLMo 2 has no input norm: q/k/v read the residual; post_attention_layernorm reads o_proj."""
    model = make_model("olmo2")
    template = llama_template()
    template.update(name="olmo2-wrong", architectures=["Olmo2ForCausalLM"], model_types=["olmo2"])
    template["scaling_layers"][0]["prev_op"] = "post_attention_layernorm"
    template["scaling_layers"] = template["scaling_layers"][:2]  # qkv and v -> o
    resolved = resolve_template(model, template)
    layers, captured = block_inputs(model, resolved.decoder_layers)
    with pytest.raises(TemplateError, match=r"'post_attention_layernorm -> self_attn\.q_proj.*' of decoder"):
        verify_block_folds(layers[0], resolved.block(0), captured.for_layer(0))


def test_fold_check_leaves_the_block_unchanged() -> None:
    model = make_tiny_model("llama")
    resolved = resolve_template(model)
    layers, captured = block_inputs(model, resolved.decoder_layers)
    before = {k: v.clone() for k, v in layers[0].state_dict().items()}
    check_block_folds(layers[0], resolved.block(0), captured.for_layer(0))
    for name, tensor in layers[0].state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_special_floats_in_config_json_are_decoded() -> None:
    """transformers writes inf as {"__float__": "Infinity"} (Mamba 2's time_step_limit)."""
    config = AutoConfig.for_model(
        "mamba2", hidden_size=64, num_hidden_layers=2, vocab_size=256, num_heads=8, head_dim=16
    )
    data = json.loads(config.to_json_string())
    assert data["time_step_limit"][1] == {"__float__": "Infinity"}
    rebuilt = hf_config_from_dict(data)
    assert list(rebuilt.time_step_limit) == [0.0, float("inf")]
    decoded = decode_special_floats({"a": [{"__float__": "-Infinity"}, {"b": {"__float__": "NaN"}}], "c": 1})
    assert decoded["a"][0] == float("-inf") and decoded["a"][1]["b"] != decoded["a"][1]["b"]
    assert decoded["c"] == 1
    assert decode_special_floats({"__float__": "x", "y": 2}) == {"__float__": "x", "y": 2}


# ---- the guard: AWQ never ships a block worse than plain rounding ---------------------------


@pytest.mark.parametrize("spread", [2.0, 4.0])  # 4.0 overflows: the AWQ error is NaN, also refused
def test_block_where_awq_is_worse_than_rounding_falls_back_with_a_warning(
    spread: float, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from types import SimpleNamespace

    import awq_plugin.algorithm.awq as awq
    import awq_plugin.algorithm.block as block_step

    model = make_tiny_model("llama")
    resolved = resolve_template(model)
    layers, captured = block_inputs(model, resolved.decoder_layers)
    block, inputs = layers[0], captured.for_layer(0)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    real_search = block_step.search_best_scale

    def harmful_search(group, **kwargs):  # a search that picks wildly wrong scales
        found = real_search(group, **kwargs)
        wild = torch.exp(spread * torch.randn(group.n_scales, generator=torch.Generator().manual_seed(0)))
        return type(found)(wild, 0.5, found.loss_rtn, found.loss_rtn * 10, found.losses)

    monkeypatch.setattr(block_step, "search_best_scale", harmful_search)
    quant = SimpleNamespace(bits=4, group_size=32, zero_point=True, modules_to_not_convert=())
    # Nearest rounding: after the fallback the block holds exactly its original weights.
    options = awq.AwqOptions(
        n_grid=4, clip_grid=4, search_tokens=None, clip_tokens=64, micro_batch_size=2, rounding="nearest"
    )
    with caplog.at_level("WARNING", logger="awq_plugin.algorithm.block"):
        result, _ = awq.awq_block_step(block, resolved.block(0), inputs, quant, options)
    warning = [r.getMessage() for r in caplog.records if "falling back to plain rounding" in r.getMessage()]
    assert len(warning) == 1 and "layer 0" in warning[0]
    assert result.mse_awq == result.mse_rtn > 0
    assert all(g.alpha is None and torch.equal(g.scales, torch.ones_like(g.scales)) for g in result.groups)
    assert result.clip_max == {} and result.clip_min == {}
    for name, tensor in block.state_dict().items():  # s = 1 folds exactly: the original weights
        assert torch.equal(tensor, before[name]), name


def test_block_where_awq_helps_keeps_its_scales(caplog: pytest.LogCaptureFixture) -> None:
    from types import SimpleNamespace

    import awq_plugin.algorithm.awq as awq

    model = make_tiny_model("llama")
    with torch.no_grad():  # input-channel outliers: the case AWQ is made for
        model.model.layers[0].input_layernorm.weight[[3, 40]] *= 50.0
    resolved = resolve_template(model)
    layers, captured = block_inputs(model, resolved.decoder_layers)
    quant = SimpleNamespace(bits=4, group_size=32, zero_point=True, modules_to_not_convert=())
    options = awq.AwqOptions(n_grid=4, clip_grid=4, search_tokens=None, clip_tokens=64, micro_batch_size=2)
    with caplog.at_level("WARNING", logger="awq_plugin.algorithm.block"):
        result, _ = awq.awq_block_step(layers[0], resolved.block(0), captured.for_layer(0), quant, options)
    assert result.mse_awq < result.mse_rtn
    assert any(g.alpha is not None for g in result.groups)
    assert not any("falling back" in r.getMessage() for r in caplog.records)


def test_wrong_template_is_refused_before_the_search() -> None:
    from types import SimpleNamespace

    import awq_plugin.algorithm.awq as awq

    model = make_model("bitnet")
    template = llama_template()
    template.update(name="bitnet-from-llama", architectures=["BitNetForCausalLM"], model_types=["bitnet"])
    resolved = resolve_template(model, template)
    layers, captured = block_inputs(model, resolved.decoder_layers)
    quant = SimpleNamespace(bits=4, group_size=32, zero_point=True, modules_to_not_convert=())
    with pytest.raises(TemplateError, match=r"'self_attn\.v_proj -> self_attn\.o_proj' of decoder layer 0"):
        awq.awq_block_step(layers[0], resolved.block(0), captured.for_layer(0), quant, awq.AwqOptions())
