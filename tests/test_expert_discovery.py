"""Fused MoE experts found in every family the architecture sweep builds, and their per-expert form proven.

Each family is built as the sweep builds it (``tools.bench_architectures._shrink``: hidden 64, 2
layers, 4 experts, random weights). For every fused experts module of every decoder layer, the
per-expert form derived by :mod:`awq_plugin.models.discover_experts` must reproduce the fused
module on random tokens and random routing (relative error at float32 rounding), or the family
must be one of the few whose experts are documented as unprovable (kept in full precision,
listed in the README). Planted defects (a layout with gate and up swapped, interleaved read as
concatenated, the wrong transposition) must fail the same proof.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings

import pytest
import torch

from awq_plugin.errors import TemplateError
from awq_plugin.models.discover_experts import (
    PROOF_TOLERANCE,
    checkpoint_expert_names,
    discover_experts,
    fused_expert_modules,
    layout_without_proof,
    names_for,
    prove_unfused,
)
from awq_plugin.templates.infer import find_decoder_layers

# (mapping, model_type) of every family the sweep builds with fused 3-D experts in its decoder
# layers (transformers 5.19). tests/test_expert_discovery.py::test_family_list_is_complete checks
# the list against every buildable type (make test-all).
MOE_FAMILIES = [
    ("causal-lm", t)
    for t in [
        "afmoe",
        "aria_text",
        "axk1",
        "axk2",
        "cohere2_moe",
        "deepseek_v2",
        "deepseek_v32",
        "deepseek_v4",
        "ernie4_5_moe",
        "exaone_moe",
        "flex_olmo",
        "glm4_moe",
        "glm4_moe_lite",
        "glm_moe_dsa",
        "gpt_oss",
        "granitemoe",
        "granitemoe_swa",
        "granitemoehybrid",
        "granitemoeshared",
        "hy_v3",
        "jamba",
        "jetmoe",
        "kimi_linear",
        "llama4_text",
        "longcat_flash",
        "mellum",
        "mimo_v2_flash",
        "minimax",
        "minimax_m2",
        "minimax_m3_vl_text",
        "mixtral",
        "nemotron_h",
        "olmoe",
        "phimoe",
        "qwen2_moe",
        "qwen3_5_moe",
        "qwen3_moe",
        "qwen3_next",
        "solar_open",
        "hy_v4",
        "inkling_text",
        "laguna",
        "llama4",
        "qwen3_5_moe_text",
        "zaya",
    ]
] + [
    ("image-text-to-text", t)
    for t in [
        "aria",
        "ernie4_5_vl_moe",
        "glm4v_moe",
        "llama4",
        "minimax_m3_vl",
        "qwen3_omni_moe_thinker",
        "qwen3_vl_moe",
        "glm5_next",
        "inkling_mm_model",
        "mistral4",
        "nemotron_h_omni",
        "qwen3_5_moe",
        "step3p7",
    ]
]

# Expert modules of otherwise proven families that stay fused (reported, full precision).
UNPROVABLE_CLASSES = {
    "InklingSharedExperts": "gate, up and down as three separate 3-D tensors applied to every token",
}
# Families whose experts no layout reproduces, with the reason (README: "Experts kept in full precision").
UNPROVABLE = {
    "jetmoe": "JetMoE's ParallelExperts take (inputs sorted by expert, expert_size), not a routing",
    "longcat_flash": "LongCat-Flash's 'zero experts' (identity) share the routed index space",
}


def build_tiny(mapping: str, model_type: str) -> torch.nn.Module:
    from awq_plugin.tools.bench_architectures import build_tiny_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            return build_tiny_model(model_type, mapping)
        finally:
            logging.disable(logging.NOTSET)


def _layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    return model.get_submodule(find_decoder_layers(model))


@pytest.mark.parametrize(("mapping", "model_type"), MOE_FAMILIES, ids=[t for _, t in MOE_FAMILIES])
def test_unfused_experts_reproduce_the_fused_module(mapping: str, model_type: str) -> None:
    model = build_tiny(mapping, model_type)
    names = checkpoint_expert_names(model)
    found = [(layer, f) for layer in _layers(model) for f in discover_experts(layer, names)]
    findings = [
        f
        for layer, f in found
        if f.layout is not None or type(layer.get_submodule(f.path)).__name__ not in UNPROVABLE_CLASSES
    ]
    assert findings, f"{model_type}: no fused experts found in the decoder layers"
    if model_type in UNPROVABLE:
        assert all(f.layout is None and f.reason for f in findings), findings
        return
    for f in findings:
        assert f.layout is not None, f"{model_type} {f.path}: {f.reason}"
        assert f.error is not None and f.error <= PROOF_TOLERANCE
    # A loader building the skeleton on meta (no weights to prove with) picks the same layout.
    for layer in _layers(model):
        for path, module in fused_expert_modules(layer).items():
            assumed = layout_without_proof(path, module, names_for(path, names))
            proven = next(f.layout for f in discover_experts(layer, names) if f.path == path)
            assert assumed == proven, (model_type, path)


def _first_experts(mapping: str, model_type: str) -> tuple[torch.nn.Module, object]:
    model = build_tiny(mapping, model_type)
    for layer in _layers(model):
        for f in discover_experts(layer, checkpoint_expert_names(model)):
            if f.layout is not None:
                return layer.get_submodule(f.path), f.layout
    raise AssertionError(f"{model_type}: no proven experts")


@pytest.mark.parametrize(
    ("model_type", "defect"),
    [
        ("olmoe", {"interleaved": True}),  # concatenated gate/up read as interleaved
        ("gpt_oss", {"interleaved": False}),  # interleaved gate/up read as concatenated
        ("gpt_oss", {"gate_up_bias": None, "down_bias": None}),  # biases forgotten
        ("llama4_text", {"transposed": False}),  # [E, in, out] read as [E, out, in]
        ("deepseek_v4", {"gating": "act_mul"}),  # the clamped SwiGLU taken for a plain one
    ],
)
def test_a_wrong_layout_fails_the_proof(model_type: str, defect: dict) -> None:
    module, layout = _first_experts("causal-lm", model_type)
    assert prove_unfused(module, layout) <= PROOF_TOLERANCE
    wrong = dataclasses.replace(layout, **defect)
    try:
        error = prove_unfused(module, wrong)
    except TemplateError as exc:  # the gate rows do not gate, or the shapes do not even fit
        assert "do not gate" in str(exc) or "expected" in str(exc) or "Error" in str(exc), exc
        return
    assert error > 100 * PROOF_TOLERANCE, (model_type, defect, error)


def test_a_large_module_is_proven_on_a_subset_of_its_experts() -> None:
    module, layout = _first_experts("causal-lm", "olmoe")
    assert prove_unfused(module, layout, max_bytes=0) <= PROOF_TOLERANCE  # 4 experts renumbered
    wrong = dataclasses.replace(layout, interleaved=True)
    with pytest.raises(TemplateError, match="do not gate"):
        prove_unfused(module, wrong, max_bytes=0)


@pytest.mark.full
def test_family_list_is_complete() -> None:
    """Every type the sweep can build whose decoder layers hold fused 3-D experts is in MOE_FAMILIES."""
    from awq_plugin.tools.bench_architectures import model_types

    listed = set(MOE_FAMILIES)
    missing = []
    for mapping in ("causal-lm", "image-text-to-text"):
        for model_type in model_types(mapping):
            try:
                model = build_tiny(mapping, model_type)
                layers = _layers(model)
            except Exception:  # not buildable: not in the sweep's results either
                continue
            if (mapping, model_type) not in listed and any(fused_expert_modules(layer) for layer in layers):
                missing.append((mapping, model_type))
    assert not missing, f"MoE families the sweep builds but the test does not prove: {missing}"


def _quantize_tiny(tmp_path, model_type: str, method: str = "rtn"):
    from awq_plugin.api import quantize

    src, out = tmp_path / "src", tmp_path / "awq"
    build_tiny("causal-lm", model_type).save_pretrained(src)
    ids = torch.randint(1, 400, (2, 32), generator=torch.Generator().manual_seed(0))
    return quantize(str(src), "uint4_wo_32", ids, out_dir=out, method=method, progress=False), out


def test_every_quantize_reports_the_int4_share_and_lists_what_stays_full_precision(tmp_path) -> None:
    from awq_plugin.format.checkpoint import read_json

    report, out = _quantize_tiny(tmp_path, "olmoe")
    precision = report.precision
    assert precision["int4_share"] >= 0.99, precision
    routers = [f"model.layers.{i}.mlp.gate" for i in range(2)]
    assert precision["full_precision"] == dict.fromkeys(routers, "MoE router (routing stays exact)")
    assert any(line.startswith("decoder matrix weights in INT4: 99.") for line in report.precision_lines)
    assert "decoder matrix weights in INT4" in report.render()
    kept = read_json(out / "config.json")["quantization_config"]["modules_to_not_convert"]
    assert kept == routers


def test_unprovable_experts_are_kept_fused_reported_and_listed(tmp_path, monkeypatch) -> None:
    from awq_plugin.format.checkpoint import SafetensorsReader, read_json
    from awq_plugin.models import discover_experts as module

    monkeypatch.setattr(module, "candidate_layouts", lambda path, m, names=None: ([], "no layout (planted)"))
    report, out = _quantize_tiny(tmp_path, "olmoe")
    assert report.precision["int4_share"] < 0.2  # attention only
    fused = [f"model.layers.{i}.mlp.experts" for i in range(2)]
    for name in fused:
        assert "no layout (planted)" in report.precision["full_precision"][name]
    kept = read_json(out / "config.json")["quantization_config"]["modules_to_not_convert"]
    assert set(fused) <= set(kept)
    assert "model.layers.0.mlp.experts.gate_up_proj" in SafetensorsReader(out)
