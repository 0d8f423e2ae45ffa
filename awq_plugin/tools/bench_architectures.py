"""Coverage: every causal-LM and image-text-to-text architecture transformers builds, through AWQ.

For each ``model_type`` in transformers' ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` and
``MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES``: shrink the default config
(hidden 64, 2 layers, 4 heads / 2 KV heads, FFN 128, vocab 512, sub-configs
likewise), build a random-weight model and save it, run it once (step ``run``:
a skeleton whose own forward fails on the shrunk config cannot pass; the
summary gives the pass rate over buildable models and over those that run),
then run what a new user would::

    folder -> template (shipped, else inferred) -> quantize -> inspect -> from_pretrained -> finite logits

Each architecture runs in its own process with a time limit, so one crash or
hang costs one row. Per architecture the result says which step failed and
why, and how many linears got a proven AWQ scale and how many only clip +
rounding. ``--json OUT`` writes the rows, ``--png OUT`` a bar chart of the
pass rates.

    awq-plugin bench architectures --json arch.json --png arch.png [--only llama,qwen2] [--jobs 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

SMALL = {  # config field -> tiny value, applied wherever a (sub-)config has the field
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    # multi-head latent attention (DeepSeek-V2/V3 and kin): rope part = head_dim, the rest small
    "qk_rope_head_dim": 16,
    "qk_nope_head_dim": 32,
    "qk_head_dim": 48,
    "v_head_dim": 32,
    "kv_lora_rank": 32,
    "q_lora_rank": 64,
    "rotary_dim": 16,  # partial rotary (CodeGen, GPT-J): at most the head size 64 / 4
    "vocab_size": 512,
    "max_position_embeddings": 256,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 64,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "ffn_dim": 128,
    "d_model": 64,
    "n_embd": 64,
    "n_layer": 2,
    "decoder_layers": 2,  # encoder-decoder configs used as decoders (mBART, ...)
    "encoder_layers": 2,
    "n_head": 4,
    "num_layers": 2,
    "depth": 2,
    "embed_dim": 64,
    "embedding_dim": 64,  # xLSTM: its own name for the hidden size, read by the blocks' norms
    "num_blocks": 2,  # xLSTM: its own name for the layer count
}
STEPS = ("build", "run", "template", "quantize", "inspect", "from_pretrained", "logits")
N_TOKENS = 16


def _shrink(config: Any, seen: set[int] | None = None) -> None:
    """Set every field of ``SMALL`` the config (and its sub-configs) already has."""
    from transformers import PretrainedConfig

    seen = seen if seen is not None else set()
    if id(config) in seen:
        return
    seen.add(id(config))
    # A layer count that counts cache slots of stacked layers (HRM: num_hidden_layers =
    # num_layers_per_stack * cycles) keeps its multiple of the stack: shrink the stack, not the slots.
    per_stack = getattr(config, "num_layers_per_stack", None)
    total = getattr(config, "num_hidden_layers", None)
    stacked = (
        isinstance(per_stack, int) and isinstance(total, int) and per_stack > 0 and total % per_stack == 0
    )
    for key, value in SMALL.items():
        current = getattr(config, key, None)
        if isinstance(current, int) and not isinstance(current, bool) and current > value:
            with contextlib.suppress(Exception):  # read-only aliases
                setattr(config, key, value)
    if stacked and per_stack > SMALL["num_hidden_layers"]:  # each stack gets the tiny layer count
        config.num_layers_per_stack = SMALL["num_hidden_layers"]
        config.num_hidden_layers = total // per_stack * SMALL["num_hidden_layers"]
    for key, current in vars(config).items():
        # xLSTM sizes q/k/v as hidden * factor in its layers but hidden * factor rounded up to a
        # multiple of 64 in its cache: equal at the tiny hidden size 64 only with the full factor
        if key.endswith("_dim_factor") and isinstance(current, float) and current < 1.0:
            setattr(config, key, 1.0)
    if getattr(config, "default_language", "") is None and getattr(config, "languages", None):
        config.default_language = next(
            iter(config.languages)
        )  # X-MOD: input_ids alone need a default adapter
    if getattr(config, "num_experts_per_tok", 0) is None and getattr(config, "n_routed_experts", None):
        config.num_experts_per_tok = SMALL["num_experts_per_tok"]  # DeepSeek-V2 leaves it unset
    if getattr(config, "kv_lora_rank", None) and getattr(config, "num_key_value_heads", None):
        config.num_key_value_heads = config.num_attention_heads  # latent attention: one K/V per head
    vocab = getattr(config, "vocab_size", None)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):  # ids beyond the tiny vocabulary
        current = getattr(config, key, None)
        if isinstance(vocab, int) and isinstance(current, int) and current >= vocab:
            with contextlib.suppress(Exception):
                setattr(config, key, {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}[key])
    n_layers = SMALL["num_hidden_layers"]
    # Per-layer lists (layer_types, mlp_layer_types, ...) must match the tiny layer count.
    per_layer = [k for k in vars(config) if k.endswith("layer_types") or k == "mlp_only_layers"]
    for key in per_layer:
        current = getattr(config, key, None)
        if isinstance(current, list) and len(current) > n_layers:
            kept = current[:n_layers]
            if key.endswith(
                "layer_types"
            ):  # a hybrid keeps one layer of each kind (full attention among them)
                missing = [t for t in dict.fromkeys(current) if t not in kept][:n_layers]
                kept = kept[: n_layers - len(missing)] + missing
            setattr(config, key, kept)
    for key in ("rope_scaling", "rope_parameters"):  # M-RoPE sections must sum to the rotary dim / 2
        rope = getattr(config, key, None)
        if isinstance(rope, dict) and rope:
            nested = [r for r in rope.values() if isinstance(r, dict)]  # one per layer type
            for params in nested or [rope]:
                _shrink_mrope(config, params)
    for value in list(vars(config).values()):
        if isinstance(value, PretrainedConfig):
            _shrink(value, seen)


def _code_mrope_default(config: Any) -> list[int] | None:
    """The M-RoPE sections the model's code uses when its config names none (Qwen-VL, GLM-4V, ERNIE-VL
    read ``rope_parameters.get("mrope_section", [16, 24, 24])``), from the modeling module's source."""
    import importlib.util
    import re

    module = type(config).__module__.replace(".configuration_", ".modeling_")
    try:
        spec = importlib.util.find_spec(module)
        source = Path(spec.origin).read_text() if spec and spec.origin else ""
    except (ImportError, ValueError, OSError):
        return None
    found = re.search(r"""get\(\s*["']mrope_section["']\s*,\s*\[([\d,\s]+)\]""", source)
    return [int(v) for v in found.group(1).split(",") if v.strip()] if found else None


