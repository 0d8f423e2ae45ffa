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
    GUARD_SIGMAS,
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
    assert "4 x 48" in message and "(standard error)" in message


def test_guard_is_silent_when_awq_wins(case) -> None:
    model, results, held = case
    verdict = compare_with_rounding(copying_loader(model), results, QUANT, held)
    assert not verdict.awq_lost, verdict.message()
    assert verdict.nll_awq < verdict.nll_rtn
    assert verdict.message().startswith("end-to-end check: AWQ <= plain rounding")


def test_nan_loss_counts_as_a_loss() -> None:
    assert GuardResult(math.nan, 1.0, 4, 32, "x").awq_lost
    assert not GuardResult(1.0, 1.0, 4, 32, "x").awq_lost  # a tie is not a loss


def test_a_loss_within_the_noise_keeps_awq_and_says_so() -> None:
    noisy = GuardResult.from_windows([2.0, 3.1, 4.0, 5.2], [2.1, 3.0, 4.1, 5.0], 16, "x")
    assert noisy.awq_worse and 0 < noisy.difference < GUARD_SIGMAS * noisy.standard_error
    assert not noisy.awq_lost
    assert "within the noise" in noisy.message() and "kept AWQ" in noisy.message()
    clear = GuardResult.from_windows([2.2, 3.2, 4.2, 5.3], [2.0, 3.0, 4.0, 5.0], 16, "x")
    assert clear.awq_lost


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


def _quantize(source, out, search_dtype: str = "float32", **kwargs):
    """The pipeline on ``source``; float32 forwards unless asked (the exact comparisons need them,
    and "auto" would make the verdicts depend on the CPU's bf16 units)."""
    from awq_plugin.config import AwqQuantConfig
    from awq_plugin.pipeline.quantize import quantize_checkpoint

    return quantize_checkpoint(
        source,
        out,
        AwqQuantConfig(bits=4, group_size=64),
        n_samples=4,
        seq_len=64,
        options=dataclasses.replace(FAST, clip=False, search_dtype=search_dtype),
        progress=False,
        **kwargs,
    )


def _tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _ruining_step(real_step):
    """``awq_block_step`` as a search that loses end to end: the real step, then every group's
    scales multiplied by a seeded spread over 10^-1.5 .. 10^1.5 (folded exactly in full precision,
    so the block's fp output is unchanged; ruinous once quantized). The per-block fallback
    inside the real step cannot see it, as it cannot see any end-to-end loss."""
    from awq_plugin.templates.folds import apply_group_scales

    def step(block, groups, inputs, quant, options):
        result, next_inputs = real_step(block, groups, inputs, quant, options)
        gen = torch.Generator().manual_seed(groups.index)
        with torch.no_grad():
            scaled = []
            for group, found in zip(groups.groups, result.groups):
                spread = 10.0 ** (3 * torch.rand(found.scales.shape, generator=gen) - 1.5)
                apply_group_scales(block, group, spread)
                scaled.append(dataclasses.replace(found, scales=found.scales * spread))
        return dataclasses.replace(result, groups=scaled), next_inputs

    return step


def test_streamed_guard_equals_the_whole_model_comparison(tiny_llama_fp, tmp_path) -> None:
    """The pipeline's block-by-block guard computes the same per-window losses as scoring two
    whole fake-quantized fp32 models (the guard before it streamed)."""
    from transformers import AutoTokenizer

    from awq_plugin.algorithm.awq import AwqResults
    from awq_plugin.config import AwqQuantConfig
    from awq_plugin.pipeline.assemble import RESULTS_FILE
    from awq_plugin.runtime.modeling import load_fp_model

    report = _quantize(tiny_llama_fp, tmp_path / "out", guard="warn")
    streamed = report.guard
    assert streamed is not None and streamed["action"] == "kept"
    results = AwqResults.load(tmp_path / "out" / RESULTS_FILE)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_fp)
    held = held_out_windows(tokenizer, "enwiki", 4, 64, FAST.seed, count=8)
    whole = compare_with_rounding(
        lambda: load_fp_model(tiny_llama_fp, torch.float32),
        results,
        AwqQuantConfig(bits=4, group_size=64),
        held,
    )
    assert streamed["windows"] == whole.windows == 8
    for key, expected in (("awq_windows", whole.awq_windows), ("rtn_windows", whole.rtn_windows)):
        assert streamed[key] == pytest.approx(list(expected), rel=1e-5, abs=1e-5)


def test_guard_windows_in_bf16_agree_with_float32(tiny_llama_fp, tmp_path) -> None:
    """With bf16 forwards (the default where the CPU has bf16 units) the guard's streams run
    their matmuls in bf16 too: per-window losses within bf16's reach of float32's, same verdict."""
    exact = _quantize(tiny_llama_fp, tmp_path / "fp32", guard="warn").guard
    lowered = _quantize(tiny_llama_fp, tmp_path / "bf16", search_dtype="bfloat16", guard="warn").guard
    assert lowered is not None and exact is not None and lowered["windows"] == exact["windows"] == 8
    for key in ("awq_windows", "rtn_windows"):
        assert lowered[key] == pytest.approx(exact[key], rel=2e-3)
        assert lowered[key] != exact[key]  # the bf16 path ran
    assert lowered["action"] == exact["action"]


