"""The architecture coverage tool on a handful of architectures (the full sweep is a benchmark)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from awq_plugin.models.auto import auto_model_class
from awq_plugin.tools.bench_architectures import (
    DOCS_JSON,
    DOCS_MD,
    comparison_failure,
    coverage_summary,
    main,
    render_coverage,
    run_one,
    summarize,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("model_type", "architectures", "auto"),
    [
        ("llama", ["LlamaForCausalLM"], "AutoModelForCausalLM"),
        ("qwen2_vl", ["Qwen2VLForConditionalGeneration"], "AutoModelForImageTextToText"),
        ("llava", None, "AutoModelForImageTextToText"),
        ("mllama", ["MllamaForConditionalGeneration"], "AutoModelForImageTextToText"),
        ("mllama", ["MllamaForCausalLM"], "AutoModelForCausalLM"),
    ],
)
def test_skeleton_auto_class_follows_the_architecture(model_type, architectures, auto) -> None:
    config = AutoConfig.for_model(model_type)
    config.architectures = architectures
    assert auto_model_class(config).__name__ == auto


def test_a_text_config_no_auto_mapping_lists_is_built_by_its_named_class(tmp_path: Path) -> None:
    # MllamaForCausalLM saves a `mllama_text_model` config, which AutoModelForCausalLM refuses;
    # quantize (skeleton, fp load) and the load back go through the class `architectures` names.
    row = run_one("mllama", "causal-lm", tmp_path)
    assert row["ok"], row
    assert row["architecture"] == "MllamaForCausalLM" and row["step"] == "done"
    saved = AutoConfig.from_pretrained(tmp_path / "awq")
    assert saved.model_type == "mllama_text_model"
    model = auto_model_class(saved).from_config(saved)
    assert type(model).__name__ == "MllamaForCausalLM"


def test_an_architecture_without_shipped_template_goes_folder_to_matching_logits(tmp_path: Path) -> None:
    row = run_one("starcoder2", "causal-lm", tmp_path)
    assert row["ok"], row
    assert row["template"] == "inferred" and row["step"] == "done"
    # c_proj follows a GELU: no provable fold, clip + rounding in both layers
    assert row["scaled_linears"] == 10 and row["rounded_linears"] == 2
    summary = summarize([row, {"model_type": "x", "mapping": "causal-lm", "ok": False, "step": "build"}])
    assert summary["causal-lm"] == {
        "tried": 2,
        "buildable": 1,
        "runs": 1,
        "passed": 1,
        "pass_rate": 1.0,
        "pass_rate_of_runs": 1.0,
        "scaled_linears": 10,
        "rounded_linears": 2,
    }


def test_vlm_checkpoint_keys_are_read_under_the_model_names(tmp_path: Path) -> None:
    """transformers saves Gemma 3 / LLaVA-style keys as language_model.model.*; the model says
    model.language_model.*: the streaming reader serves the model's names."""
    import torch
    from transformers import AutoModelForImageTextToText

    from awq_plugin.format.checkpoint import SafetensorsReader
    from awq_plugin.runtime.checkpoint_keys import renamed_reader
    from awq_plugin.tools.bench_architectures import _shrink

    config = AutoConfig.for_model("gemma3")
    _shrink(config)
    model = AutoModelForImageTextToText.from_config(config)
    model.save_pretrained(tmp_path)
    raw = SafetensorsReader(tmp_path)
    reader = renamed_reader(raw, model)
    state = model.state_dict()
    assert any(k.startswith("language_model.model.") for k in raw)  # the legacy layout on disk
    expected = {k for k in state if k != "lm_head.weight"}  # tied to the embeddings, not stored
    assert set(reader.keys()) == expected
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(reader.get(name), state[name])
    assert tuple(reader.get_slice_shape(name)) == tuple(state[name].shape)
    # a model whose checkpoint already uses its names gets the plain reader back
    llama = make_llama(tmp_path / "llama")
    assert renamed_reader(SafetensorsReader(tmp_path / "llama"), llama).__class__ is SafetensorsReader


def make_llama(folder: Path):
    from transformers import AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        vocab_size=256,
    )
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize(
    ("model_type", "scaled", "why"),
    [
        ("xglm", True, "its decoder layers get the attention mask and more as positional arguments"),
        (
            "roformer",
            True,
            "its head cls.predictions.decoder (weight and bias) is tied, so not in the checkpoint",
        ),
        ("deepseek_v3", True, "latent attention (q_a/q_b, kv_a/kv_b projections with their own norms)"),
        ("xlm", False, "no fold is provable: every linear still gets clip search + rounding"),
        ("gptj", True, "parallel attention and MLP read one norm: the search runs the whole layer"),
        ("falcon", True, "multi-query attention under a config name the defaults do not know"),
        ("olmo_hybrid", True, "a linear with 30 output rows in some layers only stays full precision"),
    ],
)
def test_designs_outside_the_llama_mould(model_type: str, scaled: bool, why: str, tmp_path: Path) -> None:
    """Folder -> AWQ -> inspect -> from_pretrained -> logits that match the references."""
    row = run_one(model_type, "causal-lm", tmp_path)
    assert row["ok"], (why, row)
    assert row["step"] == "done" and (row["scaled_linears"] > 0) == scaled and row["rounded_linears"] >= 0


