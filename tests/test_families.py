"""The 2026 families the sweep refused: Gemma 4 (per-layer head sizes), DeepSeek-V4 (reload dtype,
grouped linear) and the hybrid attention / SSM / linear-attention stacks (per-layer groups).

Tiny random models built as the architecture sweep builds them (``run_one``, whose shrink also
handles these families' per-layer config data). A pass is the sweep's own comparison with the
full-precision model and its fake-quant twin, with at least 90% of the decoder's matrix weights
in INT4.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from awq_plugin.errors import TemplateError
from awq_plugin.format.checkpoint import declared_dtype
from awq_plugin.templates import infer as infer_module
from awq_plugin.templates import resolve_template, validate_template_data
from awq_plugin.templates.infer import infer_template
from awq_plugin.templates.layer_config import config_of_layer
from awq_plugin.tools import bench_architectures as bench

torch.set_num_threads(1)


def tiny_model(model_type: str, **overrides) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type)
    bench._shrink(config)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


# ---------------------------------------------------------------------------------------------
# Per-layer attributes (Gemma 4)
# ---------------------------------------------------------------------------------------------


def test_each_layer_reads_its_own_head_dim() -> None:
    model = tiny_model("gemma4_text")
    config = model.config
    assert [config_of_layer(config, i).head_dim for i in range(2)] == [16, 32]
    assert [infer_module._head_dim(config_of_layer(config, i)) for i in range(2)] == [(4, 16), (4, 32)]
    assert [layer.self_attn.head_dim for layer in model.model.layers] == [16, 32]  # what the model built


def test_a_homogeneous_config_is_its_own_layer_config() -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2)
    assert config_of_layer(config, 0) is config and config_of_layer(config, 1) is config


def test_grouped_query_heads_resolve_per_layer_on_gemma4() -> None:
    """A v -> o group resolved on layers of different head sizes gets each layer's head_dim (the
    global config raises AmbiguousGlobalPerLayerAttributeError when read)."""
    model = tiny_model("gemma4_text")
    template, _ = infer_template(model)
    template["scaling_layers"] = [
        {
            "prev_op": "self_attn.v_proj",
            "layers": ["self_attn.o_proj"],
            "inp": "self_attn.o_proj",
            "repeat_kv": True,
        }
    ]
    template["unscaled"] = []
    resolved = resolve_template(model, template)
    groups = [block.groups[0] for block in resolved.blocks]
    assert [(g.kv_repeat, g.head_dim, g.in_features) for g in groups] == [(2, 16, 64), (2, 32, 128)]


def test_reading_the_global_head_dim_fails_on_gemma4(monkeypatch: pytest.MonkeyPatch) -> None:
    """The planted bug: layer configs replaced by the global one, as before the fix."""
    model = tiny_model("gemma4_text")
    monkeypatch.setattr(infer_module, "config_of_layer", lambda config, index: config)
    with pytest.raises(RuntimeError, match="per-layer attribute"):
        infer_template(model)


# ---------------------------------------------------------------------------------------------
# Hybrid stacks: groups per block kind
# ---------------------------------------------------------------------------------------------


def test_hybrid_groups_name_the_layers_of_their_kind() -> None:
    """Jamba: layer 0 is a Mamba mixer + dense MLP, layer 1 attention + experts. Each kind's groups
    are proven and kept for its own layer; before, nothing was common to both layers."""
    model = tiny_model("jamba")
    template, report = infer_template(model)
    where = {name: g.get("decoder_layers") for g in template["scaling_layers"] for name in g["layers"]}
    assert where["mamba.in_proj"] == where["feed_forward.down_proj"] == [0]
    assert where["self_attn.q_proj"] == where["self_attn.o_proj"] == [1]
    assert "mamba.out_proj" in report.reasons  # rounded without a scale, with the reason
    resolved = resolve_template(model, template)
    mamba, attention = resolved.blocks
    assert any("mamba.in_proj" in g.layers for g in mamba.groups)
    assert not any(name.startswith("mamba.") for g in attention.groups for name in g.layers)
    assert any("self_attn.q_proj" in g.layers for g in attention.groups)
    # every linear of every layer is quantized (scaled or rounded) unless it cannot pack
    for block, layer in zip(resolved.blocks, model.model.layers):
        linears = {n for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        assert set(block.linears) == {n for n in linears if layer.get_submodule(n).out_features % 8 == 0}


def test_a_homogeneous_stack_gets_no_decoder_layers_field() -> None:
    template, _ = infer_template(tiny_model("llama"))
    assert template["scaling_layers"] and not any("decoder_layers" in g for g in template["scaling_layers"])


@pytest.mark.parametrize(
    ("indices", "error"),
    [([], "non-empty"), ([0, 0], "twice"), ([-1], "indices >= 0"), ([True], "indices >= 0")],
)
def test_decoder_layers_field_is_validated(indices, error) -> None:
    data = {
        "architectures": ["X"],
        "model_types": [],
        "model_decoder_layers": "model.layers",
        "non_layer_modules": {"embed_tokens": "e", "lm_head": "h"},
        "scaling_layers": [{"prev_op": "n", "layers": ["a"], "inp": "a", "decoder_layers": indices}],
    }
    with pytest.raises(TemplateError, match=error):
        validate_template_data(data, "<test>")


def test_decoder_layers_beyond_the_model_are_an_error() -> None:
    model = tiny_model("llama")
    template, _ = infer_template(model)
    template["scaling_layers"][0]["decoder_layers"] = [0, 5]
    with pytest.raises(TemplateError, match=r"decoder_layers' names layers \[5\]"):
        resolve_template(model, template)


# ---------------------------------------------------------------------------------------------
# DeepSeek-V4: the reload dtype and its grouped o_a_proj
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "dtype"),
    [
        ({"dtype": "bfloat16"}, "bfloat16"),
        ({"torch_dtype": "float32"}, "float32"),
        ({"dtype": "torch.float32"}, "float32"),
        ({}, "float16"),
        ({"dtype": None, "torch_dtype": "int8"}, "float16"),
    ],
)
def test_the_checkpoint_declares_the_source_dtype(config, dtype) -> None:
    assert declared_dtype(config) == dtype


def test_deepseek_v4_reloads_in_its_own_dtype(tmp_path: Path) -> None:
    """No dtype given: the float32 model reloads as float32. Declared float16, its float32-kept
    norms fed the float16 o_a_proj ("expected m1 and m2 to have the same dtype")."""
    from transformers import AutoModelForCausalLM

    import awq_plugin.integrations.transformers as awq_transformers
    from awq_plugin.api import quantize

    model = tiny_model("deepseek_v4")
    model.save_pretrained(tmp_path / "src")
    ids = torch.randint(1, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    quantize(str(tmp_path / "src"), bench.SCHEME, ids, out_dir=tmp_path / "awq", progress=False)
    assert json.loads((tmp_path / "awq" / "config.json").read_text())["torch_dtype"] == "float32"
    awq_transformers.activate()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "awq").eval()
    with torch.no_grad():
        logits = loaded(input_ids=ids).logits
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_deepseek_v4_grouped_output_projection_is_quantized_as_its_groups() -> None:
    """DeepSeek-V4's o_a_proj multiplies each head group by its own slice of W: it is inferred as
    its G plain linears (tests/test_grouped_linear.py), each rounded without a scale."""
    model = tiny_model("deepseek_v4")
    template, report = infer_template(model)
    groups = [f"self_attn.o_a_proj.{g}" for g in range(model.config.o_groups)]
    assert not set(groups) & set(template["not_quantized"])
    assert infer_module.NOT_A_LINEAR not in report.reasons.values()
    assert not any(set(groups) & set(g["layers"]) for g in template["scaling_layers"])
    assert set(groups) <= set(template["unscaled"])


def test_a_plain_linear_subclass_is_still_quantized() -> None:
    class Plain(nn.Linear):  # Falcon's FalconLinear: same math, its own forward
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight.T + self.bias

    class Grouped(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = self.weight.view(2, -1, x.shape[-1]).transpose(1, 2)  # (groups, in, out/groups)
            return torch.bmm(x.transpose(0, 1), w).transpose(0, 1)  # (B, groups, out/groups)

    torch.manual_seed(0)
    x = torch.randn(3, 2, 16)  # (B, groups, in)
    plain, grouped = Plain(16, 8), Grouped(16, 8)
    with torch.no_grad():
        assert infer_module._computes_linear(plain, x, plain(x))
        assert not infer_module._computes_linear(grouped, x, grouped(x))


# ---------------------------------------------------------------------------------------------
# The sweep's pass, family by family
# ---------------------------------------------------------------------------------------------

# (model_type, mapping, lowest INT4 share, why the rest stays in full precision)
FAMILIES = [
    ("gemma4_text", "causal-lm", 1.0, ""),
    ("gemma4_unified_text", "causal-lm", 1.0, ""),
    ("gemma4", "image-text-to-text", 1.0, ""),
    ("gemma4_unified", "image-text-to-text", 1.0, ""),
    ("deepseek_v4", "causal-lm", 0.95, "hyper-connection mixes, compressor position biases, routers"),
    ("minimax", "causal-lm", 0.9, "routers"),
    ("laguna", "causal-lm", 0.9, "g_proj with 8 rows per head (unpackable), routers"),
    ("jamba", "causal-lm", 0.9, "Mamba's conv1d and A_log, routers"),
    ("nemotron_h", "causal-lm", 0.9, "Mamba's conv1d, routers"),
    ("zamba2", "causal-lm", 0.9, "Mamba's conv1d"),
    ("hy_v4", "causal-lm", 0.9, "hyper-connection mixes, routers"),
    # Its adapters write a linear's output into a float32 tensor by index: under bf16 autocast
    # (search_dtype "auto" on CPUs with bf16 units) the block's forward fails; it runs in float32.
    ("xmod", "causal-lm", 1.0, ""),
]


def check_family(model_type: str, mapping: str, share: float, tmp_path: Path) -> None:
    row = bench.run_one(model_type, mapping, tmp_path)
    assert row["ok"], row
    assert row["int4_share"] >= share, row


@pytest.mark.parametrize(("model_type", "mapping", "share", "why"), FAMILIES)
def test_family_quantizes_and_reloads_close_to_full_precision(
    model_type, mapping, share, why, tmp_path
) -> None:
    check_family(model_type, mapping, share, tmp_path)


def test_a_linear_whose_output_the_block_changes_in_place_is_still_a_linear() -> None:
    """Falcon's attention rewrites query_key_value's output in place after the call: the check is
    made in the call, or every Falcon attention linear would be kept in full precision."""
    template, report = infer_template(tiny_model("falcon"))
    assert template["not_quantized"] == []
    assert infer_module.NOT_A_LINEAR not in report.reasons.values()
