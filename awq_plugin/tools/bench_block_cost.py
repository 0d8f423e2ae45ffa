"""``awq-plugin bench block-cost``: what AWQ spends on one decoder block, in forward equivalents.

A forward equivalent (FE) is the time of one forward of the block over the same calibration
tokens, on the same threads and device: the floor any calibration-based search pays at least
once. The benchmark builds ONE random decoder block (a 1-layer Llama of the chosen shape, the
Llama-3-8B shape by default), captures its inputs the way the pipeline does
(:func:`awq_plugin.calibration.capture.capture_decoder_inputs` on random token ids, in the
model's bf16), then per thread count:

1. times one forward of the block over all calibration tokens in bf16 and in fp32 (the floors,
   micro-batched like the search), after one warm-up micro-batch;
2. times what the pipeline spends on the block: :func:`awq_plugin.algorithm.block.awq_block_step`
   on a fresh float32 copy of it (the pipeline reads each block in float32), with the step's own
   phase markers (:mod:`awq_plugin.algorithm.phases`), and the end-to-end guard's two passes of
   its held-out windows through the block (as plain rounding before the step, as written after
   it; ``--guard-windows 0``: no guard);
3. reports FE = those seconds / the ``--floor-dtype`` forward's seconds, per phase too.

It prints one JSON object (CPU model and flags, shape, tokens, options, per-run seconds, FE,
phases, and the speed-up between the first two thread counts) and draws the phases as bars.
Random weights: right for speed, wrong for quality (see ``bench quality``).

    awq-plugin bench block-cost --threads 2,1 --json block_cost.json --png block_cost.png
    awq-plugin bench block-cost --n-samples 16 --threads 2      # a quick look at the hotspots
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from awq_plugin.cpuinfo import cpu_description

# The Llama-3-8B block: hidden 4096, SwiGLU 14336, 32 query heads of 128 over 8 KV heads.
LLAMA3_8B_SHAPE = {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8}
# The pipeline's default: the guard's windows are part of every block's cost.
GUARD_WINDOWS = 8
SUB_PHASE = "/"  # "search mlp/forwards" is part of "search mlp": totals skip such names


def forward_equivalents(seconds: float, floor_seconds: float) -> float:
    """``seconds`` in units of one forward of the block (``floor_seconds``); NaN without a floor."""
    return seconds / floor_seconds if floor_seconds > 0 else math.nan


def summarize_run(
    threads: int,
    floors: Mapping[str, float],
    awq_seconds: float,
    phases: Mapping[str, float],
    floor_dtype: str,
) -> dict[str, Any]:
    """One thread count's figures: seconds, FE (total and per phase) against the ``floor_dtype`` floor."""
    floor = floors[floor_dtype]
    top = {name: s for name, s in phases.items() if SUB_PHASE not in name}
    return {
        "threads": threads,
        "floor_seconds": {dtype: round(s, 6) for dtype, s in floors.items()},
        "awq_seconds": round(awq_seconds, 6),
        "fe": round(forward_equivalents(awq_seconds, floor), 3),
        "fp32_over_bf16_forward": round(floors["float32"] / floors["bfloat16"], 3)
        if floors.get("bfloat16")
        else None,
        "phases": [
            {
                "phase": name,
                "seconds": round(s, 6),
                "fe": round(forward_equivalents(s, floor), 3),
                "share": round(s / awq_seconds, 4) if awq_seconds > 0 else None,
            }
            for name, s in phases.items()
        ],
        "unaccounted_seconds": round(awq_seconds - sum(top.values()), 3),
    }