def _shrunk(model_type: str):
    from awq_plugin.tools.bench_architectures import _shrink

    config = AutoConfig.for_model(model_type)
    _shrink(config)
    return config


def _rotary_half(text) -> int:
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    factor = text.rope_parameters.get("partial_rotary_factor") or 1.0
    return int(head_dim * factor) // 2


@pytest.mark.parametrize(
    ("sections", "half", "expected"),
    [
        ([16, 24, 24], 8, [2, 3, 3]),  # Qwen2-VL: proportions kept
        ([24, 20, 20], 8, [4, 2, 2]),  # Qwen3-VL: the rounding rest goes to the odd section
        ([22, 22, 20], 8, [3, 3, 2]),  # ERNIE-VL stacks h and w: they stay equal
        ([8, 12, 12], 4, [2, 1, 1]),  # GLM-4V with half rotary: one each, the odd one the rest
        ([11, 11, 10], 2, None),  # fewer rotary pairs than sections: left to the model
    ],
)
def test_mrope_sections_scale_to_the_tiny_rotary_dim(sections, half, expected) -> None:
    from awq_plugin.tools.bench_architectures import _mrope_sections

    assert _mrope_sections(sections, half) == expected


@pytest.mark.parametrize(
    ("model_type", "code_default"),
    [
        ("glm4v_moe", [8, 12, 12]),  # partial rotary 0.5: the sections must sum to head_dim / 4
        ("ernie4_5_vl_moe", [22, 22, 20]),
        ("qwen2_vl", [16, 24, 24]),
    ],
)
def test_shrunk_mrope_sections_sum_to_half_the_rotary_dim(model_type: str, code_default) -> None:
    """The config names no sections, the model's code defaults them for the full-size model:
    the shrunk config names ones that fit its rotary dim."""
    from awq_plugin.tools.bench_architectures import _code_mrope_default

    default_text = AutoConfig.for_model(model_type).text_config
    assert "mrope_section" not in default_text.rope_parameters
    assert _code_mrope_default(default_text) == code_default
    text = _shrunk(model_type).text_config
    sections = text.rope_parameters["mrope_section"]
    assert sum(sections) == _rotary_half(text) and min(sections) >= 1
    if model_type == "ernie4_5_vl_moe":
        assert sections[0] == sections[1]  # its h and w sections are stacked


def test_shrunk_configs_stay_consistent() -> None:
    xlstm = _shrunk("xlstm")  # its second names for hidden size and layer count follow
    assert xlstm.embedding_dim == xlstm.hidden_size == 64 and xlstm.num_blocks == xlstm.num_hidden_layers == 2
    assert xlstm.qk_dim == xlstm.hidden_size * xlstm.qk_dim_factor  # layers and cache agree on q/k size
    hrm = _shrunk("hrm_text")  # cache slots = layers per stack x cycles
    assert hrm.num_layers_per_stack == 2  # the tiny layer count, in each stack
    assert hrm.num_hidden_layers == hrm.num_layers_per_stack * hrm.H_cycles * (hrm.L_cycles + 1)
    xmod = _shrunk("xmod")  # a default language adapter, so input_ids alone run
    assert xmod.default_language == next(iter(xmod.languages))


