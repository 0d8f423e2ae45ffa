"""Format compatibility: stock vLLM (plugins off) serves our checkpoint like our reference model."""

from __future__ import annotations

from pathlib import Path

from awq_plugin.runtime import modeling
from greedy import assert_same_or_near_tie, reference_greedy, vllm_generate

PROMPTS = [[1, 100, 200, 300], [5000, 42, 7, 9, 11], [12, 13, 14, 15, 16, 17, 18], [30000, 2, 40000]]
NEW_TOKENS = 12


def test_stock_vllm_serves_our_checkpoint_like_the_reference(
    vllm_launch: None, tiny_llama_awq: Path, tmp_path: Path
) -> None:
    reference = reference_greedy(
        modeling.load_awq_model(tiny_llama_awq, backend="reference"), PROMPTS, NEW_TOKENS
    )
    result = vllm_generate(
        # fp16 activations (10 significant bits) keep vLLM's rounding far below the logit gaps of
        # this random model; in bf16 its near-uniform logits produce more near ties.
        {"model": str(tiny_llama_awq), "prompts": PROMPTS, "max_tokens": NEW_TOKENS, "dtype": "float16"},
        tmp_path,
        env={"VLLM_PLUGINS": ""},  # no plugins: vLLM's own AWQ path reads the checkpoint
    )
    assert "CPUWNA16LinearKernel" in result["log"], "stock vLLM did not take its AWQ path"
    notes = assert_same_or_near_tie(reference, result["tokens"], "stock vLLM")
    # At most one prompt may end early on a near tie; the format itself must be right.
    assert len(notes) <= 1, notes
