"""``awq-plugin bench peers``: llm-compressor's recipes on the quality panel's windows.

The peer runs in its own environment (``--peer-python``, a Python with ``llmcompressor``
installed: it pins other transformers and compressed-tensors versions than ours), through
``scripts/peer_llmcompressor.py``, on exactly the calibration windows ``bench quality`` gives
our quantizer. Its compressed-tensors output is read back with this package's layout code
(:mod:`awq_plugin.format.convert`), dequantized into the full-precision model in fp32 and
scored on the same held-out windows, beside full precision and plain rounding. One JSON
document and one PNG; the times are the peer's own ``oneshot`` seconds.

    awq-plugin bench peers --peer-python /work/peer/bin/python --models-dir /tmp/panel \\
        --recipes gptq,awq+gptq --json peers.json --png peers.png
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "peer_llmcompressor.py"
RECIPES = ("gptq", "awq+gptq", "awq", "rtn")


def load_dequantized(base: Any, checkpoint: Path) -> Any:
    """A copy of ``base`` (fp32) holding ``checkpoint``: its quantized linears dequantized, and
    every other tensor it has (norm weights that AWQ's smoothing divided by its scales, biases,
    embeddings) as written. A recipe that folds scales into the norms is only right with both."""
    import torch

    from awq_plugin.format.checkpoint import SafetensorsReader, read_json
    from awq_plugin.format.convert import quantized_linears, read_linear, read_scheme

    scheme = read_scheme(read_json(checkpoint / "config.json"))
    reader = SafetensorsReader(checkpoint)
    model = copy.deepcopy(base)
    names = quantized_linears(reader, scheme.layout)
    linears = set(names)
    state = model.state_dict()
    other = unmatched = 0
    with torch.no_grad():
        for name in names:
            linear = model.get_submodule(name)
            linear.weight.copy_(read_linear(reader, name, scheme).dequantize(torch.float32))
        for key in reader:
            if key.rsplit(".", 1)[0] in linears:
                continue  # a quantized linear's own tensors
            tensor = reader.get(key)
            if key in state and state[key].shape == tensor.shape:
                state[key].copy_(tensor)
                other += 1
            else:
                unmatched += 1
                log.warning("%s: tensor %s has no place in the model; not loaded", checkpoint.name, key)
    log.info(
        "%s: %d linears dequantized from %s, %d other tensors loaded, %d without a place",
        checkpoint.name,
        len(names),
        scheme.layout,
        other,
        unmatched,
    )
    return model


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from awq_plugin.calibration.text import calibration_windows, evaluation_windows
    from awq_plugin.config import AwqQuantConfig
    from awq_plugin.evaluate import perplexity
    from awq_plugin.pipeline.guard import fake_quantize_linears
    from awq_plugin.tools.bench_quality import PANEL_BY_NAME, prepare_model

    model_dir = prepare_model(PANEL_BY_NAME[args.model], args.models_dir)
    quant = AwqQuantConfig.from_scheme(args.scheme)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    calib = calibration_windows(tokenizer, "enwiki", args.n_samples, args.seq_len)
    evals = evaluation_windows(tokenizer, "enwiki-heldout", args.windows, 512)

    def ppl(model: Any) -> float:
        return perplexity(model, evals, batch_size=4, progress=False).ppl

    ppl_fp = ppl(base)
    rtn = copy.deepcopy(base)
    fake_quantize_linears(rtn, quant)
    ppl_rtn = ppl(rtn)
    del rtn
    common = {
        "model": args.model,
        "scheme": quant.scheme,
        "calib": [args.n_samples, args.seq_len],
        "eval_windows": args.windows,
        "ppl_fp": ppl_fp,
        "ppl_rtn": ppl_rtn,
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ids = tmp / "ids.json"
        ids.write_text(json.dumps(calib.tolist()))
        for recipe in args.recipes:
            out = tmp / recipe.replace("+", "-")
            command = [
                str(args.peer_python),
                str(SCRIPT),
                str(model_dir),
                str(ids),
                str(out),
                "--recipe",
                recipe,
                "--group-size",
                str(quant.group_size),
                "--threads",
                str(args.threads),
            ]
            if not quant.zero_point:
                command.append("--symmetric")
            # The peer's own environment only: a PYTHONPATH reaching this checkout would put our
            # kernels/ folder in place of the hub's `kernels` package that transformers imports.
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            done = subprocess.run(command, capture_output=True, text=True, env=env, cwd="/")
            if done.returncode != 0:
                raise RuntimeError(f"the peer failed on {recipe}:\n{done.stderr[-3000:]}")
            peer = json.loads(done.stdout.strip().splitlines()[-1])
            value = ppl(load_dequantized(base, out))
            gap = ppl_rtn - ppl_fp
            row = {
                **common,
                "method": f"llm-compressor {recipe}",
                "ppl": value,
                "gap_closed": (ppl_rtn - value) / gap if gap > 0 else None,
                "seconds": peer["seconds"],
            }
            log.info("%s", json.dumps(row))
            rows.append(row)
    return rows


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["rounding"] + [r["method"].removeprefix("llm-compressor ") for r in rows]
    values = [100 * (rows[0]["ppl_rtn"] / rows[0]["ppl_fp"] - 1)] + [
        100 * (r["ppl"] / r["ppl_fp"] - 1) for r in rows
    ]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(labels)), 4.0), dpi=120)
    bars = ax.bar(range(len(labels)), values)
    ax.bar_label(bars, fmt="%.1f%%", fontsize=7)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("perplexity above full precision (%), lower is better")
    ax.set_title(
        f"llm-compressor on {rows[0]['model']} {rows[0]['scheme']}: {rows[0]['calib'][0]} x "
        f"{rows[0]['calib'][1]} calibration, {rows[0]['eval_windows']} held-out windows",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="awq-plugin bench peers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--peer-python", type=Path, required=True, help="a Python with llmcompressor installed")
    p.add_argument("--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "awq_quality_panel")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--scheme", default="uint4_wo_64")
    p.add_argument("--recipes", default="gptq,awq+gptq", help=f"comma list of {', '.join(RECIPES)}")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path)
    p.add_argument("--png", type=Path)
    args = p.parse_args(argv)
    args.recipes = [r for r in args.recipes.split(",") if r]
    unknown = sorted(set(args.recipes) - set(RECIPES))
    if unknown:
        p.error(f"unknown recipe(s) {unknown}; known: {list(RECIPES)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from awq_plugin.tools.bench_block_cost import cpu_description

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    rows = measure(args)
    document = {"cpu": cpu_description(), "threads": args.threads, "rows": rows}
    text = json.dumps(document, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if args.png and rows:
        plot(rows, args.png)
    return 0
