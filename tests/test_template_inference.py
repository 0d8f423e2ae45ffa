"""Templates inferred from the model's own data flow: equal to the reviewed ones, refusing what is not proven.

Tiny random models (hidden 64, 2 layers); random weights are enough, the
inference observes data flow and proves folds numerically, it learns no values.
"""

from __future__ import annotations

import pytest
import torch
from test_fold_check import make_model
from test_templates import make_tiny_model
from torch import nn

from awq_plugin.errors import TemplateError
from awq_plugin.templates import resolve_template
from awq_plugin.templates.infer import infer_template

torch.set_num_threads(1)

DENSE_SHIPPED = ["gemma", "gemma2", "gemma3_text", "llama", "mistral", "opt", "phi3", "qwen2", "qwen3"]


def group_key(group) -> tuple:
    return (
        group.prev_op,
        group.layers,
        group.inp,
        group.module2inspect,
        group.kv_repeat,
        group.fused_prev_op,
        group.norm_weight_offset,
        group.n_scales,
    )


@pytest.mark.parametrize("model_type", DENSE_SHIPPED)
def test_inferred_groups_equal_the_shipped_template(model_type: str) -> None:
    model = make_tiny_model(model_type)
    template, report = infer_template(model)
    shipped = resolve_template(model)
    inferred = resolve_template(model, template)
    assert inferred.decoder_layers == shipped.decoder_layers
    for mine, theirs in zip(inferred.blocks, shipped.blocks):
        assert [group_key(g) for g in mine.groups] == [group_key(g) for g in theirs.groups]
        assert mine.unscaled == theirs.unscaled == ()
    assert report.unscaled == [] and len(report.proven) == len(shipped.block(0).groups)
    for role in ("embed_tokens", "norm", "lm_head"):
        assert template["non_layer_modules"][role] == shipped.non_layer_modules[role]


def test_bitnet_sub_norms_are_found_as_the_producers() -> None:
    """BitNet normalises before o_proj and down_proj: the sub-norms, not v/up, feed them."""
    template, report = infer_template(make_model("bitnet"))
    assert report.proven == [
        "input_layernorm -> self_attn.q_proj, self_attn.k_proj, self_attn.v_proj",
        "self_attn.attn_sub_norm -> self_attn.o_proj",
        "post_attention_layernorm -> mlp.gate_proj, mlp.up_proj",
        "mlp.ffn_sub_norm -> mlp.down_proj",
    ]
    resolve_template(make_model("bitnet"), template)  # the inferred template resolves as any other


def test_folds_that_do_not_hold_are_rounded_with_the_reason() -> None:
    """StarCoder 2's MLP is c_proj(gelu(c_fc(x))): GELU does not commute with a scale."""
    template, report = infer_template(make_model("starcoder2"))
    assert "post_attention_layernorm -> mlp.c_fc" in report.proven
    assert report.unscaled == ["mlp.c_proj"] == template["unscaled"]
    assert "no producer whose fold leaves the block output unchanged" in report.reasons["mlp.c_proj"]
    # OLMo 2 has no pre-norm: q/k/v and gate/up read the residual stream, nothing can absorb 1/s.
    _, report = infer_template(make_model("olmo2"))
    assert report.proven == ["self_attn.v_proj -> self_attn.o_proj", "mlp.up_proj -> mlp.down_proj"]
    assert set(report.unscaled) == {
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
    }


def test_no_decoder_layer_list_is_a_clear_error() -> None:
    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

    with pytest.raises(TemplateError, match=r"no decoder-layer list found: looked for an nn\.ModuleList"):
        infer_template(Flat(), torch.zeros(1, 4, dtype=torch.long))


def test_decoder_layers_without_linears_is_a_clear_error() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(8))

    class NoLinears(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])

    with pytest.raises(TemplateError, match=r"\['layers'\]\) hold no nn.Linear layers"):
        infer_template(NoLinears(), torch.zeros(1, 4, dtype=torch.long))


