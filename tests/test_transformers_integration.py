"""The transformers integration: ``from_pretrained`` loads AWQ checkpoints and quantizes on load.

Oracles:

- our own loader, ``modeling.load_awq_model(..., backend="reference")``: with the same
  checkpoint tensors, the same reference kernel and fp32 everywhere, a model loaded by
  ``from_pretrained`` must give *bitwise* the same logits; nothing is left to tolerate;
- for the CPU kernel, each quantized layer's output against ``linear_ref`` on the very
  activations it saw, within the kernel's documented error bound (int8 activations);
- greedy tokens, compared with the near-tie rule of ``tests/greedy.py`` where two
  implementations round differently (bf16/fp16 activations, int8 activations, vLLM).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.quantizers import auto as hf_auto
from transformers.quantizers.quantizer_awq import AwqQuantizer as TransformersAwqQuantizer

import awq_plugin
from awq_plugin import AwqConfig
from awq_plugin.algorithm.options import AwqOptions
from awq_plugin.api import quantize_model
from awq_plugin.config import AwqQuantConfig
from awq_plugin.errors import ConfigError
from awq_plugin.format.checkpoint import read_json, validate_checkpoint
from awq_plugin.integrations import transformers as hf_integration
from awq_plugin.kernels.cpu import build
from awq_plugin.numerics import pack, quant_ref
from awq_plugin.runtime import modeling
from awq_plugin.runtime.qlinear import AwqLinear
from greedy import Greedy, assert_same_or_near_tie, generate_greedy, reference_greedy, vllm_generate

# transformers warns whenever a config is passed for an already-quantized checkpoint (it keeps
# the checkpoint's and copies over the loading attributes, here the kernel): expected.
pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")

PROMPTS = [[1, 100, 200, 300], [5000, 42, 7, 9, 11], [12, 13, 14, 15, 16, 17, 18], [30000, 2, 40000]]
NEW_TOKENS = 8
# More prompts for vLLM (its start-up dominates; prompts are cheap): on a random model some
# prompts meet a near tie early, and the comparison needs enough that do not.
VLLM_PROMPTS = [
    *PROMPTS,
    [7, 7, 7, 7],
    [2024, 11, 300, 17, 9000],
    [45000, 1234, 5678],
    [400, 401, 402, 403, 404, 405],
]
BATCH = torch.tensor([[1, 100, 200, 300, 5000, 42, 7, 9], [12, 13, 14, 15, 16, 17, 18, 30000]])  # (2, 8)
U32 = 2.0**-24  # unit roundoff of fp32
# Quantize-on-load settings small enough for a test: 4 windows of 64 tokens of the smallest built-in
# text (pydoc: "enwiki" spends seconds parsing and tokenizing, and the plumbing is the same).
ON_LOAD = dict(bits=4, group_size=64, dataset="pydoc", n_samples=4, seq_len=64)


def load(folder: Path, dtype: torch.dtype = torch.float32, **kwargs: Any) -> Any:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs).eval()


@torch.inference_mode()
def logits(model: Any, ids: torch.Tensor = BATCH) -> torch.Tensor:
    return model(input_ids=ids).logits.float()  # (B, T, V)


def awq_layers(model: Any) -> dict[str, AwqLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AwqLinear)}


@pytest.fixture(scope="module")
def reference_model(tiny_llama_awq: Path) -> Any:
    """Our own loader on the reference kernel, in fp32: the oracle."""
    return modeling.load_awq_model(tiny_llama_awq, dtype=torch.float32, backend="reference")


@pytest.fixture(scope="module")
def reference_tokens(reference_model: Any) -> Greedy:
    """The oracle's greedy tokens for PROMPTS, with its top-2 margins (for the near-tie rule)."""
    return reference_greedy(reference_model, PROMPTS, NEW_TOKENS)


# ---- activation --------------------------------------------------------------------------------


