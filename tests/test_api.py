"""The in-memory API: quantize_model packs every quantized linear and shows progress."""

from __future__ import annotations

import pytest
import torch

from awq_plugin.api import quantize_model
from awq_plugin.config import AwqQuantConfig
from awq_plugin.runtime.qlinear import AwqLinear
from awq_plugin.tools import synthetic


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


@pytest.mark.parametrize("command", ["quantize", "eval"])
def test_cli_defaults_are_the_library_defaults(command: str) -> None:
    # The CLI once clipped on a 4096-token subsample while the API used every token, so the same
    # model quantized both ways gave different checkpoints (24.81 vs 24.71 perplexity).
    from awq_plugin.algorithm.awq import AwqOptions
    from awq_plugin.cli import _awq_options, build_parser

    args = build_parser().parse_args([command, "a", "b"] if command == "quantize" else [command, "a"])
    assert _awq_options(args) == AwqOptions()
    assert (args.n_samples, args.seq_len, args.calib) == (128, 512, "enwiki")


def test_cli_builds_its_parser_without_torch() -> None:
    """The CLI's AwqOptions defaults are read from the dataclass, which stays torch-free."""
    import subprocess
    import sys

    code = (
        "import sys; from awq_plugin.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "False"


def test_cli_passes_search_and_clip_token_counts() -> None:
    from awq_plugin.cli import _awq_options, build_parser

    args = build_parser().parse_args(["quantize", "a", "b", "--search-tokens", "0", "--clip-tokens", "512"])
    options = _awq_options(args)
    assert (options.search_tokens, options.clip_tokens) == (None, 512)


def test_folder_form_takes_token_ids_like_the_in_memory_form(tmp_path, tiny_llama_fp) -> None:
    """``quantize(folder, scheme, token_ids, out_dir=...)`` streams the folder with those very ids:
    the checkpoint equals the one written from the same ids drawn from text by the pipeline."""
    from transformers import AutoTokenizer

    from awq_plugin.api import quantize
    from awq_plugin.calibration.text import calibration_windows

    ids = calibration_windows(AutoTokenizer.from_pretrained(tiny_llama_fp), "enwiki", 4, 64, seed=0)
    from_ids = quantize(tiny_llama_fp, "uint4_wo_64", ids, out_dir=tmp_path / "ids", progress=False)
    from_text = quantize(
        tiny_llama_fp,
        "uint4_wo_64",
        "enwiki",
        out_dir=tmp_path / "text",
        n_samples=4,
        seq_len=64,
        guard="off",  # token ids leave no held-out text: no guard on that side either
        progress=False,
    )
    assert (from_ids.n_samples, from_ids.seq_len) == (4, 64) and from_ids.guard is None
    assert [b["mse_awq"] for b in from_ids.blocks] == [b["mse_awq"] for b in from_text.blocks]
    for name in ("model.safetensors", "awq_plugin/awq_results.safetensors"):
        assert (tmp_path / "ids" / name).read_bytes() == (tmp_path / "text" / name).read_bytes()


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (torch.zeros(4, 16), "integer tensor"),
        (torch.zeros(16, dtype=torch.long), r"shape \[16\]"),
        (torch.zeros(4, 1, dtype=torch.long), "seq_len >= 2"),
    ],
)
def test_bad_token_ids_are_refused_before_any_work(tmp_path, tiny_llama_fp, ids, message) -> None:
    from awq_plugin.api import quantize
    from awq_plugin.errors import CalibrationError

    with pytest.raises(CalibrationError, match=message):
        quantize(tiny_llama_fp, "uint4_wo_64", ids, out_dir=tmp_path / "out", progress=False)
    assert not any(tmp_path.iterdir())  # no output, no work dir


def test_cli_defaults_come_from_the_calibration_settings() -> None:
    from awq_plugin.calibration.settings import DEFAULTS
    from awq_plugin.cli import build_parser

    args = build_parser().parse_args(["quantize", "a", "b"])
    assert (args.calib, args.n_samples, args.seq_len) == (
        DEFAULTS.source,
        DEFAULTS.n_samples,
        DEFAULTS.seq_len,
    )


def test_a_built_in_text_is_tokenized_once_per_tokenizer(default_model_dir) -> None:
    """The cached stream equals a fresh tokenization, and a caller's edit never reaches the cache."""
    from transformers import AutoTokenizer

    from awq_plugin.calibration.text import load_documents, source_stream, tokenize_stream

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    first = source_stream(tokenizer, "pydoc")
    assert torch.equal(first, tokenize_stream(tokenizer, load_documents("pydoc")))
    first[:10] = -1
    again = source_stream(AutoTokenizer.from_pretrained(default_model_dir), "pydoc")
    assert torch.equal(again, tokenize_stream(tokenizer, load_documents("pydoc")))
