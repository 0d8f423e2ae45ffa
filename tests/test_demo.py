"""The demo's report: Markdown tables and readable plots from a run's summary.

The demo itself (install, quantize, evaluate, serve) is what ``make demo``
runs; here its report writer gets a summary of the shape the demo builds, so a
change to either side that breaks the report fails in CI.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from awq_plugin.tools import demo


def kernel_rows() -> list[dict]:
    rows = []
    for m, ours, dense in ((1, 0.9, 6.0), (16, 2.0, 6.5)):
        rows.append(
            {
                "K": 2048,
                "N": 5632,
                "M": m,
                "group_size": 64,
                "threads": 2,
                "impl": "ours",
                "ms": ours,
                "speedup_vs_dense": round(dense / ours, 3),
                "bw_fraction": 0.8,
            }
        )
        rows.append({"K": 2048, "N": 5632, "M": m, "group_size": 64, "threads": 2, "impl": "dense_bf16", "ms": dense,
                     "speedup_vs_dense": 1.0})  # fmt: skip
    rows.append({"impl": "bandwidth", "threads": 2, "gbps": 20.0, "bytes": 1})
    return rows


def summary() -> dict:
    quality = [
        {"method": "fp16", "ppl": 24.0, "size_mib": 256.0},
        {"method": "RTN", "ppl": 31.0, "size_mib": 90.0},
        {"method": "AWQ", "ppl": 26.5, "size_mib": 90.0, "gap_closed": 4.5 / 7.0},
    ]
    rows = kernel_rows()
    return {
        "date": "2026-11-23",
        "machine": "x86_64, 2 cores",
        "quality": quality,
        "kernels": {"shape": "2048x5632", "threads": 2, "rows": rows, "ours": rows[::2][:2]},
        "serve": {
            "question": demo.CHAT_QUESTION,
            "answer": "  Weight quantization stores weights in fewer bits.  ",
            "startup_s": 40.0,
            "tok_s": 30.0,
            "throughput": [
                {"concurrency": 1, "output_tok_s": 30.0},
                {"concurrency": 8, "output_tok_s": 120.0},
            ],
            "plugin_in_use": True,
        },
    }


def test_report_has_the_tables_the_answer_and_the_plots(tmp_path: Path) -> None:
    (tmp_path / "bench_serve.png").write_bytes(b"\x89PNG placeholder")  # a full benchmark's output
    report = demo.write_report(tmp_path, summary())
    text = report.read_text()
    assert "| AWQ | 26.500 | 90.0 | 64% |" in text
    assert "| 1 | 0.900 | 6.000 | - | - | - | 6.667x |" in text  # missing contenders show as "-"
    assert "**A:** Weight quantization stores weights in fewer bits." in text
    for png in ("demo_perplexity.png", "demo_kernels.png", "demo_serving.png"):
        assert f"]({png})" in text
    assert "](bench_serve.png)" in text and "](soak.png)" not in text  # only plots that exist
    for png in ("demo_perplexity.png", "demo_serving.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_cli_passes_options_to_the_demo(capsys: pytest.CaptureFixture[str]) -> None:
    from awq_plugin.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--workdir", "somewhere", "--help"])
    assert exit_info.value.code == 0 and "--no-kernel-bench" in capsys.readouterr().out
