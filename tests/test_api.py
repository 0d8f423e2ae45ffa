"""The in-memory API: quantize_model packs every quantized linear and shows progress."""

from __future__ import annotations

import pytest
import torch

from awq_plugin import synthetic
from awq_plugin.api import quantize_model
from awq_plugin.config import AwqQuantConfig
from awq_plugin.qlinear import AwqLinear


def test_quantize_model_packs_linears_and_draws_a_progress_bar(capfd: pytest.CaptureFixture[str]) -> None:
    config = synthetic.make_config("tiny-llama", vocab_size=512, hidden_size=128, intermediate_size=256)
    model = synthetic.make_model(config, seed=0)
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    quantize_model(model, AwqQuantConfig(bits=4, group_size=64), ids, backend="reference")
    swapped = [m for m in model.modules() if isinstance(m, AwqLinear)]
    assert len(swapped) == 2 * 7
    assert all(m.qweight.device == model.lm_head.weight.device for m in swapped)
    assert "AWQ blocks" in capfd.readouterr().err
    logits = model(input_ids=ids[:1]).logits
    assert torch.isfinite(logits).all()
