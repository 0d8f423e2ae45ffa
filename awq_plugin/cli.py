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
from collections.abc import Callable, Sequence

from awq_plugin.errors import AwqPluginError

EXIT_OK = 0
EXIT_INVALID = 1  # the thing inspected is not valid
EXIT_USAGE = 2  # bad input from the user


def _cmd_default_model(args: argparse.Namespace) -> int:
    from awq_plugin.default_model import write_default_model

    out = write_default_model(args.out_dir)
    print(f"default model (SmolLM2-135M-Instruct, fp16) is at {out}")
    return EXIT_OK


def _cmd_inspect(args: argparse.Namespace) -> int:
    from awq_plugin.checkpoint import validate_checkpoint

    try:
        summary = validate_checkpoint(args.model_dir)
    except AwqPluginError as exc:
        print(f"invalid AWQ checkpoint: {exc}", file=sys.stderr)
        return EXIT_INVALID
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.render())
    return EXIT_OK


def _cmd_bench(args: argparse.Namespace) -> int:
    runners: dict[str, Callable[[list[str]], int]] = {}
    if args.what == "kernels":
        from awq_plugin.bench_kernels import main as bench_kernels

        runners["kernels"] = bench_kernels
    return runners[args.what](args.rest)


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

    p = sub.add_parser("bench", help="benchmarks that print JSON and draw a PNG")
    p.add_argument(
        "what", choices=["kernels"], help="kernels: INT4 GEMM against dense bf16, aten int4 and vLLM"
    )
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of the benchmark (see its --help)")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
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
