"""compressed-tensors and GPTQ checkpoints served by vLLM on this package's CPU kernels.

The claim is a pure function (tested per case); the serving runs compare greedy tokens with
an independent model: for conversions of our AutoAWQ checkpoints, the AutoAWQ source's
reference model; for llm-compressor's own output (``full``), the checkpoint as transformers
and the compressed-tensors library dequantize it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from test_vllm_plugin import SERVER_VS_REFERENCE_NATS

from awq_plugin.format.convert import convert_checkpoint
from awq_plugin.integrations.vllm_layouts import claims
from awq_plugin.runtime import modeling
from greedy import assert_same_or_near_tie, reference_greedy, vllm_generate_models

PROMPTS = [[1, 100, 200, 300], [5000, 42, 7, 9, 11], [12, 13, 14, 15, 16, 17, 18]]
NEW_TOKENS = 10
REPO = Path(__file__).resolve().parents[1]

W4A16 = {
    "quant_method": "compressed-tensors",
    "format": "pack-quantized",
    "config_groups": {"group_0": {"weights": {"num_bits": 4, "type": "int"}, "targets": ["Linear"]}},
}


@pytest.mark.parametrize(
    ("config", "user", "on_cpu", "expected"),
    [
        (W4A16, None, True, "awq_plugin_ct"),
        (W4A16, "compressed-tensors", True, "awq_plugin_ct"),
        (W4A16, None, False, None),  # GPUs: vLLM's Marlin serves these layouts
        (W4A16, "fp8", True, None),
        ({**W4A16, "format": "float-quantized"}, None, True, None),
        ({**W4A16, "config_groups": {"g": {"weights": {"num_bits": 8, "type": "int"}}}}, None, True, None),
        (
            {
                **W4A16,
                "config_groups": {"g": {"weights": {"num_bits": 4}, "input_activations": {"num_bits": 8}}},
            },
            None,
            True,
            None,
        ),
        ({"quant_method": "gptq", "bits": 4}, None, True, "awq_plugin_gptq"),
        ({"quant_method": "gptq", "bits": 4}, "gptq_marlin", True, "awq_plugin_gptq"),
        ({"quant_method": "gptq", "bits": 8}, None, True, None),
        ({"quant_method": "gptq", "bits": 4, "desc_act": True}, None, True, None),  # g_idx permuted
        (
            {"quant_method": "gptq", "bits": 4, "desc_act": True, "static_groups": True},
            None,
            True,
            "awq_plugin_gptq",
        ),
        ({"quant_method": "awq", "bits": 4}, None, True, None),  # AutoAWQ is the other config's
    ],
)
def test_which_checkpoints_the_plugin_claims(config, user, on_cpu, expected) -> None:
    assert claims(config, user, on_cpu) == expected


def test_converted_checkpoints_run_on_our_kernels_in_vllm(
    vllm_launch: None, tiny_llama_awq: Path, tiny_llama_awq_sym: Path, tmp_path: Path
) -> None:
    """compressed-tensors (asymmetric), GPTQ v1 (symmetric) and GPTQ v2 (asymmetric, which vLLM's
    own GPTQ refuses), converted from our AutoAWQ checkpoints, through the plugin; the
    compressed-tensors one also on the forced avx2 and portable paths (vLLM's own WNA16 CPU
    kernel needs AVX-512)."""
    ct = convert_checkpoint(tiny_llama_awq, tmp_path / "ct", "compressed-tensors")
    gptq_v1 = convert_checkpoint(tiny_llama_awq_sym, tmp_path / "gptq-v1", "gptq")
    gptq_v2 = convert_checkpoint(tiny_llama_awq, tmp_path / "gptq-v2", "gptq")
    references = {
        source: reference_greedy(modeling.load_awq_model(source, backend="reference"), PROMPTS, NEW_TOKENS)
        for source in (tiny_llama_awq, tiny_llama_awq_sym)
    }
    runs = [
        ("compressed-tensors", ct, tiny_llama_awq, {}),
        ("GPTQ v1", gptq_v1, tiny_llama_awq_sym, {}),
        ("GPTQ v2", gptq_v2, tiny_llama_awq, {}),
        ("compressed-tensors, avx2", ct, tiny_llama_awq, {"AWQ_PLUGIN_KERNEL": "avx2"}),
        ("compressed-tensors, portable", ct, tiny_llama_awq, {"AWQ_PLUGIN_KERNEL": "portable"}),
    ]
    result = vllm_generate_models(
        [
            {
                "model": str(model),
                "prompts": PROMPTS,
                "max_tokens": NEW_TOKENS,
                "dtype": "float32",
                "env": env,
            }
            for _, model, _, env in runs
        ],
        tmp_path,
    )
    log = result["log"]
    for layout in ("compressed-tensors", "gptq"):
        assert f"AwqPluginLayoutLinearMethod ({layout}) using kernel 'cpu'" in log, layout
    assert "AwqPluginLayoutLinearMethod (compressed-tensors) using kernel 'avx2'" in log
    assert "AwqPluginLayoutLinearMethod (compressed-tensors) using kernel 'portable'" in log
    assert "CompressedTensorsWNA16" not in log and "AutoGPTQLinearMethod" not in log  # vLLM's own: not used
    for (name, _, source, _), run in zip(runs, result["runs"], strict=True):
        notes = assert_same_or_near_tie(references[source], run["tokens"], f"plugin, {name}")
        assert len(notes) <= 1, (name, notes)


# ---- llm-compressor's own checkpoints (a separate environment: it pins other versions) -------


@pytest.fixture(scope="session")
def peer_python() -> Path:
    """A Python with llm-compressor, made by scripts/setup_peer_env.sh (once; reused after)."""
    env = os.environ.get("AWQ_PLUGIN_PEER_VENV", str(REPO / ".peer-venv"))
    setup = REPO / "scripts" / "setup_peer_env.sh"
    subprocess.run(["bash", str(setup)], check=True, env={**os.environ, "PEER_VENV": env})
    return Path(env) / "bin" / "python"


@pytest.fixture(scope="session")
def llmcompressor_checkpoints(
    peer_python: Path, default_model_dir: Path, tmp_path_factory
) -> dict[str, Path]:
    """The default model written by llm-compressor: GPTQ asymmetric and plain W4A16 symmetric,
    group 64 (576 input channels take no larger group), on a tiny calibration."""
    from transformers import AutoTokenizer

    from awq_plugin.calibration.text import calibration_windows

    root = tmp_path_factory.mktemp("llmcompressor")
    ids = root / "ids.json"
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    ids.write_text(json.dumps(calibration_windows(tokenizer, "enwiki", 8, 128).tolist()))
    out = {}
    for name, extra in (("gptq-asym", ["--recipe", "gptq"]), ("rtn-sym", ["--recipe", "rtn", "--symmetric"])):
        folder = root / name
        command = [str(peer_python), str(REPO / "scripts" / "peer_llmcompressor.py"), str(default_model_dir)]
        command += [str(ids), str(folder), "--group-size", "64", "--dtype", "float16", *extra]
        subprocess.run(command, check=True, capture_output=True)
        out[name] = folder
    return out


@pytest.mark.full
def test_llmcompressor_checkpoints_on_our_kernel_match_transformers(
    vllm_launch: None, llmcompressor_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from awq_plugin.format.checkpoint import read_json

    prompts = [
        [504, 3575, 282, 4649, 314],
        [1604, 3987, 46477, 24, 94, 727],
        [12615, 36411, 418, 253, 2779, 282],
    ]
    names = sorted(llmcompressor_checkpoints)
    for name in names:
        config = read_json(llmcompressor_checkpoints[name] / "config.json")["quantization_config"]
        assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    # Each checkpoint twice: on the reference kernel inside vLLM (exact dequantization: the
    # layout's test) and on the CPU kernel this machine picks (int8 activations: its noise).
    kernels = ("reference", "auto")
    runs = [(n, k) for n in names for k in kernels]
    result = vllm_generate_models(
        [
            {
                "model": str(llmcompressor_checkpoints[n]),
                "prompts": prompts,
                "max_tokens": 10,
                "dtype": "float32",
                "env": {"AWQ_PLUGIN_KERNEL": k},
            }
            for n, k in runs
        ],
        tmp_path,
    )
    assert "AwqPluginLayoutLinearMethod (compressed-tensors) using kernel 'reference'" in result["log"]
    references = {}
    for name in names:
        # The independent side: transformers' compressed-tensors loader, decompressed by the library.
        model = AutoModelForCausalLM.from_pretrained(
            llmcompressor_checkpoints[name],
            dtype=torch.float32,
            quantization_config=CompressedTensorsConfig(run_compressed=False),
        )
        assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)
        references[name] = reference_greedy(model.eval(), prompts, 10)
    for (name, kernel), run in zip(runs, result["runs"], strict=True):
        what = f"plugin ({kernel} kernel), llm-compressor {name}"
        if kernel == "reference":
            notes = assert_same_or_near_tie(references[name], run["tokens"], what)
            assert len(notes) <= 1, notes
        else:
            # int8 activations against an fp32 dense model: flips only below the margin
            # test_vllm_plugin measured for that pair (a layout error moves logits by whole nats).
            assert_same_or_near_tie(references[name], run["tokens"], what, SERVER_VS_REFERENCE_NATS)
