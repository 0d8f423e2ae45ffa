"""The larger-than-memory benchmark end to end on a tiny shape, so the script cannot rot.

The real run (a model several GiB large, see README Results) is a benchmark, not
a test; here the ratio check is off (``--min-ratio 0``) and everything else is
the same code path: synthetic checkpoint, monitored child quantizer, validation,
JSON, PNG, clean-up.
"""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest

from awq_plugin.tools import synthetic
from awq_plugin.tools.bench_large_model import exit_status, main

TINY = ["--layers", "3", "--hidden", "256", "--intermediate", "512", "--heads", "4", "--kv-heads", "2"]
CALIB = ["--n-samples", "4", "--seq-len", "64", "--threads", "1", "--interval", "0.1"]


def test_tiny_run_reports_and_cleans_up(
    tmp_path: Path, default_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "work"
    out_json, out_png = tmp_path / "r" / "large.json", tmp_path / "r" / "large.png"
    argv = [*TINY, *CALIB, "--work-dir", str(work), "--tokenizer", str(default_model_dir)]
    status = main([*argv, "--min-ratio", "0", "--json", str(out_json), "--png", str(out_png)])
    assert status == 0, capsys.readouterr().err
    result = json.loads(out_json.read_text())
    printed = json.loads(capsys.readouterr().out)
    assert printed == {k: v for k, v in result.items() if k != "trace"}

    config = synthetic.make_config(
        "llama-2.7b-deep",
        num_hidden_layers=3,
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    assert result["bf16_weight_bytes"] == synthetic.checkpoint_bytes(config) == 2 * result["params"]
    assert result["shape"] == {
        "model_type": "llama",
        "layers": 3,
        "hidden": 256,
        "intermediate": 512,
        "vocab": 49152,
        "heads": 4,
        "kv_heads": 2,
    }
    assert result["machine_ram_bytes"] == psutil.virtual_memory().total
    # The child's own high-water mark: above what torch alone takes, at most what the
    # fork-inflated rusage figure says, at least every sample.
    assert 150 * 2**20 < result["peak_rss_bytes"] <= result["rusage_maxrss_bytes"]
    assert 0 < result["sampled_peak_rss_bytes"] <= result["peak_rss_bytes"]
    assert result["weights_over_peak_rss"] == pytest.approx(
        result["bf16_weight_bytes"] / result["peak_rss_bytes"], abs=1e-3
    )
    assert result["output_valid"] and result["inspect"]["quantized_layers"] == 3 * 7
    assert result["output_bytes"] > 0 and result["wall_seconds"] > 0
    assert sorted(map(int, result["block_done_at"])) == [0, 1, 2, 3]
    for key in ("setup_seconds", "blocks_seconds", "assemble_seconds", "block_seconds_median"):
        assert result[key] is not None and result[key] >= 0, key
    assert result["calibration"] == {"text": "enwiki", "n_samples": 4, "seq_len": 64, "search_tokens": None}
    assert result["method"] == "awq" and result["threads"] == 1 and result["clip_search"] is False
    assert "--no-clip" in result["quantize_args"]
    assert len(result["trace"]["seconds"]) == len(result["trace"]["rss_bytes"]) > 0
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not any(work.iterdir()), "the synthetic model and the output are deleted without --keep"


def test_exit_status_needs_a_valid_output_and_the_ratio() -> None:
    ok = {"output_valid": True, "weights_over_peak_rss": 3.2, "min_ratio": 3.0}
    assert exit_status(ok) == 0
    assert exit_status({**ok, "weights_over_peak_rss": 2.99}) == 1
    assert exit_status({**ok, "output_valid": False}) == 1
    assert exit_status({**ok, "weights_over_peak_rss": 0.1, "min_ratio": 0.0}) == 0


def test_random_checkpoint_is_streamed_sharded_loadable_and_deterministic(tmp_path: Path) -> None:
    """The synthetic writer: shards + index that transformers loads, the same bytes every time."""
    import torch
    from transformers import AutoModelForCausalLM

    config = synthetic.make_config("tiny-llama", vocab_size=512, hidden_size=64, intermediate_size=128)
    folders = [
        synthetic.write_random_checkpoint(tmp_path / name, config, seed=3, max_shard_bytes=40_000)
        for name in ("a", "b")
    ]
    shards = sorted(p.name for p in folders[0].glob("*.safetensors"))
    assert len(shards) > 2 and (folders[0] / "model.safetensors.index.json").is_file()
    assert all((folders[0] / n).read_bytes() == (folders[1] / n).read_bytes() for n in shards)
    model = AutoModelForCausalLM.from_pretrained(folders[0])
    assert model.dtype == torch.bfloat16 and type(model).__name__ == "LlamaForCausalLM"
    name = "model.layers.1.mlp.down_proj.weight"
    expected = synthetic.random_tensor(name, (64, 128), torch.bfloat16, 3, config.initializer_range)
    assert torch.equal(model.get_parameter(name), expected)
    assert torch.equal(model.get_parameter("model.norm.weight"), torch.ones(64, dtype=torch.bfloat16))
    assert synthetic.checkpoint_bytes(config) == sum(p.numel() * 2 for p in model.parameters())
