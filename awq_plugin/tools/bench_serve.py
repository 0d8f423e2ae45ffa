"""End-to-end serving benchmark: output tokens/s and ms per output token through ``vllm serve``.

For each model (a synthetic random-weight Llama of ~1.1B parameters, whose weights do not
fit in cache, and the default model) and each implementation

- ``plugin``: the AWQ checkpoint served through this package's vLLM plugin,
- ``builtin_awq``: the same checkpoint with ``VLLM_PLUGINS=""`` (vLLM's own AWQ path),
- ``bf16``: the unquantized model,

one server is started on 127.0.0.1 and the same prompts are sent at concurrency 1 and 16
(streaming completions, fixed prompt and output lengths, ``ignore_eos``). Every row records
the vLLM CPU thread binding used; contenders of one run share it. Random weights are right
for speed and wrong for quality; the prompts are random token ids below 32000 (the
synthetic model's vocabulary).

Usage: ``awq-plugin bench serve [--json OUT] [--png OUT] [--quick]``. The machines are
shared and noisy: compare the ratios of one run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from awq_plugin.tools.server import VllmServer

IMPLS = ("plugin", "builtin_awq", "bf16")
#: The plugin on its other CPU paths (forced with AWQ_PLUGIN_KERNEL): ask for them with --impls.
FORCED_PATHS = {"plugin_avx2": "avx2", "plugin_portable": "portable"}
#: Checkpoint layouts the quantized contenders read (--layout): the plugin serves both.
LAYOUTS = ("autoawq", "compressed-tensors")
CONCURRENCIES = (1, 16)
MODELS = ("llama-1.1b", "default")
PROMPT_ID_RANGE = (100, 32000)  # below the synthetic model's vocabulary of 32000

# What each implementation's server log must show, so a row cannot silently measure
# another path (e.g. the plugin not loading and vLLM's built-in AWQ running instead).
PATH_MARKERS = {
    "plugin": r"awq-plugin: AwqPlugin(Layout)?LinearMethod( \([\w-]+\))? using kernel 'cpu'",
    "plugin_avx2": r"awq-plugin: AwqPlugin(Layout)?LinearMethod( \([\w-]+\))? using kernel 'avx2'",
    "plugin_portable": r"awq-plugin: AwqPlugin(Layout)?LinearMethod( \([\w-]+\))? using kernel 'portable'",
    "builtin_awq": r"CPUWNA16LinearKernel",
    "bf16": None,
}


@dataclass(frozen=True)
class BenchSettings:
    """One run's knobs (plain data; written into every row)."""

    prompt_tokens: int = 128  # per request
    output_tokens: int = 64  # per request (ignore_eos: every request generates exactly this many)
    rounds: int = 2  # requests per level = rounds * concurrency (at least 4)
    enforce_eager: bool = False  # False: vLLM's default torch.compile mode, as served in production
    threads_bind: str = "auto"  # VLLM_CPU_OMP_THREADS_BIND; "auto" = vLLM's own choice
    kv_cache_gib: int = 2  # VLLM_CPU_KVCACHE_SPACE
    max_model_len: int = 1024
    start_timeout_s: float = 600.0  # a 1.1B model takes ~230 s to start in compile mode here
    request_timeout_s: float = 600.0


QUICK = BenchSettings(prompt_tokens=32, output_tokens=16, rounds=1, enforce_eager=True)


# ---------------------------------------------------------------------------------------------
# The server's log
# ---------------------------------------------------------------------------------------------


def thread_binding(log_text: str) -> dict[str, Any]:
    """The CPU cores vLLM bound its compute threads to, as its log reports them."""
    cores = re.findall(r"local_rank=\d+, core ids=\[([\d, ]*)\]", log_text)
    reserved = re.findall(r"reserved_cpus=\[([\d, ]*)\]", log_text)

    def ids(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x.strip()]

    return {
        "compute_cores": [ids(c) for c in cores],
        "reserved_cores": ids(reserved[-1]) if reserved else [],
    }


# ---------------------------------------------------------------------------------------------
# Load generation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestResult:
    output_tokens: int
    latency_s: float  # request sent -> last token
    ttft_s: float  # request sent -> first token


