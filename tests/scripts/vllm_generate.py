"""Greedy generation with vLLM's offline API, in a process of its own.

Usage: python vllm_generate.py REQUEST.json RESULT.json
REQUEST: {"model": dir, "prompts": [[token ids], ...], "max_tokens": n, "quantization": null|"awq",
          "dtype": "bfloat16", "tensor_parallel_size": 1, "logprobs": 2,
          "hf_overrides": null|{"quantization_config": {...}}}
RESULT:  {"tokens": [[...], ...], "logprobs": [[{token: logprob}, ...], ...]}
vLLM prints to stdout until it exits, so the verdict goes to a file.
quantize_on_start_generate.py runs this with quantization "awq" fixed.
"""

import json
import sys
from typing import Any


def main(defaults: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> int:
    """Generate for the request in argv[1], with ``defaults`` under it and ``overrides`` over it."""
    with open(sys.argv[1]) as handle:
        request = {**(defaults or {}), **json.load(handle), **(overrides or {})}
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=request["model"],
        quantization=request.get("quantization"),
        hf_overrides=request.get("hf_overrides"),
        dtype=request.get("dtype", "bfloat16"),
        enforce_eager=request.get("enforce_eager", True),
        max_model_len=request.get("max_model_len", 512),
        tensor_parallel_size=request.get("tensor_parallel_size", 1),
        seed=0,
    )
    params = SamplingParams(
        temperature=0.0, max_tokens=request["max_tokens"], logprobs=request.get("logprobs", 2)
    )
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in request["prompts"]], params)
    result = {"tokens": [], "logprobs": []}
    for out in outputs:
        completion = out.outputs[0]
        result["tokens"].append(list(completion.token_ids))
        result["logprobs"].append(
            [{str(tok): lp.logprob for tok, lp in step.items()} for step in (completion.logprobs or [])]
        )
    with open(sys.argv[2], "w") as handle:
        json.dump(result, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