def test_cli_template_infer_prints_a_template_that_resolves(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from awq_plugin.cli import main

    model = make_model("starcoder2")
    model.save_pretrained(tmp_path / "sc2")
    assert main(["template", "infer", str(tmp_path / "sc2")]) == 0
    out = capsys.readouterr()
    template = json.loads(out.out)
    assert template["model_decoder_layers"] == "model.layers" and template["unscaled"] == ["mlp.c_proj"]
    assert "unscaled (clip + rounding): mlp.c_proj" in out.err
    resolved = resolve_template(model, template)  # the user can review it and pass it back
    assert len(resolved.block(0).groups) == 3


def test_equal_values_from_two_norms_are_not_one_shared_input() -> None:
    """GPT-NeoX reads two freshly initialised (so equal-valued) norms in parallel: two groups."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "gpt_neox",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=256,
    )
    torch.manual_seed(0)
    _, report = infer_template(AutoModelForCausalLM.from_config(config).eval())
    assert report.proven == [
        "input_layernorm -> attention.query_key_value",
        "post_attention_layernorm -> mlp.dense_h_to_4h",
    ]
    # dense reads per-head interleaved q/k/v rows, dense_4h_to_h a GELU: neither folds
    assert report.unscaled == ["attention.dense", "mlp.dense_4h_to_h"]


def _shrunk_model(model_type: str) -> nn.Module:
    """The coverage bench's tiny config of ``model_type`` (consistent for GPT-J, Falcon, MLA ...)."""
    from transformers import AutoConfig

    from awq_plugin.tools.bench_architectures import _shrink

    config = AutoConfig.for_model(model_type)
    _shrink(config)
    return make_model(model_type, config)


def test_parallel_attention_and_mlp_are_judged_on_the_whole_layer() -> None:
    """GPT-J: ln_1 feeds q/k/v and fc_in side by side; only the layer itself holds all four."""
    template, report = infer_template(_shrunk_model("gptj"))
    assert "ln_1 -> attn.q_proj, attn.k_proj, attn.v_proj, mlp.fc_in" in report.proven
    (group,) = [g for g in template["scaling_layers"] if g["prev_op"] == "ln_1"]
    assert group["module2inspect"] == ""
    resolved = resolve_template(_shrunk_model("gptj"), template)
    assert resolved.block(0).groups[0].module2inspect == ""


def test_multi_query_attention_the_config_does_not_name_states_its_head_ratio() -> None:
    """Falcon says multi_query, not num_key_value_heads: the template carries the proven ratio,
    and the fold check at quantize time (which failed with the config's 1:1) passes."""
    from test_fold_check import block_inputs

    from awq_plugin.templates.verify import verify_block_folds

    model = _shrunk_model("falcon")
    template, _ = infer_template(model)
    (vo,) = [g for g in template["scaling_layers"] if g["layers"] == ["self_attention.dense"]]
    assert vo["repeat_kv"] == model.config.num_attention_heads  # one KV head
    resolved = resolve_template(model, template)
    layers, captured = block_inputs(model, resolved.decoder_layers)
    checks = verify_block_folds(layers[0], resolved.block(0), captured.for_layer(0), "inferred")
    assert checks and all(c.error < 1e-5 for c in checks), checks


def test_the_streaming_quantizer_infers_the_same_template_one_layer_at_a_time(tmp_path) -> None:
    """No shipped template and no --template: the folder's own weights, one decoder layer in memory
    at a time, give the template the in-memory inference gives on the whole model."""
    from awq_plugin.algorithm.results import AwqResults
    from awq_plugin.config import AwqQuantConfig
    from awq_plugin.pipeline.quantize import quantize_checkpoint
    from awq_plugin.templates.schema import validate_template_data

    model = _shrunk_model("gptj")  # parallel attention + MLP, a position-table buffer in each layer
    expected, _ = infer_template(model)
    model.save_pretrained(tmp_path / "src")
    ids = torch.randint(1, 400, (2, 32), generator=torch.Generator().manual_seed(0))
    quant = AwqQuantConfig.from_scheme("uint4_wo_32")
    quantize_checkpoint(tmp_path / "src", tmp_path / "out", quant, calib=ids, progress=False)
    used = AwqResults.load(tmp_path / "out" / "awq_plugin" / "awq_results.safetensors").template
    expected = validate_template_data(expected, "<inferred>")  # as stored: defaults filled in
    assert used["scaling_layers"] == expected["scaling_layers"] and used["unscaled"] == expected["unscaled"]
    assert any(g["module2inspect"] == "" for g in used["scaling_layers"])


def tiny_mamba(dt_rank: int) -> nn.Module:
    from transformers import MambaConfig, MambaForCausalLM

    config = MambaConfig(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, state_size=8, expand=2, time_step_rank=dt_rank
    )
    torch.manual_seed(0)
    return MambaForCausalLM(config).eval()


def test_a_small_linear_the_group_cannot_split_stays_in_full_precision(tmp_path) -> None:
    """Mamba's dt_proj reads dt_rank = 48 columns: group 32 keeps it in fp16, listed, and the rest loads."""
    from transformers import AutoModelForCausalLM

    import awq_plugin.integrations.transformers as awq_transformers
    from awq_plugin.api import quantize
    from awq_plugin.format.checkpoint import read_json
    from awq_plugin.runtime.qlinear import AwqLinear

    src, out = tmp_path / "src", tmp_path / "awq"
    tiny_mamba(dt_rank=48).save_pretrained(src)
    ids = torch.randint(1, 400, (2, 32), generator=torch.Generator().manual_seed(0))
    quantize(str(src), "uint4_wo_32", ids, out_dir=out, progress=False)
    kept = read_json(out / "config.json")["quantization_config"]["modules_to_not_convert"]
    # dt_proj by the group size; the mixers' convolutions as every full-precision leaf is listed
    assert kept == [f"backbone.layers.{i}.mixer.dt_proj" for i in range(2)] + [
        f"backbone.layers.{i}.mixer.conv1d" for i in range(2)
    ]
    awq_transformers.activate()
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    mixer = loaded.backbone.layers[0].mixer
    assert isinstance(mixer.dt_proj, nn.Linear) and isinstance(mixer.in_proj, AwqLinear)
    with torch.no_grad():
        assert torch.isfinite(loaded(input_ids=ids[:1]).logits).all()


def test_a_large_linear_the_group_cannot_split_is_a_clear_error(tmp_path) -> None:
    from awq_plugin.algorithm.awq import ungroupable_linears
    from awq_plugin.config import AwqQuantConfig
    from awq_plugin.errors import ConfigError

    model = tiny_mamba(dt_rank=120)  # dt_proj: 120 x 128 of the block's linear weights
    resolved = resolve_template(model)
    layers = model.get_submodule(resolved.decoder_layers)
    quant = AwqQuantConfig.from_scheme("uint4_wo_32")
    with pytest.raises(
        ConfigError,
        match=r"'backbone\.layers\.0\.mixer\.dt_proj' has in_features=120, not a multiple of group_size=32 \(with 0 more",
    ):
        ungroupable_linears(layers, resolved, quant)
    # Listed by the user, it is theirs to keep: no error, nothing added.
    assert ungroupable_linears(layers, resolved, quant.replace(modules_to_not_convert=("dt_proj",))) == ()


def test_gpt2_conv1d_layers_quantize_and_load_as_the_reference_computes(tmp_path, monkeypatch) -> None:
    """GPT-2 keeps its linears as Conv1D ([in, out] weights). Quantized ones load as AwqLinear, the one
    kept in full precision is written in Conv1D's layout, and transformers' logits equal the
    reference (the source model, AWQ re-applied, fake-quantized): a transposition slip in any square
    c_proj would not."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    import awq_plugin.integrations.transformers as awq_transformers
    from awq_plugin.algorithm.awq import AwqResults, apply_awq
    from awq_plugin.api import quantize
    from awq_plugin.config import AwqQuantConfig
    from awq_plugin.format.checkpoint import SafetensorsReader
    from awq_plugin.pipeline.guard import fake_quantize_linears
    from awq_plugin.pipeline.quantize import RESULTS_FILE
    from awq_plugin.runtime.qlinear import AwqLinear

    src, out = tmp_path / "src", tmp_path / "awq"
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    GPT2LMHeadModel(config).eval().save_pretrained(src)
    ids = torch.randint(1, 500, (4, 32), generator=torch.Generator().manual_seed(0))
    quant = AwqQuantConfig.from_scheme("uint4_wo_32").replace(modules_to_not_convert=("mlp.c_proj",))
    quantize(str(src), quant, ids, out_dir=out, progress=False)
    reader = SafetensorsReader(out)
    assert "transformer.h.0.attn.c_attn.qweight" in reader
    assert list(reader.get_slice_shape("transformer.h.0.mlp.c_proj.weight")) == [256, 64]  # Conv1D: [in, out]

    reference = GPT2LMHeadModel.from_pretrained(src, dtype=torch.float32).eval()
    results = AwqResults.load(out / RESULTS_FILE)
    apply_awq(reference, results)
    fake_quantize_linears(reference, quant, results.template)
    awq_transformers.activate()
    monkeypatch.setenv("AWQ_PLUGIN_KERNEL", "reference")  # the kernels have their own tests
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    block = loaded.transformer.h[0]
    assert isinstance(block.attn.c_attn, AwqLinear) and isinstance(block.attn.c_proj, AwqLinear)
    assert isinstance(block.mlp.c_proj, Conv1D)
    with torch.no_grad():
        want, got = reference(input_ids=ids).logits, loaded(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_a_post_norm_model_without_a_final_norm_gets_a_template() -> None:
    """OpenAI GPT normalises inside its blocks only (and keeps Conv1D linears): no norm role, still a template."""
    from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel

    torch.manual_seed(0)
    model = OpenAIGPTLMHeadModel(
        OpenAIGPTConfig(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    )
    template, report = infer_template(model.eval())
    assert set(template["non_layer_modules"]) == {"embed_tokens", "lm_head"}
    assert report.proven  # the folds of the post-attention norm into the MLP, at least
    assert resolve_template(model, template).block(1).linears
