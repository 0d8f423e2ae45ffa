"""Measure AWQ against plain rounding on a real model, in memory (fake quantization).

Loads an fp16 transformers folder in fp32, runs :func:`awq_plugin.algorithm.awq.run_awq`
on calibration windows, fake-quantizes every decoder linear with the reference
quantizer and prints one JSON object with perplexities (fp, RTN, AWQ), the
fraction of RTN's gap that AWQ closes and the AWQ wall time. Results are
appended to ``--out`` (JSON lines) as well.

    python scripts/awq_quality.py MODEL_DIR --scheme uint4_wo_64,uint4_wo_32,uint3_wo_64 \\
        --eval-windows 64 --threads 2 --out results/quality.jsonl --png results/quality.png
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from awq_plugin.algorithm.awq import AwqOptions, run_awq
from awq_plugin.calibration.text import calibration_windows, evaluation_windows
from awq_plugin.config import AwqQuantConfig
from awq_plugin.evaluate import perplexity
from awq_plugin.pipeline.guard import fake_quantize_linears


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("--scheme", default="uint4_wo_64", help="one scheme or a comma list (fp runs once)")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=None, help="held-out windows (default: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-baselines", action="store_true", help="only AWQ (reuse fp/RTN from --out)")
    p.add_argument("--baselines-only", action="store_true", help="only fp and RTN perplexity")
    p.add_argument("--out", type=Path, default=None, help="append the JSON result to this file")
    p.add_argument("--tag", default="")
    p.add_argument("--png", type=Path, default=None, help="draw perplexity per scheme to this PNG")
    p.add_argument("--template", default=None, help="architecture template JSON (default: shipped)")
    # AwqOptions
    p.add_argument("--n-grid", type=int, default=AwqOptions.n_grid)
    p.add_argument("--duo-scaling", action="store_true")
    p.add_argument("--no-clip", action="store_true")
    p.add_argument("--clip-symmetric", action="store_true", help="llm-awq's [-c, c] clip")
    p.add_argument("--no-clip-qk", action="store_true", help="skip q/k in the clip search (llm-awq)")
    p.add_argument("--clip-grid", type=int, default=AwqOptions.clip_grid)
    p.add_argument("--max-shrink", type=float, default=AwqOptions.max_shrink)
    p.add_argument("--search-tokens", type=int, default=AwqOptions.search_tokens, help="0 = all")
    p.add_argument("--clip-tokens", type=int, default=AwqOptions.clip_tokens, help="0 = all")
    p.add_argument("--seed", type=int, default=AwqOptions.seed)
    p.add_argument("--micro-batch-size", type=int, default=AwqOptions.micro_batch_size)
    p.add_argument("--propagate", default=AwqOptions.propagate, choices=["fp", "quantized"])
    p.add_argument("--search-dtype", default=AwqOptions.search_dtype, choices=["float32", "bfloat16"])
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    options = AwqOptions(
        n_grid=args.n_grid,
        duo_scaling=args.duo_scaling,
        clip=not args.no_clip,
        clip_asymmetric=not args.clip_symmetric,
        clip_qk=not args.no_clip_qk,
        clip_grid=args.clip_grid,
        max_shrink=args.max_shrink,
        search_tokens=args.search_tokens or None,
        clip_tokens=args.clip_tokens or None,
        micro_batch_size=args.micro_batch_size,
        seed=args.seed,
        propagate=args.propagate,
        search_dtype=args.search_dtype,
    )
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    calib = calibration_windows(tokenizer, "enwiki", args.n_samples, args.seq_len)
    evals = evaluation_windows(tokenizer, "enwiki-heldout", args.eval_windows, 512)

    def ppl(model: torch.nn.Module, name: str) -> float:
        return perplexity(model, evals, batch_size=4, progress=False, desc=name).ppl

    ppl_fp = None if args.skip_baselines else ppl(base, "fp")
    rows = []
    for scheme in args.scheme.split(","):
        quant_config = AwqQuantConfig.from_scheme(scheme)
        report: dict[str, object] = {
            "tag": args.tag,
            "scheme": quant_config.scheme,
            "threads": args.threads,
            "calib": list(calib.shape),
            "eval_windows": evals.shape[0],
            "options": options.to_dict(),
        }
        if ppl_fp is not None:
            report["ppl_fp"] = ppl_fp
            rtn = copy.deepcopy(base)
            fake_quantize_linears(rtn, quant_config)
            report["ppl_rtn"] = ppl(rtn, "rtn")
            del rtn
        if not args.baselines_only:
            model = copy.deepcopy(base)
            start = time.perf_counter()
            results = run_awq(model, quant_config, calib, template=args.template, options=options)
            report["awq_seconds"] = round(time.perf_counter() - start, 1)
            fake_quantize_linears(model, quant_config)
            report["ppl_awq"] = ppl(model, "awq")
            del model
            if "ppl_rtn" in report:
                gap = report["ppl_rtn"] - report["ppl_fp"]
                report["gap_closed"] = (report["ppl_rtn"] - report["ppl_awq"]) / gap if gap else None
            mse = results.summary()
            report["block_mse_rtn_sum"] = sum(b["mse_rtn"] for b in mse)
            report["block_mse_awq_sum"] = sum(b["mse_awq"] for b in mse)
        _emit(report, args.out)
        rows.append(report)
    if args.png:
        plot(rows, args.png)
    return 0


def plot(rows: list[dict[str, object]], path: Path) -> None:
    """Perplexity per scheme: plain rounding and AWQ bars against the full-precision line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "ppl_rtn" in r and "ppl_awq" in r]
    if not rows:
        return
    labels = [str(r["scheme"]) for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    rtn = ax.bar([i - 0.2 for i in x], [r["ppl_rtn"] for r in rows], 0.4, label="plain rounding (RTN)")
    awq = ax.bar([i + 0.2 for i in x], [r["ppl_awq"] for r in rows], 0.4, label="AWQ")
    ax.bar_label(rtn, fmt="%.2f", fontsize=8)
    ax.bar_label(awq, fmt="%.2f", fontsize=8)
    for i, r in zip(x, rows):
        if r.get("gap_closed") is not None:
            ax.annotate(
                f"{100 * r['gap_closed']:.0f}% of gap closed",
                (i, r["ppl_fp"]),
                xytext=(0, -14),
                textcoords="offset points",
                ha="center",
                fontsize=8,
            )
    ax.axhline(
        rows[0]["ppl_fp"],
        color="black",
        linestyle="--",
        linewidth=1,
        label=f"full precision ({rows[0]['ppl_fp']:.2f})",
    )
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("perplexity, held-out Wikipedia (lower is better)")
    calib = rows[0]["calib"]
    ax.set_title(
        f"Quality by scheme: {calib[0]} x {calib[1]} calibration tokens, "
        f"{rows[0]['eval_windows']} x 512 eval windows",
        fontsize=10,
    )
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _emit(report: dict[str, object], out: Path | None) -> int:
    line = json.dumps(report)
    print(line, flush=True)
    if out is not None:
        with out.open("a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
