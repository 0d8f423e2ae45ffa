"""The end-to-end guard: AWQ's finished model against plain rounding on held-out windows.

It must fire (loudly, with both figures) on a model where AWQ loses, and stay
silent where AWQ wins. A tiny Llama with injected activation outliers, where
AWQ's real search wins; the losing case is the same search's result with its
scales replaced by a spread no search would choose (folded exactly in full
precision, ruinous once quantized).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from test_awq_algorithm import FAST, QUANT, calib_ids, make_outlier_llama

from awq_plugin.algorithm.awq import AwqResults, run_awq
from awq_plugin.calibration.text import calibration_windows
from awq_plugin.pipeline.guard import (
    GuardResult,
    compare_with_rounding,
    copying_loader,
    held_out_windows,
)

torch.set_num_threads(1)


def _confident_outlier_llama() -> torch.nn.Module:
    """The outlier toy with a sharpened head, so that its predictions are far from uniform."""
    model = make_outlier_llama(seed=2)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


@pytest.fixture(scope="module")
def case() -> tuple[torch.nn.Module, AwqResults, torch.Tensor]:
    """(fresh full-precision model, its AWQ results, held-out windows sampled from the model itself).

    Text sampled from the full-precision model is its own distribution: any change to the
    model raises the expected loss on it, so more quantization error means a higher loss.
    """
    searched = _confident_outlier_llama()  # run_awq scales and clips it in place
    results = run_awq(searched, QUANT, calib_ids(seed=2), options=FAST, progress=False)
    model = _confident_outlier_llama()
    torch.manual_seed(0)
    prompt = calib_ids(n=4, seq=1, seed=99)
    with torch.no_grad():
        held = model.generate(prompt, do_sample=True, max_new_tokens=47, min_new_tokens=47, top_k=0)
    return model, results, held


def _ruinous(results: AwqResults) -> AwqResults:
    """The same results with each group's scales spread over 10^-3 .. 10^3 (seeded)."""
    gen = torch.Generator().manual_seed(0)
    blocks = []
    for block in results.blocks:
        groups = [
            dataclasses.replace(g, scales=10.0 ** (6 * torch.rand(g.scales.shape, generator=gen) - 3))
            for g in block.groups
        ]
        blocks.append(dataclasses.replace(block, groups=groups, clip_max={}, clip_min={}))
    return dataclasses.replace(results, blocks=blocks)


def test_guard_fires_with_both_figures_when_awq_loses(case) -> None:
    model, results, held = case
    verdict = compare_with_rounding(copying_loader(model), _ruinous(results), QUANT, held)
    assert verdict.awq_lost
    assert verdict.nll_awq > verdict.nll_rtn + 0.01
    message = verdict.message()
    assert "WORSE THAN PLAIN ROUNDING" in message
    assert f"{verdict.nll_awq:.4f}" in message and f"{verdict.nll_rtn:.4f}" in message
    assert "4 x 48" in message


def test_guard_is_silent_when_awq_wins(case) -> None:
    model, results, held = case
    verdict = compare_with_rounding(copying_loader(model), results, QUANT, held)
    assert not verdict.awq_lost, verdict.message()
    assert verdict.nll_awq < verdict.nll_rtn
    assert verdict.message().startswith("end-to-end check: AWQ <= plain rounding")


def test_nan_loss_counts_as_a_loss() -> None:
    assert GuardResult(math.nan, 1.0, 4, 32, "x").awq_lost
    assert not GuardResult(1.0, 1.0, 4, 32, "x").awq_lost  # a tie is not a loss


class CharTokenizer:
    """One token per character (ids 1..255) with EOS 0: enough for the text helpers."""

    eos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [1 + ord(c) % 255 for c in text]}


def test_held_out_windows_are_the_calibration_draws_unused_windows() -> None:
    docs = [" ".join(str((i * 7919 + j * 104729) % 100003) for j in range(12)) for i in range(30)]
    tok = CharTokenizer()
    calib = calibration_windows(tok, docs, n_samples=6, seq_len=16, seed=3)
    held = held_out_windows(tok, docs, n_samples=6, seq_len=16, seed=3, count=4)
    assert held is not None and held.shape == (4, 16)
    all_windows = calibration_windows(tok, docs, n_samples=10, seq_len=16, seed=3)
    # Same permutation: calibration (first 6) and held-out (next 4) together are the first 10.
    together = torch.cat([calib, held])
    assert sorted(map(tuple, together.tolist())) == sorted(map(tuple, all_windows.tolist()))
    for row in held.tolist():
        assert row not in calib.tolist()
    assert held_out_windows(tok, docs, n_samples=10_000, seq_len=16, seed=3) is None
    assert held_out_windows(None, torch.zeros(2, 4, dtype=torch.long), 2, 4, 0) is None


def test_quantize_checkpoint_reports_the_guard_last(tiny_llama_fp, tmp_path) -> None:
    """The pipeline runs the guard after assembly; its verdict is the report's closing line."""
    from awq_plugin.config import AwqQuantConfig
    from awq_plugin.pipeline.quantize import quantize_checkpoint

    report = quantize_checkpoint(
        tiny_llama_fp,
        tmp_path / "out",
        AwqQuantConfig(bits=4, group_size=64),
        n_samples=4,
        seq_len=64,
        options=dataclasses.replace(FAST, clip=False),
        progress=False,
    )
    assert report.guard is not None
    assert report.guard["windows"] == 4 and report.guard["seq_len"] == 64
    assert math.isfinite(report.guard["nll_awq"]) and math.isfinite(report.guard["nll_rtn"])
    assert report.render().splitlines()[-1] == report.guard["message"]
