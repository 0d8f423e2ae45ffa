"""vLLM serves AWQ checkpoints of the 2026 MoE families through our MoE method (issue 27, point 3).

Tiny random models (2 layers, hidden 128, 4 experts, top-2; vLLM's CPU attention needs a head
size of 32 or more), quantized here by plain rounding (uint4, group 32) and written by hand in
the layout each family's vLLM 0.32 loader reads:

- OLMoE, GLM-4-MoE, PhiMoE, ERNIE-4.5-MoE, EXAONE-MoE, AFMoE, FlexOlmo (the last through
  vLLM's Transformers backend): one ``qweight/qzeros/scales`` triple per expert and projection
  under the names of their original checkpoints (``...mlp.experts.E.gate_proj.qweight``;
  PhiMoE ``...block_sparse_moe.experts.E.w1``), as vLLM's generic ``RoutedExperts`` loader
  maps them; ``silu``. Several add shared experts (AWQ linears) and grouped sigmoid routing
  with a score-correction bias (full precision, as the routers).
- Llama 4 (text) and Granite-MoE keep their experts fused in their own checkpoints; vLLM reads
  AWQ experts of both per expert under its default names (``...feed_forward.experts.E.gate_proj``,
  ``...block_sparse_moe.experts.E.gate_proj``). Llama 4 applies the router weight to the
  expert input and has a shared expert; its q/k rows are reordered for rotary by our method.
- gpt-oss: vLLM 0.32's gpt-oss loader has no per-expert route for AWQ names (it drops them
  silently); it hands a tensor named like the method's parameter to its weight loader whole.
  So the experts are stacked: ``model.layers.L.mlp.experts.w13_qweight`` ``[E, H, 2I/8]``
  with gate and up columns interleaved as in gpt-oss's own ``gate_up_proj``, ``w2_*``
  ``[E, I, H/8]``, and the biases under gpt-oss's names (``gate_up_proj_bias``,
  ``down_proj_bias``); activation ``swigluoai`` (clamped, interleaved).
- OLMoE with layer 1's experts in ``modules_to_not_convert``, stored as plain per-expert
  weights: that layer runs on vLLM's unquantized fused-MoE method, layer 0 on ours.

Oracle: transformers on the same weights dequantized (fake quantization), fp32, greedy with
top-2 margins. vLLM runs with our ``reference`` kernel (the math of the oracle: tokens must match
up to the usual near ties, tests/greedy.py) and gpt-oss once with the default CPU kernel (int8
activations: near ties of 1 nat, as in tests/test_moe.py). A planted bug, gpt-oss with gate and
up stored as halves instead of interleaved, must change the tokens: the comparison can see a
layout mistake. Qwen3-Next and DeepSeek-V3 are served from checkpoints our pipeline writes
(``tests/test_moe_families.py``), not here.

Runtime: about 75 s (one vLLM process, engine in-process, thirteen model loads).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from awq_plugin.config import AwqQuantConfig
from awq_plugin.format.checkpoint import SafetensorsReader
from awq_plugin.numerics.pack import pack
from awq_plugin.numerics.quant_ref import quantize
from awq_plugin.tools import synthetic
from awq_plugin.tools.bench_architectures import _shrink
from greedy import NEAR_TIE_NATS, assert_same_or_near_tie, reference_greedy, vllm_generate_models

GROUP = 32
QUANT = AwqQuantConfig(bits=4, group_size=GROUP)
PROMPTS = [[40, 72, 83, 220, 75, 82], [83, 71, 68, 220, 66], [1, 2, 3, 4, 5, 6], [200, 14, 90, 33, 250]]
NEW_TOKENS = 10
KERNEL_NEAR_TIE_NATS = 1.0  # the CPU kernel's int8 activations (see tests/test_moe.py)
FP_LAYER = 1  # the OLMoE layer whose experts stay in full precision

pytestmark = pytest.mark.full  # > 30 s: one vLLM process with thirteen model loads


#: What vLLM 0.32's loaders need beyond the sweep's shrink.
OVERRIDES: dict[str, dict[str, Any]] = {
    # vLLM's PhiMoE always builds attention and lm_head biases, as Phi-3.5-MoE has them
    "phimoe": dict(attention_bias=True, lm_head_bias=True),
    # vLLM's AFMoE reads routing fields real AFMoE configs carry and transformers 5's lacks
    "afmoe": dict(score_func="sigmoid", route_norm=True, n_group=1, topk_group=1),
    # vLLM's CPU MLA kernels take kv_lora_rank 512 with rope 64 only; its grouped router needs
    # the group fields. Rope as DeepSeek-V3 ships it (YaRN): vLLM 0.32's CPU rotary kernel, which
    # the default rope type reaches, mis-rotates every query head but the first in MLA's 3-D
    # query slice (its PyTorch path and the YaRN class are right), so the default rope type
    # would test that bug rather than the checkpoint.
    "deepseek_v3": dict(
        first_k_dense_replace=1,  # its default (3) would leave the tiny model no MoE layer
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        qk_nope_head_dim=64,
        v_head_dim=64,
        head_dim=64,
        qk_head_dim=128,
        q_lora_rank=None,
        n_group=1,
        topk_group=1,
        topk_method="noaux_tc",  # as V3's config says: vLLM then reads the router's correction bias
        scoring_func="sigmoid",
        max_position_embeddings=163840,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    ),
}
#: transformers 5 names some classes otherwise than vLLM's registry (which then falls back to
#: its Transformers backend): the name real checkpoints carry.
ARCHITECTURES = {"phimoe": "PhiMoEForCausalLM"}


def tiny_config(model_type: str) -> Any:
    """The architecture sweep's tiny config, widened to vLLM's CPU attention (head size 32)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    _shrink(config)
    config.hidden_size, config.head_dim, config.num_attention_heads = 128, 32, 4
    config.vocab_size, config.tie_word_embeddings = 320, False
    for key, value in OVERRIDES.get(model_type, {}).items():
        setattr(config, key, value)
    return config


