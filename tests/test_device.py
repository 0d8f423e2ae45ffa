"""Where the quantizer computes: ``--device auto|cpu|cuda[:N]``, one code path everywhere.

The CUDA runs themselves live in ``tests/test_cuda.py`` (skipped without a CUDA device);
these run the same functions with the devices this machine has.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_awq_algorithm import FAST

from awq_plugin.config import AwqQuantConfig
from awq_plugin.errors import ConfigError
from awq_plugin.pipeline.device import resolve_device
from awq_plugin.pipeline.quantize import quantize_checkpoint

torch.set_num_threads(1)


def test_auto_is_cuda_when_present_else_cpu() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("bad", ["tpu", "cuda:x", "mps"])
def test_unsupported_device_names_the_value(bad: str) -> None:
    with pytest.raises(ConfigError, match=repr(bad)):
        resolve_device(bad)


def test_cuda_is_refused_on_a_machine_without_it() -> None:
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
        with pytest.raises(ConfigError, match="cuda:99"):
            resolve_device("cuda:99")
    else:
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto is the CPU only where CUDA is absent")
def test_device_cpu_and_auto_write_byte_identical_checkpoints(tiny_llama_fp, tmp_path) -> None:
    outputs = {}
    for device in ("cpu", "auto"):
        report = quantize_checkpoint(
            tiny_llama_fp,
            tmp_path / device,
            AwqQuantConfig(bits=4, group_size=64),
            n_samples=4,
            seq_len=64,
            options=dataclasses.replace(FAST, clip=False),
            device=device,
            progress=False,
        )
        assert report.device == "cpu"
        outputs[device] = {
            p.relative_to(tmp_path / device): p.read_bytes()
            for p in sorted((tmp_path / device).rglob("*"))
            if p.is_file()
        }
    assert outputs["cpu"].keys() == outputs["auto"].keys()
    for name, data in outputs["cpu"].items():
        assert data == outputs["auto"][name], name
