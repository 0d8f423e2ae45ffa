"""``awq-plugin``: the command line over the Python API.

Every subcommand is a thin shell: it parses arguments, calls one API function
and turns :class:`~awq_plugin.errors.AwqPluginError` into a one-line message and
exit status 2 (1 for an invalid checkpoint found by ``inspect``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from awq_plugin.errors import AwqPluginError

EXIT_OK = 0
EXIT_INVALID = 1  # the thing inspected is not valid
EXIT_USAGE = 2  # bad input from the user


def _cmd_default_model(args: argparse.Namespace) -> int:
    from awq_plugin.tools.default_model import write_default_model

    out = write_default_model(args.out_dir)
    print(f"default model (SmolLM2-135M-Instruct, fp16) is at {out}")
    return EXIT_OK


def _cmd_inspect(args: argparse.Namespace) -> int:
    from awq_plugin.format.checkpoint import validate_checkpoint

    try:
        summary = validate_checkpoint(args.model_dir)
    except AwqPluginError as exc:
        print(f"invalid AWQ checkpoint: {exc}", file=sys.stderr)
        return EXIT_INVALID
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.render())
    return EXIT_OK


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _add_guard_arg(p: argparse.ArgumentParser, fallback: str) -> None:
    from awq_plugin.algorithm.options import GUARD_MODES

    p.add_argument(
        "--guard",
        choices=GUARD_MODES,
        default="fallback",
        help=f"when AWQ ends worse than plain rounding on held-out windows: {fallback} "
        "(fallback, the default), keep AWQ and warn (warn), or skip the check (off)",
    )


def _add_switch(p: argparse.ArgumentParser, flag: str, default: bool, help_text: str) -> None:
    """An ``on|off`` option whose default is the :class:`AwqOptions` field's."""
    p.add_argument(
        flag,
        choices=("on", "off"),
        default="on" if default else "off",
        help=f"{help_text} (default {'on' if default else 'off'})",
    )


def _awq_options(args: argparse.Namespace):
    from awq_plugin.algorithm.options import AwqOptions

    return AwqOptions(
        duo_scaling=args.duo_scaling,
        clip=args.clip,
        search_tokens=args.search_tokens or None,  # 0 = all tokens
        clip_tokens=args.clip_tokens or None,
        seed=args.seed,
        search_dtype=args.search_dtype,
        rounding=args.rounding,
        act_order={v: k for k, v in _ACT_ORDER_NAMES.items()}[args.act_order],
        fit_to=args.fit_to,
        sequential=args.sequential == "on",
        fit_norms=args.fit_norms == "on",
        refine_passes=args.refine_passes,
        propagate=args.propagate,
    )


#: ``AwqOptions.act_order`` by its command-line name.
_ACT_ORDER_NAMES = {False: "off", True: "on", "auto": "auto"}