def stream_completion(
    base_url: str, model: str, prompt_ids: list[int], max_tokens: int, timeout_s: float
) -> RequestResult:
    """One streaming ``/v1/completions`` request with a token-id prompt; time its tokens."""
    body = {
        "model": model,
        "prompt": prompt_ids,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "return_token_ids": True,
    }
    import httpx  # the tooling's one HTTP client (the soak test uses it too)

    start = time.perf_counter()
    first = None
    tokens = 0
    with httpx.stream(
        "POST", f"{base_url}/v1/completions", json=body, timeout=timeout_s, trust_env=False
    ) as response:
        response.raise_for_status()
        for raw in response.iter_lines():
            line = raw.strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            choice = json.loads(line[len("data:") :])["choices"][0]
            new = len(choice.get("token_ids") or [])
            if new and first is None:
                first = time.perf_counter()
            tokens += new
    end = time.perf_counter()
    return RequestResult(tokens, end - start, (first or end) - start)


def random_prompts(count: int, length: int, seed: int = 0) -> list[list[int]]:
    """``count`` prompts of ``length`` token ids in PROMPT_ID_RANGE (the same for every impl)."""
    rng = random.Random(seed)
    lo, hi = PROMPT_ID_RANGE
    return [[rng.randrange(lo, hi) for _ in range(length)] for _ in range(count)]


def measure_level(
    server: VllmServer, prompts: list[list[int]], concurrency: int, settings: BenchSettings
) -> dict[str, Any]:
    """Send ``prompts`` with ``concurrency`` requests in flight; output tokens/s and ms per token."""

    def one(prompt: list[int]) -> RequestResult:
        return stream_completion(
            server.base_url, server.model, prompt, settings.output_tokens, settings.request_timeout_s
        )

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(one, prompts))
    wall = time.perf_counter() - start
    total = sum(r.output_tokens for r in results)
    # Time per output token after the first, per request (TPOT), averaged over requests.
    tpot = [(r.latency_s - r.ttft_s) / (r.output_tokens - 1) for r in results if r.output_tokens > 1]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "output_tokens": total,
        "wall_s": round(wall, 3),
        "output_tok_s": round(total / wall, 3),
        "ms_per_output_token": round(1000 * sum(tpot) / max(len(tpot), 1), 3),
        "mean_ttft_ms": round(1000 * sum(r.ttft_s for r in results) / len(results), 1),
    }


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchModel:
    """One model's two folders: the unquantized original and its AWQ checkpoint."""

    name: str
    fp_dir: Path
    awq_dir: Path  # the quantized checkpoint, in ``layout``
    group_size: int
    layout: str = "autoawq"


def rtn_quantize(fp_dir: Path, out_dir: Path, group_size: int) -> Path:
    """Quantize ``fp_dir`` by plain rounding (uint4, ``group_size``) into an AWQ checkpoint."""
    import torch

    from awq_plugin.config import AwqQuantConfig
    from awq_plugin.format.packing import write_packed_model
    from awq_plugin.runtime.modeling import load_fp_model

    model = load_fp_model(fp_dir, dtype=torch.float32)
    quant = AwqQuantConfig(bits=4, group_size=group_size)
    return write_packed_model(model, out_dir, quant, source_dir=fp_dir, overwrite=True)


def prepare_model(name: str, work_dir: Path, layout: str = "autoawq") -> BenchModel:
    """Write (once; reused from ``work_dir`` afterwards) the fp16 and quantized folders of a model
    (the quantized one in ``layout``, converted exactly from the AutoAWQ checkpoint)."""
    from awq_plugin.fsutil import holds_model
    from awq_plugin.tools.default_model import write_default_model

    default_dir = write_default_model(work_dir / "default-fp16")
    if name == "default":
        fp_dir, group = default_dir, 64  # hidden 576 is not a multiple of 128
    else:
        from awq_plugin.tools import synthetic

        fp_dir, group = work_dir / f"{name}-fp16", 128
        if not holds_model(fp_dir):
            model = synthetic.make_model(synthetic.make_config(name), seed=0)
            # The default model's tokenizer lets the server start; prompts stay below 32000.
            synthetic.write_model(fp_dir, model, tokenizer_dir=default_dir)
            del model
    awq_dir = work_dir / f"{name}-awq-g{group}"
    if not holds_model(awq_dir):
        rtn_quantize(fp_dir, awq_dir, group)
    if layout != "autoawq":
        from awq_plugin.format.convert import convert_checkpoint

        converted = work_dir / f"{name}-{layout}-g{group}"
        if not holds_model(converted):
            convert_checkpoint(awq_dir, converted, layout)
        awq_dir = converted
    return BenchModel(name, fp_dir, awq_dir, group, layout)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def kernel_in_use(impl: str, log_text: str) -> str:
    """The linear kernel a server ran, from its log (the plugin logs its choice once)."""
    if impl.startswith("plugin"):
        found = re.search(r"AwqPlugin(?:Layout)?LinearMethod(?: \([\w-]+\))? using kernel '(\w+)'", log_text)
        return f"awq-plugin {found.group(1)}" if found else "unknown"
    if impl == "builtin_awq":
        found = re.search(r"Using (\w+) for (?:AutoAWQMarlinLinearMethod|CompressedTensorsWNA16)", log_text)
        return found.group(1) if found else "unknown"
    return "dense (vLLM's unquantized linear)"