@pytest.mark.parametrize(
    ("model_type", "auto"),
    [
        ("xmod", "AutoModelForCausalLM"),
        ("xlstm", "AutoModelForCausalLM"),
        ("hrm_text", "AutoModelForCausalLM"),
        ("ernie4_5_vl_moe", "AutoModelForImageTextToText"),
        ("glm4v_moe", "AutoModelForImageTextToText"),
    ],
)
def test_shrunk_models_run_their_own_forward(model_type: str, auto: str) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    model = getattr(transformers, auto).from_config(_shrunk(model_type)).eval()
    ids = torch.randint(1, 400, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape[:2] == (1, 8) and torch.isfinite(logits).all()


def test_a_checkpoint_the_load_mapping_does_not_invert_is_read_under_the_model_names(tmp_path: Path) -> None:
    """A shieldgemma2 config builds a Gemma3ForConditionalGeneration; save_pretrained stores its
    model.language_model.* as model.language_model.model.*, and transformers' load mapping for
    shieldgemma2 adds a model. prefix that does not undo that. The reader reverses the save renaming."""
    import torch
    from transformers import AutoModelForImageTextToText

    from awq_plugin.format.checkpoint import SafetensorsReader
    from awq_plugin.runtime.checkpoint_keys import renamed_reader

    model = AutoModelForImageTextToText.from_config(_shrunk("shieldgemma2"))
    model.save_pretrained(tmp_path)
    raw = SafetensorsReader(tmp_path)
    assert "model.language_model.model.embed_tokens.weight" in set(raw)
    reader = renamed_reader(raw, model)
    state = model.state_dict()
    assert set(reader.keys()) == {k for k in state if k != "lm_head.weight"}  # tied, not stored
    for name in (
        "model.language_model.embed_tokens.weight",
        "model.multi_modal_projector.mm_input_projection_weight",
    ):
        assert torch.equal(reader.get(name), state[name])


def test_mrope_sections_only_where_a_text_config_uses_them() -> None:
    """Vision sub-configs (no vocabulary) share the modeling module's default but not its use:
    they get no sections; a -vl text config whose code has no default gets Qwen-VL's, scaled."""
    assert "mrope_section" not in _shrunk("qwen3_5").vision_config.rope_parameters
    text = _shrunk("hunyuan_vl").text_config
    assert sum(text.rope_parameters["mrope_section"]) == _rotary_half(text)


# ---------------------------------------------------------------------------------------------
# The comparison: a pass is close to the references, and a planted defect fails it
# ---------------------------------------------------------------------------------------------


def _rewrite_checkpoint(folder: Path, edit) -> int:
    """Apply ``edit(tensors) -> bool`` to every shard of ``folder``; the number of shards it changed."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    changed = 0
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            metadata = f.metadata()
        tensors = load_file(shard)
        if edit(tensors):
            save_file(tensors, shard, metadata=metadata)
            changed += 1
    return changed


def reverse_nibble_order(linear: str):
    """A wrong pack order: the eight output channels in each int32 of ``linear``'s qweight reversed."""

    def edit(tensors) -> bool:
        key = f"{linear}.qweight"
        if key not in tensors:
            return False
        q = tensors[key]  # (K, N/8) int32, eight 4-bit channels each
        nibbles = [(q >> (4 * i)) & 0xF for i in range(8)]
        out = torch.zeros_like(q)
        for i in range(8):
            out |= nibbles[7 - i] << (4 * i)
        tensors[key] = out
        return True

    return edit


def swap_linears(first: str, second: str):
    """One expert's gate and up exchanged: all three packed tensors of ``first`` and ``second``."""

    def edit(tensors) -> bool:
        if f"{first}.qweight" not in tensors:
            return False
        for part in ("qweight", "qzeros", "scales"):
            a, b = f"{first}.{part}", f"{second}.{part}"
            tensors[a], tensors[b] = tensors[b], tensors[a]
        return True

    return edit


DEFECTS = {
    "llama": reverse_nibble_order("model.layers.1.mlp.down_proj"),
    # Mixtral's checkpoint names expert e's gate w1 and its up w3 (AutoAWQ / vLLM layout)
    "mixtral": swap_linears(
        "model.layers.0.block_sparse_moe.experts.0.w1", "model.layers.0.block_sparse_moe.experts.0.w3"
    ),
}


@pytest.mark.parametrize("model_type", sorted(DEFECTS))
def test_a_planted_checkpoint_defect_fails_the_comparison(model_type: str, tmp_path: Path) -> None:
    clean = run_one(model_type, "causal-lm", tmp_path / "clean")
    assert clean["ok"] and clean["step"] == "done", clean
    assert clean["checkpoint_error_ratio"] < 1e-5  # same weights: fp32 summation order only

    planted = []

    def corrupt(folder: Path) -> None:
        planted.append(_rewrite_checkpoint(folder, DEFECTS[model_type]))

    broken = run_one(model_type, "causal-lm", tmp_path / "broken", corrupt=corrupt)
    assert planted == [1]  # the defect is in the checkpoint the run loads
    assert not broken["ok"] and broken["step"] == "compare", broken
    assert "fake-quant reference" in broken["reason"]
    assert broken["checkpoint_error_ratio"] > 10 * clean["checkpoint_error_ratio"] + 0.01
    if model_type == "mixtral":
        # one expert's MLP barely moves a tiny random model's logits: a cosine with full
        # precision alone (the second check) would still pass it
        assert comparison_failure({**broken, "checkpoint_error_ratio": 0.0}) is None


def test_int4_share_counts_fused_experts_as_full_precision(tmp_path: Path) -> None:
    """Mixtral (shipped template) and OLMoE (inferred, experts unfused where proven): only the routers
    stay full precision. JetMoE (experts in no provable layout): its fused experts stay full precision,
    its decoder is mostly full precision, and the row says so."""
    mixtral = run_one("mixtral", "causal-lm", tmp_path / "mixtral")
    assert mixtral["ok"], mixtral
    assert mixtral["fp_matrix_weights"] == 2 * 4 * 64  # 2 layers x router [4 experts, hidden 64]
    assert mixtral["int4_share"] == round(mixtral["int4_weights"] / (mixtral["int4_weights"] + 512), 4)
    olmoe = run_one("olmoe", "causal-lm", tmp_path / "olmoe")
    assert olmoe["ok"] and olmoe["template"] == "inferred", olmoe
    assert olmoe["fp_fused_expert_tensors"] == 0 and olmoe["fp_matrix_weights"] == 2 * 4 * 64
    jetmoe = run_one("jetmoe", "causal-lm", tmp_path / "jetmoe")
    assert jetmoe["ok"], jetmoe
    assert jetmoe["fp_fused_expert_tensors"] == 8 and jetmoe["int4_share"] < 0.2  # 2 layers x 4 modules


@pytest.mark.parametrize(
    ("figures", "fails_on"),
    [
        ({"checkpoint_error_ratio": 0.0, "cos_fp_fakequant": 0.99, "cos_fp_reloaded": 0.99}, None),
        ({"checkpoint_error_ratio": 0.0, "cos_fp_fakequant": 0.99, "cos_fp_reloaded": 0.9876}, None),
        ({"checkpoint_error_ratio": 0.0, "cos_fp_fakequant": 0.99, "cos_fp_reloaded": 0.987}, "kernel"),
        ({"checkpoint_error_ratio": 2e-3, "cos_fp_fakequant": 0.99, "cos_fp_reloaded": 0.99}, "checkpoint"),
        (
            {"checkpoint_error_ratio": float("nan"), "cos_fp_fakequant": 1.0, "cos_fp_reloaded": 1.0},
            "checkpoint",
        ),
        ({"checkpoint_error_ratio": 0.0, "cos_fp_fakequant": 1.0, "cos_fp_reloaded": 1.0 - 5e-7}, None),
    ],
)
def test_comparison_thresholds(figures, fails_on) -> None:
    """The kernel may add 1.25 x the reference's 1 - cosine (+1e-6 noise); the checkpoint 1e-3."""
    reason = comparison_failure(figures)
    if fails_on is None:
        assert reason is None
    else:
        assert (
            reason is not None
            and {"checkpoint": "fake-quant reference", "kernel": "kernel"}[fails_on] in reason
        )


# ---------------------------------------------------------------------------------------------
# The committed summary and the page generated from it
# ---------------------------------------------------------------------------------------------


def test_coverage_page_is_generated_from_the_committed_summary(tmp_path: Path) -> None:
    """docs/coverage.md is what the generator makes of docs/coverage.json: the page cannot drift."""
    out = tmp_path / "coverage.md"
    assert main(["--from-summary", str(REPO / DOCS_JSON), "--docs", str(out)]) == 0
    assert out.read_text() == (REPO / DOCS_MD).read_text()


def test_coverage_summary_and_page_list_counts_passes_failures_and_low_int4_shares() -> None:
    passed = {
        "model_type": "a",
        "mapping": "causal-lm",
        "ok": True,
        "step": "done",
        "template": "inferred",
        "int4_share": 0.5,
        "fp_fused_expert_tensors": 2,
        "cos_fp_fakequant": 0.99,
        "cos_fp_reloaded": 0.989,
        "kernel": "cpu",
        "seconds": 3.0,
    }
    failed = {
        "model_type": "b",
        "mapping": "image-text-to-text",
        "ok": False,
        "step": "compare",
        "reason": "ValueError: x | y <z>",
    }
    summary = coverage_summary([passed, failed], "awq-plugin bench architectures --only a,b", complete=False)
    text = json.dumps(summary)  # plain data: what is committed
    assert json.loads(text) == summary
    causal, vlm = summary["mappings"]["causal-lm"], summary["mappings"]["image-text-to-text"]
    assert (causal["tried"], causal["passed"], vlm["tried"], vlm["buildable"], vlm["passed"]) == (
        1,
        1,
        1,
        1,
        0,
    )
    assert causal["passing"] == {
        "a": {
            "template": "inferred",
            "int4_share": 0.5,
            "fp_fused_expert_tensors": 2,
            "cos_fp_fakequant": 0.99,
            "cos_fp_reloaded": 0.989,
        }
    }
    assert vlm["failures"] == [{"model_type": "b", "step": "compare", "reason": "ValueError: x | y <z>"}]
    page = render_coverage(summary)
    assert "**Partial run**" in page
    assert "| causal-lm | a | 50.0% | 2 | inferred |" in page  # below the 90% INT4 share
    assert "| image-text-to-text | b | compare | ValueError: x \\| y &lt;z&gt; |" in page
    assert render_coverage(json.loads(text)) == page