def _add_calibration_args(p: argparse.ArgumentParser) -> None:
    # Defaults come from the library's owners (both torch-free), so the CLI and the Python API
    # write the same checkpoint and building the parser does not import torch.
    from awq_plugin.algorithm.options import FIT_TO_CHOICES, PROPAGATE_CHOICES, ROUNDINGS, AwqOptions
    from awq_plugin.calibration.settings import DEFAULTS

    options = AwqOptions()

    p.add_argument(
        "--calib",
        default=DEFAULTS.source,
        help=f"built-in set (enwiki, news, pydoc) or a .txt/.jsonl file (default {DEFAULTS.source})",
    )
    p.add_argument(
        "--n-samples",
        type=int,
        default=DEFAULTS.n_samples,
        help=f"calibration windows (default {DEFAULTS.n_samples})",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=DEFAULTS.seq_len,
        help=f"tokens per calibration window (default {DEFAULTS.seq_len})",
    )
    p.add_argument(
        "--template",
        help="architecture template: a JSON file, a shipped template's name, or 'infer' (inferred from the "
        "model's data flow, every fold proven); default: the shipped one for the model, else inferred",
    )
    p.add_argument(
        "--duo-scaling",
        action="store_true",
        default=options.duo_scaling,
        help="scale by activation AND weight magnitude",
    )
    p.add_argument(
        "--no-clip",
        action="store_false",
        dest="clip",
        default=options.clip,
        help="skip the clip (max-range shrink) search",
    )
    p.add_argument(
        "--search-tokens",
        type=int,
        default=options.search_tokens or 0,  # 0 = all tokens (None in AwqOptions)
        help=f"seeded token subsample for the scale-search loss (default {options.search_tokens or 0}; "
        "0 = all tokens; statistics always use all)",
    )
    p.add_argument(
        "--clip-tokens",
        type=int,
        default=options.clip_tokens or 0,
        help=f"seeded token subsample for the clip-search loss (default {options.clip_tokens or 0}; 0 = all "
        "tokens: the loss runs through per-group Gram matrices, so all tokens cost little)",
    )
    p.add_argument(
        "--search-dtype",
        choices=["auto", "float32", "bfloat16"],
        default=options.search_dtype,
        help=f"dtype of the block's forward matmuls in the search (default {options.search_dtype}: bfloat16 "
        "where the device has bf16 units, such as AVX512-BF16 or AMX, else float32; statistics and losses "
        "stay float32)",
    )
    p.add_argument(
        "--rounding",
        choices=ROUNDINGS,
        default=options.rounding,
        help=f"how the weights go to their grid after the scales and clips (default {options.rounding}): "
        "each to its nearest level, or compensated (GPTQ's error compensation over the block's calibration "
        "inputs, kept in each block whose held-out error it lowers)",
    )
    p.add_argument(
        "--act-order",
        choices=("off", "on", "auto"),
        default=_ACT_ORDER_NAMES[options.act_order],
        help="compensated rounding's column order: index order (off), by decreasing second moment of "
        "the inputs (on: GPTQ's act-order on static groups; the checkpoint layout is unchanged), or "
        f"both, each block keeping the one with the lower held-out error (auto; default "
        f"{_ACT_ORDER_NAMES[options.act_order]})",
    )
    p.add_argument(
        "--fit-to",
        choices=FIT_TO_CHOICES,
        default=options.fit_to,
        help=f"what each block is judged against and compensated rounding fits (default {options.fit_to}): "
        "its full-precision output on the quantized inputs (block), or the full-precision model's own "
        "(model: asymmetric calibration, which also works off the error of the blocks before it; one more "
        "forward per block; the same as block under --propagate fp)",
    )
    _add_switch(
        p,
        "--sequential",
        options.sequential,
        "compensated rounding, true-sequential: each run of linears after the first (o_proj, then "
        "gate/up, then down_proj) is fitted on its inputs recorded again with the linears before it "
        "rounded, toward the inputs the full-precision target gives it (on), or all of them on one "
        "recording (off); on costs a partial forward of the block per run, and holds the target's "
        "inputs of those linears for the block",
    )
    _add_switch(
        p,
        "--fit-norms",
        options.fit_norms,
        "compensated rounding: once the linears a norm feeds (q/k/v, gate/up) are rounded, refit "
        "the norm's per-channel weight so their outputs come closest to the target (on), or leave it "
        "as the scale fold left it (off); judged with the block's compensation on held-out "
        "micro-batches",
    )
    p.add_argument(
        "--refine-passes",
        type=int,
        default=options.refine_passes,
        metavar="N",
        help="compensated rounding: passes of coordinate descent over each walk's integers, every "
        "column moved to the level nearest its best value with the others fixed (never raises the "
        f"walk's objective; each pass takes about as long as the walk; default {options.refine_passes})",
    )
    p.add_argument(
        "--propagate",
        choices=PROPAGATE_CHOICES,
        default=options.propagate,
        help=f"what feeds each next block (default {options.propagate}): the outputs of this block as "
        "quantized, or its full-precision outputs (one forward per block less; with --rounding nearest "
        "the fast setting)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=options.seed,
        help=f"seed of the calibration draw and subsamples (default {options.seed})",
    )
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")


def _cmd_quantize(args: argparse.Namespace) -> int:
    from awq_plugin.config import AwqQuantConfig
    from awq_plugin.pipeline.quantize import quantize_checkpoint

    _set_threads(args.threads)
    # Another layout: quantize into a staging AutoAWQ folder beside OUT (resumable there), then
    # convert it exactly (awq_plugin.format.convert) and drop the staging folder.
    target = Path(args.out)
    out = target if args.format == "autoawq" else target.with_name(f".{target.name}.autoawq")
    if out != target:
        from awq_plugin.format.checkpoint import read_json
        from awq_plugin.format.convert import check_layout_holds_architecture
        from awq_plugin.fsutil import check_output_dir

        check_output_dir(target, args.overwrite)
        check_layout_holds_architecture(read_json(Path(args.source) / "config.json"), args.format)
    report = quantize_checkpoint(
        args.source,
        out,
        AwqQuantConfig.from_scheme(args.scheme),
        method=args.method,
        calib=args.calib,
        n_samples=args.n_samples,
        seq_len=args.seq_len,
        template=args.template,
        options=_awq_options(args),
        guard=args.guard,
        device=args.device,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        trust_remote_code=args.trust_remote_code,
    )
    print(report.render())
    if out != target:
        import shutil

        from awq_plugin.format.convert import convert_checkpoint

        convert_checkpoint(out, target, args.format, overwrite=args.overwrite)
        shutil.rmtree(out)
        print(f"written in the {args.format} layout (the same integers, scales and zeros) to {target}")
    if args.json:
        from awq_plugin.fsutil import atomic_write_json

        atomic_write_json(args.json, report.to_dict())
    return EXIT_OK