def test_import_awq_plugin_activates_and_deactivate_restores(tiny_llama_awq: Path) -> None:
    assert hf_integration.is_active()
    assert hf_auto.AUTO_QUANTIZER_MAPPING["awq"] is hf_integration.AwqHfQuantizer
    assert hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["awq"] is AwqConfig
    assert awq_plugin.AwqConfig is hf_integration.AwqConfig
    try:
        hf_integration.deactivate()
        assert hf_auto.AUTO_QUANTIZER_MAPPING["awq"] is TransformersAwqQuantizer
        assert hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING["awq"] is transformers.AwqConfig
        if importlib.util.find_spec("gptqmodel") is None:
            # What users get without the plugin: transformers' own quantizer wants gptqmodel.
            with pytest.raises(ImportError, match="gptqmodel"):
                load(tiny_llama_awq)
    finally:
        hf_integration.activate()
        hf_integration.activate()  # idempotent
    assert hf_auto.AUTO_QUANTIZER_MAPPING["awq"] is hf_integration.AwqHfQuantizer


# ---- config ------------------------------------------------------------------------------------


def test_config_serializes_as_our_checkpoint_writer_does() -> None:
    config = AwqConfig(group_size=64, dataset=["some text"], n_samples=2, backend="reference")
    assert config.to_dict() == AwqQuantConfig(bits=4, group_size=64).to_quantization_config()
    assert json.loads(config.to_json_string()) == config.to_dict()
    assert isinstance(config, transformers.AwqConfig)  # transformers forwards loading attributes to it
    # The quantizer's options follow the library's defaults unless given.
    assert config.awq_options() == AwqOptions()
    fast = AwqConfig(rounding="nearest", propagate="fp").awq_options()
    assert (fast.rounding, fast.propagate) == ("nearest", "fp")
    # Every AWQ dialect reads back; another tool's backend is not a property of the checkpoint.
    autoawq = {"quant_method": "awq", "w_bit": 4, "q_group_size": 128, "zero_point": False, "version": "GEMM"}
    read = AwqConfig.from_dict({**autoawq, "backend": "exllama_v2"})
    assert (read.bits, read.group_size, read.zero_point, read.version, read.backend) == (
        4,
        128,
        False,
        "gemm",
        None,
    )
    assert AwqConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()


