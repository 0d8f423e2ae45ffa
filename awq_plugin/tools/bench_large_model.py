"""Quantize a synthetic Llama whose bf16 weights are several times the quantizer's peak memory.

The streaming pipeline (:mod:`awq_plugin.pipeline.quantize`) holds one decoder block, the
embeddings and the calibration activations, so its memory does not grow with the
number of blocks. This benchmark shows it on a model built for the purpose:

1. write a random-weight Llama checkpoint (bf16, sharded, the default model's
   tokenizer) tensor by tensor (:func:`awq_plugin.tools.synthetic.write_random_checkpoint`);
2. run ``awq-plugin quantize`` on it in a child process, sampling the child's
   resident memory every ``--interval`` s and its progress (blocks done) from the
   run's work dir; the peak is the child's own high-water mark (``VmHWM``, which
   it reports itself; see :mod:`awq_plugin.procmem` for why not ``ru_maxrss``);
3. validate the output (:func:`awq_plugin.format.checkpoint.validate_checkpoint`);
4. print one JSON object (and ``--json OUT``), draw RSS over time against the
   bf16 size and the machine's RAM (``--png OUT``), and exit 1 if the bf16 weights
   are less than ``--min-ratio`` (default 3) times the peak RSS;
5. delete the synthetic model and the output unless ``--keep``.

AWQ runs with its scale search and, by default, without the clip search
(``--clip`` turns it on): on this CPU it makes a block about 5x slower (94 s
against 20 s for a hidden-2048 block, 1 thread), which would take a model of
several GiB to hours, and it adds little memory (measured on 3 such blocks:
peak 1.12 GiB with it, 1.06 GiB without).

Usage: ``awq-plugin bench large-model [--preset llama-2.7b-deep] [--threads 1]
[--json OUT] [--png OUT]``. The machine's RAM (23 GiB here) is larger than any
model this can write in bounded time, so "larger than memory" is shown by the
ratio: the run would fit in a third of the model's size.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_PRESET = "llama-2.7b-deep"
DEFAULT_TOKENIZER_DIR = Path.home() / ".cache" / "awq_plugin" / "default-fp16"
SOURCE_MARKER = "awq_plugin_bench_source.json"  # what the synthetic source was written from
GIB = 2**30


@dataclass
class Trace:
    """What the monitor saw: RSS samples and the times blocks finished (seconds since start)."""

    seconds: list[float] = field(default_factory=list)
    rss_bytes: list[int] = field(default_factory=list)
    block_done_at: dict[int, float] = field(default_factory=dict)  # blocks done -> time

    @property
    def sampled_peak_bytes(self) -> int:
        return max(self.rss_bytes, default=0)


@dataclass
class ChildRun:
    """One monitored ``awq-plugin quantize`` process."""

    returncode: int
    wall_seconds: float
    trace: Trace
    report: dict[str, Any] | None  # the quantizer's own --json report (None if it failed)
    rusage_maxrss_bytes: int  # from wait4: includes the parent's pages at fork, an upper bound
    log_path: Path


class ChildMonitor(threading.Thread):
    """Polls a process's RSS (``/proc/<pid>/status``) and the quantizer's ``progress.json``.

    Times are wall-clock seconds since ``started`` (a ``time.time()``), the clock
    of file mtimes: a block's finish time is its ``progress.json`` write, exact
    even between two polls. The quantizer is one process (no workers), so its
    RSS is the run's.
    """

    def __init__(self, pid: int, progress_file: Path, interval: float, started: float) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.progress_file = progress_file
        self.interval = interval
        self.started = started
        self.trace = Trace()
        self.stop = threading.Event()

    def _read_progress(self) -> None:
        try:
            done = int(json.loads(self.progress_file.read_text())["done"])
            mtime = self.progress_file.stat().st_mtime
        except (OSError, ValueError, KeyError, TypeError):
            return  # not written yet, or caught mid-rename
        self.trace.block_done_at.setdefault(done, max(0.0, round(mtime - self.started, 3)))

    def run(self) -> None:
        from awq_plugin.procmem import current_rss_bytes

        while not self.stop.is_set():
            rss = current_rss_bytes(self.pid)
            if rss:
                self.trace.seconds.append(round(time.time() - self.started, 3))
                self.trace.rss_bytes.append(rss)
            self._read_progress()
            self.stop.wait(self.interval)
        self._read_progress()


def run_quantize(
    source: Path, out: Path, quantize_args: Sequence[str], threads: int, interval: float
) -> ChildRun:
    """Run ``awq-plugin quantize SOURCE OUT ...`` in a child process, monitored; wait for it."""
    from awq_plugin.pipeline.quantize import work_dir_path

    report_path = out.with_name(f"{out.name}.report.json")
    log_path = out.with_name(f"{out.name}.quantize.log")
    report_path.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "awq_plugin.cli",
        "quantize",
        str(source),
        str(out),
        *quantize_args,
        "--threads",
        str(threads),
        "--no-progress",
        "--overwrite",
        "--json",
        str(report_path),
    ]
    # One intra-op pool of the size asked for; no tokenizer thread pool (keeps RSS honest).
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    started = time.time()
    with open(log_path, "wb") as log:
        # cwd outside the repo: a repo root on sys.path shadows packages (kernels/) for transformers
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=out.parent, env=env)
        monitor = ChildMonitor(proc.pid, work_dir_path(out) / "progress.json", interval, started)
        monitor.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            monitor.stop.set()
            monitor.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - started
    report = json.loads(report_path.read_text()) if proc.returncode == 0 and report_path.is_file() else None
    return ChildRun(proc.returncode, wall, monitor.trace, report, usage.ru_maxrss * 1024, log_path)


def block_timing(trace: Trace, n_layers: int, wall_seconds: float) -> dict[str, Any]:
    """Set-up, per-block and assembly times from the block-finish times the monitor saw."""
    marks = sorted(trace.block_done_at.items())  # (blocks done, seconds)
    per_block: list[float] = []
    for (d0, t0), (d1, t1) in itertools.pairwise(marks):
        per_block += [(t1 - t0) / (d1 - d0)] * (d1 - d0)
    start = trace.block_done_at.get(0)
    end = trace.block_done_at.get(n_layers)
    return {
        "setup_seconds": round(start, 2) if start is not None else None,  # load, tokenize, capture
        "blocks_seconds": round(end - start, 2) if None not in (start, end) else None,
        "assemble_seconds": round(wall_seconds - end, 2) if end is not None else None,  # write + validate
        "block_seconds_median": round(statistics.median(per_block), 3) if per_block else None,
        "block_seconds_mean": round(statistics.fmean(per_block), 3) if per_block else None,
        "block_seconds_max": round(max(per_block), 3) if per_block else None,
    }


def model_config(args: argparse.Namespace) -> Any:
    """The transformers config of the synthetic model: the preset with any shape overrides."""
    from awq_plugin.tools import synthetic

    overrides = {
        key: value
        for key, value in {
            "num_hidden_layers": args.layers,
            "hidden_size": args.hidden,
            "intermediate_size": args.intermediate,
            "vocab_size": args.vocab,
            "num_attention_heads": args.heads,
            "num_key_value_heads": args.kv_heads,
        }.items()
        if value is not None
    }
    return synthetic.make_config(args.preset, **overrides)


def shape_of(config: Any) -> dict[str, Any]:
    return {
        "model_type": config.model_type,
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "intermediate": config.intermediate_size,
        "vocab": config.vocab_size,
        "heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
    }


def tokenizer_folder(path: str | None) -> Path:
    """A folder holding the default model's tokenizer (written once, then reused)."""
    if path is not None:
        return Path(path)
    from awq_plugin.tools.default_model import write_default_model

    return write_default_model(DEFAULT_TOKENIZER_DIR)


