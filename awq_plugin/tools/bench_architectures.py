"""Coverage: every causal-LM and image-text-to-text architecture transformers builds, through AWQ.

For each ``model_type`` in transformers' ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` and
``MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES``: shrink the default config
(hidden 64, 2 layers, 4 heads / 2 KV heads, FFN 128, vocab 512, sub-configs
likewise), build a random-weight model and save it, run it once (step ``run``:
a skeleton whose own forward fails on the shrunk config cannot pass; the
summary gives the pass rate over buildable models and over those that run),
then run what a new user would::

    folder -> template (shipped, else inferred) -> quantize -> inspect -> from_pretrained -> logits

and compare the logits on held-out ids with two references computed in the same
run: the full-precision model and its fake-quant twin (``numerics.quant_ref`` at
the same group size, AWQ's saved scales re-applied, in memory). A pass needs the
checkpoint to compute what the fake-quant reference computes and the kernel to
stay about as close to full precision (:func:`comparison_failure` says how
close, and why). Finite logits alone would pass a wrong pack order or a swapped
expert projection.

Each architecture runs in its own process with a time limit, so one crash or
hang costs one row. Per architecture the result says which step failed and
why, how many linears got a proven AWQ scale and how many only clip +
rounding, both cosines and the INT4 share of the decoder's matrix weights.
``--json OUT`` writes the rows, ``--png OUT`` a bar chart of the pass rates,
``--summary`` the summary committed as ``docs/coverage.json`` and ``--docs``
the page generated from it, ``docs/coverage.md``::

    awq-plugin bench architectures --json arch.json --png arch.png [--only llama,qwen2] [--jobs 2]
    awq-plugin bench architectures --summary docs/coverage.json --docs docs/coverage.md
    awq-plugin bench architectures --from-summary docs/coverage.json --docs docs/coverage.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
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
STEPS = (
    "build",
    "run",
    "template",
    "quantize",
    "inspect",
    "from_pretrained",
    "logits",
    "reference",
    "compare",
)
# A pass compares the reloaded checkpoint's logits with two references computed in the same run
# on held-out ids: the full-precision model and its fake-quant twin (numerics.quant_ref at the same
# group size, AWQ's saved scales re-applied, in memory, no pack/reload); see comparison_failure.
# 1. Same weights, fp32 sums in another order at most: the ratio measured exactly 0 on all eight
#    passing models of a small run (llama, mixtral, qwen3_moe, olmoe, gpt_oss, gemma3_text,
#    starcoder2, llava). Planted defects: one mixtral expert's gate and up swapped 0.055-0.084, a
#    reversed nibble order in one llama linear 1.5, in another 8.6.
MAX_CHECKPOINT_ERROR_RATIO = 1e-3
# 2. The CPU kernels round activations to int8 per group (kernels/__init__.py states the bound).
#    1 - cosine may grow by a quarter: an extra error orthogonal to quantization's and half its
#    size. Measured (1 - cos reloaded) / (1 - cos fake-quant): 1.000-1.008 on dense models and
#    qwen3_moe/olmoe, 1.038 on mixtral (int8 rounding flips a few top-k routes), 0.63 on gpt_oss.
KERNEL_COSINE_SLACK = 1.25
COSINE_NOISE = 1e-6  # fp32/float64 noise floor for models quantization barely moves
SCHEME = "uint4_wo_32"  # the tiny models' hidden size 64 holds two groups of 32
LOW_INT4_SHARE = 0.9  # passing models below this INT4 share are listed in the docs
PASSING_FIELDS = ("template", "int4_share", "fp_fused_expert_tensors", "cos_fp_fakequant", "cos_fp_reloaded")
DOCS_JSON = "docs/coverage.json"  # the committed summary of the last sweep
DOCS_MD = "docs/coverage.md"  # generated from it
REGENERATE_DOCS = f"awq-plugin bench architectures --from-summary {DOCS_JSON} --docs {DOCS_MD}"
N_TOKENS = 16


def _shrink_fields(config: Any, seen: set[int] | None = None) -> None:
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
    if getattr(config, "o_groups", None) and getattr(config, "o_lora_rank", None):
        # DeepSeek-V4's grouped output projection: groups of 32 inputs (one quantization group),
        # a rank as small as the rest of the tiny model
        config.o_groups, config.o_lora_rank = 2, 32
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
            _shrink_fields(value, seen)


def _configs(config: Any, seen: set[int] | None = None) -> list[Any]:
    """``config`` and its nested sub-configs."""
    from transformers import PretrainedConfig

    seen = seen if seen is not None else set()
    if id(config) in seen:
        return []
    seen.add(id(config))
    out = [config]
    for value in list(vars(config).values()):
        if isinstance(value, PretrainedConfig):
            out += _configs(value, seen)
    return out


def _one_of_each_kind(kinds: list[Any], n: int) -> list[Any]:
    """The first entries of ``kinds``, ``n`` or as many as it has kinds, with one of each kind."""
    n = max(n, len(set(kinds)))
    kept = kinds[:n]
    missing = [k for k in dict.fromkeys(kinds) if k not in kept]
    return kept[: n - len(missing)] + missing


def _small(key: str, value: Any) -> Any:
    """A per-layer override's value at the tiny size: twice the sweep's (so it still differs)."""
    if isinstance(value, int) and not isinstance(value, bool) and key in SMALL:
        return min(value, 2 * SMALL[key])
    return value


def _shrink(config: Any, seen: set[int] | None = None) -> None:
    """Shrink ``config`` in place: every size field (:func:`_shrink_fields`) and the per-layer data of the
    hybrid and heterogeneous families (Gemma 4's per-layer overrides re-keyed onto the tiny layer count,
    Laguna's heads per layer, Zamba2's and Nemotron-H's block lists with one layer of each kind, Jamba's
    attention and expert periods, Nemotron-H's shared expert and Mamba width)."""
    heterogeneous = []
    for cfg in _configs(config):
        spec = cfg.__dict__.get("_heterogeneity_spec")
        if spec is None:
            continue
        kinds = list(getattr(cfg, "layer_types", None) or [])
        by_kind: dict[Any, dict[str, Any]] = {}
        for index, overrides in spec.per_layer_overrides.items():
            by_kind.setdefault(kinds[index] if index < len(kinds) else index, dict(overrides))
        cfg.allow_global_per_layer_attribute_access = True  # the sweep's shrink reads them all
        heterogeneous.append((cfg, by_kind))
    for cfg in _configs(config):
        blocks = getattr(cfg, "layers_block_type", None)
        settable = not isinstance(getattr(type(cfg), "layers_block_type", None), property)  # Jamba derives it
        if settable and isinstance(blocks, list) and len(blocks) > SMALL["num_hidden_layers"]:
            cfg.layers_block_type = _one_of_each_kind(blocks, SMALL["num_hidden_layers"])
            cfg.num_hidden_layers = len(cfg.layers_block_type)
            if isinstance(getattr(cfg, "hybrid_layer_ids", None), list):
                cfg.hybrid_layer_ids = [i for i, kind in enumerate(cfg.layers_block_type) if kind == "hybrid"]
        if getattr(cfg, "attn_layer_period", 0) > SMALL["num_hidden_layers"]:
            cfg.attn_layer_period, cfg.attn_layer_offset = (
                SMALL["num_hidden_layers"],
                SMALL["num_hidden_layers"] - 1,
            )
        if getattr(cfg, "expert_layer_period", 0) >= SMALL["num_hidden_layers"]:
            cfg.expert_layer_period, cfg.expert_layer_offset = (
                SMALL["num_hidden_layers"],
                SMALL["num_hidden_layers"] - 1,
            )
        if getattr(cfg, "vocab_size_per_layer_input", 0) > SMALL["vocab_size"]:
            cfg.vocab_size_per_layer_input = SMALL["vocab_size"]  # Gemma 4: 262144 x 256 per layer
            cfg.hidden_size_per_layer_input = 32  # a multiple of the sweep's group size
        if getattr(cfg, "mamba_num_heads", 0) > 8 and getattr(cfg, "mamba_head_dim", None):
            # Nemotron-H: 128 Mamba heads of 64 make the tiny model's mixer 8192 wide (30 s a run)
            cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size = 8, 16, 16
        if getattr(cfg, "moe_shared_expert_intermediate_size", 0):
            cfg.moe_shared_expert_intermediate_size = SMALL["intermediate_size"]
    _shrink_fields(config, seen)
    for cfg in _configs(config):
        per_layer = getattr(cfg, "num_attention_heads_per_layer", None)
        if isinstance(per_layer, list) and len(per_layer) != cfg.num_hidden_layers:
            cfg.num_attention_heads_per_layer = [cfg.num_attention_heads] * cfg.num_hidden_layers
        if getattr(cfg, "n_mamba_heads", None) and getattr(cfg, "mamba_headdim", None):
            # Zamba2 derives these from the hidden size in __post_init__, before the shrink
            cfg.mamba_headdim = int(cfg.mamba_expand * cfg.hidden_size) // cfg.n_mamba_heads
            cfg.attention_hidden_size = 2 * cfg.hidden_size
            cfg.attention_head_dim = cfg.attention_hidden_size // cfg.num_attention_heads
    for cfg, by_kind in heterogeneous:
        kinds = list(getattr(cfg, "layer_types", None) or [])
        overrides = {
            i: {key: _small(key, value) for key, value in by_kind[kind].items()}
            for i, kind in enumerate(kinds)
            if kind in by_kind
        }
        cfg.per_layer_config = overrides or None
        cfg.allow_global_per_layer_attribute_access = False  # the code under test must not read them


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


def logits_of(model: Any, ids: Any) -> Any:
    """The model's logits for ``ids`` ``[B, T]``, in float64 (the comparisons' precision)."""
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.double()  # (B, T, vocab)


def cosine(a: Any, b: Any) -> float:
    """Cosine similarity of two logit tensors, flattened."""
    import torch

    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def _error_ratio(logits: Any, fake_quant: Any, fp: Any) -> float:
    """How far ``logits`` are from the fake-quant reference, as a share of how far quantization
    itself moved the logits (``||logits - fake_quant|| / ||fake_quant - fp||``)."""
    import torch

    off = float(torch.linalg.vector_norm(logits - fake_quant))
    quant_effect = float(torch.linalg.vector_norm(fake_quant - fp))
    if quant_effect == 0.0:
        return 0.0 if off == 0.0 else math.inf
    return off / quant_effect


def compare_logits(fp: Any, fake_quant: Any, reloaded: Any, kernel: Any) -> dict[str, float]:
    """The figures a pass is judged on (see :func:`comparison_failure`).

    ``fp``: the full-precision model; ``fake_quant``: :func:`fake_quant_reference`;
    ``reloaded``: the checkpoint loaded back, every AWQ linear on the fp32 reference kernel;
    ``kernel``: the same model on the kernel this machine picks (what a user runs).
    """
    return {
        "cos_fp_fakequant": cosine(fp, fake_quant),
        "cos_fp_reloaded": cosine(fp, kernel),
        "cos_fakequant_reloaded": cosine(fake_quant, reloaded),
        "checkpoint_error_ratio": _error_ratio(reloaded, fake_quant, fp),
        "kernel_error_ratio": _error_ratio(kernel, fake_quant, fp),
    }


def comparison_failure(figures: dict[str, float]) -> str | None:
    """Why the reloaded model fails the comparison with the references (None: it passes).

    1. The checkpoint holds the reference's weights: on the fp32 reference kernel the reloaded
       model computes what the fake-quant reference computes (same integers, scales and fp16
       tensors; only the order of fp32 sums differs), so its distance from the reference must be
       tiny next to quantization's own effect (``MAX_CHECKPOINT_ERROR_RATIO``). A wrong pack
       order, a transposed projection or one expert's gate and up swapped fail here even where
       they move the logits too little for a cosine with full precision to notice.
    2. On this machine's kernel the reloaded model is about as close to full precision as the
       reference: ``1 - cos(fp, reloaded) <= KERNEL_COSINE_SLACK * (1 - cos(fp, fake_quant))``.
    """
    ratio = figures["checkpoint_error_ratio"]
    if not ratio <= MAX_CHECKPOINT_ERROR_RATIO:
        return (
            f"the checkpoint does not compute what the fake-quant reference computes: reloaded logits "
            f"(reference kernel) are {ratio:.3g} x quantization's own effect away from it "
            f"(> {MAX_CHECKPOINT_ERROR_RATIO})"
        )
    loss_ref = 1.0 - figures["cos_fp_fakequant"]
    loss = 1.0 - figures["cos_fp_reloaded"]
    if not loss <= KERNEL_COSINE_SLACK * loss_ref + COSINE_NOISE:
        return (
            f"on this machine's kernel the reloaded logits are further from full precision than the "
            f"fake-quant reference: 1 - cosine {loss:.3g} > {KERNEL_COSINE_SLACK} x {loss_ref:.3g}"
        )
    return None


def fake_quant_reference(model: Any, checkpoint: Path, calib_ids: Any) -> Any:
    """``model`` (full precision, modified in place) made into what the checkpoint should hold,
    in memory, with no packing, saving or loading: every quantized decoder linear replaced by
    its reference quantize-dequantize (``numerics.quant_ref``) after AWQ, every other parameter
    rounded to float16, the format's type for everything that is not INT4.

    Where every block was rounded to nearest, the checkpoint's saved AWQ scales and clips are
    re-applied. Compensated rounding's integers are not in the saved results (only in the
    checkpoint, which this reference must not read): the search runs again in memory on the
    same calibration ids (``api.fake_quantize_model``), which must reach the integers the
    folder pipeline streamed to disk."""
    import torch

    from awq_plugin.algorithm.awq import AwqOptions, apply_awq, quantized_linear_names
    from awq_plugin.algorithm.results import AwqResults
    from awq_plugin.api import fake_quantize_model
    from awq_plugin.config import AwqQuantConfig
    from awq_plugin.format.checkpoint import read_json
    from awq_plugin.pipeline.assemble import RESULTS_FILE
    from awq_plugin.pipeline.guard import fake_quantize_linears
    from awq_plugin.templates import resolve_template

    results = AwqResults.load(checkpoint / RESULTS_FILE)
    # the config the loaders obey, including the linears the quantizer kept in full precision
    quant = AwqQuantConfig.from_dict(read_json(checkpoint / "config.json")["quantization_config"])
    in_memory = any(block.rounding != "nearest" for block in results.blocks)
    if in_memory:
        options = AwqOptions.from_dict(results.options)
        fake_quantize_model(model, quant, calib_ids, template=results.template, options=options)
        resolved = resolve_template(model, results.template)
    else:
        resolved = apply_awq(model, results)
    layers = model.get_submodule(resolved.decoder_layers)
    quantized = {
        id(block.get_submodule(name).weight)
        for i, block in enumerate(layers)
        for name in quantized_linear_names(block, resolved.block(i), quant)
    }
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and id(p) not in quantized:
                p.copy_(p.to(torch.float16))
    if not in_memory:
        fake_quantize_linears(model, quant, results.template)
    return model


def set_kernel(model: Any, backend: str | None) -> None:
    """Run every AWQ linear of ``model`` on ``backend`` (None: the automatic choice) from now on."""
    from awq_plugin.runtime.qlinear import AwqLinear

    for module in model.modules():
        if isinstance(module, AwqLinear):
            module.backend = backend
            module.invalidate()


def kernel_name(model: Any) -> str | None:
    """The backend the model's AWQ linears run on (None: the model has none)."""
    from awq_plugin.runtime.qlinear import AwqLinear

    names = {m.kernel_backend for m in model.modules() if isinstance(m, AwqLinear)}
    return ",".join(sorted(names)) or None


def int4_share(model: Any, decoder_layers: str) -> dict[str, Any]:
    """Matrix weights (ndim >= 2) inside the decoder layers: how many are stored as INT4 and how many
    stay in full precision (fused 3-D expert tensors, convolutions, linears the scheme skips)."""
    from awq_plugin.runtime.qlinear import AwqLinear

    int4 = fp = 0
    for module in model.get_submodule(decoder_layers).modules():
        if isinstance(module, AwqLinear):
            int4 += module.in_features * module.out_features
        fp += sum(p.numel() for p in module.parameters(recurse=False) if p.dim() >= 2)
    total = int4 + fp
    return {
        "int4_weights": int4,
        "fp_matrix_weights": fp,
        "int4_share": round(int4 / total, 4) if total else None,
    }


def build_tiny_model(model_type: str, mapping: str = "causal-lm") -> Any:
    """The sweep's model of ``model_type``: its default config shrunk (:func:`_shrink`), random
    weights (seed 0), in eval mode; ``mapping`` picks the causal-LM or image-text-to-text class."""
    import torch
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    _shrink(config)
    auto = transformers.AutoModelForCausalLM
    if mapping == "image-text-to-text":
        auto = transformers.AutoModelForImageTextToText
    torch.manual_seed(0)
    return auto.from_config(config).eval()


def run_one(
    model_type: str, mapping: str, work: Path, corrupt: Callable[[Path], None] | None = None
) -> dict[str, Any]:
    """Every step for one architecture; the row of the report (never raises).

    ``corrupt(folder)``, when given, is called on the quantized checkpoint before it is loaded:
    tests plant a defect there and watch the comparison catch it.
    """
    import torch

    row: dict[str, Any] = {"model_type": model_type, "mapping": mapping, "ok": False}
    step = "build"
    try:
        from transformers import AutoConfig

        from awq_plugin.templates import find_shipped_template
        from awq_plugin.templates.infer import infer_template

        model = build_tiny_model(model_type, mapping)
        row["architecture"] = type(model).__name__
        src = work / "src"
        model.save_pretrained(src)
        step = "run"  # the unquantized model's own forward: it can fail on the shrunk config
        with torch.no_grad():
            model(input_ids=torch.randint(1, 400, (1, 8), generator=torch.Generator().manual_seed(0)))
        # held-out input for the comparison: not the calibration ids
        eval_ids = torch.randint(1, 400, (2, N_TOKENS), generator=torch.Generator().manual_seed(1))
        fp_logits = logits_of(model, eval_ids)
        step = "template"
        arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
        try:
            template, _ = find_shipped_template(arch, model.config.model_type)
            row["template"] = template["name"]
        except Exception:
            template, _ = infer_template(model)
            row["template"] = "inferred"
        row["scaled_linears"], row["rounded_linears"] = _count_linears(template, model)
        # Experts transformers keeps fused in 3-D parameters are unfused by the template's
        # resolution (above) where their per-expert form is proven; those still fused stay in
        # full precision: say so.
        from awq_plugin.models.discover_experts import fused_expert_modules

        row["fp_fused_expert_tensors"] = sum(
            1
            for layer in model.get_submodule(template["model_decoder_layers"])
            for module in fused_expert_modules(layer).values()
            for p in module.parameters(recurse=False)
            if p.dim() == 3
        )
        step = "quantize"
        from awq_plugin.api import quantize

        ids = torch.randint(1, 400, (4, N_TOKENS), generator=torch.Generator().manual_seed(0))
        out = work / "awq"
        quantize(str(src), SCHEME, ids, out_dir=out, template=template, progress=False)
        step = "inspect"
        from awq_plugin.format.checkpoint import validate_checkpoint

        validate_checkpoint(out)
        if corrupt is not None:
            corrupt(out)
        step = "from_pretrained"
        import awq_plugin.integrations.transformers as awq_transformers
        from awq_plugin.models.auto import auto_model_class

        awq_transformers.activate()
        saved = AutoConfig.from_pretrained(out)  # a text model's config may be in no Auto mapping
        loaded = auto_model_class(saved).from_pretrained(out, dtype=torch.float32).eval()
        step = "logits"
        kernel_logits = logits_of(loaded, eval_ids)  # the kernel a user gets on this machine
        if not torch.isfinite(kernel_logits).all():
            raise ValueError("non-finite logits")
        row["kernel"] = kernel_name(loaded)
        set_kernel(loaded, "reference")  # the checkpoint's integers, dequantized in fp32
        reloaded_logits = logits_of(loaded, eval_ids)
        row.update(int4_share(loaded, template["model_decoder_layers"]))
        del loaded
        step = "reference"
        # the in-memory model itself (template resolution computes the same function)
        fake_quant_logits = logits_of(fake_quant_reference(model, out, ids), eval_ids)
        del model
        step = "compare"
        figures = compare_logits(fp_logits, fake_quant_logits, reloaded_logits, kernel_logits)
        row.update({k: float(f"{v:.6g}") for k, v in figures.items()})
        failure = comparison_failure(figures)
        if failure:
            raise ValueError(failure)
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
        if "reason" in row:  # the same failure reads the same in every run
            row["reason"] = row["reason"].replace(tmp, "{work}")
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


def coverage_summary(rows: list[dict[str, Any]], command: str, complete: bool) -> dict[str, Any]:
    """What ``docs/coverage.json`` holds: the run, the pass criterion, and per mapping the counts,
    the passing models (INT4 share, both cosines) and the failures (step, reason); no logs.

    ``complete``: the run tried every model type of the mappings (not an ``--only`` subset).
    """
    import torch
    import transformers

    counts = summarize(rows)
    mappings = {}
    for mapping, c in counts.items():
        mine = sorted((r for r in rows if r["mapping"] == mapping), key=lambda r: r["model_type"])
        passing = {r["model_type"]: {key: r.get(key) for key in PASSING_FIELDS} for r in mine if r["ok"]}
        failures = [
            {"model_type": r["model_type"], "step": r.get("step"), "reason": r.get("reason", "")}
            for r in mine
            if not r["ok"]
        ]
        mappings[mapping] = {**c, "passing": passing, "failures": failures}
    return {
        "format": "awq-plugin architecture coverage",
        "version": 1,
        "command": command,
        "complete": complete,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "scheme": SCHEME,
        "kernels": sorted({r["kernel"] for r in rows if r.get("kernel")}),
        "criterion": {
            "max_checkpoint_error_ratio": MAX_CHECKPOINT_ERROR_RATIO,
            "kernel_cosine_slack": KERNEL_COSINE_SLACK,
            "cosine_noise": COSINE_NOISE,
        },
        "low_int4_share": LOW_INT4_SHARE,
        "mappings": mappings,
    }


def _cell(text: Any) -> str:
    """``text`` safe in a Markdown table cell."""
    out = str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
    return out.replace("<", "&lt;").replace(">", "&gt;")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def render_coverage(summary: dict[str, Any]) -> str:
    """``docs/coverage.md`` from a :func:`coverage_summary` (pure: the same JSON gives the same text)."""
    lines = _coverage_intro(summary)
    lines += ["## Counts", "", *_counts_table(summary["mappings"])]
    low = summary["low_int4_share"]
    lines += ["", f"## Passing models with an INT4 share below {100 * low:.0f}%", ""]
    lines += _low_share_table(summary["mappings"], low)
    lines += ["", "## Passed", "", *_passed_table(summary["mappings"])]
    lines += ["", "## Failures", "", *_failures_table(summary["mappings"])]
    return "\n".join(lines) + "\n"


def _coverage_intro(summary: dict[str, Any]) -> list[str]:
    crit = summary["criterion"]
    lines = [
        "# Architecture coverage",
        "",
        f"<!-- Generated from {DOCS_JSON} by `{REGENERATE_DOCS}`. Do not edit: "
        "tests/test_bench_architectures.py checks that this file matches the JSON. -->",
        "",
        "Every `model_type` in transformers' causal-LM and image-text-to-text mappings, built tiny "
        "with random weights (hidden 64, 2 layers, vocabulary 512), quantized with AWQ to "
        f"`{summary['scheme']}` from its saved folder, validated, loaded back through "
        "`from_pretrained` and compared on held-out token ids with the full-precision model and "
        "with its fake-quant reference (`numerics.quant_ref` at the same group size, AWQ's saved "
        "scales re-applied, in memory: no packing, saving or loading).",
        "",
    ]
    if not summary["complete"]:
        lines += [
            "**Partial run**: only the model types listed below were tried; the counts are not "
            "the coverage of the mappings.",
            "",
        ]
    kernels = ", ".join(f"`{k}`" for k in summary["kernels"]) or "none"
    ratio = crit["max_checkpoint_error_ratio"]
    lines += [
        f"Run: `{summary['command']}` with transformers {summary['transformers']}, "
        f"torch {summary['torch']}; AWQ kernel on the machine that ran it: {kernels}.",
        "",
        "## What a pass means",
        "",
        "1. The checkpoint computes what the fake-quant reference computes. On the fp32 reference "
        "kernel the reloaded model has the reference's integers, scales and float16 tensors, so "
        "only the order of fp32 sums may differ: its logits must be within "
        f"{ratio:g} x the distance quantization itself moved them "
        f"(`||reloaded - fake_quant|| <= {ratio:g} * ||fake_quant - fp||`). A wrong pack "
        "order, a transposed projection or one expert's gate and up swapped fail here, even where "
        "they move the logits of a tiny random model too little for a cosine with full precision "
        "to notice.",
        "2. On the machine's kernel the reloaded model is about as close to full precision as the "
        f"reference: `1 - cos(fp, reloaded) <= {crit['kernel_cosine_slack']:g} * "
        f"(1 - cos(fp, fake_quant)) + {crit['cosine_noise']:g}` (the CPU kernels round activations "
        "to int8 per group: an extra error orthogonal to quantization's and half its size).",
        "",
        "Cosines are of the flattened logits. INT4 share: of the matrix weights (ndim >= 2) inside "
        "the decoder layers, the share stored as INT4. Counted as full precision: MoE routers (one "
        "[experts, hidden] matrix per MoE layer, kept so that routing stays exact; on these tiny "
        "models 0.2-0.5% of a decoder), experts left fused (3-D tensors whose per-expert form could "
        "not be proven), convolutions, SSM mixer parameters and linears the scheme skips. Norms and "
        "biases are vectors and are not counted.",
        "",
    ]
    return lines


def _counts_table(mappings: dict[str, Any]) -> list[str]:
    header = ["mapping", "tried", "buildable", "own forward runs", "passed"]
    header += ["pass rate (of buildable)", "pass rate (of those that run)"]
    rows = [
        [
            m,
            c["tried"],
            c["buildable"],
            c["runs"],
            c["passed"],
            _percent(c["pass_rate"]),
            _percent(c["pass_rate_of_runs"]),
        ]
        for m, c in mappings.items()
    ]
    return _table(header, rows)


def _low_share_table(mappings: dict[str, Any], low: float) -> list[str]:
    rows = [
        [m, t, _percent(p["int4_share"]), p["fp_fused_expert_tensors"], p["template"]]
        for m, c in mappings.items()
        for t, p in c["passing"].items()
        if p["int4_share"] is None or p["int4_share"] < low
    ]
    header = ["mapping", "model_type", "INT4 share", "fused expert tensors in full precision", "template"]
    return _table(header, rows) if rows else ["None."]


def _passed_table(mappings: dict[str, Any]) -> list[str]:
    rows = [
        [
            m,
            t,
            p["template"],
            _percent(p["int4_share"]),
            f"{p['cos_fp_fakequant']:.6f}",
            f"{p['cos_fp_reloaded']:.6f}",
        ]
        for m, c in mappings.items()
        for t, p in c["passing"].items()
    ]
    header = ["mapping", "model_type", "template", "INT4 share", "cos(fp, fake-quant)", "cos(fp, reloaded)"]
    return _table(header, rows) if rows else ["None."]


def _failures_table(mappings: dict[str, Any]) -> list[str]:
    rows = [[m, f["model_type"], f["step"], f["reason"]] for m, c in mappings.items() for f in c["failures"]]
    return _table(["mapping", "model_type", "failed at step", "reason"], rows) if rows else ["None."]


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
    ax.barh(names, passed, color="#3a7", label="folder -> AWQ -> reload -> logits match the references")
    for i, (b, r, p) in enumerate(zip(built, runs, passed)):
        ax.text(b, i, f" {p}/{b} ({p}/{r} that run)", va="center", fontsize=7)
    ax.set_xlabel("architectures")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="awq-plugin bench architectures", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--json", metavar="OUT", help="write the rows and the summary as JSON")
    parser.add_argument("--png", metavar="OUT", help="draw the pass rates")
    parser.add_argument(
        "--summary", metavar="OUT", help=f"write the summary the docs are generated from ({DOCS_JSON})"
    )
    parser.add_argument("--docs", metavar="OUT", help=f"write the coverage page ({DOCS_MD})")
    parser.add_argument(
        "--from-summary",
        metavar="IN",
        help="run nothing: write --docs from a summary written by --summary earlier",
    )
    parser.add_argument("--only", help="comma-separated model_types (default: every one)")
    parser.add_argument(
        "--mapping", choices=["causal-lm", "image-text-to-text", "both"], default="both", help="which mapping"
    )
    parser.add_argument("--jobs", type=int, default=2, help="architectures run at once (default 2)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per architecture (default 300)")
    parser.add_argument("--shuffle", type=int, metavar="SEED", help="run in a seeded random order")
    parser.add_argument("--one", nargs=3, metavar=("MODEL_TYPE", "MAPPING", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.from_summary:
        if not args.docs:
            parser.error("--from-summary writes the page given with --docs")
        summary = json.loads(Path(args.from_summary).read_text())
        Path(args.docs).write_text(render_coverage(summary))
        return 0
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
    if args.summary or args.docs:
        command = shlex.join(["awq-plugin", "bench", "architectures", *argv])
        coverage = coverage_summary(rows, command, complete=only is None and args.mapping == "both")
        if args.summary:
            Path(args.summary).write_text(json.dumps(coverage, indent=1) + "\n")
        if args.docs:
            Path(args.docs).write_text(render_coverage(coverage))
    return 0


if __name__ == "__main__":
    sys.exit(main())
