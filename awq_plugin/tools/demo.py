"""``awq-plugin demo``: default model -> AWQ checkpoint -> perplexity table -> served by vLLM.

Every step reuses what an earlier run built (models are validated, evaluations
are cached by the checkpoint's fingerprint), so a second run is quick.
Artifacts go under ``--workdir`` (default ``artifacts/``), the report under
``--results`` (default ``results/``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import platform
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from awq_plugin.errors import AwqPluginError
from awq_plugin.fsutil import atomic_write_bytes, atomic_write_json, dir_size_bytes

CHAT_QUESTION = "In two sentences, what is weight quantization of a neural network?"
SERVE_PROMPT = "The history of the city begins"
SERVE_CONCURRENCY = (1, 8)
# One decode-sized GEMM shape of a 1.1B Llama (hidden 2048 -> MLP 5632) for the quick kernel run.
KERNEL_SHAPE = "2048x5632"
KERNEL_IMPLS = ("ours", "dense_bf16", "dense_onednn", "aten_int4", "vllm_wna16")
# PNGs the full benchmarks write when given --png under the results folder; the report links them.
FULL_BENCHMARKS = (
    ("quality.png", "AWQ vs plain rounding on real models (awq-plugin bench quality)"),
    ("bench_kernels.png", "INT4 GEMM speed-up vs M (awq-plugin bench kernels)"),
    ("bench_serve.png", "Serving throughput (awq-plugin bench serve)"),
    ("soak.png", "Server soak (awq-plugin bench soak)"),
    ("bench_large_model.png", "Quantizing a model larger than memory (awq-plugin bench large-model)"),
)


def _say(message: str) -> None:
    print(f"==> {message}", flush=True)


def _checkpoint_stamp(folder: Path) -> str:
    """A cheap fingerprint of a model folder: names, sizes and mtimes of its weight files."""
    parts = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(folder.glob("*.safetensors"))]
    parts.append(("config", (folder / "config.json").read_text()))
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def ensure_quantized(source: Path, out: Path, scheme: str, method: str, n_samples: int, seq_len: int) -> Path:
    """Quantize unless ``out`` already holds a valid checkpoint made with the same settings."""
    from awq_plugin.config import AwqQuantConfig
    from awq_plugin.format.checkpoint import validate_checkpoint
    from awq_plugin.pipeline.quantize import quantize_checkpoint

    settings = {"scheme": scheme, "method": method, "n_samples": n_samples, "seq_len": seq_len}
    stamp_file = out / "awq_plugin" / "demo_settings.json"
    if out.is_dir():
        try:
            validate_checkpoint(out)
            if json.loads(stamp_file.read_text()) == settings:
                _say(f"reusing {method.upper()} checkpoint {out}")
                return out
        except (AwqPluginError, OSError, ValueError):
            pass
    _say(f"quantizing with {method.upper()} ({scheme}, {n_samples} x {seq_len} calibration tokens) -> {out}")
    report = quantize_checkpoint(
        source,
        out,
        AwqQuantConfig.from_scheme(scheme),
        method=method,
        n_samples=n_samples,
        seq_len=seq_len,
        overwrite=True,
    )
    print(report.render(), flush=True)
    stamp_file.parent.mkdir(exist_ok=True)
    atomic_write_json(stamp_file, settings)
    atomic_write_json(out / "awq_plugin" / "quantize_report.json", report.to_dict())
    return out


def evaluate_cached(model_dir: Path, windows: int, cache: dict[str, Any]) -> dict[str, Any]:
    """Held-out perplexity of a folder, cached by its fingerprint and the window count."""
    import torch
    from transformers import AutoTokenizer

    from awq_plugin.api import evaluate_perplexity
    from awq_plugin.runtime.modeling import load_model

    key = f"{model_dir}|{_checkpoint_stamp(model_dir)}|{windows}"
    if key in cache:
        return cache[key]
    _say(f"perplexity of {model_dir.name} on {windows} held-out Wikipedia windows")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_model(model_dir, dtype=torch.float32)
    result = evaluate_perplexity(model, tokenizer, "enwiki-heldout", windows, 512).to_dict()
    cache[key] = result
    return result


def serve_and_chat(model_dir: Path, log_path: Path) -> dict[str, Any]:
    """Serve the checkpoint with ``vllm serve --quantization awq``; ask one chat question; time a completion."""
    from openai import OpenAI

    from awq_plugin.tools.server import VllmServer

    args = [
        "--quantization",
        "awq",
        "--enforce-eager",
        "--max-model-len",
        "2048",
        "--served-model-name",
        "demo",
    ]
    _say(f"starting: vllm serve {model_dir} {' '.join(args)}  (log: {log_path})")
    started = time.monotonic()
    with VllmServer(model_dir, log_path, args) as server:
        ready = time.monotonic() - started
        _say(f"server ready on {server.base_url} after {ready:.0f} s")
        client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
        chat = client.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": CHAT_QUESTION}],
            max_tokens=96,
            temperature=0.0,
        )
        answer = chat.choices[0].message.content or ""
        throughput = {c: _completion_throughput(client, c) for c in SERVE_CONCURRENCY}
        log = server.log_text()
    plugin_in_use = "awq-plugin" in log.lower()
    return {
        "question": CHAT_QUESTION,
        "answer": answer,
        "startup_s": round(ready, 1),
        "tok_s": throughput[1],
        "throughput": [{"concurrency": c, "output_tok_s": v} for c, v in throughput.items()],
        "plugin_in_use": plugin_in_use,
    }


def quick_kernel_bench(results_dir: Path) -> dict[str, Any]:
    """Our INT4 GEMM against dense bf16, aten int4 and vLLM's kernel on one shape, M = 1..64."""
    import os

    from awq_plugin.tools import bench_kernels

    threads = os.cpu_count() or 1
    _say(f"kernel benchmark: {KERNEL_SHAPE} weights, M in 1,4,16,64, {threads} threads (about a minute)")
    json_path = results_dir / "demo_kernels.json"
    results_dir.mkdir(parents=True, exist_ok=True)
    argv = ["--shapes", KERNEL_SHAPE, "--ms", "1,4,16,64", "--threads", str(threads), "--budget", "0.1"]
    argv += ["--impls", ",".join(KERNEL_IMPLS)]  # ours and the peers, not the bench's forced paths
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):  # the rows go to the JSON
        bench_kernels.main([*argv, "--json", str(json_path)])
    rows = json.loads(json_path.read_text())
    ours = [r for r in rows if r.get("impl") == "ours"]
    machine = next((r for r in rows if r.get("impl") == "machine"), {})
    return {"shape": KERNEL_SHAPE, "threads": threads, "rows": rows, "ours": ours, "machine": machine}


