"""Architecture templates: every shipped template against a tiny model of its family, and bad templates.

Each family's model is built from a transformers config with random weights
(hidden 64, 2 layers, vocab 256). Besides name resolution, the test folds
random positive scales into every group and checks that the decoder layer's
full-precision output does not change: that is what makes a template
*correct* (a wrong ``prev_op`` would change it), not merely resolvable.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModelForCausalLM

from awq_plugin.calibration.capture import capture_decoder_inputs, forward_block
from awq_plugin.errors import TemplateError
from awq_plugin.templates import load_shipped_templates, resolve_template
from awq_plugin.templates.folds import apply_group_scales

torch.set_num_threads(1)

COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention wherever the family supports it
    vocab_size=256,
    max_position_embeddings=128,
)
# model_type -> (extra config fields, expected shipped template)
FAMILIES = {
    "llama": ({}, "llama"),
    "mistral": ({}, "mistral"),
    "qwen2": ({}, "qwen2"),
    "qwen3": ({"head_dim": 16}, "qwen3"),
    "gemma": ({"head_dim": 16}, "gemma"),
    "gemma2": ({"head_dim": 16}, "gemma2"),
    "gemma3_text": ({"head_dim": 16, "sliding_window": 8}, "gemma3"),
    "phi3": ({"pad_token_id": 0}, "phi3"),
    "mixtral": ({"num_local_experts": 4, "num_experts_per_tok": 2}, "mixtral"),
    "qwen2_moe": (
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 64,
        },
        "qwen2_moe",
    ),
    "qwen3_moe": (
        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 16},
        "qwen3_moe",
    ),
    "opt": (
        {"ffn_dim": 128, "word_embed_proj_dim": 64, "intermediate_size": None, "num_key_value_heads": None},
        "opt",
    ),
}


def make_tiny_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    extra, _ = FAMILIES[model_type]
    fields = {k: v for k, v in {**COMMON, **extra}.items() if v is not None}
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms start at 1 (or 0 for Gemma's 1 + w): perturb them so folds matter
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.3 * torch.randn_like(param))
    return model


def test_shipped_templates_load_and_keys_are_unique() -> None:
    shipped = load_shipped_templates()
    assert {t for _, t in FAMILIES.values()} == set(shipped)
    for name, data in shipped.items():
        assert data["name"] == name
        if data["unsupported"]:  # a template that leaves parts out says what and why
            assert data["notes"]


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_template_resolves_and_every_fold_is_exact(model_type: str) -> None:
    model = make_tiny_model(model_type)
    resolved = resolve_template(model)
    assert resolved.name == FAMILIES[model_type][1]
    layers = model.get_submodule(resolved.decoder_layers)
    assert len(resolved.blocks) == len(layers)
    for role, path in resolved.non_layer_modules.items():
        assert model.get_submodule(path) is not None, role
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    captured = capture_decoder_inputs(model, layers, ids, micro_batch_size=2)
    generator = torch.Generator().manual_seed(1)
    for i, block in enumerate(layers):
        template = resolved.block(i)
        inputs = captured.for_layer(i)
        reference = forward_block(block, inputs)
        scaled = copy.deepcopy(block)
        for group in template.groups:
            s = torch.exp(torch.randn(group.n_scales, generator=generator))  # positive, spread ~ e^±2
            apply_group_scales(scaled, group, s)
        for out, ref in zip(forward_block(scaled, inputs), reference):
            # fp32: each fold adds ~1e-7 relative rounding per multiply; 1e-4 leaves margin for
            # attention softmax and the RMSNorm/LayerNorm statistics.
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", ["llama", "phi3", "opt", "qwen2_moe"])
def test_groups_layers_exist_with_matching_in_features(model_type: str) -> None:
    model = make_tiny_model(model_type)
    resolved = resolve_template(model)
    layers = model.get_submodule(resolved.decoder_layers)
    for block, template in zip(layers, resolved.blocks):
        covered = set()
        for group in template.groups:
            for name in group.layers:
                linear = block.get_submodule(name)
                assert isinstance(linear, torch.nn.Linear)
                assert linear.in_features == group.in_features == group.n_scales * group.kv_repeat
                covered.add(name)
        assert set(template.linears) == covered | set(template.unscaled)


def test_gqa_v_to_o_group_has_one_scale_per_kv_channel() -> None:
    model = make_tiny_model("llama")
    v_to_o = resolve_template(model).block(0).groups[1]
    assert (v_to_o.kv_repeat, v_to_o.head_dim, v_to_o.n_scales, v_to_o.in_features) == (2, 16, 32, 64)
    s = torch.arange(32, dtype=torch.float32)
    cols = v_to_o.expand_scales(s)  # query head h reads KV head h // 2
    assert torch.equal(cols[:16], s[:16]) and torch.equal(cols[16:32], s[:16])
    assert torch.equal(cols[32:48], s[16:]) and torch.equal(v_to_o.reduce_columns(cols), s)


def test_lookup_falls_back_to_model_type() -> None:
    model = make_tiny_model("llama")
    model.config.architectures = ["SomethingForCausalLM"]
    assert resolve_template(model).name == "llama"


def test_resolve_from_config_builds_a_meta_skeleton() -> None:
    config = make_tiny_model("mistral").config
    assert resolve_template(config).name == "mistral"


def test_unknown_architecture_names_the_fix() -> None:
    """Without weights (a meta skeleton) nothing can be inferred: the error says what to do."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(make_tiny_model("llama").config)
    model.config.architectures = ["SomethingForCausalLM"]
    model.config.model_type = "something"
    with pytest.raises(TemplateError, match=r"SomethingForCausalLM.*--template"):
        resolve_template(model)
    with pytest.raises(TemplateError, match=r"needs the model's weights.*template infer"):
        resolve_template(model, "infer")