#: Where each family keeps its routed experts in transformers 5: (MoE block, fused gate+up, fused
#: down, stored [E, in, out] rather than [E, out, in], router weight holder).
EXPERTS = {
    "olmoe": ("mlp", "experts.gate_up_proj", "experts.down_proj", False, "gate"),
    "glm4_moe": ("mlp", "experts.gate_up_proj", "experts.down_proj", False, "gate"),
    "phimoe": ("mlp", "experts.gate_up_proj", "experts.down_proj", False, "router"),
    "flex_olmo": ("mlp", "experts.gate_up_proj", "experts.down_proj", False, "gate"),
    "ernie4_5_moe": ("mlp", "experts.gate_up_proj", "experts.down_proj", False, "gate"),
    "exaone_moe": ("mlp", "experts.gate_up_proj", "experts.down_proj", False, "gate"),
    "afmoe": ("mlp", "experts.gate_up_proj", "experts.down_proj", False, "router.gate"),
    "gpt_oss": ("mlp", "experts.gate_up_proj", "experts.down_proj", True, "router"),
    "llama4_text": ("feed_forward", "experts.gate_up_proj", "experts.down_proj", True, "router"),
    "granitemoe": ("block_sparse_moe", "input_linear.weight", "output_linear.weight", False, "router.layer"),
    "qwen3_next": ("mlp", "experts.gate_up_proj", "experts.down_proj", False, "gate"),
    "deepseek_v3": ("mlp", "experts.gate_up_proj", "experts.down_proj", False, "gate"),
}