def test_quantize_checkpoint_reports_the_guard_last(tiny_llama_fp, tmp_path) -> None:
    report = _quantize(tiny_llama_fp, tmp_path / "out")
    assert report.guard is not None
    assert report.guard["windows"] == 8 and report.guard["seq_len"] == 64
    assert math.isfinite(report.guard["nll_awq"]) and math.isfinite(report.guard["nll_rtn"])
    assert math.isfinite(report.guard["standard_error"]) and report.guard["standard_error"] > 0
    assert report.render().splitlines()[-1] == report.guard["message"]


@pytest.fixture(scope="module")
def rounded(default_model_dir, tmp_path_factory):
    """The default model (a real one: a ruined quantization shows end to end, where on a random
    model every variant is as bad as the next on real text) by plain rounding (the pipeline's
    rtn method): what a fallback must write."""
    out = tmp_path_factory.mktemp("guard") / "rtn"
    _quantize(default_model_dir, out, method="rtn")
    return out


def test_awq_losing_end_to_end_writes_plain_rounding(
    default_model_dir, rounded, tmp_path, monkeypatch, caplog
) -> None:
    import awq_plugin.pipeline.quantize as pipeline
    from awq_plugin.pipeline.assemble import RESULTS_FILE

    monkeypatch.setattr(pipeline, "awq_block_step", _ruining_step(pipeline.awq_block_step))
    report = _quantize(default_model_dir, tmp_path / "out")
    guard = report.guard
    assert guard["awq_lost"] and guard["action"] == "rounded", guard["message"]
    assert guard["difference"] > GUARD_SIGMAS * guard["standard_error"] > 0  # above the noise
    message = guard["message"]
    assert "AWQ LOST TO PLAIN ROUNDING" in message and "holds plain rounding" in message
    assert f"{guard['nll_awq']:.4f}" in message and f"{guard['nll_rtn']:.4f}" in message
    assert f"+- {guard['standard_error']:.4f} (standard error)" in message and "8 x 64" in message
    assert message in caplog.text
    written, expected = _tensors(tmp_path / "out"), _tensors(rounded)
    assert written.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(written[name], tensor), name
    assert not (tmp_path / "out" / RESULTS_FILE).exists()  # no AWQ results: none were applied


@pytest.mark.full  # a second AWQ run of the default model (~45 s); the fallback above runs in make test
def test_guard_warn_keeps_awq_and_warns(default_model_dir, rounded, tmp_path, monkeypatch) -> None:
    import awq_plugin.pipeline.quantize as pipeline
    from awq_plugin.pipeline.assemble import RESULTS_FILE

    monkeypatch.setattr(pipeline, "awq_block_step", _ruining_step(pipeline.awq_block_step))
    report = _quantize(default_model_dir, tmp_path / "out", guard="warn")
    assert report.guard["awq_lost"] and report.guard["action"] == "kept"
    assert report.guard["message"].startswith("WARNING: AWQ IS WORSE THAN PLAIN ROUNDING")
    written, rtn = _tensors(tmp_path / "out"), _tensors(rounded)
    assert any(not torch.equal(written[n], rtn[n]) for n in rtn if n.endswith(".qweight"))
    assert (tmp_path / "out" / RESULTS_FILE).is_file()


def test_guard_off_runs_no_check(tiny_llama_fp, tmp_path) -> None:
    assert _quantize(tiny_llama_fp, tmp_path / "out", guard="off").guard is None


def test_standard_error_is_that_of_the_paired_differences() -> None:
    verdict = GuardResult.from_windows([2.0, 3.0, 4.5], [1.0, 3.0, 4.0], 16, "x")
    diffs = [1.0, 0.0, 0.5]
    mean = sum(diffs) / 3
    expected = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2 / 3)
    assert verdict.difference == pytest.approx(mean)
    assert verdict.standard_error == pytest.approx(expected)
    assert math.isnan(GuardResult.from_windows([1.0], [2.0], 16, "x").standard_error)


# The tail replay on the families' own forwards: tensor or tuple layer outputs, soft-capped
# logits, learned positions, hybrid stacks. Blocks left unquantized, so both streams are the
# full-precision model and their losses must equal the whole model's forward.
TAIL_FAMILIES = [
    "llama",
    "gpt2",
    "gemma2",
    "opt",
    "bloom",
    "falcon",
    "gpt_neox",
    "qwen3_moe",
    "mamba",
    "xglm",
]