def test_unknown_architecture_with_weights_gets_an_inferred_template(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = make_tiny_model("llama")
    model.config.architectures = ["SomethingForCausalLM"]
    model.config.model_type = "something"
    with caplog.at_level(logging.WARNING, logger="awq_plugin.templates"):
        resolved = resolve_template(model)
    assert "inferring the scaling groups" in caplog.text
    assert resolved.name == "inferred-something" and "inferred" in resolved.source
    shipped = resolve_template(model, "llama")
    assert [g.name for g in resolved.block(1).groups] == [g.name for g in shipped.block(1).groups]


def test_opt_variant_with_post_layer_norm_is_refused() -> None:
    model = make_tiny_model("opt")
    model.config.do_layer_norm_before = False
    with pytest.raises(TemplateError, match=r"config_requirements\.do_layer_norm_before"):
        resolve_template(model)


# ---- user templates -------------------------------------------------------------------------


def llama_template() -> dict:
    return copy.deepcopy(load_shipped_templates()["llama"])


def test_user_template_file_works_like_a_shipped_one(tmp_path: Path) -> None:
    path = tmp_path / "my_arch.json"
    data = llama_template()
    del data["name"]
    path.write_text(json.dumps(data))
    resolved = resolve_template(make_tiny_model("llama"), path)
    assert resolved.name == "my_arch" and len(resolved.block(0).groups) == 4


def test_misspelled_module_names_field_layer_and_close_match(tmp_path: Path) -> None:
    data = llama_template()
    data["scaling_layers"][2]["prev_op"] = "post_attention_layernom"
    path = tmp_path / "typo.json"
    path.write_text(json.dumps(data))
    with pytest.raises(TemplateError) as info:
        resolve_template(make_tiny_model("llama"), path)
    message = str(info.value)
    assert "typo.json" in message and "scaling_layers[2].prev_op" in message
    assert "post_attention_layernom" in message and "'post_attention_layernorm'" in message
    assert "decoder layer 0" in message


def test_missing_decoder_layers_path() -> None:
    data = llama_template()
    data["model_decoder_layers"] = "model.layer"
    with pytest.raises(TemplateError, match=r"model_decoder_layers.*close matches: \['model.layers'"):
        resolve_template(make_tiny_model("llama"), data)


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (lambda d: d.pop("scaling_layers"), "'scaling_layers' is missing"),
        (lambda d: d.update(scaling_layers=[]), "'scaling_layers' is empty and so is 'unscaled'"),
        (lambda d: d["scaling_layers"][0].pop("inp"), r"'scaling_layers\[0\].inp' is missing"),
        (lambda d: d.update(model_decoder_layers=3), "'model_decoder_layers' must be str, got int"),
        (lambda d: d["scaling_layers"][1].update(layers="self_attn.o_proj"), r"layers' must be list"),
        (lambda d: d.update(norm_weight_offset=True), "'norm_weight_offset' must be int or float, got bool"),
        (lambda d: d.update(scaling_layer=[]), "'scaling_layer' is not a template field"),
        (lambda d: d["scaling_layers"][0].update(module2inspec="x"), "module2inspec' is not a group field"),
        (lambda d: d["non_layer_modules"].pop("lm_head"), "non_layer_modules.lm_head' is missing"),
        (lambda d: d["scaling_layers"][0].pop("module2inspect"), "module2inspect' is required"),
        (lambda d: d["clip_skip"].append(""), r"clip_skip\[2\]' must be a non-empty string"),
    ],
)
def test_bad_template_schema_names_the_field(mutate, pattern: str) -> None:
    data = llama_template()
    mutate(data)
    with pytest.raises(TemplateError, match=pattern):
        resolve_template(make_tiny_model("llama"), data)


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (
            lambda d: d["scaling_layers"][0].update(module2inspect="mlp"),
            "does not contain the group's layers",
        ),
        (lambda d: d["scaling_layers"][1].update(repeat_kv=False), r"set \"fused_prev_op\".*\"repeat_kv\""),
        (lambda d: d["scaling_layers"][0].update(prev_op="self_attn"), "folding needs a norm"),
        (
            lambda d: d["scaling_layers"][3].update(
                layers=["mlp.down_proj", "mlp.up_proj"], module2inspect="mlp"
            ),
            "mixes in_features",
        ),
        (
            lambda d: d["scaling_layers"][0].update(layers=["self_attn.q_proj", "mlp"]),
            "is a LlamaMLP, not an nn.Linear",
        ),
        (lambda d: d["not_quantized"].append("mlp.down_prj"), r"not_quantized\[0\].*close matches"),
        (lambda d: d["scaling_layers"].append(dict(d["scaling_layers"][3])), "in the layers of two groups"),
    ],
)
def test_template_inconsistent_with_model_is_refused(mutate, pattern: str) -> None:
    data = llama_template()
    mutate(data)
    with pytest.raises(TemplateError, match=pattern):
        resolve_template(make_tiny_model("llama"), data)