def server_launch(
    impl: str, model: BenchModel, settings: BenchSettings
) -> tuple[Path, list[str], dict[str, str]]:
    """The folder, ``vllm serve`` arguments and environment of one implementation."""
    args = ["--dtype", "bfloat16", "--max-model-len", str(settings.max_model_len), "--seed", "0"]
    args += ["--max-num-seqs", str(max(CONCURRENCIES)), "--disable-log-stats"]
    if settings.enforce_eager:
        args.append("--enforce-eager")
    env = {
        "VLLM_CPU_KVCACHE_SPACE": str(settings.kv_cache_gib),
        "VLLM_CPU_OMP_THREADS_BIND": settings.threads_bind,
    }
    # An AutoAWQ folder is named with --quantization awq, as users serve it; vLLM detects
    # compressed-tensors from the folder's config.
    quantized = [*args, "--quantization", "awq"] if model.layout == "autoawq" else args
    if impl == "plugin":
        return model.awq_dir, quantized, env
    if impl in FORCED_PATHS:
        return model.awq_dir, quantized, {**env, "AWQ_PLUGIN_KERNEL": FORCED_PATHS[impl]}
    if impl == "builtin_awq":
        return model.awq_dir, quantized, {**env, "VLLM_PLUGINS": ""}
    if impl == "bf16":
        return model.fp_dir, args, env
    raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")


def bench_impl(
    impl: str, model: BenchModel, settings: BenchSettings, prompts: list[list[int]], log_dir: Path
) -> list[dict[str, Any]]:
    """Start one server, check it runs the intended path, and measure every concurrency level."""
    folder, args, env = server_launch(impl, model, settings)
    log_path = log_dir / f"{model.name}-{impl}.log"
    started = time.perf_counter()
    with VllmServer(folder, log_path, args, env=env, startup_timeout=settings.start_timeout_s) as server:
        start_s = time.perf_counter() - started
        marker = PATH_MARKERS[impl]
        if marker is not None and not re.search(marker, server.log_text()):
            raise RuntimeError(f"{impl}: the server log lacks {marker!r}; see {log_path}")
        warm = stream_completion(server.base_url, server.model, prompts[0], 4, settings.request_timeout_s)
        rows = []
        for concurrency in CONCURRENCIES:
            count = max(4, settings.rounds * concurrency)
            level = measure_level(server, prompts[:count], concurrency, settings)
            rows.append({"model": model.name, "impl": impl, **level})
        log = server.log_text()
    binding = thread_binding(log)
    for row in rows:
        row.update(
            kernel=kernel_in_use(impl, log),
            startup_s=round(start_s, 1),
            warmup_tokens=warm.output_tokens,
            threads_bind=settings.threads_bind,
            **binding,
            prompt_tokens=settings.prompt_tokens,
            tokens_per_request=settings.output_tokens,
            mode="eager" if settings.enforce_eager else "compile",
            group_size=model.group_size if impl != "bf16" else None,
            layout=model.layout if impl != "bf16" else None,
        )
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """``speedup_vs_<impl>``: the plugin's output tokens/s over each other impl's, same model and level."""
    by_key = {(r["model"], r["concurrency"], r["impl"]): r for r in rows}
    for row in rows:
        if row["impl"] != "plugin":
            continue
        for other in (*IMPLS[1:], *FORCED_PATHS):
            peer = by_key.get((row["model"], row["concurrency"], other))
            if peer and peer["output_tok_s"] > 0:
                row[f"speedup_vs_{other}"] = round(row["output_tok_s"] / peer["output_tok_s"], 3)


