"""Greedy decoding helpers shared by the tests that compare two implementations token for token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from awq_plugin.tools.bench_generate import greedy_generate
from awq_plugin.tools.near_tie import NEAR_TIE_NATS, first_divergence, greedy_divergence

# NEAR_TIE_NATS and first_divergence are re-exported for the tests that import them from here.
__all__ = [
    "NEAR_TIE_NATS",
    "Greedy",
    "assert_same_or_near_tie",
    "first_divergence",
    "generate_greedy",
    "reference_greedy",
    "run_vllm_script",
    "vllm_generate",
    "vllm_generate_models",
]

SCRIPTS = Path(__file__).parent / "scripts"


@dataclass
class Greedy:
    tokens: list[list[int]]  # per prompt, the generated ids
    margins: list[list[float]]  # per prompt and step, top-1 minus top-2 log-probability


@torch.inference_mode()
def reference_greedy(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int) -> Greedy:
    """Greedy tokens and top-2 margins of a transformers model (no KV-cache tricks: full recompute)."""
    tokens, margins = [], []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out, gaps = [], []
        for _ in range(max_new_tokens):
            logprobs = model(input_ids=ids).logits[0, -1].float().log_softmax(-1)
            top = logprobs.topk(2)
            out.append(int(top.indices[0]))
            gaps.append(float(top.values[0] - top.values[1]))
            ids = torch.cat([ids, top.indices[:1].view(1, 1)], dim=1)
        tokens.append(out)
        margins.append(gaps)
    return Greedy(tokens, margins)


def assert_same_or_near_tie(
    reference: Greedy, other_tokens: list[list[int]], what: str, threshold: float = NEAR_TIE_NATS
) -> list[str]:
    """Each prompt's tokens must match; where they differ, the first difference must be a near tie
    (the reference's top-2 margin below ``threshold`` nats there; see :mod:`awq_plugin.tools.near_tie`).

    Returns notes on the near ties found (empty when every token matched).
    """
    notes = []
    for i, (ref, got) in enumerate(zip(reference.tokens, other_tokens, strict=True)):
        divergence = greedy_divergence(ref, reference.margins[i], got, threshold)
        if divergence is None:
            continue
        assert divergence.near_tie, (
            f"{what}: prompt {i} {divergence.describe()}\nreference {ref}\n{what} {got}"
        )
        notes.append(f"prompt {i}: near tie at step {divergence.step} (margin {divergence.margin:.3f} nats)")
    return notes


def run_vllm_script(
    script: str,
    request: dict,
    workdir: Path,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    cwd: Path | None = None,
) -> dict[str, Any]:
    """Run ``tests/scripts/SCRIPT REQUEST.json RESULT.json`` in a fresh process (small KV cache);
    return the JSON result with the process's whole log under ``"log"``."""
    req, res, log = workdir / "request.json", workdir / "result.json", workdir / "vllm.log"
    req.write_text(json.dumps(request))
    full_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}
    with open(log, "w") as handle:
        proc = subprocess.run(
            [sys.executable, str(SCRIPTS / script), str(req), str(res)],
            env=full_env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            cwd=cwd,
        )
    text = log.read_text()
    assert proc.returncode == 0 and res.is_file(), f"vLLM failed (exit {proc.returncode}):\n{text[-4000:]}"
    result = json.loads(res.read_text())
    result["log"] = text
    return result


def vllm_generate(
    request: dict, workdir: Path, env: dict[str, str] | None = None, timeout: float = 600
) -> dict:
    """One model, greedy, through tests/scripts/vllm_generate.py (see its docstring)."""
    return run_vllm_script("vllm_generate.py", request, workdir, env, timeout)


def vllm_generate_models(
    runs: list[dict], workdir: Path, env: dict[str, str] | None = None, timeout: float = 900
) -> dict[str, Any]:
    """Several models (or one model under several settings) in one vLLM process, engine
    in-process, through tests/scripts/vllm_generate_models.py. Returns ``{"runs": [...],
    "log": text}``, the runs in request order."""
    in_process = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", **(env or {})}
    return run_vllm_script("vllm_generate_models.py", {"runs": runs}, workdir, in_process, timeout)


@torch.inference_mode()
def generate_greedy(model: Any, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """transformers' ``generate()`` (KV cache and all), greedy, one prompt at a time: the new tokens."""
    return [
        greedy_generate(model, torch.tensor([prompt]), new_tokens, pad_token_id=0)[0, len(prompt) :].tolist()
        for prompt in prompts
    ]