@pytest.mark.parametrize("model_type", TAIL_FAMILIES)
def test_streams_through_the_tail_equal_the_whole_models_losses(model_type: str) -> None:
    from awq_plugin.calibration.capture import capture_decoder_inputs
    from awq_plugin.models.conv1d import linearize_conv1d
    from awq_plugin.pipeline.guard import GuardStreams, model_window_losses
    from awq_plugin.templates.infer import find_decoder_layers
    from awq_plugin.tools.bench_architectures import build_tiny_model

    model = build_tiny_model(model_type).float()
    linearize_conv1d(model)  # as the pipeline reads GPT-2
    layers = model.get_submodule(find_decoder_layers(model))
    windows = torch.randint(0, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))
    expected = model_window_losses(model, windows)
    streams = GuardStreams(windows, capture_decoder_inputs(model, layers, windows, 1))
    for i, block in enumerate(layers):
        for stream in ("rtn", "awq"):
            streams.advance(stream, i, block, [], QUANT)
    verdict = streams.score(model, layers, "random ids")
    assert verdict.awq_windows == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert verdict.rtn_windows == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_the_report_gives_each_blocks_cost_in_forward_equivalents(tiny_llama_fp, tmp_path) -> None:
    report = _quantize(tiny_llama_fp, tmp_path / "out", guard="off")
    assert [c["layer"] for c in report.costs] == [0, 1]
    for cost in report.costs:
        assert 0 < cost["forward_seconds"] < cost["seconds"]
        assert cost["forward_equivalents"] == pytest.approx(cost["seconds"] / cost["forward_seconds"])
    assert "forward equivalents (median of 2 blocks" in report.render()


# ---------------------------------------------------------------------------------------------
# Models held in memory: quantize() on a model, eval --fake-quant, quantize-on-load
# ---------------------------------------------------------------------------------------------


def _in_memory(tiny_llama_fp, guard: str):
    """``tiny_llama_fp`` in fp32, fake-quantized by the API the way ``eval --fake-quant`` does,
    with the pipeline tests' calibration (so that the held-out windows are the same)."""
    from transformers import AutoTokenizer

    from awq_plugin.api import fake_quantize_model
    from awq_plugin.config import AwqQuantConfig
    from awq_plugin.runtime.modeling import load_fp_model

    model = load_fp_model(tiny_llama_fp, torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_fp)
    fake_quantize_model(
        model,
        AwqQuantConfig(bits=4, group_size=64),
        "enwiki",
        tokenizer=tokenizer,
        n_samples=4,
        seq_len=64,
        options=dataclasses.replace(FAST, clip=False, search_dtype="float32"),
        guard=guard,
    )
    return model, tokenizer


def test_in_memory_guard_scores_the_same_windows_as_the_whole_model_comparison(tiny_llama_fp) -> None:
    from awq_plugin.config import AwqQuantConfig
    from awq_plugin.runtime.modeling import load_fp_model

    model, tokenizer = _in_memory(tiny_llama_fp, guard="warn")
    verdict = model.awq_guard
    assert verdict is not None and verdict.action == "kept" and verdict.windows == 8
    held = held_out_windows(tokenizer, "enwiki", 4, 64, FAST.seed, count=8)
    whole = compare_with_rounding(
        lambda: load_fp_model(tiny_llama_fp, torch.float32),
        model.awq_results,
        AwqQuantConfig(bits=4, group_size=64),
        held,
    )
    assert verdict.awq_windows == pytest.approx(whole.awq_windows, rel=1e-5, abs=1e-5)
    assert verdict.rtn_windows == pytest.approx(whole.rtn_windows, rel=1e-5, abs=1e-5)


def test_in_memory_fallback_leaves_plain_rounding(tiny_llama_fp, monkeypatch) -> None:
    """When the verdict is a loss, the model held in memory ends as plain rounding of its
    full-precision weights: the guard restores every block before the linears are quantized."""
    import awq_plugin.pipeline.guard as guard_module
    from awq_plugin.config import AwqQuantConfig
    from awq_plugin.pipeline.guard import fake_quantize_linears
    from awq_plugin.runtime.modeling import load_fp_model

    def lost(self, model, text):
        return GuardResult.from_windows([3.0, 3.1, 3.2], [2.0, 2.0, 2.1], 64, text)

    monkeypatch.setattr(guard_module.InMemoryGuard, "verdict", lost)
    model, _ = _in_memory(tiny_llama_fp, guard="fallback")
    assert model.awq_guard.action == "rounded" and model.awq_results is None
    expected = load_fp_model(tiny_llama_fp, torch.float32)
    fake_quantize_linears(expected, AwqQuantConfig(bits=4, group_size=64))
    for name, tensor in expected.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name

    kept, _ = _in_memory(tiny_llama_fp, guard="warn")  # warn: the same loss keeps AWQ
    assert kept.awq_guard.action == "kept" and kept.awq_results is not None
    assert any(not torch.equal(kept.state_dict()[n], t) for n, t in expected.state_dict().items())


def test_in_memory_guard_is_skipped_without_held_out_text(tiny_llama_fp) -> None:
    from awq_plugin.api import fake_quantize_model
    from awq_plugin.config import AwqQuantConfig
    from awq_plugin.runtime.modeling import load_fp_model

    model = load_fp_model(tiny_llama_fp, torch.float32)
    fake_quantize_model(
        model, AwqQuantConfig(bits=4, group_size=64), calib_ids(n=4, seq=64), options=FAST, guard="fallback"
    )
    assert model.awq_guard is None and model.awq_results is not None
