"""Shared fixtures: the default model and tiny random checkpoints, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Keep vLLM's KV cache small and its logs quiet in every process the tests start.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def private_model_cache(tmp_path_factory: pytest.TempPathFactory):
    """Models quantized on load or on start during the tests go to a temporary cache, not the
    user's; the CPU kernel builds stay shared (a link to the user's kernels/), so a session does
    not rebuild them. Subprocesses (vllm serve, the CLI) inherit the variable."""
    from awq_plugin.fsutil import CACHE_ENV, cache_base

    if CACHE_ENV in os.environ:  # the caller chose a cache: use it as it is
        yield
        return
    kernels = cache_base() / "kernels"
    kernels.mkdir(parents=True, exist_ok=True)
    base = tmp_path_factory.mktemp("awq-plugin-cache")
    (base / "kernels").symlink_to(kernels, target_is_directory=True)
    os.environ[CACHE_ENV] = str(base)
    yield
    os.environ.pop(CACHE_ENV, None)


@pytest.fixture(scope="session")
def default_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded SmolLM2-135M-Instruct, written as an fp16 transformers folder."""
    from awq_plugin.tools.default_model import write_default_model

    return write_default_model(tmp_path_factory.mktemp("models") / "smollm2-135m")


@pytest.fixture(scope="session")
def tiny_llama_fp(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    """A 2-layer random Llama (hidden 256) with the default model's tokenizer, in fp16."""
    from awq_plugin.tools import synthetic

    model = synthetic.make_model(synthetic.make_config("tiny-llama"), seed=0, weight_std=1.0)
    return synthetic.write_model(tmp_path_factory.mktemp("tiny") / "tiny-llama-fp", model, default_model_dir)


@pytest.fixture(scope="session")
def tiny_llama_awq(tmp_path_factory: pytest.TempPathFactory, tiny_llama_fp: Path) -> Path:
    """``tiny_llama_fp`` quantized by plain rounding (uint4, group 64) and written by our writer."""
    from awq_plugin.config import AwqQuantConfig
    from awq_plugin.format.packing import write_packed_model
    from awq_plugin.runtime.modeling import load_fp_model

    model = load_fp_model(tiny_llama_fp, dtype=torch.float32)
    out = tmp_path_factory.mktemp("tiny") / "tiny-llama-awq"
    return write_packed_model(model, out, AwqQuantConfig(bits=4, group_size=64), source_dir=tiny_llama_fp)
