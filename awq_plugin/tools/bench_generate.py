"""Benchmark ``generate()`` on CPU: the AWQ-quantized default model against its fp32 and bf16 originals.

Contenders, all loaded through ``AutoModelForCausalLM.from_pretrained`` and timed in one
process, on the same prompt, with the same lengths, greedy:

- ``awq`` in fp32 and in bf16: the AWQ checkpoint (uint4, group 64) loaded through this
  package's transformers quantizer, its linears running the kernel ``awq_plugin.kernels``
  picks (the AVX-512 VNNI CPU kernel where the CPU has it);
- ``dense`` in fp32 and in bf16: the original model.

Unless ``--awq DIR`` names a checkpoint, one is made by plain rounding (RTN) of the default
model: the scales AWQ would search change the numbers, not the format or the work, so the
speed is the same. For each thread count the contenders are timed in turn, ``--repeats``
rounds, and each keeps its best time (the machine is shared and noisy; the best round is the
least disturbed). ``tok_s`` is new tokens over the whole ``generate`` call (prefill
included); ``decode_tok_s`` takes out the prefill, timed as a 1-token ``generate``.

Usage: ``awq-plugin bench generate [--json OUT] [--quick]``. Compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

MODEL_NAME = "SmolLM2-135M-Instruct"
GROUP_SIZE = 64  # hidden 576 is not a multiple of 128
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PROMPT_TEXT = (
    "The history of the printing press begins in the fifteenth century, when movable type "
    "made books cheap enough for merchants, students and craftsmen to own. "
)


@dataclass(frozen=True)
class Settings:
    """One run's lengths and repetitions (written into every row)."""

    prompt_tokens: int = 64
    new_tokens: int = 64
    repeats: int = 3


QUICK = Settings(prompt_tokens=32, new_tokens=16, repeats=1)


@dataclass
class Contender:
    impl: str  # "awq" or "dense"
    dtype: str  # key of DTYPES
    model: Any
    kernel: str | None = None  # the AWQ kernel backend, once known


def rtn_checkpoint(fp_dir: Path, out_dir: Path) -> Path:
    """An AWQ-format checkpoint of ``fp_dir`` by plain rounding, in memory (seconds, no calibration)."""
    from awq_plugin.config import AwqQuantConfig
    from awq_plugin.format.packing import write_packed_model
    from awq_plugin.runtime.modeling import load_fp_model

    model = load_fp_model(fp_dir, dtype=torch.float32)
    quant = AwqQuantConfig(bits=4, group_size=GROUP_SIZE)
    return write_packed_model(model, out_dir, quant, source_dir=fp_dir, overwrite=True)


def prepare_checkpoints(work_dir: Path, awq_dir: Path | None) -> tuple[Path, Path]:
    """The default model's fp16 folder and an AWQ checkpoint of it (both written once, then reused)."""
    from awq_plugin.fsutil import holds_model
    from awq_plugin.tools.default_model import write_default_model

    fp_dir = write_default_model(work_dir / "default-fp16")
    if awq_dir is None:
        awq_dir = work_dir / f"default-rtn-g{GROUP_SIZE}"
        if not holds_model(awq_dir):
            rtn_checkpoint(fp_dir, awq_dir)
    return fp_dir, awq_dir


def prompt_ids(tokenizer: Any, n_tokens: int) -> torch.Tensor:
    """A fixed English prompt of exactly ``n_tokens`` tokens: ``[1, n_tokens]``."""
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids += tokenizer(PROMPT_TEXT, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids[:n_tokens]])


def load_contenders(fp_dir: Path, awq_dir: Path) -> list[Contender]:
    from transformers import AutoModelForCausalLM

    import awq_plugin.integrations.transformers  # noqa: F401 - activates the "awq" quantizer

    contenders = []
    for impl, folder in (("awq", awq_dir), ("dense", fp_dir)):
        for name, dtype in DTYPES.items():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
            contenders.append(Contender(impl, name, model))
    return contenders


def awq_kernel(model: Any) -> str | None:
    """The backend the model's first AwqLinear runs (after a forward pass), or None for dense models."""
    from awq_plugin.runtime.qlinear import AwqLinear

    for module in model.modules():
        if isinstance(module, AwqLinear):
            return module.kernel_backend
    return None


@torch.inference_mode()
def greedy_generate(model: Any, ids: torch.Tensor, new_tokens: int, pad_token_id: int | None) -> torch.Tensor:
    """transformers' ``generate()``, greedy, exactly ``new_tokens`` new tokens: ``[1, prompt + new]``."""
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad_token_id,
    )
    assert out.shape[1] == ids.shape[1] + new_tokens
    return out