def _completion_throughput(client: Any, concurrency: int, max_tokens: int = 128) -> float:
    """Output tokens/s of ``concurrency`` simultaneous greedy completions of ``max_tokens`` each."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> int:
        completion = client.completions.create(
            model="demo",
            prompt=f"{SERVE_PROMPT} (story {i})",
            max_tokens=max_tokens,
            temperature=0.0,
            extra_body={"ignore_eos": True},
        )
        return completion.usage.completion_tokens if completion.usage else 0

    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(one, range(concurrency)))
    return round(tokens / (time.monotonic() - started), 2)


def _plot_perplexity(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    names = [r["method"] for r in rows]
    values = [r["ppl"] for r in rows]
    bars = ax.bar(names, values, color=["#4c72b0", "#c44e52", "#55a868"][: len(rows)])
    ax.bar_label(bars, fmt="%.2f")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("SmolLM2-135M, held-out Wikipedia: full precision vs 4-bit")
    ax.set_ylim(0, max(values) * 1.15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_throughput(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    bars = ax.bar([f"{r['concurrency']} request(s)" for r in rows], [r["output_tok_s"] for r in rows])
    ax.bar_label(bars, fmt="%.1f")
    ax.set_ylabel("output tokens / s")
    ax.set_xlabel("concurrent greedy completions, 128 tokens each")
    ax.set_title("vllm serve --quantization awq (this plugin), SmolLM2-135M")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results_dir: Path, summary: dict[str, Any]) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    _plot_perplexity(summary["quality"], results_dir / "demo_perplexity.png")
    atomic_write_json(results_dir / "demo.json", summary)
    lines = [
        "# awq-plugin demo report",
        "",
        f"{summary['date']} on {summary['machine']}.",
        "",
        "| method | perplexity | weights on disk (MiB) | gap closed |",
        "|---|---|---|---|",
    ]
    for row in summary["quality"]:
        closed = "" if row.get("gap_closed") is None else f"{100 * row['gap_closed']:.0f}%"
        lines.append(f"| {row['method']} | {row['ppl']:.3f} | {row['size_mib']:.1f} | {closed} |")
    lines += ["", "![perplexity](demo_perplexity.png)", ""]
    serve = summary.get("serve")
    if serve:
        lines += [
            f"Served by `vllm serve ... --quantization awq` (plugin in use: {serve['plugin_in_use']}); "
            f"ready after {serve['startup_s']} s; {serve['tok_s']} output tokens/s for one request.",
            "",
            f"> **Q:** {serve['question']}",
            ">",
            f"> **A:** {serve['answer'].strip()}",
            "",
            "![serving throughput](demo_serving.png)",
            "",
        ]
        _plot_throughput(serve["throughput"], results_dir / "demo_serving.png")
    kernels = summary.get("kernels")
    if kernels:
        from awq_plugin.tools import bench_kernels

        rows = {(r["impl"], r["M"]): r for r in kernels["rows"] if "M" in r}
        machine = kernels.get("machine", {})
        lines += [
            f"## INT4 GEMM, {kernels['shape']} weights, {kernels['threads']} threads",
            "",
            f"ms per call, weights read from DRAM on every call (cold cache: {machine.get('cycle_mib')} "
            f"MiB cycled on {machine.get('model_name')}); speed-up is over dense bf16.",
            "",
            "| M | ours | dense bf16 (F.linear) | dense bf16 (vLLM oneDNN) | aten int4 | vLLM AWQ (CPU) | ours vs F.linear |",
            "|---|---|---|---|---|---|---|",
        ]
        for m in sorted({m for _, m in rows}):
            cells = [f"{rows[(impl, m)]['ms']:.3f}" if (impl, m) in rows else "-" for impl in KERNEL_IMPLS]
            speedup = rows.get(("ours", m), {}).get("speedup_vs_dense")
            lines.append(f"| {m} | {' | '.join(cells)} | {speedup}x |")
        bench_kernels.plot(kernels["rows"], str(results_dir / "demo_kernels.png"))
        lines += ["", "![kernel speed-up](demo_kernels.png)", ""]
    others = [(name, title) for name, title in FULL_BENCHMARKS if (results_dir / name).is_file()]
    if others:
        lines += ["## Full benchmarks found in this folder", ""]
        lines += [f"### {title}\n\n![{title}]({name})\n" for name, title in others]
    path = results_dir / "REPORT.md"
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="awq-plugin demo", description=__doc__)
    parser.add_argument(
        "--workdir", default="artifacts", help="where models are written (default: artifacts/)"
    )
    parser.add_argument(
        "--results", default="results", help="where the report is written (default: results/)"
    )
    parser.add_argument("--scheme", default="uint4_wo_64")
    parser.add_argument(
        "--n-samples",
        type=int,
        default=64,
        help="calibration windows (default 64: half the library default of 128, to keep the demo short)",
    )
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument(
        "--windows", type=int, default=20, help="held-out windows for perplexity (default 20)"
    )
    parser.add_argument("--no-serve", action="store_true", help="skip the vLLM step")
    parser.add_argument("--no-kernel-bench", action="store_true", help="skip the quick kernel benchmark")
    args = parser.parse_args(argv)

    from awq_plugin.tools.default_model import is_default_model_current, write_default_model

    work = Path(args.workdir).resolve()
    results = Path(args.results).resolve()
    models = work / "models"
    models.mkdir(parents=True, exist_ok=True)
    fp_dir = models / "smollm2-135m"
    verb = "reusing" if is_default_model_current(fp_dir) else "writing"
    _say(f"{verb} the embedded default model (SmolLM2-135M-Instruct, fp16) at {fp_dir}")
    write_default_model(fp_dir)
    if args.n_samples < 128:
        _say(f"calibrating on {args.n_samples} samples, fewer than the default 128, to keep the demo short")
    awq_dir = ensure_quantized(
        fp_dir, models / f"smollm2-135m-awq-{args.scheme}", args.scheme, "awq", args.n_samples, args.seq_len
    )
    rtn_dir = ensure_quantized(
        fp_dir, models / f"smollm2-135m-rtn-{args.scheme}", args.scheme, "rtn", args.n_samples, args.seq_len
    )

    cache_path = work / "eval_cache.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    quality = []
    for method, folder in (("fp16", fp_dir), ("RTN", rtn_dir), ("AWQ", awq_dir)):
        result = evaluate_cached(folder, args.windows, cache)
        atomic_write_json(cache_path, cache)
        weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        quality.append(
            {
                "method": method,
                "ppl": result["ppl"],
                "tokens": result["tokens"],
                "size_mib": weights / 2**20,
                "folder_mib": dir_size_bytes(folder) / 2**20,
            }
        )
    fp, rtn, awq = (row["ppl"] for row in quality)
    quality[2]["gap_closed"] = (rtn - awq) / (rtn - fp) if rtn > fp else None

    summary: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
        "scheme": args.scheme,
        "n_samples": args.n_samples,
        "seq_len": args.seq_len,
        "quality": quality,
        "artifacts": {"fp16": str(fp_dir), "awq": str(awq_dir), "rtn": str(rtn_dir)},
    }
    if not args.no_kernel_bench:
        summary["kernels"] = quick_kernel_bench(results)
    if not args.no_serve:
        summary["serve"] = serve_and_chat(awq_dir, results / "demo_vllm_serve.log")
        print(f"\nQ: {CHAT_QUESTION}\nA: {summary['serve']['answer'].strip()}\n", flush=True)
    report = write_report(results, summary)

    print(f"{'method':<8}{'perplexity':>12}{'weights MiB':>14}")
    for row in quality:
        print(f"{row['method']:<8}{row['ppl']:>12.3f}{row['size_mib']:>14.1f}")
    if quality[2].get("gap_closed") is not None:
        print(f"AWQ closes {100 * quality[2]['gap_closed']:.0f}% of plain rounding's perplexity gap")
    if "kernels" in summary:
        machine = summary["kernels"].get("machine", {})
        cold = f"{machine.get('cycle_mib')} MiB of weights cycled, more than the cache holds"
        print(f"INT4 GEMM {KERNEL_SHAPE} on {machine.get('model_name')} ({cold}):")
        for row in summary["kernels"]["ours"]:
            print(f"  M={row['M']}: {row.get('speedup_vs_dense')}x dense bf16")
    if "serve" in summary:
        for row in summary["serve"]["throughput"]:
            print(f"vLLM serving, {row['concurrency']} concurrent: {row['output_tok_s']} output tokens/s")
    print(f"artifacts: {work}\nreport:    {report}")
    return 0