def _mrope_sections(default: list[int], half: int) -> list[int] | None:
    """``default`` scaled to sum to ``half``, every section at least 1 and equal sections kept equal
    (ERNIE-VL stacks its h and w sections); None when ``half`` is too small for one per section."""
    n, total = len(default), sum(default)
    if n == 0 or half < n or total <= 0:
        return None
    new = [max(1, round(s * half / total)) for s in default]
    unique = [i for i, s in enumerate(default) if default.count(s) == 1]
    i = unique[0] if unique else 0
    new[i] += half - sum(new)
    if new[i] < 1:  # the others take one each, the odd one the rest
        new = [1] * n
        new[i] = half - (n - 1)
    return new


def _shrink_mrope(config: Any, rope: dict[str, Any]) -> None:
    """Make ``rope``'s M-RoPE sections (given, or the code's default) sum to the tiny rotary dim / 2."""
    sections = rope.get("mrope_section")
    vl = "vl" in str(getattr(config, "model_type", ""))  # Qwen-VL kin: sections even where the code has none
    if not isinstance(sections, list) and (getattr(config, "vocab_size", None) or vl):  # a text config
        sections = _code_mrope_default(config) or ([16, 24, 24] if vl else None)
    if not sections:
        return
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    if not isinstance(head_dim, int):
        return
    factor = rope.get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None) or 1.0
    half = int(head_dim * factor) // 2
    if sum(sections) == half:
        return
    new = _mrope_sections(sections, half)
    if new is not None:
        rope["mrope_section"] = new