def make_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    """Random weights whose experts, biases and router matter (fan-in scaled, as in tests/test_moe.py)."""
    model = synthetic.make_model(tiny_config(model_type), seed=seed, weight_std=1.0, logit_gain=4.0)
    generator = torch.Generator().manual_seed(seed + 1)
    block_name, gate_up, down, in_first, router_name = EXPERTS[model_type]
    with torch.no_grad():
        for layer in model.model.layers:
            block = getattr(layer, block_name)
            if not hasattr(block, gate_up.split(".")[0]):
                continue  # a dense layer (GLM-4-MoE's first)
            for tensor in (block.get_parameter(gate_up), block.get_parameter(down)):
                fan_in = tensor.shape[1] if in_first else tensor.shape[2]
                tensor.copy_(torch.randn(tensor.shape, generator=generator) / fan_in**0.5)
            for name in ("experts.gate_up_proj_bias", "experts.down_proj_bias"):
                if model_type == "gpt_oss":
                    bias = block.get_parameter(name)
                    bias.copy_(torch.randn(bias.shape, generator=generator) * 0.5)
            router = block.get_parameter(f"{router_name}.weight")
            router.copy_(torch.randn(router.shape, generator=generator) * 2.0 / 128**0.5)
    return model.eval()


def quantize_weight(w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """AutoAWQ tensors of one ``[N, K]`` weight (uint4, group 32) and the weight they stand for."""
    gq = quantize(w.float(), QUANT.bits, GROUP, QUANT.zero_point)
    packed = pack(gq)
    tensors = {"qweight": packed.qweight, "qzeros": packed.qzeros, "scales": packed.scales}
    return tensors, gq.dequantize(torch.float32)


def is_router(name: str) -> bool:
    return name.endswith(
        (
            ".mlp.gate.weight",
            ".block_sparse_moe.gate.weight",
            ".router.weight",
            ".router.layer.weight",
            ".router.gate.weight",
        )
    )


#: Fused expert tensors a family's vLLM loader wants per expert: name suffix -> (the MoE block,
#: the per-expert projections its rows split into, stored [E, in, out]). Llama 4 and Granite-MoE keep their
#: experts fused in their own checkpoints; vLLM reads AWQ experts of both per expert, under its
#: default names (``...experts.E.gate_proj``).
SPLIT_PER_EXPERT = {
    ".feed_forward.experts.gate_up_proj": (".feed_forward", ("gate_proj", "up_proj"), True),
    ".feed_forward.experts.down_proj": (".feed_forward", ("down_proj",), True),
    ".block_sparse_moe.input_linear.weight": (".block_sparse_moe", ("gate_proj", "up_proj"), False),
    ".block_sparse_moe.output_linear.weight": (".block_sparse_moe", ("down_proj",), False),
}


def split_per_expert(name: str, t: torch.Tensor, served: dict[str, torch.Tensor]) -> torch.Tensor:
    """Quantize fused experts ``t`` into per-expert triples in ``served``; return the dequantized ``t``."""
    suffix = next(s for s in SPLIT_PER_EXPERT if name.endswith(s))
    block, projections, in_first = SPLIT_PER_EXPERT[suffix]
    module = name.removesuffix(suffix) + block
    dequantized = []
    for e in range(t.shape[0]):
        w = t[e].T if in_first else t[e]  # (out, in): gate rows, then up rows
        parts = w.chunk(len(projections))  # gate first, as both families' forwards read it
        deq_parts = []
        for projection, part in zip(projections, parts):
            tensors, deq = quantize_weight(part)
            served.update({f"{module}.experts.{e}.{projection}.{leaf}": v for leaf, v in tensors.items()})
            deq_parts.append(deq)
        deq = torch.cat(deq_parts)  # (out, in)
        dequantized.append(deq.T if in_first else deq)
    return torch.stack(dequantized).to(t.dtype)


def write_awq_checkpoint(
    source: Path, out: Path, ref: Path, keep_fp: tuple[str, ...] = (), interleave: bool = True
) -> None:
    """Quantize ``source`` by rounding into ``out`` (the served checkpoint) and ``ref`` (its
    dequantized weights under the source's names, for transformers).

    Every 2-D decoder weight but the routers is quantized, per expert where the source stores
    experts per expert; gpt-oss's fused ``experts.gate_up_proj`` ``[E, H, 2I]`` and
    ``experts.down_proj`` ``[E, I, H]`` become stacked ``w13_*`` / ``w2_*`` tensors (``interleave
    =False`` plants a bug: gate and up columns as two halves). Tensors whose names contain a
    pattern of ``keep_fp`` stay as they are, and the patterns go to ``modules_to_not_convert``.
    """
    reader = SafetensorsReader(source)
    served: dict[str, torch.Tensor] = {}
    dense: dict[str, torch.Tensor] = {}
    for name in reader:
        t = reader.get(name)
        dense[name] = t
        if not name.startswith("model.layers.") or any(p in name for p in keep_fp) or is_router(name):
            served[name] = t
        elif name.endswith(tuple(SPLIT_PER_EXPERT)):
            dense[name] = split_per_expert(name, t, served)
        elif name.endswith((".experts.gate_up_proj", ".experts.down_proj")):  # gpt-oss, [E, in, out]
            stem = name.rsplit(".", 1)[0] + (".w13" if name.endswith("gate_up_proj") else ".w2")
            per_expert, dequantized = [], []
            for e in range(t.shape[0]):
                w = t[e].T  # (out, in)
                if stem.endswith("w13") and not interleave:
                    w = torch.cat([w[0::2], w[1::2]])  # the planted bug: halves, not pairs
                tensors, deq = quantize_weight(w)
                per_expert.append(tensors)
                if stem.endswith("w13") and not interleave:
                    half = deq.shape[0] // 2
                    deq = torch.stack([deq[:half], deq[half:]], dim=1).reshape(deq.shape)  # back to pairs
                dequantized.append(deq.T)  # (in, out)
            for leaf in ("qweight", "qzeros", "scales"):
                served[f"{stem}_{leaf}"] = torch.stack([p[leaf] for p in per_expert])  # (E, ...)
            dense[name] = torch.stack(dequantized).to(t.dtype)
        elif name.endswith(".weight") and t.dim() == 2:
            tensors, deq = quantize_weight(t)
            stem = name.removesuffix(".weight")
            served.update({f"{stem}.{leaf}": v for leaf, v in tensors.items()})
            dense[name] = deq.to(t.dtype)
        else:
            served[name] = t
    from safetensors.torch import save_file

    for folder, tensors in ((out, served), (ref, dense)):
        folder.mkdir(parents=True, exist_ok=True)
        for side in source.iterdir():
            if side.suffix != ".safetensors" and side.name != "model.safetensors.index.json":
                shutil.copy(side, folder / side.name)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    quant = AwqQuantConfig(bits=4, group_size=GROUP, modules_to_not_convert=keep_fp)
    config["quantization_config"] = quant.to_quantization_config()
    (out / "config.json").write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    from test_moe import write_byte_tokenizer

    work = tmp_path_factory.mktemp("vllm-moe-families")
    tokenizer = write_byte_tokenizer(work / "tokenizer")
    out: dict[str, dict[str, Path]] = {}
    for model_type, seed in (
        ("olmoe", 0),
        ("gpt_oss", 1),
        ("glm4_moe", 2),
        ("llama4_text", 3),
        ("granitemoe", 4),
        ("phimoe", 6),
        ("flex_olmo", 7),
        ("ernie4_5_moe", 8),
        ("exaone_moe", 9),
        ("afmoe", 10),
    ):
        source = synthetic.write_model(
            work / f"{model_type}-fp", make_model(model_type, seed), tokenizer, torch.float32
        )
        if model_type in ARCHITECTURES:
            config = json.loads((source / "config.json").read_text())
            config["architectures"] = [ARCHITECTURES[model_type]]
            (source / "config.json").write_text(json.dumps(config, indent=2))
        out[model_type] = {"awq": work / f"{model_type}-awq", "ref": work / f"{model_type}-ref"}
        write_awq_checkpoint(source, out[model_type]["awq"], out[model_type]["ref"])
        if model_type not in ("olmoe", "gpt_oss"):
            continue
        if model_type == "olmoe":
            out["olmoe_fp_layer"] = {"awq": work / "olmoe-fplayer-awq", "ref": work / "olmoe-fplayer-ref"}
            write_awq_checkpoint(
                source,
                work / "olmoe-fplayer-awq",
                work / "olmoe-fplayer-ref",
                (f"model.layers.{FP_LAYER}.mlp.experts",),
            )
        else:
            out["gpt_oss_halves"] = {"awq": work / "gpt_oss-halves-awq", "ref": work / "gpt_oss-halves-ref"}
            write_awq_checkpoint(
                source, work / "gpt_oss-halves-awq", work / "gpt_oss-halves-ref", interleave=False
            )
    out["_work"] = {"dir": work}
    return out


RUNS = [  # (name, checkpoint, kernel)
    ("olmoe", "olmoe", "reference"),
    ("olmoe_fp_layer", "olmoe_fp_layer", "reference"),
    ("gpt_oss", "gpt_oss", "reference"),
    ("gpt_oss_cpu", "gpt_oss", "cpu"),
    ("gpt_oss_halves", "gpt_oss_halves", "reference"),
    ("glm4_moe", "glm4_moe", "reference"),
    ("llama4_text", "llama4_text", "reference"),
    ("granitemoe", "granitemoe", "reference"),
    ("phimoe", "phimoe", "reference"),
    ("flex_olmo", "flex_olmo", "reference"),  # vLLM's Transformers backend
    ("ernie4_5_moe", "ernie4_5_moe", "reference"),
    ("exaone_moe", "exaone_moe", "reference"),
    ("afmoe", "afmoe", "reference"),
]


@pytest.fixture(scope="module")
def served(vllm_launch: None, checkpoints: dict[str, dict[str, Path]]) -> dict[str, Any]:
    from awq_plugin.kernels import cpu_kernel_available

    runs = [
        {
            "model": str(checkpoints[ckpt]["awq"]),
            "prompts": PROMPTS,
            "max_tokens": NEW_TOKENS,
            "env": {"AWQ_PLUGIN_KERNEL": kernel},
            "ignore_eos": True,  # the reference generates through EOS as well
        }
        for _, ckpt, kernel in RUNS
        if kernel != "cpu" or cpu_kernel_available()
    ]
    result = vllm_generate_models(runs, checkpoints["_work"]["dir"], timeout=600)
    names = [name for name, _, kernel in RUNS if kernel != "cpu" or cpu_kernel_available()]
    return {"tokens": {n: r["tokens"] for n, r in zip(names, result["runs"])}, "log": result["log"]}


def reference_of(checkpoints: dict[str, dict[str, Path]], ckpt: str) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoints[ckpt]["ref"], dtype=torch.float32).eval()
    return reference_greedy(model, PROMPTS, NEW_TOKENS)