@pytest.mark.parametrize(
    "bad",
    [
        dict(bits=3),
        dict(group_size=48),
        dict(version="gemv"),
        dict(backend="cuda"),
        dict(n_samples=0),
        dict(seq_len=1),
        dict(guard="sometimes"),
        dict(device=0),
        dict(rounding="stochastic"),
        dict(propagate="sideways"),
    ],
)
def test_config_rejects_what_cannot_be_loaded_or_packed(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        AwqConfig(**bad)


def test_transformers_own_config_is_converted() -> None:
    theirs = transformers.AwqConfig(bits=4, group_size=64, dataset="pydoc", model_seqlen=96, backend="marlin")
    ours = hf_integration.AwqHfQuantizer(theirs, pre_quantized=False).quantization_config
    assert isinstance(ours, AwqConfig)
    assert (ours.group_size, ours.dataset, ours.seq_len, ours.backend) == (64, "pydoc", 96, None)
    assert ours.to_dict() == AwqQuantConfig(bits=4, group_size=64).to_quantization_config()


# ---- loading pre-quantized checkpoints ---------------------------------------------------------


def test_logits_equal_our_reference_loader_bitwise(tiny_llama_awq: Path, reference_model: Any) -> None:
    model = load(tiny_llama_awq, quantization_config=AwqConfig(backend="reference"))
    layers = awq_layers(model)
    assert len(layers) == 14 and all(m.backend == "reference" for m in layers.values())
    assert all(m.scales.dtype == torch.float16 and m.qweight.dtype == torch.int32 for m in layers.values())
    assert isinstance(model.config.quantization_config, AwqConfig)
    assert torch.equal(logits(model), logits(reference_model))


def _kernel_error_bound(x: torch.Tensor, w_hat: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-element bound on |cpu kernel - linear_ref| for fp32 x [M, K], w_hat [N, K] -> [M, N].

    The kernel quantizes x to int8 per (row, group) with s_a = max|x_group| / 127: each element
    moves by at most s_a / 2 (plus fp32 rounding of x * 127 / max, below |x| 2^-21 + s_a 2^-16);
    the int4 x int8 products are exact in int32; then both sides accumulate in fp32, at most
    (K + K/G + 4) u32 sum |w_hat| |x| (the dot-product bound).
    """
    m, k = x.shape
    xg = x.abs().reshape(m, k // group_size, group_size)  # (M, K/G, G)
    s_a = (xg.amax(dim=-1, keepdim=True) / 127.0).expand_as(xg).reshape(m, k)  # (M, K)
    per_elem = s_a * (0.5 + 2.0**-16) + x.abs() * 2.0**-21  # (M, K)
    wa = w_hat.abs().t()  # (K, N)
    return per_elem @ wa + (k + k // group_size + 4) * U32 * ((x.abs() + per_elem) @ wa) + 1e-30


@pytest.mark.skipif(not build.has_avx512_vnni(), reason="the CPU kernel needs AVX-512 VNNI")
def test_cpu_kernel_layers_within_their_bound_and_greedy_matches(
    tiny_llama_awq: Path, reference_tokens: Greedy
) -> None:
    model = load(tiny_llama_awq)  # backend: auto
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(name: str) -> Any:
        def hook(module: AwqLinear, args: tuple[torch.Tensor], out: torch.Tensor) -> None:
            seen[name] = (args[0], out)

        return hook

    hooks = [module.register_forward_hook(record(name)) for name, module in awq_layers(model).items()]
    logits(model)
    for hook in hooks:
        hook.remove()
    assert len(seen) == 14
    for name, (x, y) in seen.items():
        module = model.get_submodule(name)
        assert module.kernel_weight().backend == "cpu", name
        gq = pack.unpack(module.packed())
        x2 = x.reshape(-1, module.in_features)  # (M, K)
        y_ref = quant_ref.linear_ref(x2, gq.q, gq.scales, gq.zeros, gq.group_size)  # (M, N)
        bound = _kernel_error_bound(x2, gq.dequantize(torch.float32), gq.group_size)
        worst = ((y.reshape_as(y_ref) - y_ref).abs() / bound).max().item()
        assert worst <= 1.0, f"{name}: error {worst:.2f}x the kernel's bound"
    assert_same_or_near_tie(reference_tokens, generate_greedy(model, PROMPTS, NEW_TOKENS), "CPU kernel")


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
def test_each_dtype_loads_and_generates(
    tiny_llama_awq: Path, reference_tokens: Greedy, dtype: torch.dtype
) -> None:
    model = load(tiny_llama_awq, dtype=dtype)
    assert model.dtype == dtype and model.model.embed_tokens.weight.dtype == dtype
    for layer in awq_layers(model).values():
        assert layer.scales.dtype == torch.float16  # checkpoint precision kept, whatever the load dtype
    tokens = generate_greedy(model, PROMPTS, NEW_TOKENS)
    assert all(len(t) == NEW_TOKENS for t in tokens)
    assert_same_or_near_tie(reference_tokens, tokens, f"from_pretrained({dtype})")


def test_device_map_auto(tiny_llama_awq: Path, reference_model: Any) -> None:
    model = load(tiny_llama_awq, device_map="auto", quantization_config=AwqConfig(backend="reference"))
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert torch.equal(logits(model), logits(reference_model))
    assert len(generate_greedy(model, PROMPTS[:1], 4)[0]) == 4


def test_transformers_own_config_loads_a_checkpoint(tiny_llama_awq: Path, reference_tokens: Greedy) -> None:
    model = load(tiny_llama_awq, quantization_config=transformers.AwqConfig(bits=4, group_size=64))
    assert isinstance(model.config.quantization_config, AwqConfig)
    assert len(awq_layers(model)) == 14
    assert_same_or_near_tie(
        reference_tokens, generate_greedy(model, PROMPTS, NEW_TOKENS), "transformers' AwqConfig"
    )


def test_dequantize_gives_dense_linears(tiny_llama_awq: Path, reference_model: Any) -> None:
    model = load(tiny_llama_awq, quantization_config=AwqConfig(backend="reference"))
    model.dequantize()
    assert not awq_layers(model) and not hasattr(model.config, "quantization_config")
    # Same weights; only the order of fp32 sums differs from linear_ref.
    torch.testing.assert_close(logits(model), logits(reference_model), rtol=1e-4, atol=1e-4)


# ---- quantizing on load ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantized_on_load(tiny_llama_fp: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """``tiny_llama_fp`` quantized by from_pretrained, saved (with its tokenizer) by save_pretrained."""
    model = load(tiny_llama_fp, quantization_config=AwqConfig(**ON_LOAD, backend="reference"))
    out = tmp_path_factory.mktemp("on-load") / "tiny-llama-awq"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama_fp).save_pretrained(out)
    return model, out


def test_quantize_on_load_is_our_api(quantized_on_load: tuple[Any, Path], tiny_llama_fp: Path) -> None:
    model, _ = quantized_on_load
    expected = quantize_model(
        modeling.load_fp_model(tiny_llama_fp, dtype=torch.float32),
        AwqQuantConfig(bits=4, group_size=64),
        ON_LOAD["dataset"],
        tokenizer=AutoTokenizer.from_pretrained(tiny_llama_fp),
        n_samples=ON_LOAD["n_samples"],
        seq_len=ON_LOAD["seq_len"],
        backend="reference",
    )
    ours, theirs = awq_layers(model), awq_layers(expected)
    assert sorted(ours) == sorted(theirs) and len(ours) == 14
    for name, layer in ours.items():
        for buffer in ("qweight", "qzeros", "scales"):
            assert torch.equal(getattr(layer, buffer), getattr(theirs[name], buffer)), f"{name}.{buffer}"


def test_saved_checkpoint_validates_and_reloads_identically(quantized_on_load: tuple[Any, Path]) -> None:
    model, out = quantized_on_load
    summary = validate_checkpoint(out)  # what `awq-plugin inspect` runs
    assert summary.quantized_layers == 14
    assert (
        read_json(out / "config.json")["quantization_config"]
        == AwqQuantConfig(4, 64).to_quantization_config()
    )
    before = logits(model)
    assert torch.equal(logits(load(out, quantization_config=AwqConfig(backend="reference"))), before)
    assert torch.equal(logits(modeling.load_awq_model(out, backend="reference")), before)


def test_transformers_own_config_quantizes_on_load(tiny_llama_fp: Path) -> None:
    # transformers' AwqConfig has no n_samples: the default 128 windows, of model_seqlen tokens
    # (short here, to keep the test quick).
    config = transformers.AwqConfig(bits=4, group_size=64, dataset="pydoc", model_seqlen=16)
    model = load(tiny_llama_fp, quantization_config=config)
    assert len(awq_layers(model)) == 14
    assert isinstance(model.config.quantization_config, AwqConfig)


def test_disk_offload_is_refused(tiny_llama_fp: Path) -> None:
    with pytest.raises(ConfigError, match="offloaded to disk"):
        load(tiny_llama_fp, quantization_config=AwqConfig(**ON_LOAD), device_map={"": "disk"})


# ---- a user's script ---------------------------------------------------------------------------

USER_SCRIPT = """
import json
import sys
{first}
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
{second}
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
inputs = tokenizer("The capital of France is", return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
print(tokenizer.decode(out[0]))

with open(sys.argv[2], "w") as handle:  # what the test checks
    result = {{
        "new_tokens": out.shape[1] - inputs["input_ids"].shape[1],
        "text": tokenizer.decode(out[0]),
        "layer": type(model.model.layers[0].self_attn.q_proj).__name__,
        "registry_before_plugin": REGISTRY_BEFORE_PLUGIN,
    }}
    json.dump(result, handle)
"""
PLUGIN_LINE = "import awq_plugin  # the one line the plugin needs"


@pytest.mark.parametrize("plugin_first", [True, False], ids=["plugin-first", "transformers-first"])
def test_user_script_with_import_awq_plugin_added(
    tiny_llama_awq: Path, tmp_path: Path, plugin_first: bool
) -> None:
    """Both orders: the import hook (transformers loaded later) and immediate activation (loaded before)."""
    probe = "REGISTRY_BEFORE_PLUGIN = 'transformers.quantizers.auto' in sys.modules"
    if plugin_first:
        first, second = f"{probe}\n{PLUGIN_LINE}", ""
    else:  # PreTrainedModel forces transformers' quantizer registry in before the plugin
        first, second = "", f"from transformers import PreTrainedModel\n{probe}\n{PLUGIN_LINE}"
    script = tmp_path / "user_script.py"
    script.write_text(textwrap.dedent(USER_SCRIPT.format(first=first, second=second)))
    result_path = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(script), str(tiny_llama_awq), str(result_path)],
        cwd=tmp_path,  # not the repo root: only the installed package is importable
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(result_path.read_text())
    assert result["registry_before_plugin"] is (not plugin_first)
    assert result["layer"] == "AwqLinear" and result["new_tokens"] == 8
    assert result["text"].startswith("The capital of France is")


# ---- cross-check with vLLM ---------------------------------------------------------------------


# stock vLLM reading our format is make test's test_stock_vllm; here it is the second variant.
@pytest.mark.parametrize("engine", [pytest.param("stock", marks=pytest.mark.full), "plugin"])
def test_vllm_greedy_matches_transformers(
    vllm_launch: None, quantized_on_load: tuple[Any, Path], tmp_path: Path, engine: str
) -> None:
    """The checkpoint quantized on load and saved: vLLM serves it, token for token like transformers.

    ``stock``: vLLM's own AWQ path (plugins off) reads the saved format. ``plugin``: this
    package's vLLM integration; the two integrations must agree.
    """
    _, out = quantized_on_load
    model = load(out, quantization_config=AwqConfig(backend="reference"))
    reference = reference_greedy(model, VLLM_PROMPTS, NEW_TOKENS)
    assert_same_or_near_tie(
        reference, generate_greedy(model, VLLM_PROMPTS, NEW_TOKENS), "transformers generate()"
    )
    result = vllm_generate(
        # fp16 activations keep vLLM's rounding below the logit gaps of this random model.
        {"model": str(out), "prompts": VLLM_PROMPTS, "max_tokens": NEW_TOKENS, "dtype": "float16"},
        tmp_path,
        env={"VLLM_PLUGINS": "" if engine == "stock" else "awq"},
    )
    marker = "CPUWNA16LinearKernel" if engine == "stock" else "awq-plugin: AwqPluginLinearMethod using kernel"
    assert marker in result["log"], f"vLLM did not take the {engine} AWQ path"
    # Every divergence must start at a near tie of the reference (a rounding coin flip), and at
    # least half of the prompts must agree token for token, so that the test compares something.
    notes = assert_same_or_near_tie(reference, result["tokens"], f"vLLM ({engine})")
    assert len(notes) <= len(VLLM_PROMPTS) // 2, notes


def test_weight_of_a_quantized_linear_is_a_stand_in_that_cannot_pass_for_the_weight() -> None:
    """Model code reads `.weight` of linears (dtype, device; transformers' init on load): it gets a
    NaN expanded to [out, in], marked initialised, following the module's dtype, never saved."""
    layer = AwqLinear(64, 16, 32, bias=False, dtype=torch.bfloat16)
    w = layer.weight
    assert w.shape == (16, 64) and w.dtype == torch.bfloat16 and w.device == layer.qweight.device
    assert w._is_hf_initialized and torch.isnan(w).all() and w.untyped_storage().nbytes() == 2
    assert set(layer.state_dict()) == {"qweight", "qzeros", "scales"}
    assert layer.to(torch.float32).weight.dtype == torch.float32
    layer.weight.zero_()  # a write reaches nothing
    assert torch.isnan(layer.weight).all()
    x = torch.randn(3, 64)
    assert torch.isnan(torch.nn.functional.linear(x, layer.weight)).all()