def _cmd_convert(args: argparse.Namespace) -> int:
    from awq_plugin.format.checkpoint import read_json
    from awq_plugin.format.convert import convert_checkpoint, describe, read_scheme, target_scheme

    config = read_json(Path(args.source) / "config.json")
    scheme = read_scheme(config)
    target = target_scheme(scheme, args.to, config, args.gptq_format)
    out = convert_checkpoint(
        args.source, args.out, args.to, gptq_format=args.gptq_format, overwrite=args.overwrite
    )
    print(
        f"{args.source}: {describe(scheme)} -> {out}: {describe(target)}, the same integers, scales and zeros"
    )
    return EXIT_OK


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer

    from awq_plugin.api import evaluate_perplexity, fake_quantize_model
    from awq_plugin.config import AwqQuantConfig
    from awq_plugin.runtime.modeling import is_awq_checkpoint, load_model

    _set_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = load_model(args.model, dtype=torch.float32, backend=args.backend)
    label = "awq-checkpoint" if is_awq_checkpoint(args.model) else "full-precision"
    if args.fake_quant:
        quant = AwqQuantConfig.from_scheme(args.fake_quant)
        fake_quantize_model(
            model,
            quant,
            args.calib,
            tokenizer=tokenizer,
            method=args.method,
            n_samples=args.n_samples,
            seq_len=args.seq_len,
            template=args.template,
            options=_awq_options(args),
            guard=args.guard,
        )
        label = f"fake-quant {quant.scheme} ({args.method})"
        if model.awq_guard is not None:
            if model.awq_guard.action == "rounded":
                label = f"fake-quant {quant.scheme} (rtn: AWQ lost the end-to-end check)"
            if not args.json:
                print(model.awq_guard.message())
    result = evaluate_perplexity(
        model, tokenizer, args.text, args.windows, args.eval_seq_len, progress=not args.json
    )
    if args.json:
        print(
            json.dumps({"model": str(args.model), "label": label, "text": str(args.text), **result.to_dict()})
        )
    else:
        print(f"{label}: perplexity {result.ppl:.3f} on {result.tokens} tokens of {args.text}")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from awq_plugin.tools.demo import main as demo_main

    return demo_main(args.rest)


def _cmd_template_infer(args: argparse.Namespace) -> int:
    import torch

    from awq_plugin.runtime.modeling import load_fp_model
    from awq_plugin.templates.infer import infer_template

    model = load_fp_model(args.model_dir, dtype=torch.float32, trust_remote_code=args.trust_remote_code)
    template, report = infer_template(model)
    for name, reason in report.reasons.items():
        print(f"unscaled (clip + rounding): {name}: {reason}", file=sys.stderr)
    print(json.dumps(template, indent=2))
    return EXIT_OK


def _cmd_cache(args: argparse.Namespace) -> int:
    from awq_plugin.pipeline.cache import cache_root, clear_entries, list_entries

    root = cache_root()
    if args.action == "list":
        entries = list_entries(root)
        print(f"cache {root}: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}")
        for item in entries:
            print(item.render())
        return EXIT_OK
    removed, busy = clear_entries(root, args.keys or None)
    print(f"removed {len(removed)} from {root}" + (f"; in use, kept: {', '.join(busy)}" if busy else ""))
    return EXIT_OK


def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(BENCHMARKS[args.what])
    return module.main(args.rest)