@pytest.mark.parametrize(("name", "ckpt", "kernel"), [r for r in RUNS if r[0] != "gpt_oss_halves"])
def test_vllm_serves_the_family_like_its_dequantized_reference(
    name: str, ckpt: str, kernel: str, checkpoints: dict[str, dict[str, Path]], served: dict[str, Any]
) -> None:
    if name not in served["tokens"]:
        pytest.skip("no AVX-512 VNNI CPU kernel here")
    assert "awq-plugin: AwqPluginMoEMethod using kernel 'reference'" in served["log"]
    threshold = NEAR_TIE_NATS if kernel == "reference" else KERNEL_NEAR_TIE_NATS
    assert_same_or_near_tie(
        reference_of(checkpoints, ckpt), served["tokens"][name], f"vLLM {name}", threshold
    )


def test_the_full_precision_moe_layer_ran_unquantized(served: dict[str, Any]) -> None:
    assert f"awq-plugin: model.layers.{FP_LAYER}.mlp.experts" in served["log"]
    assert "stays in full precision" in served["log"]


def test_a_gate_up_layout_mistake_changes_the_tokens(
    checkpoints: dict[str, dict[str, Path]], served: dict[str, Any]
) -> None:
    """The planted bug (halves instead of interleaved pairs) must not pass the comparison."""
    reference = reference_of(checkpoints, "gpt_oss_halves")  # the intended weights, in pairs
    with pytest.raises(AssertionError):
        assert_same_or_near_tie(
            reference, served["tokens"]["gpt_oss_halves"], "vLLM planted bug", NEAR_TIE_NATS
        )
