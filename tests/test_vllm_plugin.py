"""The vLLM plugin: registration, kernel choice, weight sharding, and the real ``vllm serve`` on CPU.

Servers are expensive here (30-60 s each on 2 shared cores), so one ``vllm serve DIR
--quantization awq`` is shared by every endpoint test of this module; the other processes
are the plain ``vllm serve DIR`` start (its log must show our method too) and the two
offline tensor-parallel runs.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from kernel_oracle import auto_kernel_here

from awq_plugin.integrations import vllm as vllm_plugin
from awq_plugin.integrations.vllm import KernelChoice, awq_shard_shapes, choose_kernel
from awq_plugin.tools.bench_serve import rtn_quantize
from awq_plugin.tools.server import VllmServer
from greedy import (
    NEAR_TIE_NATS,
    Greedy,
    assert_same_or_near_tie,
    first_divergence,
    reference_greedy,
    vllm_generate,
)

# The plugin's method and our CPU kernel, as the plugin logs them (once per process).
KERNEL_LOG = f"awq-plugin: AwqPluginLinearMethod using kernel '{auto_kernel_here()}'"
SERVER_ARGS = ["--max-model-len", "1024", "--enforce-eager", "--seed", "0", "--max-num-seqs", "32"]
SERVER_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
START_TIMEOUT_S = 420  # typical start-up is 30-60 s; the first run also builds the CPU kernel

PROMPT_TEXTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
    "The three primary colors are",
    "Once upon a time, in a small village,",
    "To make a cup of tea, first",
]
NEW_TOKENS = 16

# Thresholds for "the first divergence is a near tie" (top-1 minus top-2 log-probability of the
# run we compare against, in nats):
# - server vs our fp32 reference model: the server computes in bf16, and our CPU kernel also
#   quantizes activations to int8 per (row, group). Measured on this model (6 prompts x 16
#   steps, offline vLLM, top-2 margin vs the reference's): vLLM's own bf16 AWQ path and our
#   reference kernel inside vLLM move margins by up to 0.22 nats (median 0.05); our CPU kernel
#   by up to 0.53 (median 0.11) in bf16 and in fp32 alike, i.e. the int8 activations dominate;
#   the server by up to 0.66. A flip needs a margin below that perturbation, so 1.0 nats;
#   a wrong kernel (nibble order, zeros, scales) moves logits by whole nats.
SERVER_VS_REFERENCE_NATS = 1.0
# - concurrent vs sequential on the same server: only the batch composition differs (attention
#   and GEMM tiling, accumulation order; per-row activation quantization does not depend on
#   the batch), i.e. bf16 rounding: greedy.NEAR_TIE_NATS (0.1).
CONCURRENCY_NEAR_TIE_NATS = NEAR_TIE_NATS
# - TP=2 vs TP=1 in fp32: TP=2 adds two partial products of each row-parallel layer where TP=1
#   accumulates in one pass (whole groups per rank, so our kernel's int8 activation groups are
#   the same); fp32 rounding, ~1e-6 relative: any flip needs a margin far below 0.01 nats.
TP_NEAR_TIE_NATS = 0.01

# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served_model_dir(default_model_rtn_g64: Path) -> Path:
    """The quantized default model (SmolLM2-135M, plain rounding, group 64) the server runs."""
    return default_model_rtn_g64


@pytest.fixture(scope="module")
def server(
    vllm_launch: None, served_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VllmServer]:
    """``vllm serve DIR --quantization awq`` on 127.0.0.1, stopped when the module ends (or fails)."""
    log = tmp_path_factory.mktemp("server") / "vllm-serve-quantization-awq.log"
    args = [*SERVER_ARGS, "--quantization", "awq"]
    with VllmServer(served_model_dir, log, args, env=SERVER_ENV, startup_timeout=START_TIMEOUT_S) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: VllmServer):
    import openai

    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", timeout=300, max_retries=0)


@pytest.fixture(scope="module")
def prompt_ids(served_model_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(served_model_dir)
    return [tokenizer(text)["input_ids"] for text in PROMPT_TEXTS]


@pytest.fixture(scope="module")
def dense_reference(served_model_dir: Path) -> torch.nn.Module:
    """Our reference model in fp32, each AwqLinear replaced by its dequantized dense weight.

    Identical math to ``load_awq_model(..., backend="reference")`` (W_hat = (q - z) * s, fp32),
    dequantized once instead of on every call, which makes greedy decoding fast enough to test.
    """
    from awq_plugin.runtime.modeling import dequantize_awq_linears, load_awq_model

    model = load_awq_model(served_model_dir, dtype=torch.float32, backend="reference")
    dequantize_awq_linears(model)
    return model.eval()


@pytest.fixture(scope="module")
def tp_model_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    """A 2-layer random Llama that splits evenly over 2 ranks, with decisive greedy choices.

    tiny-llama has 4 heads / 2 KV heads, and its row-parallel layers keep whole groups of 64 per
    rank (o_proj K 256 -> 128, down_proj K 640 -> 320). ``logit_gain`` widens the top-2 margins
    of the output head: with near-uniform logits nearly every step would be a near tie.
    """
    from awq_plugin.tools import synthetic

    root = tmp_path_factory.mktemp("tp")
    model = synthetic.make_model(synthetic.make_config("tiny-llama"), seed=0, weight_std=1.0, logit_gain=8.0)
    fp_dir = synthetic.write_model(root / "tiny-llama-fp", model, default_model_dir)
    return rtn_quantize(fp_dir, root / "tiny-llama-awq-g64", 64)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def greedy_request(prompt: list[int], **extra) -> dict:
    """Body fields of a greedy completion of exactly NEW_TOKENS tokens with token ids returned."""
    return {
        "prompt": prompt,
        "max_tokens": NEW_TOKENS,
        "temperature": 0.0,
        "extra_body": {"ignore_eos": True, "return_token_ids": True, **extra},
    }


def sequential_greedy(client, model: str, prompts: list[list[int]]) -> Greedy:
    """One request at a time: tokens and the server's own top-2 margins per step."""
    tokens, margins = [], []
    for prompt in prompts:
        body = greedy_request(prompt, return_tokens_as_token_ids=True)
        choice = client.completions.create(model=model, logprobs=2, **body).choices[0]
        tokens.append(list(choice.token_ids))
        margins.append([top_two_margin(step) for step in choice.logprobs.top_logprobs])
    return Greedy(tokens, margins)


