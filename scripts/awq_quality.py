"""Measure AWQ against plain rounding on a real model, in memory (fake quantization).

Loads an fp16 transformers folder in fp32, runs :func:`awq_plugin.awq.run_awq`
on calibration windows, fake-quantizes every decoder linear with the reference
quantizer and prints one JSON object with perplexities (fp, RTN, AWQ), the
fraction of RTN's gap that AWQ closes and the AWQ wall time. Results are
appended to ``--out`` (JSON lines) as well.

    python scripts/awq_quality.py MODEL_DIR --scheme uint4_wo_64 --threads 2
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

from awq_plugin.awq import AwqOptions, make_fake_quantizer, run_awq
from awq_plugin.calib import calibration_windows, evaluation_windows
from awq_plugin.config import AwqQuantConfig
from awq_plugin.evaluate import perplexity
from awq_plugin.templates import resolve_template


@torch.no_grad()
def fake_quantize_decoder(model: torch.nn.Module, quant_config: AwqQuantConfig) -> None:
    """Replace every quantized decoder linear's weight by its reference fake quantization."""
    resolved = resolve_template(model)
    layers = model.get_submodule(resolved.decoder_layers)
    quantize = make_fake_quantizer(quant_config)
    for block, template in zip(layers, resolved.blocks):
        for name in template.linears:
            linear = block.get_submodule(name)
            linear.weight.data = quantize(linear.weight.data)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("--scheme", default="uint4_wo_64")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=None, help="held-out windows (default: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-baselines", action="store_true", help="only AWQ (reuse fp/RTN from --out)")
    p.add_argument("--baselines-only", action="store_true", help="only fp and RTN perplexity")
    p.add_argument("--out", type=Path, default=None, help="append the JSON result to this file")
    p.add_argument("--tag", default="")
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
    quant_config = AwqQuantConfig.from_scheme(args.scheme)
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
    report: dict[str, object] = {
        "tag": args.tag,
        "scheme": args.scheme,
        "threads": args.threads,
        "calib": list(calib.shape),
        "eval_windows": evals.shape[0],
        "options": options.to_dict(),
    }

    def ppl(model: torch.nn.Module, name: str) -> float:
        return perplexity(model, evals, batch_size=4, progress=False, desc=name).ppl

    if not args.skip_baselines:
        report["ppl_fp"] = ppl(base, "fp")
        rtn = copy.deepcopy(base)
        fake_quantize_decoder(rtn, quant_config)
        report["ppl_rtn"] = ppl(rtn, "rtn")
        del rtn
    if args.baselines_only:
        return _emit(report, args.out)
    model = copy.deepcopy(base)
    start = time.perf_counter()
    results = run_awq(model, quant_config, calib, template=args.template, options=options)
    report["awq_seconds"] = round(time.perf_counter() - start, 1)
    fake_quantize_decoder(model, quant_config)
    report["ppl_awq"] = ppl(model, "awq")
    if "ppl_rtn" in report:
        gap = report["ppl_rtn"] - report["ppl_fp"]
        report["gap_closed"] = (report["ppl_rtn"] - report["ppl_awq"]) / gap if gap else None
    mse = results.summary()
    report["block_mse_rtn_sum"] = sum(b["mse_rtn"] for b in mse)
    report["block_mse_awq_sum"] = sum(b["mse_awq"] for b in mse)
    return _emit(report, args.out)


def _emit(report: dict[str, object], out: Path | None) -> int:
    line = json.dumps(report)
    print(line, flush=True)
    if out is not None:
        with out.open("a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
