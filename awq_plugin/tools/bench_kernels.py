"""Benchmark the AWQ CPU kernel against its peers, cold cache, in one run.

Contenders, all timed in the same process on the same quantized weights:

- ``ours``: ``awq_plugin.kernels.awq_linear`` on the AVX-512 VNNI backend (``cpu``; bf16 activations),
  which multiplies on the AMX tiles from ``AMX_MIN_ROWS`` rows on CPUs that have them;
- ``vnni`` and ``amx``: the same kernel with its path forced (``kernels.cpu_linear``), so that the
  choice between them by M can be read off the same run (``amx`` only where the CPU has AMX-INT8);
- ``avx2``: the same on the ``avx2`` backend (the kernel x86 CPUs without AVX-512 VNNI run; its
  AVX-VNNI inner product only where the CPU has ``avx_vnni``);
- ``portable``: the same on the ``portable`` backend (ARM and other CPUs: our generic C++
  kernel, compiled for the host CPU);
- ``dense_bf16``: ``F.linear`` on the dequantized weight in bf16 (the unquantized baseline);
- ``dense_bf16_noamx``: the same with oneDNN kept off the AMX tiles
  (``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16``; only on CPUs with AMX). oneDNN reads that variable once
  per process, so these rows come from a child process run right after the others, not
  interleaved with them;
- ``dense_onednn``: the same bf16 weight through vLLM's own CPU linear for unquantized layers
  (``onednn_mm`` on the handle ``dispatch_cpu_unquantized_gemm`` creates), i.e. what
  ``vllm serve`` of the bf16 model runs; several times faster than ``F.linear`` here at small M
  (only when vLLM is importable);
- ``aten_int4``: ``torch.ops.aten._weight_int4pack_mm_for_cpu`` with bf16 activations;
- ``vllm_wna16``: vLLM's ``cpu_gemm_wna16``, weights prepared by ``CPUWNA16LinearKernel``
  (only when vLLM is importable).

Every contender cycles through more than ``--cycle-mib`` of distinct weight copies
(default: 544 MiB, or twice the machine's last-level cache as sysfs reports it where that
is more) so that the cache cannot hold them: each call reads its weight from DRAM, as a
decode step through a large model does. A ``machine`` row records the CPU model, its
matrix-unit flags, the last-level cache and the bytes cycled. The machine's read
bandwidth is measured in the same run (summing a 1 GiB tensor), and our backends are
reported as a fraction of the bytes / bandwidth limit.

Prints a JSON list of rows to stdout (and writes it with ``--json``); ``--png``
draws speed-up over dense bf16 against M, one panel per shape. Times are the
best pass mean over repeated passes (the machine is shared and noisy; the best
pass is the least disturbed one, and each pass is cold by construction).
"""

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from awq_plugin.cpuinfo import cpu_description, last_level_cache_bytes
from awq_plugin.numerics import pack, quant_ref

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (576, 1536), (1536, 576)]
LARGE_SHAPES = SHAPES[:3]
MS = [1, 4, 16, 64, 256]
QUICK_SHAPES = [(576, 1536), (1536, 576)]
QUICK_MS = [1, 16]
IMPLS = (
    "ours",
    "vnni",
    "amx",
    "avx2",
    "portable",
    "dense_bf16",
    "dense_bf16_noamx",
    "dense_onednn",
    "aten_int4",
    "vllm_wna16",
)
#: Our backends by contender name (``ours`` kept its name: it is the AVX-512 VNNI ``cpu`` backend).
OUR_BACKENDS = {"ours": "cpu", "vnni": "cpu", "amx": "cpu", "avx2": "avx2", "portable": "portable"}
#: Contenders that force one path of the ``cpu`` kernel (``kernels.cpu_linear``).
FORCED_PATHS = {"vnni": "vnni", "amx": "amx"}
#: oneDNN's instruction-set cap for ``dense_bf16_noamx``: AVX-512 with bf16, no AMX.
NOAMX_ISA = "AVX512_CORE_BF16"


