"""``vllm serve`` on the CPU paths for machines without AVX-512 VNNI, and how vLLM picks them.

The serving tests force each path with ``AWQ_PLUGIN_KERNEL`` (this machine has AVX-512
VNNI, so auto would take the ``cpu`` kernel) and check that the server answers a chat
request and logs the path it runs and why. One server per path, eager mode, a small KV cache.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from awq_plugin.integrations.vllm import KernelChoice, choose_kernel
from awq_plugin.tools.bench_serve import rtn_quantize
from awq_plugin.tools.server import VllmServer

SERVER_ARGS = ["--max-model-len", "1024", "--enforce-eager", "--seed", "0", "--max-num-seqs", "8"]
START_TIMEOUT_S = 420  # typical start-up is 30-60 s; the first run also builds the kernel

AVX2_FALLBACK = KernelChoice(
    "avx2", "CPU has AVX2 but no AVX-512 VNNI or AVX-VNNI: the AVX2 kernel (vpmaddubsw)"
)
PORTABLE_FALLBACK = KernelChoice("portable", "ARM CPU with dot product (asimddp): the portable kernel")


@pytest.mark.parametrize(
    ("env", "cpu_ok", "fallback", "expected"),
    [
        (None, True, None, "cpu"),  # AVX-512 VNNI: our AVX-512 kernel
        (None, False, AVX2_FALLBACK, "avx2"),  # AVX2 CPU: our AVX2 kernel, not vLLM's WNA16
        (None, False, PORTABLE_FALLBACK, "portable"),  # ARM: our portable kernel
        ("auto", False, None, "marlin"),  # none of ours runs: vLLM's own CPU route
        ("avx2", True, None, "avx2"),  # forced
        ("portable", True, None, "portable"),
        ("avx512", False, AVX2_FALLBACK, "cpu"),  # the alias of the AVX-512 kernel
    ],
)
def test_vllm_cpu_choice_takes_our_kernel_for_the_cpu(
    env: str | None, cpu_ok: bool, fallback: KernelChoice | None, expected: str
) -> None:
    choice = choose_kernel("cpu", env, cpu_kernel_ok=cpu_ok, marlin_ok=False, cpu_fallback=fallback)
    assert choice.kernel == expected
    if fallback is not None and expected == fallback.kernel and env is None:
        assert choice.reason == fallback.reason  # the server log says why


@pytest.mark.parametrize("env", ["avx2", "portable"])
def test_cpu_paths_cannot_be_forced_on_a_gpu(env: str) -> None:
    with pytest.raises(ValueError, match="needs the CPU platform"):
        choose_kernel("cuda", env, cpu_kernel_ok=False, marlin_ok=True)


@pytest.fixture(scope="module")
def served_model_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    """The default model (SmolLM2-135M) as an AWQ-format checkpoint, group 64 (hidden 576)."""
    return rtn_quantize(default_model_dir, tmp_path_factory.mktemp("served") / "smollm2-awq-g64", 64)


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["avx2", "portable"])
def test_vllm_serve_answers_chat_on_the_forced_path(
    served_model_dir: Path, tmp_path: Path, kernel: str
) -> None:
    import openai

    log_path = tmp_path / f"vllm-serve-{kernel}.log"
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "AWQ_PLUGIN_KERNEL": kernel}
    with VllmServer(served_model_dir, log_path, SERVER_ARGS, env=env, startup_timeout=START_TIMEOUT_S) as srv:
        client = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="unused", timeout=300, max_retries=0)
        reply = client.chat.completions.create(
            model=srv.model,
            messages=[{"role": "user", "content": "Name one planet of the solar system."}],
            max_tokens=16,
            temperature=0.0,
        )
        log = srv.log_text()
    text = reply.choices[0].message.content
    assert text and text.strip()
    assert reply.usage.completion_tokens > 0
    assert f"awq-plugin: AwqPluginLinearMethod using kernel '{kernel}' (forced by AWQ_PLUGIN_KERNEL)" in log
    assert "CPUWNA16LinearKernel" not in log  # vLLM's built-in AWQ kernel must not be in use