BENCHMARKS = {
    "kernels": "awq_plugin.tools.bench_kernels",  # INT4 GEMM vs dense bf16, aten int4, vLLM's kernel
    "serve": "awq_plugin.tools.bench_serve",  # vllm serve throughput: plugin vs built-in AWQ vs bf16
    "generate": "awq_plugin.tools.bench_generate",  # transformers generate(): AWQ vs fp32 and bf16
    "large-model": "awq_plugin.tools.bench_large_model",  # quantize a model 3x larger than its peak RSS
    "architectures": "awq_plugin.tools.bench_architectures",  # every transformers decoder/VLM through AWQ
    "quality": "awq_plugin.tools.bench_quality",  # AWQ vs rounding perplexity on a panel of real models
    "peers": "awq_plugin.tools.bench_peers",  # llm-compressor's recipes on the quality panel's windows
    "block-cost": "awq_plugin.tools.bench_block_cost",  # one block's AWQ time in forward equivalents
    "soak": "awq_plugin.tools.soak",  # vllm serve under 64 concurrent clients: errors, latency, memory drift
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="awq-plugin",
        description="AWQ 4-bit weight quantization: quantize, inspect and benchmark models for vLLM and transformers.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "default-model", help="write the embedded default model (SmolLM2-135M-Instruct) to a folder"
    )
    p.add_argument("out_dir", metavar="DIR")
    p.set_defaults(func=_cmd_default_model)

    p = sub.add_parser("inspect", help="validate an AWQ checkpoint and print a summary (exit 1 if invalid)")
    p.add_argument("model_dir", metavar="DIR")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("quantize", help="quantize a transformers folder into an AWQ checkpoint (resumable)")
    p.add_argument("source", metavar="SRC", help="full-precision transformers folder (safetensors)")
    p.add_argument("out", metavar="OUT", help="output folder (written atomically)")
    p.add_argument(
        "--scheme", default="uint4_wo_128", help="uint4_wo_128 (default), uint4_wo_64, int4_wo_128, ..."
    )
    p.add_argument("--method", choices=["awq", "rtn"], default="awq", help="awq (default) or plain rounding")
    p.add_argument(
        "--format",
        choices=["autoawq", "compressed-tensors", "gptq"],
        default="autoawq",
        help="checkpoint layout: autoawq (default), compressed-tensors (llm-compressor's W4A16) or gptq",
    )
    _add_calibration_args(p)
    _add_guard_arg(p, "write rounding instead")
    p.add_argument(
        "--device",
        default="auto",
        help="where each block is computed: auto (default: the first CUDA device if any, else the CPU), "
        "cpu, cuda or cuda:N",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it already holds a model")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="import Python code shipped with SRC (config.json auto_map); off by default",
    )
    p.add_argument("--json", metavar="FILE", help="also write the run's report as JSON")
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser(
        "convert",
        help="rewrite a 4-bit checkpoint in another layout (AutoAWQ, compressed-tensors, GPTQ), exactly",
    )
    p.add_argument(
        "source", metavar="SRC", help="an AutoAWQ, compressed-tensors (W4A16) or GPTQ 4-bit folder"
    )
    p.add_argument("out", metavar="OUT", help="output folder (written atomically)")
    p.add_argument(
        "--to", required=True, choices=["autoawq", "compressed-tensors", "gptq"], help="target layout"
    )
    p.add_argument(
        "--gptq-format",
        choices=["gptq", "gptq_v2"],
        help="with --to gptq: v1 ('gptq', the default for symmetric weights; stores z - 1) or 'gptq_v2' "
        "(the default for asymmetric ones, whose zero points may be 0)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it already holds a model")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("eval", help="perplexity of a full-precision folder or an AWQ checkpoint")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--text", default="enwiki-heldout", help="enwiki-heldout (default), news, pydoc or a file")
    p.add_argument("--windows", type=int, default=40, help="evaluation windows (default 40)")
    p.add_argument("--eval-seq-len", type=int, default=512, help="tokens per evaluation window (default 512)")
    p.add_argument("--fake-quant", metavar="SCHEME", help="fake-quantize first (any bits, e.g. uint3_wo_64)")
    p.add_argument("--method", choices=["awq", "rtn"], default="awq", help="with --fake-quant: awq or rtn")
    p.add_argument("--backend", help="kernel for AWQ checkpoints: auto, cpu or reference")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_calibration_args(p)
    _add_guard_arg(p, "with --fake-quant awq: evaluate rounding instead")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("demo", help="default model -> AWQ -> perplexity table -> vLLM chat (see --help)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of the demo (awq-plugin demo -- --help)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("template", help="architecture templates: 'template infer DIR' prints one inferred")
    q = p.add_subparsers(dest="template_command", required=True, metavar="ACTION")
    q = q.add_parser("infer", help="print the template inferred from DIR's data flow (folds proven), as JSON")
    q.add_argument("model_dir", metavar="DIR", help="full-precision transformers folder")
    q.add_argument("--trust-remote-code", action="store_true", help="import Python code shipped with DIR")
    q.set_defaults(func=_cmd_template_infer)

    p = sub.add_parser("bench", help="benchmarks that print JSON and draw a PNG")
    p.add_argument(
        "what",
        choices=sorted(BENCHMARKS),
        help="kernels, serve, generate, large-model or soak (each takes --json OUT, --png OUT)",
    )
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of the benchmark (see its --help)")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("cache", help="list or clear the quantize-on-start cache ($AWQ_PLUGIN_CACHE)")
    p.add_argument("action", choices=["list", "clear"])
    p.add_argument("keys", nargs="*", metavar="KEY", help="with clear: only entries whose key starts so")
    p.set_defaults(func=_cmd_cache)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        # The demo owns its options (argparse's REMAINDER would refuse a leading --option).
        from awq_plugin.tools.demo import main as demo_main

        return demo_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except AwqPluginError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted: stopped cleanly; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
