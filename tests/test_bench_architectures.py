"""The architecture coverage tool on a handful of architectures (the full sweep is a benchmark)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoConfig

from awq_plugin.runtime.modeling import auto_model_class
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
        "passed": 1,
        "pass_rate": 1.0,
        "scaled_linears": 10,
        "rounded_linears": 2,
    }
