"""Perplexity per window and paired comparisons between runs on the same windows."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from awq_plugin.evaluate import paired_difference, perplexity
from awq_plugin.tools.bench_quality import compare


class _Bigram(nn.Module):
    """A causal LM whose next-token logits depend on the current token only."""

    def __init__(self, vocab: int = 11, seed: int = 0) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)))

    def forward(self, input_ids: torch.Tensor):
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_window_losses_average_to_the_total_and_do_not_depend_on_the_batch_size() -> None:
    model = _Bigram()
    windows = torch.randint(0, 11, (5, 9), generator=torch.Generator().manual_seed(1))
    one = perplexity(model, windows, batch_size=1, progress=False)
    three = perplexity(model, windows, batch_size=3, progress=False)
    assert len(one.window_nll) == 5
    assert one.window_nll == pytest.approx(three.window_nll, abs=1e-12)
    assert sum(one.window_nll) / 5 == pytest.approx(one.nll, abs=1e-12)
    # Each window's loss is its own: the model's log-probabilities of that window's next tokens.
    logp = torch.log_softmax(model.table.detach().double(), dim=-1)
    first = -float(logp[windows[0, :-1], windows[0, 1:]].mean())
    assert one.window_nll[0] == pytest.approx(first, abs=1e-6)
    assert one.to_dict()["window_nll"] == list(one.window_nll)


def test_paired_difference_and_its_standard_error() -> None:
    mean, error = paired_difference([3.0, 4.0, 5.0], [2.0, 4.0, 4.0])
    assert mean == pytest.approx(2.0 / 3.0)
    # differences 1, 0, 1: sample standard deviation 0.577, over sqrt(3)
    assert error == pytest.approx(math.sqrt(1.0 / 3.0) / math.sqrt(3.0))
    assert math.isnan(paired_difference([1.0], [0.5])[1])
    with pytest.raises(ValueError, match="paired windows"):
        paired_difference([1.0, 2.0], [1.0])


def _row(model: str, scheme: str, awq: list[float], ppl: float) -> dict:
    return {
        "model": model,
        "scheme": scheme,
        "ppl_awq": ppl,
        "gap_closed": 0.5,
        "window_nll": {"fp": awq, "rtn": awq, "awq": awq},
    }


def test_compare_pairs_rows_by_model_and_scheme() -> None:
    base = {"rows": [_row("m", "uint4_wo_64", [2.0, 3.0], 10.0), _row("m", "uint4_wo_128", [1.0, 1.0], 5.0)]}
    other = {
        "rows": [_row("m", "uint4_wo_64", [1.5, 3.0], 9.0), {"model": "m", "scheme": "x", "skipped": "?"}]
    }
    (only,) = compare(base, other)
    assert (only["model"], only["scheme"], only["windows"]) == ("m", "uint4_wo_64", 2)
    assert only["other_minus_base"]["nats_per_token"] == pytest.approx(-0.25)
    assert only["ppl_awq"] == [10.0, 9.0]
    other["rows"][0]["window_nll"]["awq"] = [1.0]
    with pytest.raises(SystemExit, match="evaluation windows"):
        compare(base, other)


def test_the_quality_bench_scores_every_variant_on_the_same_windows_and_counts_what_blocks_kept(
    tiny_llama_fp,
) -> None:
    """``bench quality``'s measurement on a tiny model: full precision, rounding and AWQ scored on
    the same windows (one loss per window each), the gap arithmetic, and every block's choice
    and rounding counted once."""
    from awq_plugin.algorithm.options import AwqOptions
    from awq_plugin.tools.bench_quality import measure

    options = AwqOptions(n_grid=4, clip_grid=4, rounding="compensated", act_order="auto")
    (row,) = measure(tiny_llama_fp, ["uint4_wo_64"], n_samples=8, seq_len=64, windows=3, options=options)
    assert {len(v) for v in row["window_nll"].values()} == {3}
    assert row["ppl_fp"] == pytest.approx(math.exp(sum(row["window_nll"]["fp"]) / 3), rel=1e-6)
    gap = row["ppl_rtn"] - row["ppl_fp"]
    assert row["gap_closed"] == pytest.approx((row["ppl_rtn"] - row["ppl_awq"]) / gap)
    assert sum(row["blocks"]["choice"].values()) == sum(row["blocks"]["rounding"].values()) == 2
    assert set(row["blocks"]["rounding"]) <= {"nearest", "compensated", "compensated, activation order"}
