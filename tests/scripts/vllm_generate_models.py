"""Greedy generation with vLLM's offline API for several models, one after another, in one process.

Usage: VLLM_ENABLE_V1_MULTIPROCESSING=0 python vllm_generate_models.py REQUEST.json RESULT.json
REQUEST: {"runs": [{"model": dir, "prompts": [[token ids], ...], "max_tokens": n,
                    "dtype": "float32", "logprobs": 2, "ignore_eos": false,
                    "env": {NAME: value}}, ...]}
RESULT:  {"runs": [{"model": dir, "tokens": [[...], ...], "logprobs": [[{token: logprob}, ...], ...]}, ...]}

With the engine in-process (the variable above) and the single-process executor, vLLM
and torch are imported once for all models: each extra model costs its load and warm-up
only (seconds for a tiny one), not two more process start-ups. The verdict goes to a file
because vLLM logs to stdout until the process exits. A run's ``env`` is set while that run's
model loads and generates (e.g. AWQ_PLUGIN_KERNEL, which the plugin reads per model), then
restored.
"""

import gc
import json
import os
import sys


def main() -> int:
    with open(sys.argv[1]) as handle:
        request = json.load(handle)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    results = []
    for run in request["runs"]:
        saved = {name: os.environ.get(name) for name in run.get("env", {})}
        os.environ.update(run.get("env", {}))
        llm = LLM(
            model=run["model"],
            dtype=run.get("dtype", "float32"),
            enforce_eager=True,
            max_model_len=run.get("max_model_len", 256),
            distributed_executor_backend="uni",
            seed=0,
        )
        params = SamplingParams(
            temperature=0.0,
            max_tokens=run["max_tokens"],
            logprobs=run.get("logprobs", 2),
            ignore_eos=run.get("ignore_eos", False),
        )
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in run["prompts"]], params)
        tokens, logprobs = [], []
        for out in outputs:
            completion = out.outputs[0]
            tokens.append(list(completion.token_ids))
            logprobs.append(
                [{str(tok): lp.logprob for tok, lp in step.items()} for step in (completion.logprobs or [])]
            )
        results.append({"model": run["model"], "tokens": tokens, "logprobs": logprobs})
        del llm, outputs
        gc.collect()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    with open(sys.argv[2], "w") as handle:
        json.dump({"runs": results}, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
