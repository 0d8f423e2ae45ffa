"""Format compatibility: stock vLLM (plugins off) serves our checkpoints like our reference model,
in the AutoAWQ layout and in the two others ``awq-plugin convert`` writes."""

from __future__ import annotations

from pathlib import Path

from awq_plugin.format.convert import convert_checkpoint
from awq_plugin.runtime import modeling
from greedy import assert_same_or_near_tie, reference_greedy, vllm_generate_models

PROMPTS = [[1, 100, 200, 300], [5000, 42, 7, 9, 11], [12, 13, 14, 15, 16, 17, 18], [30000, 2, 40000]]
NEW_TOKENS = 12


def test_stock_vllm_serves_our_checkpoints_like_the_reference(
    vllm_launch: None,
    tiny_llama_awq: Path,
    tiny_llama_awq_sym: Path,
    tiny_llama_compensated: Path,
    tmp_path: Path,
) -> None:
    """Our AutoAWQ checkpoints (nearest and compensated rounding), a compressed-tensors
    conversion (asymmetric) and a GPTQ v1 conversion (symmetric: vLLM's GPTQ takes no other),
    each through vLLM's own path for the layout: the same greedy tokens as the AutoAWQ
    source's reference model."""
    ct = convert_checkpoint(tiny_llama_awq, tmp_path / "ct", "compressed-tensors")
    gptq = convert_checkpoint(tiny_llama_awq_sym, tmp_path / "gptq", "gptq")
    references = {
        source: reference_greedy(modeling.load_awq_model(source, backend="reference"), PROMPTS, NEW_TOKENS)
        for source in (tiny_llama_awq, tiny_llama_awq_sym, tiny_llama_compensated)
    }
    runs = [("AutoAWQ", tiny_llama_awq, tiny_llama_awq), ("compressed-tensors", ct, tiny_llama_awq)]
    runs.append(("GPTQ", gptq, tiny_llama_awq_sym))
    runs.append(("AutoAWQ, compensated rounding", tiny_llama_compensated, tiny_llama_compensated))
    result = vllm_generate_models(
        # fp16 activations (10 significant bits) keep vLLM's rounding far below the logit gaps of
        # this random model; in bf16 its near-uniform logits produce more near ties.
        [
            {"model": str(model), "prompts": PROMPTS, "max_tokens": NEW_TOKENS, "dtype": "float16"}
            for _, model, _ in runs
        ],
        tmp_path,
        env={"VLLM_PLUGINS": ""},  # no plugins: vLLM's own path for each layout reads the checkpoint
    )
    for method in ("AutoAWQMarlinLinearMethod", "CompressedTensorsWNA16", "AutoGPTQLinearMethod"):
        assert f"Using CPUWNA16LinearKernel for {method}" in result["log"], (
            f"stock vLLM did not take {method}"
        )
    for (name, _, source), run in zip(runs, result["runs"], strict=True):
        notes = assert_same_or_near_tie(references[source], run["tokens"], f"stock vLLM, {name}")
        # At most one prompt may end early on a near tie; the format itself must be right.
        assert len(notes) <= 1, notes