def _count_linears(template: dict[str, Any], model: Any) -> tuple[int, int]:
    """(linears with a proven AWQ scale, linears with clip + rounding only), over all decoder layers."""
    from awq_plugin.templates import resolve_template

    resolved = resolve_template(model, template)
    scaled = sum(len(g.layers) for b in resolved.blocks for g in b.groups)
    rounded = sum(len(b.unscaled) for b in resolved.blocks)
    return scaled, rounded


def run_one(model_type: str, mapping: str, work: Path) -> dict[str, Any]:
    """Every step for one architecture; the row of the report (never raises)."""
    import torch

    row: dict[str, Any] = {"model_type": model_type, "mapping": mapping, "ok": False}
    step = "build"
    try:
        import transformers
        from transformers import AutoConfig

        from awq_plugin.templates import find_shipped_template
        from awq_plugin.templates.infer import infer_template

        config = AutoConfig.for_model(model_type)
        _shrink(config)
        auto = transformers.AutoModelForCausalLM
        if mapping == "image-text-to-text":
            auto = transformers.AutoModelForImageTextToText
        torch.manual_seed(0)
        model = auto.from_config(config).eval()
        row["architecture"] = type(model).__name__
        src = work / "src"
        model.save_pretrained(src)
        step = "run"  # the unquantized model's own forward: it can fail on the shrunk config
        with torch.no_grad():
            model(input_ids=torch.randint(1, 400, (1, 8), generator=torch.Generator().manual_seed(0)))
        step = "template"
        arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
        try:
            template, _ = find_shipped_template(arch, model.config.model_type)
            row["template"] = template["name"]
        except Exception:
            template, _ = infer_template(model)
            row["template"] = "inferred"
        row["scaled_linears"], row["rounded_linears"] = _count_linears(template, model)
        # Experts transformers keeps fused in 3-D parameters are only quantized where a shipped
        # template splits them into linears; elsewhere they stay in full precision: say so.
        row["fp_fused_expert_tensors"] = sum(
            1
            for name, p in model.named_parameters()
            if p.dim() == 3 and "expert" in name and name.startswith(template["model_decoder_layers"])
        )
        del model
        step = "quantize"
        from awq_plugin.api import quantize

        ids = torch.randint(1, 400, (4, N_TOKENS), generator=torch.Generator().manual_seed(0))
        out = work / "awq"
        quantize(str(src), "uint4_wo_32", ids, out_dir=out, template=template, progress=False)
        step = "inspect"
        from awq_plugin.format.checkpoint import validate_checkpoint

        validate_checkpoint(out)
        step = "from_pretrained"
        import awq_plugin.integrations.transformers as awq_transformers
        from awq_plugin.models.auto import auto_model_class

        awq_transformers.activate()
        saved = AutoConfig.from_pretrained(out)  # a text model's config may be in no Auto mapping
        loaded = auto_model_class(saved).from_pretrained(out, dtype=torch.float32).eval()
        step = "logits"
        with torch.no_grad():
            logits = loaded(input_ids=ids[:1]).logits
        if not torch.isfinite(logits).all():
            raise ValueError("non-finite logits")
        row["ok"] = True
        step = "done"
    except BaseException as exc:  # one row per architecture, whatever happened
        row["reason"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    row["step"] = step
    return row


def _run_isolated(model_type: str, mapping: str, timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"arch-{model_type}-") as tmp:
        result = Path(tmp) / "row.json"
        cmd = [
            sys.executable,
            "-m",
            "awq_plugin.tools.bench_architectures",
            "--one",
            model_type,
            mapping,
            tmp,
        ]
        start = time.monotonic()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {
                "model_type": model_type,
                "mapping": mapping,
                "ok": False,
                "step": "?",
                "reason": "timeout",
            }
        if result.is_file():
            row = json.loads(result.read_text())
        else:
            tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
            row = {"model_type": model_type, "mapping": mapping, "ok": False, "step": "?", "reason": tail[0]}
        row["seconds"] = round(time.monotonic() - start, 1)
        return row


def model_types(mapping: str) -> list[str]:
    from transformers.models.auto import modeling_auto

    names = {
        "causal-lm": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        "image-text-to-text": modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    }[mapping]
    return sorted(names)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per mapping: buildable (built and saved), runs (its unquantized forward works too), passed,
    and the pass rate over each."""
    out = {}
    for mapping in ("causal-lm", "image-text-to-text"):
        mine = [r for r in rows if r["mapping"] == mapping]
        built = [r for r in mine if r.get("step") != "build"]
        runs = [r for r in built if r.get("step") != "run"]
        passed = [r for r in mine if r["ok"]]
        out[mapping] = {
            "tried": len(mine),
            "buildable": len(built),
            "runs": len(runs),
            "passed": len(passed),
            "pass_rate": round(len(passed) / len(built), 3) if built else None,
            "pass_rate_of_runs": round(len(passed) / len(runs), 3) if runs else None,
            "scaled_linears": sum(r.get("scaled_linears", 0) for r in passed),
            "rounded_linears": sum(r.get("rounded_linears", 0) for r in passed),
        }
    return out


def _plot(summary: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    names = list(summary)
    built = [summary[n]["buildable"] for n in names]
    runs = [summary[n]["runs"] for n in names]
    passed = [summary[n]["passed"] for n in names]
    ax.barh(names, built, color="#eee", label="buildable (build + save)")
    ax.barh(names, runs, color="#bbb", label="... and its own forward runs")
    ax.barh(names, passed, color="#3a7", label="folder -> AWQ -> reload -> finite logits")
    for i, (b, r, p) in enumerate(zip(built, runs, passed)):
        ax.text(b, i, f" {p}/{b} ({p}/{r} that run)", va="center", fontsize=7)
    ax.set_xlabel("architectures")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="awq-plugin bench architectures", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--json", metavar="OUT", help="write the rows and the summary as JSON")
    parser.add_argument("--png", metavar="OUT", help="draw the pass rates")
    parser.add_argument("--only", help="comma-separated model_types (default: every one)")
    parser.add_argument(
        "--mapping", choices=["causal-lm", "image-text-to-text", "both"], default="both", help="which mapping"
    )
    parser.add_argument("--jobs", type=int, default=2, help="architectures run at once (default 2)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per architecture (default 300)")
    parser.add_argument("--shuffle", type=int, metavar="SEED", help="run in a seeded random order")
    parser.add_argument("--one", nargs=3, metavar=("MODEL_TYPE", "MAPPING", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        model_type, mapping, work = args.one
        row = run_one(model_type, mapping, Path(work))
        (Path(work) / "row.json").write_text(json.dumps(row))
        return 0
    mappings = ["causal-lm", "image-text-to-text"] if args.mapping == "both" else [args.mapping]
    only = set(args.only.split(",")) if args.only else None
    todo = [(t, m) for m in mappings for t in model_types(m) if only is None or t in only]
    if args.shuffle is not None:  # a run cut short is then a fair sample of both mappings
        random.Random(args.shuffle).shuffle(todo)
    rows: list[dict[str, Any]] = []

    def run(item: tuple[str, str]) -> dict[str, Any]:
        row = _run_isolated(item[0], item[1], args.timeout)
        print(json.dumps(row), flush=True)
        return row

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = list(pool.map(run, todo))
    summary = summarize(rows)
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "rows": rows}, indent=2))
    if args.png:
        _plot(summary, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
