"""``vllm serve`` on the CPU paths for machines without AVX-512 VNNI, on the AMX tiles, and how
vLLM picks them.

The serving tests force each path with ``AWQ_PLUGIN_KERNEL`` (this machine has AVX-512
VNNI, so auto would take the ``cpu`` kernel) and check that vLLM generates the reference
model's tokens and logs the path it runs and why. ``amx`` runs where the CPU has AMX-INT8.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from awq_plugin import kernels
from awq_plugin.integrations.vllm import KernelChoice, choose_kernel
from greedy import Greedy, assert_same_or_near_tie, reference_greedy, vllm_generate_models

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
        ("amx", True, None, "amx"),  # the AMX tiles at every batch size
    ],
)
def test_vllm_cpu_choice_takes_our_kernel_for_the_cpu(
    env: str | None, cpu_ok: bool, fallback: KernelChoice | None, expected: str
) -> None:
    choice = choose_kernel("cpu", env, cpu_kernel_ok=cpu_ok, marlin_ok=False, cpu_fallback=fallback)
    assert choice.kernel == expected
    if fallback is not None and expected == fallback.kernel and env is None:
        assert choice.reason == fallback.reason  # the server log says why


def test_vllm_auto_names_the_amx_tiles_where_they_run() -> None:
    choice = choose_kernel("cpu", None, cpu_kernel_ok=True, marlin_ok=False, amx_ready=True)
    assert choice.kernel == "cpu"
    assert f"AMX tiles from {kernels.AMX_MIN_ROWS} rows" in choice.reason
    assert "AMX" not in choose_kernel("cpu", None, cpu_kernel_ok=True, marlin_ok=False).reason


@pytest.mark.parametrize("env", ["avx2", "portable", "amx"])
def test_cpu_paths_cannot_be_forced_on_a_gpu(env: str) -> None:
    with pytest.raises(ValueError, match="needs the CPU platform"):
        choose_kernel("cuda", env, cpu_kernel_ok=False, marlin_ok=True)


PROMPTS = [[1, 504, 3575, 282, 4649, 314], [1, 551, 28015, 30, 96, 29], [1, 24318, 14018, 429, 253, 3601]]
NEW_TOKENS = 12
FORCED_PATHS = ("avx2", "portable", "amx")
# The AMX tiles run only on CPUs with AMX-INT8; elsewhere that path's test skips.
RUNNABLE_PATHS = tuple(k for k in FORCED_PATHS if k != "amx" or kernels.amx_ready())
# All three paths quantize activations to int8 per (row, group) as the AVX-512 kernel does; the
# threshold of that kernel inside vLLM against the fp32 reference model applies (measured and
# explained in test_vllm_plugin.SERVER_VS_REFERENCE_NATS). A wrong path moves logits by nats.
FORCED_VS_REFERENCE_NATS = 1.0


@pytest.fixture(scope="module")
def forced_path_runs(vllm_launch: None, default_model_rtn_g64: Path, tmp_path_factory) -> dict:
    """One vLLM process, engine in-process, generating with each forced path in turn."""
    runs = [
        {
            "model": str(default_model_rtn_g64),
            "prompts": PROMPTS,
            "max_tokens": NEW_TOKENS,
            "env": {"AWQ_PLUGIN_KERNEL": kernel},
        }
        for kernel in RUNNABLE_PATHS
    ]
    return vllm_generate_models(runs, tmp_path_factory.mktemp("forced-paths"))


@pytest.fixture(scope="module")
def reference(default_model_rtn_g64: Path) -> Greedy:
    """Greedy tokens of the checkpoint's fp32 reference model (dequantized weights)."""
    from awq_plugin.runtime.modeling import dequantize_awq_linears, load_awq_model

    model = load_awq_model(default_model_rtn_g64, dtype=torch.float32, backend="reference")
    dequantize_awq_linears(model)
    return reference_greedy(model.eval(), PROMPTS, NEW_TOKENS)


@pytest.mark.parametrize("kernel", FORCED_PATHS)
def test_vllm_generates_on_the_forced_path_as_the_reference_model(
    forced_path_runs: dict, reference: Greedy, kernel: str
) -> None:
    if kernel not in RUNNABLE_PATHS:
        pytest.skip("the AMX path needs a CPU with amx_tile and amx_int8")
    log = forced_path_runs["log"]
    assert f"awq-plugin: AwqPluginLinearMethod using kernel '{kernel}' (forced by AWQ_PLUGIN_KERNEL)" in log
    assert "CPUWNA16LinearKernel" not in log  # vLLM's built-in AWQ kernel must not be in use
    run = forced_path_runs["runs"][RUNNABLE_PATHS.index(kernel)]  # runs come back in request order
    assert_same_or_near_tie(reference, run["tokens"], f"vLLM on '{kernel}'", FORCED_VS_REFERENCE_NATS)
