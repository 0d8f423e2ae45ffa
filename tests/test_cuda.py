"""The quantizer on a CUDA device: every test here needs one and is skipped without it.

The same pipeline runs on the CPU in every other test (``device="cpu"``); here one block
at a time moves to the GPU. GPU arithmetic (TF32 off, other reduction orders) is not
bit-identical to the CPU's, so the comparison is with tolerances: the integer levels
may differ where a value sits on a rounding boundary.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from test_awq_algorithm import FAST

from awq_plugin.config import AwqQuantConfig
from awq_plugin.pipeline.quantize import quantize_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _quantize(source, out, device: str):
    return quantize_checkpoint(
        source,
        out,
        AwqQuantConfig(bits=4, group_size=64),
        n_samples=4,
        seq_len=64,
        options=dataclasses.replace(FAST, clip=True),
        guard="warn",
        device=device,
        progress=False,
    )


def test_quantize_on_cuda_matches_the_cpu(tiny_llama_fp, tmp_path) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu = _quantize(tiny_llama_fp, tmp_path / "cpu", "cpu")
    gpu = _quantize(tiny_llama_fp, tmp_path / "gpu", "cuda")
    assert gpu.device.startswith("cuda")
    a = load_file(str(tmp_path / "cpu" / "model.safetensors"))
    b = load_file(str(tmp_path / "gpu" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        other = b[name]
        assert other.device.type == "cpu" and other.dtype == tensor.dtype and other.shape == tensor.shape
        if name.endswith((".qweight", ".qzeros")):
            same = (tensor == other).float().mean().item()  # packed words equal
            assert same > 0.98, f"{name}: only {same:.1%} of the packed words agree with the CPU's"
        else:
            torch.testing.assert_close(other.float(), tensor.float(), rtol=2e-2, atol=2e-3, msg=name)
    assert gpu.guard is not None and cpu.guard is not None
    assert gpu.guard["nll_awq"] == pytest.approx(cpu.guard["nll_awq"], abs=2e-3)
    assert gpu.guard["nll_rtn"] == pytest.approx(cpu.guard["nll_rtn"], abs=2e-3)


def test_auto_picks_cuda(tiny_llama_fp, tmp_path) -> None:
    report = _quantize(tiny_llama_fp, tmp_path / "auto", "auto")
    assert report.device.startswith("cuda")