def test_uncovered_linear_is_logged_not_skipped(caplog: pytest.LogCaptureFixture) -> None:
    data = llama_template()
    data["scaling_layers"] = data["scaling_layers"][:3]  # drop up -> down
    with caplog.at_level(logging.WARNING, logger="awq_plugin.templates"):
        resolved = resolve_template(make_tiny_model("llama"), data)
    assert "mlp.down_proj" in resolved.block(0).unscaled and "mlp.down_proj" in resolved.block(0).linears
    assert "mlp.down_proj" in caplog.text and "without an AWQ scale" in caplog.text


@settings(max_examples=15, deadline=None)
@given(
    n_kv=st.sampled_from([1, 2, 4]),
    rep=st.sampled_from([1, 2, 3]),
    head_dim=st.sampled_from([8, 16]),
    intermediate=st.sampled_from([48, 96]),
)
def test_property_resolved_groups_match_the_model(
    n_kv: int, rep: int, head_dim: int, intermediate: int
) -> None:
    config = AutoConfig.for_model(
        "llama",
        hidden_size=96,  # divisible by every head count drawn (1..12); head_dim is set independently
        intermediate_size=intermediate,
        num_hidden_layers=1,
        num_attention_heads=n_kv * rep,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        vocab_size=32,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    block = model.model.layers[0]
    for group in resolve_template(model).block(0).groups:
        for name in group.layers:
            assert block.get_submodule(name).in_features == group.in_features
        prev = block.get_submodule(group.prev_op)
        rows = prev.out_features if group.prev_op_is_linear else prev.weight.shape[0]
        assert rows == group.n_scales
        assert group.kv_repeat == (rep if group.prev_op == "self_attn.v_proj" else 1)


def test_unsupported_parts_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    data = llama_template()
    data["unsupported"] = ["mlp.down_proj's bias trick"]
    data["notes"] = "a test"
    with caplog.at_level(logging.WARNING, logger="awq_plugin.templates"):
        resolve_template(make_tiny_model("llama"), data)
    assert "does not cover mlp.down_proj's bias trick" in caplog.text