def prepare_source(folder: Path, config: Any, tokenizer_dir: Path, seed: int, shard_bytes: int) -> float:
    """Write the synthetic checkpoint unless ``folder`` already holds this very one; seconds taken."""
    from awq_plugin.tools import synthetic

    stamp = {"config": config.to_dict(), "seed": seed, "dtype": "bfloat16", "shard_bytes": shard_bytes}
    marker = folder / SOURCE_MARKER
    try:
        if json.loads(marker.read_text()) == json.loads(json.dumps(stamp)):
            return 0.0
    except (OSError, ValueError):
        pass
    started = time.monotonic()
    synthetic.write_random_checkpoint(folder, config, tokenizer_dir, seed=seed, max_shard_bytes=shard_bytes)
    marker.write_text(json.dumps(stamp, indent=1))
    return time.monotonic() - started


def total_ram_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def exit_status(result: dict[str, Any]) -> int:
    """0 if the output is valid and the bf16 weights are at least ``min_ratio`` x the peak RSS, else 1."""
    if not result["output_valid"]:
        return 1
    return 0 if result["weights_over_peak_rss"] >= result["min_ratio"] else 1


def plot(result: dict[str, Any], trace: Trace, path: str | Path) -> None:
    """RSS of the quantizer over time against the model's bf16 size and the machine's RAM."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_blocks) = plt.subplots(
        2, 1, figsize=(9, 6.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    minutes = [s / 60 for s in trace.seconds]
    ax.plot(
        minutes, [b / GIB for b in trace.rss_bytes], color="tab:blue", lw=1.2, label="RSS of the quantizer"
    )
    peak = result["peak_rss_bytes"] / GIB
    weights = result["bf16_weight_bytes"] / GIB
    ram = result["machine_ram_bytes"] / GIB
    ax.axhline(peak, color="tab:blue", ls=":", lw=1, label=f"peak RSS (VmHWM) {peak:.2f} GiB")
    ax.axhline(weights, color="tab:red", lw=1.5, label=f"model weights in bf16 {weights:.2f} GiB")
    ax.axhline(weights / 3, color="tab:red", ls="--", lw=1, label=f"bf16 weights / 3 = {weights / 3:.2f} GiB")
    ax.axhline(ram, color="gray", lw=1.5, label=f"machine RAM {ram:.1f} GiB")
    ax.set_ylim(0, ram * 1.08)
    ax.set_ylabel("resident memory (GiB)")
    ax.legend(loc="center right", fontsize=8)
    ax.grid(True, alpha=0.3)
    marks = sorted(trace.block_done_at.items())
    ax_blocks.step([t / 60 for _, t in marks], [d for d, _ in marks], where="post", color="tab:green")
    ax_blocks.set_ylabel("blocks done")
    ax_blocks.set_xlabel("time since the quantizer started (min)")
    ax_blocks.grid(True, alpha=0.3)
    shape, calib = result["shape"], result["calibration"]
    fig.suptitle(
        f"awq-plugin quantize ({result['method']}, {result['scheme']}) of a random {shape.get('model_type', 'llama')}, "
        f"{shape['layers']} layers x hidden {shape['hidden']}\n"
        f"bf16 weights {weights:.2f} GiB = {result['weights_over_peak_rss']:.2f}x the peak RSS; "
        f"calibration {calib['n_samples']} x {calib['seq_len']} tokens; {result['threads']} thread(s)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="awq-plugin bench large-model", description=__doc__.split("\n\n")[0]
    )
    shape = parser.add_argument_group("model shape (a preset of awq_plugin.tools.synthetic, then overrides)")
    shape.add_argument("--preset", default=DEFAULT_PRESET, help=f"default {DEFAULT_PRESET}")
    shape.add_argument("--layers", type=int, help="decoder layers")
    shape.add_argument("--hidden", type=int, help="hidden size")
    shape.add_argument("--intermediate", type=int, help="MLP intermediate size")
    shape.add_argument("--vocab", type=int, help="vocabulary (at least the tokenizer's)")
    shape.add_argument("--heads", type=int, help="attention heads")
    shape.add_argument("--kv-heads", type=int, help="key/value heads")
    shape.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    shape.add_argument(
        "--shard-mib", type=int, default=2048, help="shard size of the synthetic checkpoint (MiB)"
    )
    run = parser.add_argument_group("the quantize run")
    run.add_argument("--method", choices=["awq", "rtn"], default="awq")
    run.add_argument("--scheme", default="uint4_wo_128")
    run.add_argument("--calib", default="enwiki", help="calibration text (built-in name or file)")
    run.add_argument("--n-samples", type=int, default=8, help="calibration windows (default 8)")
    run.add_argument("--seq-len", type=int, default=128, help="tokens per window (default 128)")
    run.add_argument(
        "--search-tokens", type=int, help="token subsample of the search losses (default: the quantizer's)"
    )
    run.add_argument("--clip", action="store_true", help="also run AWQ's clip search (several times slower)")
    run.add_argument("--threads", type=int, default=1, help="torch threads of the quantizer (default 1)")
    run.add_argument("--interval", type=float, default=0.5, help="RSS sampling period in seconds")
    parser.add_argument(
        "--work-dir",
        default=str(Path(tempfile.gettempdir()) / "awq-plugin-bench-large-model"),
        help="where the synthetic model and the output are written (needs ~1.3x the bf16 size free)",
    )
    parser.add_argument("--tokenizer", help="folder with the tokenizer (default: the default model's)")
    parser.add_argument(
        "--min-ratio",
        type=float,
        default=3.0,
        help="fail (exit 1) if bf16 weights / peak RSS is below this (default 3; 0 = no check)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the synthetic model and the output")
    parser.add_argument("--json", metavar="OUT", help="also write the JSON object to this file")
    parser.add_argument("--png", metavar="OUT", help="draw RSS over time to this PNG")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; prints one JSON object; exit 1 if the ratio is short or the run failed."""
    args = parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    from awq_plugin.errors import AwqPluginError
    from awq_plugin.format.checkpoint import validate_checkpoint
    from awq_plugin.fsutil import atomic_write_json, dir_size_bytes
    from awq_plugin.tools import synthetic

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    config = model_config(args)
    weight_bytes = synthetic.checkpoint_bytes(config, torch.bfloat16)
    tokenizer_dir = tokenizer_folder(args.tokenizer)
    vocab_needed = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    if config.vocab_size < vocab_needed:
        print(f"bench large-model: --vocab must be at least the tokenizer's {vocab_needed}", file=sys.stderr)
        return 2
    source, out = work / "source-bf16", work / "out-awq"
    free = shutil.disk_usage(work).free + (dir_size_bytes(source) if source.is_dir() else 0)
    if free < 1.4 * weight_bytes:
        print(
            f"bench large-model: {work} has {free / GIB:.1f} GiB free; the source and output need about "
            f"{1.4 * weight_bytes / GIB:.1f} GiB",
            file=sys.stderr,
        )
        return 2

    print(f"bench large-model: writing {weight_bytes / GIB:.2f} GiB of bf16 weights ...", file=sys.stderr)
    write_seconds = prepare_source(source, config, tokenizer_dir, args.seed, args.shard_mib * 2**20)
    quantize_args = [
        "--method", args.method, "--scheme", args.scheme, "--calib", args.calib,
        "--n-samples", str(args.n_samples), "--seq-len", str(args.seq_len),
    ]  # fmt: skip
    if args.search_tokens is not None:
        quantize_args += ["--search-tokens", str(args.search_tokens)]
    if args.method == "awq" and not args.clip:
        quantize_args.append("--no-clip")
    print(f"bench large-model: awq-plugin quantize {' '.join(quantize_args)} ...", file=sys.stderr)
    try:
        run = run_quantize(source, out, quantize_args, args.threads, args.interval)
        if run.returncode != 0 or run.report is None:
            tail = run.log_path.read_text(errors="replace")[-3000:]
            print(f"bench large-model: quantize failed (exit {run.returncode}):\n{tail}", file=sys.stderr)
            return 1
        try:
            summary = validate_checkpoint(out).to_dict()
            valid = True
        except AwqPluginError as exc:
            summary, valid = {"error": str(exc)}, False
        peak = max(run.report["peak_rss_bytes"], run.trace.sampled_peak_bytes)
        result: dict[str, Any] = {
            "benchmark": "large-model",
            "shape": shape_of(config),
            "params": weight_bytes // 2,
            "bf16_weight_bytes": weight_bytes,
            "source_disk_bytes": dir_size_bytes(source),
            "machine_ram_bytes": total_ram_bytes(),
            "peak_rss_bytes": peak,
            "sampled_peak_rss_bytes": run.trace.sampled_peak_bytes,
            "rusage_maxrss_bytes": run.rusage_maxrss_bytes,
            "weights_over_peak_rss": round(weight_bytes / peak, 3),
            "min_ratio": args.min_ratio,
            "wall_seconds": round(run.wall_seconds, 2),
            "source_write_seconds": round(write_seconds, 2),
            **block_timing(run.trace, config.num_hidden_layers, run.wall_seconds),
            "output_bytes": run.report["output_bytes"],
            "output_valid": valid,
            "inspect": summary,
            "method": args.method,
            "scheme": args.scheme,
            "calibration": {
                "text": args.calib,
                "n_samples": args.n_samples,
                "seq_len": args.seq_len,
                "search_tokens": args.search_tokens,
            },
            "clip_search": args.method == "awq" and args.clip,
            "quantize_args": quantize_args,
            "threads": args.threads,
            "cpu_count": os.cpu_count(),
            "load_average_1m_at_end": round(os.getloadavg()[0], 2),
            "date": time.strftime("%Y-%m-%d"),
            "trace": {"seconds": run.trace.seconds, "rss_bytes": run.trace.rss_bytes},
            "block_done_at": {str(k): round(v, 3) for k, v in sorted(run.trace.block_done_at.items())},
        }
    finally:
        if not args.keep:
            from awq_plugin.pipeline.quantize import work_dir_path

            for path in (source, out, work_dir_path(out)):
                shutil.rmtree(path, ignore_errors=True)
            for suffix in (".report.json", ".quantize.log"):
                out.with_name(out.name + suffix).unlink(missing_ok=True)
    print(json.dumps({k: v for k, v in result.items() if k != "trace"}, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.json, result)
    if args.png:
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        plot(result, run.trace, args.png)
    ratio = result["weights_over_peak_rss"]
    print(
        f"bench large-model: bf16 weights {weight_bytes / GIB:.2f} GiB, peak RSS {peak / GIB:.2f} GiB "
        f"-> {ratio:.2f}x (required {args.min_ratio}x); wall {run.wall_seconds:.0f} s; output "
        f"{'valid' if valid else 'INVALID'}",
        file=sys.stderr,
    )
    return exit_status(result)


if __name__ == "__main__":
    sys.exit(main())