def top_two_margin(top_logprobs: dict[str, float]) -> float:
    best = sorted(top_logprobs.values(), reverse=True)
    return best[0] - best[1] if len(best) > 1 else float("inf")


def stream_greedy(client, model: str, prompt: list[int]) -> list[int]:
    """A streaming greedy completion; the token ids gathered from its chunks."""
    tokens: list[int] = []
    for chunk in client.completions.create(model=model, stream=True, **greedy_request(prompt)):
        tokens += chunk.choices[0].token_ids or []
    return tokens


def offline_greedy(result: dict) -> Greedy:
    """tests/scripts/vllm_generate.py's result (tokens, top-2 logprobs per step) as a Greedy."""
    margins = [[top_two_margin(step) for step in steps] for steps in result["logprobs"]]
    return Greedy(result["tokens"], margins)


def python_in_subprocess(code: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run ``code`` in a fresh interpreter (not from the repo root: see ENVIRONMENT.md)."""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------
# Pure logic: kernel choice and shard shapes (no vLLM)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("platform", "env", "cpu_ok", "marlin_ok", "expected"),
    [
        ("cpu", None, True, False, "cpu"),  # our AVX-512 kernel
        ("cpu", "auto", True, False, "cpu"),
        ("cpu", None, False, False, "marlin"),  # no VNNI: vLLM's own CPU WNA16 kernel
        ("cuda", None, False, True, "marlin"),  # vLLM's Marlin where the GPU supports it
        ("cuda", "", False, False, "triton"),  # else our Triton kernel
        ("rocm", None, False, True, "marlin"),
        ("rocm", None, False, False, "triton"),
        ("xpu", None, False, False, "marlin"),  # other platforms: vLLM's own selection
        ("cpu", "reference", True, False, "reference"),  # forced
        ("cpu", "MARLIN", True, False, "marlin"),
        ("cuda", "triton", False, True, "triton"),
        ("cuda", "reference", False, True, "reference"),
    ],
)
def test_kernel_choice_per_platform(
    platform: str, env: str | None, cpu_ok: bool, marlin_ok: bool, expected: str
) -> None:
    choice = choose_kernel(platform, env, cpu_kernel_ok=cpu_ok, marlin_ok=marlin_ok)
    assert isinstance(choice, KernelChoice)
    assert choice.kernel == expected
    assert choice.reason


@pytest.mark.parametrize(
    ("platform", "env", "message"),
    [
        ("cuda", "cpu", "needs the CPU platform"),
        ("cpu", "triton", "needs a CUDA or ROCm GPU"),
        ("cpu", "fastest", "is not one of"),
    ],
)
def test_forced_kernel_must_suit_the_platform(platform: str, env: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        choose_kernel(platform, env, cpu_kernel_ok=True, marlin_ok=True)


def test_shard_shapes_split_n_for_columns_and_k_in_whole_groups_for_rows() -> None:
    # Merged gate/up of the default model at TP 2: each rank holds half of both outputs.
    cols = awq_shard_shapes("mlp.gate_up_proj", 576, 576, [768, 768], 64)
    assert (cols.qweight, cols.qzeros, cols.scales) == ((576, 192), (9, 192), (9, 1536))
    # down_proj at TP 2: K = 1536 splits into 768 = 12 whole groups of 64.
    rows = awq_shard_shapes("mlp.down_proj", 1536, 768, [576], 64)
    assert (rows.qweight, rows.qzeros, rows.scales) == ((768, 72), (12, 72), (12, 576))


def test_tp_shard_that_would_split_a_group_is_a_clear_error() -> None:
    # o_proj of the default model at TP 2: 576 / 2 = 288 channels = 4.5 groups of 64.
    with pytest.raises(
        ValueError, match=r"'model\.layers\.0\.self_attn\.o_proj'.*splits a quantization group"
    ):
        awq_shard_shapes("model.layers.0.self_attn.o_proj", 576, 288, [576], 64)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.up'.*multiple of 8"):
        awq_shard_shapes("model.layers.0.mlp.up", 256, 256, [12], 64)


def test_importing_the_integration_imports_no_vllm(tmp_path: Path) -> None:
    code = "import sys, awq_plugin.integrations.vllm; print('vllm' in sys.modules)"
    assert python_in_subprocess(code, tmp_path) == "False"


def test_vllm_plugins_empty_loads_nothing_of_ours(tmp_path: Path) -> None:
    code = (
        "import sys; from vllm.plugins import load_general_plugins; load_general_plugins(); "
        "print('awq_plugin.integrations.vllm' in sys.modules)"
    )
    assert python_in_subprocess(code, tmp_path, {"VLLM_PLUGINS": ""}) == "False"
    assert python_in_subprocess(code, tmp_path, {"VLLM_PLUGINS": "awq"}) == "True"


# ---------------------------------------------------------------------------------------------
# In-process vLLM: registration and weight loading through vLLM's parameter classes
# ---------------------------------------------------------------------------------------------


def test_register_is_idempotent_and_owns_every_awq_route() -> None:
    from vllm.model_executor.layers.quantization import get_quantization_config

    vllm_plugin.register()
    vllm_plugin.register()
    config_cls = vllm_plugin.AwqPluginConfig
    for name in ("awq_plugin", "awq", "awq_marlin", "auto_awq"):
        assert get_quantization_config(name) is config_cls
    awq = {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True}
    for user_quant in (None, "awq", "awq_marlin", "auto_awq"):
        assert config_cls.override_quantization_method(awq, user_quant) == "awq_plugin"
    assert config_cls.override_quantization_method(awq, "moe_wna16") is None  # an explicit other choice
    assert config_cls.override_quantization_method({"quant_method": "gptq"}, None) is None
    config = config_cls.from_config({**awq, "modules_to_not_convert": ["mlp.down_proj"], "extra": 1})
    assert config.get_name() == "awq_plugin"
    assert config.quant.group_size == 64 and config.modules_to_not_convert == ["mlp.down_proj"]
    # vLLM may pickle the config into its engine process: the assembled class must resolve by name.
    assert pickle.loads(pickle.dumps(config)).quant == config.quant
    with pytest.raises(ValueError, match="lm_head"):
        config_cls.from_config({**awq, "lm_head": True})


def make_packed(n: int, k: int, group: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A random layer's AWQ tensors (K, N layout) and its dequantized weight ``[N, K]``."""
    from awq_plugin.numerics.pack import pack
    from awq_plugin.numerics.quant_ref import quantize

    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    gq = quantize(w, 4, group, True)
    packed = pack(gq)
    tensors = {"qweight": packed.qweight, "qzeros": packed.qzeros, "scales": packed.scales}
    return tensors, gq.dequantize(torch.float32)


@pytest.fixture
def tp_rank_1_of_2(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make vLLM's parameter classes believe they live on rank 1 of 2 (no process group needed)."""
    import vllm.model_executor.parameter as parameter

    monkeypatch.setattr(parameter, "get_tensor_model_parallel_rank", lambda: 1)
    monkeypatch.setattr(parameter, "get_tensor_model_parallel_world_size", lambda: 2)
    monkeypatch.setenv(vllm_plugin.KERNEL_ENV, "reference")  # exact math; the CPU kernel has its own tests


def new_method_and_layer(prefix: str, group: int):
    config = vllm_plugin.AwqPluginConfig.from_config({"quant_method": "awq", "bits": 4, "group_size": group})
    layer = torch.nn.Module()
    layer.prefix = prefix
    return vllm_plugin.AwqPluginLinearMethod(config), layer


@pytest.mark.usefixtures("tp_rank_1_of_2")
def test_row_parallel_shard_loads_whole_groups_and_computes_its_part() -> None:
    n, k, group = 64, 256, 64
    full, w = make_packed(n, k, group, seed=1)
    method, layer = new_method_and_layer("model.layers.0.mlp.down_proj", group)
    method.create_weights(layer, k // 2, [n], k, n, torch.float32, weight_loader=None)
    for name, tensor in full.items():
        getattr(layer, name).load_row_parallel_weight(tensor)  # what RowParallelLinear's loader does
    assert torch.equal(layer.qweight.data, full["qweight"][k // 2 :])
    assert torch.equal(layer.scales.data, full["scales"][2:])  # groups 2 and 3 of 4
    method.process_weights_after_loading(layer)
    x = torch.randn(3, k // 2)
    torch.testing.assert_close(method.apply(layer, x), x @ w[:, k // 2 :].t(), rtol=1e-4, atol=1e-3)


@pytest.mark.usefixtures("tp_rank_1_of_2")
def test_merged_column_shards_load_each_part_at_its_packed_offset() -> None:
    k, inter, group = 128, 256, 64
    gate, w_gate = make_packed(inter, k, group, seed=2)
    up, w_up = make_packed(inter, k, group, seed=3)
    half = inter // 2
    method, layer = new_method_and_layer("model.layers.0.mlp.gate_up_proj", group)
    method.create_weights(layer, k, [half, half], k, 2 * inter, torch.float32, weight_loader=None)
    for offset, part in ((0, gate), (half, up)):  # what MergedColumnParallelLinear's loader passes
        for name, tensor in part.items():
            getattr(layer, name).load_merged_column_weight(tensor, shard_offset=offset, shard_size=half)
    method.process_weights_after_loading(layer)
    x = torch.randn(2, k)
    expected = x @ torch.cat([w_gate[half:], w_up[half:]]).t()  # rank 1: the second half of each
    torch.testing.assert_close(method.apply(layer, x), expected, rtol=1e-4, atol=1e-3)


def test_create_weights_names_the_layer_when_a_shard_splits_a_group() -> None:
    method, layer = new_method_and_layer("model.layers.3.self_attn.o_proj", 64)
    with pytest.raises(ValueError, match=r"model\.layers\.3\.self_attn\.o_proj.*splits a quantization group"):
        method.create_weights(layer, 288, [576], 576, 576, torch.bfloat16, weight_loader=None)


# ---------------------------------------------------------------------------------------------
# The real server
# ---------------------------------------------------------------------------------------------


def test_models_endpoint_lists_the_model(client, server: VllmServer) -> None:
    assert server.model in [m.id for m in client.models.list().data]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_completions_return_text(client, server: VllmServer, stream: bool) -> None:
    kwargs = dict(model=server.model, prompt="The capital of France is", max_tokens=12, temperature=0.0)
    if stream:
        text = "".join(chunk.choices[0].text for chunk in client.completions.create(stream=True, **kwargs))
    else:
        text = client.completions.create(**kwargs).choices[0].text
    assert text.strip()


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_chat_completions_return_text(client, server: VllmServer, stream: bool) -> None:
    kwargs = dict(
        model=server.model,
        messages=[{"role": "user", "content": "Name one planet of the solar system."}],
        max_tokens=16,
        temperature=0.0,
    )
    if stream:
        chunks = client.chat.completions.create(stream=True, **kwargs)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        text = client.chat.completions.create(**kwargs).choices[0].message.content
    assert text and text.strip()


def test_quantization_awq_flag_uses_the_plugin_method_and_cpu_kernel(server: VllmServer) -> None:
    log = server.log_text()
    assert "quantization=awq_plugin" in log, "vLLM did not resolve --quantization awq to the plugin"
    assert KERNEL_LOG in log
    assert "CPUWNA16LinearKernel" not in log  # vLLM's built-in AWQ kernel must not be in use


def test_engine_config_without_a_flag_detects_awq_and_takes_the_plugin(served_model_dir: Path) -> None:
    """What ``vllm serve DIR`` (no --quantization) decides, in process: config.json's
    quant_method 'awq' resolves to the plugin. The server version of this runs in make test-all."""
    from vllm.engine.arg_utils import EngineArgs

    config = EngineArgs(
        model=str(served_model_dir), enforce_eager=True, max_model_len=512
    ).create_engine_config()
    assert config.model_config.quantization == "awq_plugin"
    assert isinstance(config.quant_config, vllm_plugin.AwqPluginConfig)
    assert config.quant_config.quant.group_size == 64


@pytest.mark.full  # a whole server for the decision the engine-config test above checks in process
def test_plain_vllm_serve_detects_awq_and_uses_the_plugin(
    vllm_launch: None, served_model_dir: Path, tmp_path: Path
) -> None:
    log_path = tmp_path / "vllm-serve.log"
    with VllmServer(
        served_model_dir, log_path, SERVER_ARGS, env=SERVER_ENV, startup_timeout=START_TIMEOUT_S
    ) as srv:
        log = srv.log_text()
    assert "quantization=awq_plugin" in log, "config.json's quant_method 'awq' did not reach the plugin"
    assert KERNEL_LOG in log
    assert "CPUWNA16LinearKernel" not in log


def test_greedy_tokens_match_the_reference_model(
    client, server: VllmServer, prompt_ids: list[list[int]], dense_reference: torch.nn.Module
) -> None:
    reference = reference_greedy(dense_reference, prompt_ids, NEW_TOKENS)
    served = sequential_greedy(client, server.model, prompt_ids)
    assert_same_or_near_tie(reference, served.tokens, "server", SERVER_VS_REFERENCE_NATS)
    # Where the tokens agree, the logits must too: the server's top-2 margin at each step is the
    # reference's up to rounding (a wrong kernel would move them by whole nats).
    gaps = [
        abs(mine - ref)
        for i, (want, got) in enumerate(zip(reference.tokens, served.tokens))
        for mine, ref in zip(served.margins[i], reference.margins[i][: first_divergence(want, got)])
    ]
    assert max(gaps) < SERVER_VS_REFERENCE_NATS, f"top-2 margins differ by up to {max(gaps):.3f} nats"


def test_32_concurrent_streams_complete_and_match_their_sequential_results(
    client, server: VllmServer, prompt_ids: list[list[int]]
) -> None:
    # 32 distinct prompts: the fixed set, each also prefixed by a few other of its tokens.
    prompts = [p[:1] + q[1:3] + p[1:] for q in prompt_ids for p in prompt_ids][:32]
    assert len({tuple(p) for p in prompts}) == 32
    sequential = sequential_greedy(client, server.model, prompts)
    with ThreadPoolExecutor(max_workers=32) as pool:
        concurrent = list(pool.map(lambda p: stream_greedy(client, server.model, p), prompts))
    assert all(len(tokens) == NEW_TOKENS for tokens in concurrent)
    notes = assert_same_or_near_tie(sequential, concurrent, "concurrent", CONCURRENCY_NEAR_TIE_NATS)
    assert len(notes) <= 4, notes  # rare: only batch-dependent rounding can differ


@pytest.mark.full  # two offline engines, one of them with 2 ranks
def test_tensor_parallel_2_gives_the_greedy_tokens_of_1(
    vllm_launch: None, tp_model_dir: Path, tmp_path: Path
) -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("tensor parallel size 2 needs 2 CPUs (one per rank)")
    prompts = [[1, 100, 200, 300], [5000, 42, 7, 9, 11], [12, 13, 14, 15, 16, 17, 18], [30000, 2, 40000]]
    # fp32: TP=2 then differs from TP=1 only in the order fp32 partial sums are added.
    request = {"model": str(tp_model_dir), "prompts": prompts, "max_tokens": 12, "dtype": "float32"}
    tp1 = vllm_generate(request, _subdir(tmp_path, "tp1"))
    # vLLM's automatic CPU binding wants a NUMA node per rank; this machine has one, so each
    # rank is bound to one core by hand.
    tp2 = vllm_generate(
        {**request, "tensor_parallel_size": 2},
        _subdir(tmp_path, "tp2"),
        env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"},
    )
    assert KERNEL_LOG in tp1["log"]
    assert tp2["log"].count(KERNEL_LOG) == 2, "each TP rank must log the plugin's method and kernel"
    assert_same_or_near_tie(offline_greedy(tp1), tp2["tokens"], "TP=2", TP_NEAR_TIE_NATS)


def _subdir(parent: Path, name: str) -> Path:
    path = parent / name
    path.mkdir()
    return path
