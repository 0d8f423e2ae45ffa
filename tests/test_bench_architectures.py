"""The architecture coverage tool on a handful of architectures (the full sweep is a benchmark)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoConfig

from awq_plugin.models.auto import auto_model_class
from awq_plugin.tools.bench_architectures import run_one, summarize


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


def test_an_architecture_without_shipped_template_goes_folder_to_finite_logits(tmp_path: Path) -> None:
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
    """Folder -> AWQ -> inspect -> from_pretrained -> finite logits."""
    row = run_one(model_type, "causal-lm", tmp_path)
    assert row["ok"], (why, row)
    assert row["step"] == "done" and (row["scaled_linears"] > 0) == scaled and row["rounded_linears"] >= 0