def summary(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'model':<12} {'impl':<12} {'conc':>4} {'tok/s':>9} {'ms/tok':>9}  speed-up of plugin"]
    for r in rows:
        ratios = ", ".join(f"{k[11:]} {v:.2f}x" for k, v in r.items() if k.startswith("speedup_vs_"))
        lines.append(
            f"{r['model']:<12} {r['impl']:<12} {r['concurrency']:>4} {r['output_tok_s']:>9.2f} "
            f"{r['ms_per_output_token']:>9.2f}  {ratios}"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str, title: str) -> None:
    """A panel per model and concurrency (own y scale): output tokens/s per impl, labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(
        len(models), len(CONCURRENCIES), figsize=(5 * len(CONCURRENCIES), 3.6 * len(models)), squeeze=False
    )
    for axes_row, model in zip(axes, models):
        for ax, concurrency in zip(axes_row, CONCURRENCIES):
            pts = [r for r in rows if r["model"] == model and r["concurrency"] == concurrency]
            bars = ax.bar([r["impl"] for r in pts], [r["output_tok_s"] for r in pts], color="C0")
            for bar, r in zip(bars, pts):
                label = f"{r['output_tok_s']:.1f} tok/s\n{r['ms_per_output_token']:.0f} ms/tok"
                ax.annotate(
                    label,
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
            ax.set_title(f"{model}, concurrency {concurrency}", fontsize=10)
            ax.set_ylabel("output tokens/s")
            ax.margins(y=0.25)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="awq-plugin bench serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="OUT", help="write the rows to this JSON file")
    parser.add_argument(
        "--png", metavar="OUT", help="draw output tokens/s per impl and concurrency to this PNG"
    )
    parser.add_argument("--quick", action="store_true", help="default model only, eager mode, short requests")
    parser.add_argument("--models", default=None, help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument(
        "--impls",
        default=",".join(IMPLS),
        help=f"comma-separated subset of {', '.join((*IMPLS, *FORCED_PATHS))}",
    )
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="autoawq",
        help="checkpoint layout of the quantized contenders (compressed-tensors: converted exactly)",
    )
    parser.add_argument("--eager", action="store_true", help="--enforce-eager (faster start, slower decode)")
    parser.add_argument(
        "--threads-bind",
        default="auto",
        help="VLLM_CPU_OMP_THREADS_BIND for every server (auto: vLLM's binding; e.g. 0-1: both cores)",
    )
    parser.add_argument(
        "--work-dir",
        default=str(Path.home() / ".cache" / "awq_plugin" / "bench_serve"),
        help="where models are written once and reused, and server logs go",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = QUICK if args.quick else BenchSettings()
    settings = BenchSettings(
        **{
            **base.__dict__,
            "threads_bind": args.threads_bind,
            "enforce_eager": base.enforce_eager or args.eager,
        }
    )
    models = (args.models or ("default" if args.quick else ",".join(MODELS))).split(",")
    impls = args.impls.split(",")
    work_dir = Path(args.work_dir)
    log_dir = work_dir / "logs"
    prompts = random_prompts(max(4, settings.rounds * max(CONCURRENCIES)), settings.prompt_tokens)
    rows: list[dict[str, Any]] = []
    for name in models:
        model = prepare_model(name, work_dir, args.layout)
        for impl in impls:
            print(f"bench serve: {name} / {impl} ...", file=sys.stderr, flush=True)
            rows += bench_impl(impl, model, settings, prompts, log_dir)
    add_ratios(rows)
    from awq_plugin.tools.bench_block_cost import cpu_description

    cpu = cpu_description()["model_name"]
    for row in rows:
        row["cpu"] = cpu
    print(summary(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if args.png:
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        mode = "eager" if settings.enforce_eager else "compile"
        plot(
            rows,
            args.png,
            f"vllm serve on {cpu} ({mode}, VLLM_CPU_OMP_THREADS_BIND={settings.threads_bind}, "
            f"{args.layout} checkpoints), "
            f"{settings.prompt_tokens} prompt + {settings.output_tokens} output tokens per request",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
