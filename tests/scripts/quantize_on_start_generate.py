"""Offline ``LLM(model=FP_DIR, quantization="awq")`` with options: quantize on start, then generate.

Usage: python quantize_on_start_generate.py REQUEST.json RESULT.json
REQUEST: vllm_generate.py's, e.g. {"model": dir, "prompts": [[token ids], ...], "max_tokens": n,
         "tensor_parallel_size": 1, "hf_overrides": {"quantization_config": {...}}, "dtype": "float32"};
         "quantization" is always "awq", and no logprobs are asked unless the request does.
RESULT:  vllm_generate.py's: {"tokens": [[...], ...], "logprobs": [...]}
The work is vllm_generate.py's (this file's folder is sys.path[0] when it runs as a script).
"""

import sys

from vllm_generate import main

if __name__ == "__main__":
    sys.exit(main(defaults={"logprobs": None}, overrides={"quantization": "awq"}))