def thread_speedup(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """AWQ seconds of the fewest threads over those of the most (None with one thread count)."""
    if len({r["threads"] for r in runs}) < 2:
        return None
    few = min(runs, key=lambda r: r["threads"])
    many = max(runs, key=lambda r: r["threads"])
    return {
        "threads": [few["threads"], many["threads"]],
        "awq": round(few["awq_seconds"] / many["awq_seconds"], 3),
        "floor": {
            dtype: round(few["floor_seconds"][dtype] / many["floor_seconds"][dtype], 3)
            for dtype in many["floor_seconds"]
        },
    }


def build_block(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    """(model with one decoder layer in bf16, its resolved template, the layer's BlockInputs, the
    guard's streams of ``args.guard_windows`` random windows, or None)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from awq_plugin.calibration.capture import capture_decoder_inputs
    from awq_plugin.templates import resolve_template

    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        num_hidden_layers=1,
        vocab_size=args.vocab,
        max_position_embeddings=max(args.seq_len, 2048),
        tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    ids = torch.randint(
        0, args.vocab, (args.n_samples, args.seq_len), generator=torch.Generator().manual_seed(args.seed)
    )
    layers = model.model.layers
    captured = capture_decoder_inputs(model, layers, ids, args.micro_batch_size)
    streams = None
    if args.guard_windows:
        from awq_plugin.algorithm.forward_dtype import resolve_search_dtype
        from awq_plugin.pipeline.guard import GuardStreams

        windows = torch.randint(
            0,
            args.vocab,
            (args.guard_windows, args.seq_len),
            generator=torch.Generator().manual_seed(args.seed + 1),
        )
        # one window per micro-batch, float32 hidden states and the search's forward dtype, as
        # the pipeline's streams
        dtype = resolve_search_dtype(args.awq_options.search_dtype, torch.device("cpu"))
        streams = GuardStreams(
            windows, capture_decoder_inputs(model.float(), layers, windows, 1), dtype=dtype
        )
        model.to(torch.bfloat16)
    return model, resolve_template(model).block(0), captured.for_layer(0), streams


def time_forward(block: Any, inputs: Any, dtype: Any) -> float:
    """Seconds of one forward of a ``dtype`` copy of ``block`` over all micro-batches (after a warm-up)."""
    import torch

    from awq_plugin.calibration.capture import BlockInputs, forward_block

    copy_ = copy.deepcopy(block).to(dtype)
    cast = inputs.to(dtype)
    with torch.no_grad():
        forward_block(copy_, BlockInputs(cast.hidden_states[:1], cast.kwargs[:1]))  # warm-up
        started = time.perf_counter()
        forward_block(copy_, cast)
        return time.perf_counter() - started


def with_reference_stream(inputs: Any, seed: int = 0) -> Any:
    """``inputs`` as a block after the first sees them under ``fit_to="model"``: beside the
    quantized model's hidden states, the full-precision model's, which differ from them (here
    by 1% noise: the work does not depend on the values, only on there being two streams)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    reference = [
        h + 0.01 * h.float().std() * torch.randn(h.shape, generator=gen).to(h) for h in inputs.hidden_states
    ]
    return inputs.with_hidden_states(inputs.hidden_states, reference)


def run_one(
    threads: int,
    block: Any,
    groups: Any,
    inputs: Any,
    quant: Any,
    options: Any,
    floor_dtype: str,
    streams: Any = None,
) -> dict[str, Any]:
    """Floors and one block's AWQ (a float32 copy of ``block``; with the guard's ``streams``
    when given) with ``threads`` intra-op threads."""
    import torch

    from awq_plugin.algorithm.block import awq_block_step
    from awq_plugin.algorithm.linears import quantized_linear_names
    from awq_plugin.algorithm.phases import phase, recording_phases

    torch.set_num_threads(threads)
    floors = {name: time_forward(block, inputs, getattr(torch, name)) for name in ("bfloat16", "float32")}
    if options.fit_to == "model" and inputs.reference is None:
        inputs = with_reference_stream(inputs)
    work = copy.deepcopy(block).float()
    names = quantized_linear_names(work, groups, quant)
    with recording_phases() as phases:
        started = time.perf_counter()
        if streams is not None:
            with phase("guard windows"):
                streams.advance("rtn", 0, work, names, quant)
        result, _ = awq_block_step(work, groups, inputs, quant, options)
        if streams is not None:
            with phase("guard windows"):
                streams.advance("awq", 0, work, names, quant)
        awq_seconds = time.perf_counter() - started
    run = summarize_run(threads, floors, awq_seconds, phases, floor_dtype)
    run["mse_rtn"], run["mse_awq"] = result.mse_rtn, result.mse_awq
    run["alphas"] = [g.alpha for g in result.groups]
    del work
    return run


def plot(result: Mapping[str, Any], path: str | Path) -> None:
    """One stacked bar per thread count: the step's phases in forward equivalents, floors marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    names: list[str] = []
    for run in runs:
        names += [
            p["phase"] for p in run["phases"] if SUB_PHASE not in p["phase"] and p["phase"] not in names
        ]
    fig, ax = plt.subplots(figsize=(9, 1.6 + 1.1 * len(runs)), dpi=110)
    colors = plt.get_cmap("tab20").colors
    for row, run in enumerate(runs):
        left = 0.0
        by_name = {p["phase"]: p["fe"] for p in run["phases"]}
        for i, name in enumerate(names):
            width = by_name.get(name, 0.0)
            ax.barh(row, width, left=left, color=colors[i % len(colors)], label=name if row == 0 else None)
            left += width
        ax.text(left, row, f"  {run['fe']:.2f} FE ({run['awq_seconds']:.0f} s)", va="center", fontsize=8)
    ax.axvline(1.0, color="black", lw=0.8, ls=":")
    ax.set_yticks(range(len(runs)), [f"{r['threads']} thread(s)" for r in runs])
    ax.set_xlabel(
        f"forward equivalents (one {result['floor_dtype']} forward of the block over the same tokens)"
    )
    calib = result["calibration"]
    shape = result["shape"]
    ax.set_title(
        f"AWQ cost of one block (hidden {shape['hidden']}, FFN {shape['intermediate']}, "
        f"{shape['heads']}/{shape['kv_heads']} heads), {calib['n_samples']} x {calib['seq_len']} tokens, "
        f"{result['scheme']}\n{result['cpu']['model_name']}",
        fontsize=9,
    )
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=4)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from awq_plugin.algorithm.options import AwqOptions

    p = argparse.ArgumentParser(
        prog="awq-plugin bench block-cost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--hidden", type=int, default=LLAMA3_8B_SHAPE["hidden"])
    p.add_argument("--intermediate", type=int, default=LLAMA3_8B_SHAPE["intermediate"])
    p.add_argument("--heads", type=int, default=LLAMA3_8B_SHAPE["heads"])
    p.add_argument("--kv-heads", type=int, default=LLAMA3_8B_SHAPE["kv_heads"])
    p.add_argument("--vocab", type=int, default=1024, help="vocabulary of the 1-layer model (random ids)")
    p.add_argument("--n-samples", type=int, default=128, help="calibration sequences (default 128)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--scheme", default="uint4_wo_128")
    p.add_argument("--threads", default="2", help="comma list of thread counts, e.g. 2,1 (default 2)")
    p.add_argument(
        "--floor-dtype", choices=["bfloat16", "float32"], default="bfloat16", help="the FE unit's forward"
    )
    p.add_argument("--options", default="{}", help="AwqOptions overrides as JSON (default: the defaults)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and token ids")
    p.add_argument(
        "--guard-windows",
        type=int,
        default=GUARD_WINDOWS,
        help=f"held-out windows the end-to-end guard streams through the block (default {GUARD_WINDOWS}; 0: none)",
    )
    p.add_argument("--json", metavar="OUT", help="also write the JSON object to this file")
    p.add_argument("--png", metavar="OUT", help="draw the phases to this PNG")
    args = p.parse_args(argv)
    args.awq_options = AwqOptions.from_dict(json.loads(args.options))
    args.micro_batch_size = args.awq_options.micro_batch_size
    args.thread_counts = [int(t) for t in args.threads.split(",") if t]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print one JSON object (and write ``--json`` / ``--png``)."""
    args = parse_args(argv)
    import torch

    from awq_plugin.config import AwqQuantConfig
    from awq_plugin.fsutil import atomic_write_json

    quant = AwqQuantConfig.from_scheme(args.scheme)
    print(
        f"bench block-cost: building the block and its {args.n_samples} x {args.seq_len} inputs",
        file=sys.stderr,
    )
    model, groups, inputs, streams = build_block(args)
    block = model.model.layers[0]
    runs = []
    for threads in args.thread_counts:
        print(f"bench block-cost: {threads} thread(s) ...", file=sys.stderr)
        runs.append(
            run_one(threads, block, groups, inputs, quant, args.awq_options, args.floor_dtype, streams)
        )
        print(
            json.dumps({k: runs[-1][k] for k in ("threads", "floor_seconds", "awq_seconds", "fe")}),
            file=sys.stderr,
        )
    result = {
        "benchmark": "block-cost",
        "cpu": cpu_description(),
        "torch": torch.__version__,
        "shape": {k: getattr(args, k) for k in ("hidden", "intermediate", "heads", "kv_heads")},
        "calibration": {
            "n_samples": args.n_samples,
            "seq_len": args.seq_len,
            "tokens": inputs.n_tokens,  # as captured: what every forward above ran over
        },
        "scheme": quant.scheme,
        "options": args.awq_options.to_dict(),
        "floor_dtype": args.floor_dtype,
        "guard_windows": args.guard_windows,
        "runs": runs,
        "speedup": thread_speedup(runs),
        "cpu_count": os.cpu_count(),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(json.dumps({**result, "cpu": {k: v for k, v in result["cpu"].items() if k != "flags"}}, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.json, result)
    if args.png:
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        plot(result, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