#: Distinct weight bytes cycled by default: at least this, and twice the last-level cache.
MIN_CYCLE_MIB = 544
#: CPU flags that decide which matrix path runs (ours and PyTorch's dense bf16).
MATRIX_FLAGS = ("avx2", "avx_vnni", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def default_cycle_mib(quick: bool, llc_bytes: int | None = None) -> int:
    """MiB of distinct weights each contender cycles through: twice the last-level cache
    (``llc_bytes``, default read from sysfs) and at least :data:`MIN_CYCLE_MIB`; 32 for ``--quick``
    (a smoke run, not a cold-cache measurement)."""
    if quick:
        return 32
    llc = last_level_cache_bytes() if llc_bytes is None else llc_bytes
    return max(MIN_CYCLE_MIB, math.ceil(2 * (llc or 0) / 2**20))


def machine_row(cycle_mib: int) -> dict[str, Any]:
    """The CPU the run measured (model, matrix-unit flags), its last-level cache and the bytes cycled."""
    cpu = cpu_description()
    llc = last_level_cache_bytes()
    return {
        "impl": "machine",
        "model_name": cpu["model_name"],
        "flags": [f for f in MATRIX_FLAGS if f in cpu["flags"]],
        "llc_mib": None if llc is None else round(llc / 2**20, 1),
        "cycle_mib": cycle_mib,
    }


def parse_shape(text: str) -> tuple[int, int]:
    """``"2048x5632"`` -> ``(K, N)``; a clear error for anything else."""
    parts = text.lower().strip().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise SystemExit(f"--shapes: {text!r} is not KxN with positive integers (e.g. 2048x5632)")
    return int(parts[0]), int(parts[1])


def group_size_for(k: int, n: int) -> int:
    """g128, or g64 for the small shapes (576 is not a multiple of 128)."""
    return 128 if k % 128 == 0 and min(k, n) >= 4096 else 64


@dataclasses.dataclass
class Contender:
    """A callable ``x -> y`` per weight copy, and the bytes one call's weight occupies."""

    name: str
    calls: list[Callable[[torch.Tensor], torch.Tensor]]
    weight_bytes: int


def tensor_bytes(*ts: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def copies_needed(weight_bytes: int, cycle_bytes: int) -> int:
    return max(2, math.ceil(cycle_bytes / max(weight_bytes, 1)))


# ---------------------------------------------------------------------------
# Weight preparation per contender
# ---------------------------------------------------------------------------


def make_ours(p: pack.AwqPacked, group_size: int, cycle_bytes: int, name: str = "ours") -> Contender | None:
    """One of our backends (``OUR_BACKENDS[name]``), or None where it does not run here."""
    from awq_plugin import kernels

    backend = OUR_BACKENDS[name]
    if backend not in kernels.available_backends():
        print(f"{name} unavailable: backend {backend!r} does not run on this machine", file=sys.stderr)
        return None
    if name == "amx" and not kernels.amx_ready():
        print("amx unavailable: this CPU has no AMX-INT8 tiles", file=sys.stderr)
        return None
    w = kernels.prepare_awq_weight(p.qweight, p.qzeros, p.scales, group_size, backend=backend)
    nbytes = tensor_bytes(w.qweight, w.qzeros, w.scales)
    copies = [w] + [
        dataclasses.replace(w, qweight=w.qweight.clone(), qzeros=w.qzeros.clone(), scales=w.scales.clone())
        for _ in range(copies_needed(nbytes, cycle_bytes) - 1)
    ]
    if name in FORCED_PATHS:
        path = FORCED_PATHS[name]
        return Contender(name, [lambda x, w=w: kernels.cpu_linear(x, w, path=path) for w in copies], nbytes)
    return Contender(name, [lambda x, w=w: kernels.awq_linear(x, w) for w in copies], nbytes)


def make_dense(gq: quant_ref.GroupQuantized, cycle_bytes: int) -> Contender:
    w = gq.dequantize(torch.bfloat16)  # (N, K)
    nbytes = tensor_bytes(w)
    copies = [w] + [w.clone() for _ in range(copies_needed(nbytes, cycle_bytes) - 1)]
    return Contender("dense_bf16", [lambda x, w=w: F.linear(x, w) for w in copies], nbytes)


def make_dense_onednn(gq: quant_ref.GroupQuantized, cycle_bytes: int) -> Contender | None:
    """vLLM's unquantized CPU linear: a oneDNN matmul handle per weight, as its layers build one."""
    try:
        from vllm import _custom_ops as ops
    except Exception as exc:  # vLLM is optional
        print(f"dense_onednn unavailable: {exc}", file=sys.stderr)
        return None
    if not getattr(ops, "_supports_onednn", False):
        print("dense_onednn unavailable: this vLLM build has no oneDNN", file=sys.stderr)
        return None
    w = gq.dequantize(torch.bfloat16)  # (N, K)
    nbytes = tensor_bytes(w)
    copies = [w] + [w.clone() for _ in range(copies_needed(nbytes, cycle_bytes) - 1)]
    # 32: the primitive cache size vLLM's dispatch_cpu_unquantized_gemm passes.
    handles = [ops.create_onednn_mm(c.t(), 32) for c in copies]
    return Contender("dense_onednn", [lambda x, h=h: ops.onednn_mm(h, x, None) for h in handles], nbytes)


def make_aten_int4(gq: quant_ref.GroupQuantized, cycle_bytes: int) -> Contender | None:
    """PyTorch's int4 CPU kernel: w = (q - 8) * s + z, so z = (8 - z_awq) * s."""
    n, k = gq.q.shape
    s = gq.scales.float()  # (N, K/G)
    z = (8 - gq.zeros.float()) * s
    scale_zero = torch.stack([s, z], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # (K/G, N, 2)
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(gq.q.to(torch.int32), 2)
    except RuntimeError as exc:
        print(f"aten_int4 unavailable for K={k}, N={n}: {exc}", file=sys.stderr)
        return None
    nbytes = tensor_bytes(packed, scale_zero)
    copies = [(packed, scale_zero)] + [
        (packed.clone(), scale_zero.clone()) for _ in range(copies_needed(nbytes, cycle_bytes) - 1)
    ]
    g = gq.group_size
    op = torch.ops.aten._weight_int4pack_mm_for_cpu
    return Contender("aten_int4", [lambda x, c=c: op(x, c[0], g, c[1]) for c in copies], nbytes)


def make_vllm_wna16(gq: quant_ref.GroupQuantized, cycle_bytes: int) -> Contender | None:
    """vLLM's CPU WNA16 kernel with weights prepared by its own CPUWNA16LinearKernel.

    vLLM's AWQ loader first converts the checkpoint to the GPTQ-like layout
    (``_convert_awq_to_standard_format``: qweight packed along K as ``[K/8, N]``,
    zeros ``[N/8, G]``, transposed by the kernel to ``[G, N/8]``); we build that
    layout directly from the integers (vLLM's parameter classes need a
    tensor-parallel group), then call the kernel's own repacking method.
    """
    try:
        from vllm import _custom_ops as ops
        from vllm.model_executor.kernels.linear.mixed_precision.cpu import CPUWNA16LinearKernel
        from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import MPLinearLayerConfig
        from vllm.model_executor.layers.quantization.utils.quant_utils import (
            pack_quantized_values_into_int32,
        )
        from vllm.scalar_type import scalar_types
    except Exception as exc:  # vLLM is optional
        print(f"vllm_wna16 unavailable: {exc}", file=sys.stderr)
        return None
    n, k = gq.q.shape
    config = MPLinearLayerConfig(
        full_weight_shape=(k, n),
        partition_weight_shape=(k, n),
        weight_type=scalar_types.uint4,
        act_type=torch.bfloat16,
        group_size=gq.group_size,
        zero_points=True,
    )
    ok, why = CPUWNA16LinearKernel.can_implement(config)
    if not ok:
        print(f"vllm_wna16 cannot run K={k}, N={n}: {why}", file=sys.stderr)
        return None
    kernel = CPUWNA16LinearKernel(
        config, w_q_param_name="qweight", w_s_param_name="scales", w_zp_param_name="qzeros"
    )

    def param(t: torch.Tensor) -> torch.nn.Parameter:
        return torch.nn.Parameter(t, requires_grad=False)

    layer = torch.nn.Module()
    layer.qweight = param(pack_quantized_values_into_int32(gq.q.t().to(torch.int32), scalar_types.uint4, 0))
    layer.qzeros = param(
        pack_quantized_values_into_int32(gq.zeros.t().to(torch.int32), scalar_types.uint4, 1)
    )
    layer.scales = param(gq.scales.t().contiguous().to(torch.bfloat16))  # params_dtype = bf16
    kernel._process_gptq_weights_w4a16(layer)  # sets layer.isa_hint and the blocked qweight
    qw, s, z, hint = layer.qweight.data, layer.scales.data, layer.qzeros.data, layer.isa_hint
    nbytes = tensor_bytes(qw, s, z)
    copies = [(qw, s, z)] + [
        (qw.clone(), s.clone(), z.clone()) for _ in range(copies_needed(nbytes, cycle_bytes) - 1)
    ]

    def call(x: torch.Tensor, c: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return ops.cpu_gemm_wna16(
            input=x, q_weight=c[0], scales=c[1], zeros=c[2], bias=None, pack_factor=8, isa_hint=hint
        )

    return Contender("vllm_wna16", [lambda x, c=c: call(x, c) for c in copies], nbytes)


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


def time_pass(calls: list[Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor) -> float:
    """Mean ms per call over one pass through all weight copies (cold by construction)."""
    t0 = time.perf_counter()
    for call in calls:
        call(x)
    return (time.perf_counter() - t0) / len(calls) * 1e3


def time_interleaved(contenders: list[Contender], x: torch.Tensor, budget_s: float) -> dict[str, float]:
    """Best pass per contender, passes interleaved round-robin.

    The machine is shared: interleaving spreads other processes' load evenly
    over the contenders, and the best pass is each one's least disturbed run.
    """
    for c in contenders:
        c.calls[0](x)  # warm the code path
    best = {c.name: math.inf for c in contenders}
    start = time.perf_counter()
    rounds = 0
    while rounds < 1 or time.perf_counter() - start < budget_s * len(contenders):
        for c in contenders:
            best[c.name] = min(best[c.name], time_pass(c.calls, x))
        rounds += 1
    return best


def measure_read_bandwidth(nbytes: int, repeats: int = 3) -> float:
    """GB/s of summing an fp32 tensor of ``nbytes`` (best of ``repeats``), at the current thread count."""
    t = torch.ones(nbytes // 4)
    t.sum()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        t.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def bench_shape(
    k: int,
    n: int,
    ms: list[int],
    threads: list[int],
    cycle_bytes: int,
    budget_s: float,
    group_size: int | None = None,
    impls: tuple[str, ...] = IMPLS,
) -> list[dict[str, Any]]:
    g = group_size or group_size_for(k, n)
    gen = torch.Generator().manual_seed(k * 7 + n)
    w = torch.randn(n, k, generator=gen) * 0.02  # (N, K)
    gq = quant_ref.quantize(w, 4, g)
    packed = pack.pack(gq)
    makers: dict[str, Callable[[], Contender | None]] = {
        **{name: (lambda name=name: make_ours(packed, g, cycle_bytes, name)) for name in OUR_BACKENDS},
        "dense_bf16": lambda: make_dense(gq, cycle_bytes),
        "dense_bf16_noamx": lambda: None,  # a child process runs it (see noamx_rows)
        "dense_onednn": lambda: make_dense_onednn(gq, cycle_bytes),
        "aten_int4": lambda: make_aten_int4(gq, cycle_bytes),
        "vllm_wna16": lambda: make_vllm_wna16(gq, cycle_bytes),
    }
    contenders = [c for name in impls if (c := makers[name]()) is not None]
    rows = []
    for m in ms:
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
        for t in threads:
            torch.set_num_threads(t)
            timings = time_interleaved(contenders, x, budget_s)
            for c in contenders:
                ms_per_call = timings[c.name]
                row: dict[str, Any] = {
                    "K": k,
                    "N": n,
                    "M": m,
                    "group_size": g,
                    "threads": t,
                    "impl": c.name,
                    "ms": round(ms_per_call, 4),
                    "weight_bytes": c.weight_bytes,
                    "copies": len(c.calls),
                    "gbps": round((c.weight_bytes + 2 * m * (k + n)) / ms_per_call / 1e6, 2),
                }
                rows.append(row)
                print(
                    f"K={k:5d} N={n:5d} M={m:3d} t={t} {c.name:11s} {ms_per_call:9.3f} ms",
                    file=sys.stderr,
                    flush=True,
                )
    return rows


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """``speedup_vs_dense``: dense_bf16 ms / this ms, same shape, M and threads."""
    dense = {(r["K"], r["N"], r["M"], r["threads"]): r["ms"] for r in rows if r["impl"] == "dense_bf16"}
    for r in rows:
        key = (r.get("K"), r.get("N"), r.get("M"), r.get("threads"))
        if key in dense:
            r["speedup_vs_dense"] = round(dense[key] / r["ms"], 3)


def add_bandwidth_fractions(rows: list[dict[str, Any]], bandwidth: dict[int, float]) -> None:
    """For our backends: the bytes / bandwidth time limit and the fraction of it reached.

    ``bw_fraction`` uses the machine's best read bandwidth (any thread count);
    ``bw_fraction_same_threads`` the bandwidth measured at the row's thread count.
    """
    best_bw = max(bandwidth.values())
    for r in rows:
        if r["impl"] not in OUR_BACKENDS:
            continue
        nbytes = r["weight_bytes"] + 2 * r["M"] * (r["K"] + r["N"])  # weight + bf16 x and y
        r["limit_ms"] = round(nbytes / (best_bw * 1e6), 4)
        r["bw_fraction"] = round(nbytes / (best_bw * 1e6) / r["ms"], 3)
        r["bw_fraction_same_threads"] = round(nbytes / (bandwidth[r["threads"]] * 1e6) / r["ms"], 3)


def best_over_threads(rows: list[dict[str, Any]]) -> dict[tuple[int, int, int, str], dict[str, Any]]:
    best: dict[tuple[int, int, int, str], dict[str, Any]] = {}
    for r in rows:
        if "M" not in r:  # the bandwidth and machine rows
            continue
        key = (r["K"], r["N"], r["M"], r["impl"])
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    return best


def summary(rows: list[dict[str, Any]]) -> str:
    """A human-readable table: best-of-threads ms per contender; each of ours vs dense and its bw fraction."""
    best = best_over_threads(rows)
    impls = [i for i in IMPLS if any(key[3] == i for key in best)]
    ours = [i for i in impls if i in OUR_BACKENDS]
    head = " ".join(f"{i:>14}" for i in impls)
    ratios = " ".join(f"{i + ' x dense':>16} {'bw':>5}" for i in ours)
    lines = [f"{'K':>6} {'N':>6} {'M':>4} | {head} | {ratios}"]
    order = list(dict.fromkeys((k, n) for k, n, _, _ in best))  # shapes in the order they were run
    for k, n, m in sorted({(r[0], r[1], r[2]) for r in best}, key=lambda s: (order.index(s[:2]), s[2])):
        cells = []
        for impl in impls:
            r = best.get((k, n, m, impl))
            cells.append(f"{r['ms']:8.3f} ({r['threads']}t)" if r else f"{'-':>14}")
        dense = best.get((k, n, m, "dense_bf16"))
        marks = []
        for impl in ours:
            r = best.get((k, n, m, impl))
            x = f"{dense['ms'] / r['ms']:16.2f}" if r and dense else f"{'-':>16}"
            marks.append(f"{x} {r['bw_fraction']:5.2f}" if r else f"{x} {'-':>5}")
        lines.append(f"{k:6d} {n:6d} {m:4d} | {' '.join(cells)} | {' '.join(marks)}")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """Speed-up over dense bf16 (best of the thread counts for each) against M, one panel per shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = best_over_threads(rows)
    shapes = list(dict.fromkeys((k, n) for k, n, _, _ in best))  # in the order they were run
    ncols = min(3, len(shapes))
    nrows = -(-len(shapes) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(4.6 * ncols, 7.5), 3.6 * nrows + 0.6), squeeze=False)
    for ax in axes.flat[len(shapes) :]:
        ax.axis("off")
    for ax, (k, n) in zip(axes.flat, shapes):
        ms = sorted({m for kk, nn, m, _ in best if (kk, nn) == (k, n)})
        for impl in IMPLS:
            pts = [
                (m, best[(k, n, m, "dense_bf16")]["ms"] / best[(k, n, m, impl)]["ms"])
                for m in ms
                if (k, n, m, impl) in best and (k, n, m, "dense_bf16") in best
            ]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ms, [str(m) for m in ms])
        ax.set_xlabel("M (rows of activations)")
        ax.set_ylabel("speed-up over dense bf16 (x)")
        group = next(r["group_size"] for r in best.values() if (r["K"], r["N"]) == (k, n))
        ax.set_title(f"K={k}, N={n}, g{group}")
        ax.grid(True, which="both", alpha=0.3)
    labels: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labels.setdefault(label, handle)
    threads = sorted({r["threads"] for r in rows if "M" in r})
    machine = next((r for r in rows if r["impl"] == "machine"), None)
    where = (
        ""
        if machine is None
        else f" on {machine['model_name']}, {machine['cycle_mib']} MiB of weights cycled"
    )
    fig.suptitle(
        f"AWQ int4 linear on CPU (bf16 activations), cold cache{where}\n"
        f"best of {threads} threads per contender; higher is better"
    )
    fig.tight_layout()
    if len(shapes) == 1:
        axes.flat[0].legend(labels.values(), labels.keys(), loc="best", fontsize=9)
    elif len(shapes) < axes.size:  # the spare panel holds the legend
        axes.flat[len(shapes)].legend(labels.values(), labels.keys(), loc="center", fontsize=10)
    else:
        fig.legend(labels.values(), labels.keys(), loc="lower right", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def noamx_rows(
    shapes: list[tuple[int, int]],
    ms: list[int],
    threads: list[int],
    cycle_mib: int,
    budget: float,
    group_size: int | None,
) -> list[dict[str, Any]]:
    """``dense_bf16`` timed in a child process whose oneDNN may not use AMX, as ``dense_bf16_noamx``.

    Empty (with a note) on a CPU without AMX bf16 tiles, where ``dense_bf16`` is that already.
    """
    if "amx_bf16" not in cpu_description()["flags"]:
        print("dense_bf16_noamx: this CPU has no AMX bf16 tiles; dense_bf16 is without them", file=sys.stderr)
        return []
    argv = [sys.executable, "-m", "awq_plugin.tools.bench_kernels", "--impls", "dense_bf16"]
    argv += ["--shapes", ",".join(f"{k}x{n}" for k, n in shapes), "--ms", ",".join(map(str, ms))]
    argv += ["--threads", ",".join(map(str, threads)), "--cycle-mib", str(cycle_mib), "--budget", str(budget)]
    if group_size is not None:
        argv += ["--group-size", str(group_size)]
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": NOAMX_ISA}
    done = subprocess.run(argv, env=env, stdout=subprocess.PIPE, check=True, text=True)
    rows = [r for r in json.loads(done.stdout) if r.get("impl") == "dense_bf16"]
    for r in rows:
        r["impl"] = "dense_bf16_noamx"
        r.pop("speedup_vs_dense", None)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the kernel benchmark; prints the JSON rows to stdout and a summary table to stderr."""
    parser = argparse.ArgumentParser(prog="awq-plugin bench kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="OUT", help="write the rows to this JSON file")
    parser.add_argument("--png", metavar="OUT", help="draw speed-up over dense bf16 vs M to this PNG")
    parser.add_argument("--quick", action="store_true", help="a tiny CI-sized run (small shapes, M in 1,16)")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    parser.add_argument("--shapes", default=None, help="comma-separated KxN weight shapes (default: five)")
    parser.add_argument("--ms", default=None, help="comma-separated batch rows M (default 1,4,16,64,256)")
    parser.add_argument(
        "--cycle-mib", type=int, default=None, help="distinct weight bytes cycled per contender"
    )
    parser.add_argument("--budget", type=float, default=None, help="seconds of timing per measurement")
    parser.add_argument(
        "--impls",
        default=",".join(IMPLS),
        help=f"comma-separated contenders (default: all of {','.join(IMPLS)})",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="for every shape (default: 128 for large shapes, else 64)",
    )
    args = parser.parse_args(argv)

    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    impls = tuple(i.strip() for i in args.impls.split(",") if i.strip())
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        raise SystemExit(f"--impls: {unknown} unknown; choose from {','.join(IMPLS)}")
    shapes, ms = (QUICK_SHAPES, QUICK_MS) if args.quick else (SHAPES, MS)
    if args.shapes:
        shapes = [parse_shape(text) for text in args.shapes.split(",")]
    if args.ms:
        ms = [int(m) for m in args.ms.split(",")]
    cycle_mib = args.cycle_mib if args.cycle_mib is not None else default_cycle_mib(args.quick)
    budget = args.budget if args.budget is not None else (0.05 if args.quick else 0.2)
    bw_bytes = (256 if args.quick else 1024) * 2**20
    saved_threads = torch.get_num_threads()

    rows: list[dict[str, Any]] = []
    bandwidth: dict[int, float] = {}
    try:
        # Bandwidth is measured before every shape and at the end; the best
        # reading per thread count is the machine's (a shared machine is rarely
        # quiet for a whole run, and a disturbed reading would flatter ours).
        for shape in [*shapes, None]:
            for t in threads:
                torch.set_num_threads(t)
                bandwidth[t] = max(bandwidth.get(t, 0.0), measure_read_bandwidth(bw_bytes))
            print(f"read bandwidth so far (GB/s per thread count): {bandwidth}", file=sys.stderr, flush=True)
            if shape is not None:
                rows += bench_shape(*shape, ms, threads, cycle_mib * 2**20, budget, args.group_size, impls)
    finally:
        torch.set_num_threads(saved_threads)
    if "dense_bf16_noamx" in impls:
        rows += noamx_rows(shapes, ms, threads, cycle_mib, budget, args.group_size)
    rows += [
        {"impl": "bandwidth", "threads": t, "gbps": round(bw, 2), "bytes": bw_bytes}
        for t, bw in bandwidth.items()
    ]
    rows.append(machine_row(cycle_mib))
    add_speedups(rows)
    add_bandwidth_fractions(rows, bandwidth)

    print(summary(rows), file=sys.stderr)
    text = json.dumps(rows, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text + "\n")
    if args.png:
        plot(rows, args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
