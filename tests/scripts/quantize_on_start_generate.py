"""Offline ``LLM(model=FP_DIR, quantization="awq")`` with options: quantize on start, then generate.

Usage: python quantize_on_start_generate.py REQUEST.json RESULT.json
REQUEST: {"model": dir, "prompts": [[token ids], ...], "max_tokens": n, "tensor_parallel_size": 1,
          "hf_overrides": {"quantization_config": {...}}, "dtype": "float32"}
RESULT:  {"tokens": [[...], ...]}
vLLM prints to stdout until it exits, so the verdict goes to a file.
"""

import json
import sys


def main() -> int:
    with open(sys.argv[1]) as handle:
        request = json.load(handle)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=request["model"],
        quantization="awq",
        hf_overrides=request.get("hf_overrides"),
        dtype=request.get("dtype", "bfloat16"),
        enforce_eager=True,
        max_model_len=512,
        tensor_parallel_size=request.get("tensor_parallel_size", 1),
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"])
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in request["prompts"]], params)
    result = {"tokens": [list(out.outputs[0].token_ids) for out in outputs]}
    with open(sys.argv[2], "w") as handle:
        json.dump(result, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