def time_generate(model: Any, ids: torch.Tensor, new_tokens: int, pad_token_id: int | None) -> float:
    """Seconds for one greedy ``generate`` of exactly ``new_tokens`` tokens."""
    started = time.perf_counter()
    greedy_generate(model, ids, new_tokens, pad_token_id)
    return time.perf_counter() - started


def bench_threads(
    contenders: list[Contender], ids: torch.Tensor, settings: Settings, threads: int, pad_token_id: int | None
) -> list[dict[str, Any]]:
    """Rows for one thread count: the contenders timed in turn, best of ``settings.repeats`` rounds."""
    torch.set_num_threads(threads)
    for c in contenders:  # warm-up: kernels built, weights repacked, allocator primed
        time_generate(c.model, ids, 2, pad_token_id)
        c.kernel = awq_kernel(c.model)
    best_full = {id(c): float("inf") for c in contenders}
    best_prefill = {id(c): float("inf") for c in contenders}
    for _ in range(settings.repeats):
        for c in contenders:
            best_full[id(c)] = min(
                best_full[id(c)], time_generate(c.model, ids, settings.new_tokens, pad_token_id)
            )
            best_prefill[id(c)] = min(best_prefill[id(c)], time_generate(c.model, ids, 1, pad_token_id))
    rows = []
    for c in contenders:
        full, prefill = best_full[id(c)], best_prefill[id(c)]
        decode = (settings.new_tokens - 1) / (full - prefill) if full > prefill else float("nan")
        rows.append(
            {
                "model": MODEL_NAME,
                "impl": c.impl,
                "dtype": c.dtype,
                "kernel": c.kernel,
                "threads": threads,
                "prompt_tokens": settings.prompt_tokens,
                "new_tokens": settings.new_tokens,
                "repeats": settings.repeats,
                "seconds": round(full, 4),
                "tok_s": round(settings.new_tokens / full, 2),
                "decode_tok_s": round(decode, 2),
            }
        )
    add_speedups(rows)
    return rows


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """Each row's tok/s over the dense fp32 and dense bf16 rows of the same run and thread count."""
    for row in rows:
        for dtype in DTYPES:
            base = next(
                (
                    r
                    for r in rows
                    if r["impl"] == "dense" and r["dtype"] == dtype and r["threads"] == row["threads"]
                ),
                None,
            )
            if base is not None:
                row[f"speedup_vs_dense_{dtype}"] = round(row["tok_s"] / base["tok_s"], 3)


def summary(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        f"{'impl':6} {'dtype':9} {'kernel':9} {'threads':>7} {'tok/s':>8} {'decode':>8} {'vs fp32':>8} {'vs bf16':>8}"
    ]
    for r in rows:
        lines.append(
            f"{r['impl']:6} {r['dtype']:9} {r['kernel'] or '-':9} {r['threads']:>7} {r['tok_s']:>8.1f} "
            f"{r['decode_tok_s']:>8.1f} {r['speedup_vs_dense_float32']:>7.2f}x {r['speedup_vs_dense_bfloat16']:>7.2f}x"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="awq-plugin bench generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="OUT", help="write the rows to this JSON file")
    parser.add_argument(
        "--quick", action="store_true", help="short prompt and output, one round, current threads"
    )
    parser.add_argument(
        "--threads", default=None, help="comma-separated thread counts (default 1,2; --quick: current)"
    )
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens generated per call")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="prompt length in tokens")
    parser.add_argument(
        "--awq", metavar="DIR", help="an AWQ checkpoint of the default model (default: made by RTN)"
    )
    parser.add_argument(
        "--work-dir",
        default=str(Path.home() / ".cache" / "awq_plugin" / "bench_generate"),
        help="where the default model and its AWQ checkpoint are written once and reused",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    base = QUICK if args.quick else Settings()
    settings = Settings(
        prompt_tokens=args.prompt_tokens or base.prompt_tokens,
        new_tokens=args.new_tokens or base.new_tokens,
        repeats=base.repeats,
    )
    if settings.new_tokens < 2:
        print("bench generate: --new-tokens must be at least 2", file=sys.stderr)
        return 2
    if args.threads:
        threads = [int(t) for t in args.threads.split(",")]
    else:
        threads = [torch.get_num_threads()] if args.quick else [1, 2]

    from transformers import AutoTokenizer

    fp_dir, awq_dir = prepare_checkpoints(Path(args.work_dir), Path(args.awq) if args.awq else None)
    tokenizer = AutoTokenizer.from_pretrained(fp_dir)
    ids = prompt_ids(tokenizer, settings.prompt_tokens)
    contenders = load_contenders(fp_dir, awq_dir)
    rows: list[dict[str, Any]] = []
    for n in threads:
        print(f"bench generate: {n} thread(s) ...", file=sys.stderr, flush=True)
        rows += bench_threads(contenders, ids, settings, n, tokenizer.eos_token_id)
    print(summary(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
