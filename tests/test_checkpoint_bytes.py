"""The bytes a checkpoint is made of are pinned: a refactor must not change what lands on disk.

A seeded 2-layer random Llama is quantized by the console script (AWQ with clip
search, and plain rounding), one thread, and every output file's SHA-256 is
compared with the value recorded before the package was reorganised into stages.
If a change is *meant* to alter the format or the numbers, update the digests in
the same commit and say why in its message.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from awq_plugin.tools import synthetic

CLI = str(Path(sys.executable).parent / "awq-plugin")
COMMON = ["--scheme", "uint4_wo_64", "--n-samples", "4", "--seq-len", "64", "--threads", "1", "--no-progress"]
# The search's forwards in float32: the default ("auto") runs them in bf16 where the CPU has bf16
# units, and bf16 matmul kernels (AVX-512 BF16 vs AMX tiles) round differently from one CPU to
# another, so only the float32 path's bytes can be pinned for every machine.
# Nearest rounding and full-precision block inputs (the scale and clip search as pinned since before
# compensated rounding became the default): the bytes these flags give are unchanged by that switch.
METHOD_ARGS = {"awq": ["--search-dtype", "float32", "--rounding", "nearest", "--propagate", "fp"], "rtn": []}
# float32 is not enough: MKL's sgemm takes a different code path on an Intel Xeon than on an
# AMD EPYC (the sums round differently), and PyTorch's own kernels follow the CPU's vector width.
# MKL's conditional numerical reproducibility (one code path on every x86 CPU) and PyTorch's
# AVX2 kernels, which every x86-64 host this suite runs on has, make the bytes the machine's
# choice no longer.
REPRODUCIBLE_ENV = {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "avx2"}

# Files that depend only on the tokenizer wheel and the config are pinned too: a moved writer that
# dropped a side file or changed JSON formatting would show here.
# Written from the source's tokenizer and config by every path alike.
SIDE_FILES = {
    "chat_template.jinja": "872be49dbb638044ad01b60388f48d469ff2980e5f0dccdc22ec907db54d0788",
    "config.json": "992fa75d3a17f4661742a44573d6aa8593c0e51c05ef0a463393f819a6123f58",
    "generation_config.json": "6b0e82dfb96a8376c5bffb91c6717f2e357d59bc4ce85a7e3aad4a1f3e9841f4",
    "tokenizer.json": "bf346d64f6f0fbcefb4c1b6928a98241467dff36c6fbae5fe1785c4ff90667f4",
    "tokenizer_config.json": "156c41a2e14e6e6bd4286c506c38ee883a78e0f5ce165ad9bf63fe73ebf9e974",
}
RTN_WEIGHTS = "2d24086e5467fc1dbc1c4cc1dd69c3a30a248f9b12ed87cafad122b7ec7904c9"
EXPECTED: dict[str, dict[str, str]] = {
    "awq": {
        **SIDE_FILES,
        # The search's fp32 scales and clips, and its losses; under REPRODUCIBLE_ENV since 2026-12-06
        # (recorded on an Intel Xeon; the packed weights below are the bytes an AMD EPYC wrote
        # without it). Since quantizer version 8 the recorded losses are summed per token in fp32
        # (their last digits moved; the scales, clips and packed weights did not). Since version 9
        # the options saved with them name fit_to (under --propagate fp the weights are the same),
        # and since the opt-in true-sequential mode, sequential, and since the opt-in norm refit,
        # fit_norms (off: the same weights). Since version 10 sequential is on by default: this
        # calibration holds no micro-batch out, so nothing is compensated and the weights stay;
        # the saved options name refine_passes since that opt-in arrived (0: the same weights).
        "awq_plugin/awq_results.safetensors": "3e81ae65d6696f7affa84913638b23b8e72812904870446b0b0dcc36ae7565c9",
        "model.safetensors": "76b99e6ee2523ae2476becba6c48276d1220b4ff20337ecf8aabfa1b6efdae5a",
    },
    # Plain rounding streamed by the pipeline and packed in memory give the same bytes.
    "rtn": {**SIDE_FILES, "model.safetensors": RTN_WEIGHTS},
    "memory": {**SIDE_FILES, "model.safetensors": RTN_WEIGHTS},
}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    config = synthetic.make_config(
        "tiny-llama", num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=4
    )
    model = synthetic.make_model(config, seed=3, weight_std=1.0)
    return synthetic.write_model(tmp_path_factory.mktemp("src") / "pinned", model, default_model_dir)


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("method", ["awq", "rtn"])
def test_quantized_checkpoint_bytes_are_pinned(method: str, source: Path, tmp_path: Path) -> None:
    out = tmp_path / method
    proc = subprocess.run(
        [CLI, "quantize", str(source), str(out), "--method", method, *METHOD_ARGS[method], *COMMON],
        capture_output=True,
        text=True,
        cwd="/",
        env={**os.environ, **REPRODUCIBLE_ENV},
    )
    assert proc.returncode == 0, proc.stderr
    got = _digests(out)
    assert got == EXPECTED[method]


def test_in_memory_writer_bytes_are_pinned(source: Path, tmp_path: Path) -> None:
    """The in-memory path (pack a loaded model's linears, write the checkpoint) is pinned too."""
    import torch

    from awq_plugin.config import AwqQuantConfig
    from awq_plugin.format.packing import write_packed_model
    from awq_plugin.runtime.modeling import load_fp_model

    model = load_fp_model(source, dtype=torch.float32)
    out = write_packed_model(
        model, tmp_path / "mem", AwqQuantConfig(bits=4, group_size=64), source_dir=source
    )
    got = _digests(out)
    assert got == EXPECTED["memory"]
