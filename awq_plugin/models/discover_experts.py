"""Find a block's fused MoE experts, whatever the family calls them, and prove their per-expert form.

transformers keeps routed experts as 3-D parameters of one module; how they
are stored varies by family (gate and up concatenated or interleaved,
``[E, out, in]`` or transposed ``[E, in, out]``, with or without biases, a
plain ``act(gate) * up`` or a clamped SwiGLU, no gate at all). Most families
declare their storage through transformers' ``use_experts_implementation``
decorator (``has_gate``, ``has_bias``, ``is_transposed``, ``is_concatenated``
on the module, and a ``_apply_gate`` method); the rest are tried against the
few layouts that fit their shapes.

Nothing found here is trusted by name: :func:`prove_unfused` runs the fused
module and the per-expert form built from a candidate layout
(:func:`awq_plugin.models.experts.build_routed_experts`) on random tokens and
random routing, in float32, and accepts the layout only when the outputs agree
to float32 rounding (the fold check's principle). A module whose experts no
candidate reproduces stays fused, in full precision, and the reason is
returned for the report.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from awq_plugin.errors import TemplateError
from awq_plugin.models.experts import ExpertsLayout, RoutedExperts, build_routed_experts, weightless_copy

PROOF_TOLERANCE = 1e-4  # relative output error of a correct unfusing is float32 rounding (~1e-7)
PROOF_TOKENS = 16  # at least; every expert gets one token
SUBSET_EXPERTS = 4  # experts kept when a float32 copy of the whole module would be too large
MAX_PROOF_BYTES = 1 << 30  # float32 copy of the fused module above which a subset is proven
DEFAULT_NAMES = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ExpertsFinding:
    """One fused experts module of a block: the proven layout, or why there is none."""

    path: str  # layer-relative
    layout: ExpertsLayout | None
    reason: str = ""  # why the experts stay fused (layout None)
    error: float | None = None  # the proof's relative error for the accepted layout


def fused_expert_modules(layer: nn.Module) -> dict[str, nn.Module]:
    """Modules of ``layer`` that hold 3-D parameters (fused experts), not inside an unfused one."""
    found: dict[str, nn.Module] = {}
    unfused = [name for name, m in layer.named_modules() if isinstance(m, RoutedExperts)]
    for name, module in layer.named_modules():
        if any(name == u or name.startswith(u + ".") for u in unfused):
            continue
        if looks_like_experts(module):
            found[name] = module
    return found


_EXPERT_TENSOR_NAMES = ("gate_up_proj", "up_proj", "down_proj", "w1", "w2", "w3")


def looks_like_experts(module: nn.Module) -> bool:
    """A module holding routed experts fused: 3-D parameters, and either transformers' experts
    declaration, an experts' tensor name, or "expert" in its class name. Other 3-D parameters
    (convolution kernels, XLNet's per-head attention projections) are not experts."""
    three_d = [n for n, p in module.named_parameters(recurse=False) if p.dim() == 3]
    if not three_d or isinstance(module, nn.modules.conv._ConvNd):
        return False
    return (
        hasattr(module, "is_transposed")
        or any(n in _EXPERT_TENSOR_NAMES for n in three_d)
        or "expert" in type(module).__name__.lower()
    )


def checkpoint_expert_names(model: nn.Module) -> dict[str, tuple[str, str, str]]:
    """Per-expert linear names as the family's checkpoints spell them, by fused-module suffix.

    Read from transformers' load-time conversions (``mlp.experts.*.w1.weight`` +
    ``...w3.weight`` -> ``mlp.experts.gate_up_proj``): the names vLLM's loaders
    and AutoAWQ checkpoints use. Families whose checkpoints store the experts
    fused have no entry (the default names apply).
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter

        transforms = get_model_conversion_mapping(model)
    except Exception:  # an older transformers, or not a PreTrainedModel
        return {}
    gate_up: dict[str, tuple[str, str]] = {}
    single: dict[str, dict[str, str]] = {}  # module -> {"down" | "up": name}
    for t in transforms:
        if not isinstance(t, WeightConverter):
            continue
        parsed = [_expert_pattern(str(s)) for s in t.source_patterns]
        if not parsed or any(p is None for p in parsed) or len({p[0] for p in parsed}) != 1:
            continue
        module = parsed[0][0]
        targets = [str(target) for target in t.target_patterns]
        if len(parsed) == 2:
            gate_up[module] = (parsed[0][1], parsed[1][1])
        elif len(parsed) == 1:
            role = "down" if all(x.endswith("down_proj") for x in targets) else "up"
            single.setdefault(module, {})[role] = parsed[0][1]
    out = {}
    for module in set(gate_up) | set(single):
        gate, up = gate_up.get(module, (DEFAULT_NAMES[0], single.get(module, {}).get("up", DEFAULT_NAMES[1])))
        out[module] = (gate, up, single.get(module, {}).get("down", DEFAULT_NAMES[2]))
    return out


def save_time_transforms(model: nn.Module) -> tuple[list[Any], list[Any]] | None:
    """transformers' save-time key transforms for ``model`` as (renamings, converters), the load
    mapping reversed (without prefix changes); None for an older transformers or no mapping."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange, WeightConverter, WeightRenaming

        transforms = getattr(model, "_weight_conversions", None)
        if transforms is None:
            transforms = get_model_conversion_mapping(model, add_legacy=False)
            transforms = [t for t in transforms if not isinstance(t, PrefixChange)]
        reverse = [t.reverse_transform() for t in transforms[::-1]]
    except Exception:  # an older transformers, or not a PreTrainedModel
        return None
    return (
        [t for t in reverse if isinstance(t, WeightRenaming)],
        [t for t in reverse if isinstance(t, WeightConverter)],
    )


def layer_prefix_renames(model: nn.Module, layers_path: str, within: str | None = None) -> dict[str, str]:
    """Layer-relative module prefixes the family's checkpoints spell differently (model -> stored).

    PhiMoE's model calls its MoE block ``mlp`` and its router ``mlp.router``; its checkpoints (and
    vLLM's loader) say ``block_sparse_moe`` and ``block_sparse_moe.gate``. Read from transformers'
    save-time renaming of the decoder layers' tensors (converted experts included, by the module
    their stored pattern names), most specific prefix first: the ``checkpoint_names`` a template
    would state. ``within``: only prefixes inside that layer-relative module (an MoE block).
    Experts a family stores fused (Granite's ``input_linear``) keep the model's module name: their
    per-expert AWQ tensors have no stored spelling to follow.
    """
    reverse = save_time_transforms(model)
    if reverse is None:
        return {}
    from transformers.core_model_loading import rename_source_key

    renamings, converters = reverse
    prefix = layers_path + "."
    renames: dict[str, str] = {}
    modules = {name for name, _ in model.named_modules()}
    for name, param in model.named_parameters():
        if not name.startswith(prefix):
            continue
        try:
            stored, _pattern = rename_source_key(name, renamings, converters, reverse=True)
        except Exception:
            return {}
        if not stored.startswith(prefix) or (param.dim() == 3 and ".*." not in stored):
            continue
        model_rel = name[len(prefix) :].split(".", 1)[1].rsplit(".", 1)[0]  # module, no layer index
        stored_rel = stored[len(prefix) :].split(".", 1)[1]
        a = model_rel.split(".")
        if (
            ".*." in stored_rel
        ):  # fused experts stored per expert: "mlp.experts" -> "block_sparse_moe.experts"
            b = stored_rel.split(".*.", 1)[0].split(".")
            while len(a) > 1 and len(b) > 1 and a[-1] == b[-1]:  # the block's name is what differs
                a, b = a[:-1], b[:-1]
        else:  # one module renamed or moved (ERNIE's mlp.gate.moe_statics -> mlp.moe_statics)
            b = stored_rel.rsplit(".", 1)[0].split(".")
        key = ".".join(a)
        layer = name[len(prefix) :].split(".", 1)[0]
        if f"{prefix}{layer}.{'.'.join(b)}" in modules:
            continue  # a tensor moved to another existing module (Laguna's bias), not a renamed module
        if a != b and (within is None or key == within or key.startswith(within + ".")):
            renames.setdefault(key, ".".join(b))
    return dict(sorted(renames.items(), key=lambda kv: -kv[0].count(".")))


def _expert_pattern(pattern: str) -> tuple[str, str] | None:
    """``"mlp.experts.*.gate_proj.weight"`` -> ``("mlp.experts", "gate_proj")``; None for other patterns."""
    head, star, tail = pattern.replace("\\", "").partition(".*.")  # patterns are regexes: unescape
    if not star or not tail.endswith(".weight") or "*" in tail:
        return None
    return head.strip(".^$"), tail[: -len(".weight")]


def names_for(path: str, names: Mapping[str, tuple[str, str, str]]) -> tuple[str, str, str]:
    for suffix, triple in names.items():
        if path == suffix or path.endswith("." + suffix):
            return triple
    return DEFAULT_NAMES


def _call_kind(module: nn.Module) -> str | None:
    """ "routed" (hidden, top_k_index, top_k_weights) or "stacked" (hidden alone), from the signature."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind == p.VAR_POSITIONAL for p in params) or len(positional) >= 3:
        return "routed"
    return "stacked" if len(positional) == 1 else None


def candidate_layouts(
    path: str, module: nn.Module, names: tuple[str, str, str] = DEFAULT_NAMES
) -> tuple[list[ExpertsLayout], str]:
    """Layouts worth proving for one fused module, most likely first, or ([], the reason there are none)."""
    gate, up, down = names
    three_d = {n: tuple(p.shape) for n, p in module.named_parameters(recurse=False) if p.dim() == 3}
    declared = all(hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed", "is_concatenated"))
    if declared:  # transformers' use_experts_implementation states the storage
        has_gate = bool(module.has_gate)
        fused_up = "gate_up_proj" if has_gate else "up_proj"
        bias = bool(module.has_bias)
        layout = ExpertsLayout(
            module=path,
            gate=gate,
            up=up,
            down=down,
            fused_gate_up=fused_up,
            fused_down="down_proj",
            transposed=bool(module.is_transposed),
            interleaved=has_gate and not bool(module.is_concatenated),
            gate_up_bias=f"{fused_up}_bias" if bias else None,
            down_bias="down_proj_bias" if bias else None,
            gating="apply_gate"
            if has_gate and hasattr(module, "_apply_gate")
            else ("act_mul" if has_gate else "act_only"),
            call="routed",
        )
        return [layout], ""
    call = _call_kind(module)
    if "gate_up_proj" not in three_d or "down_proj" not in three_d:
        return [], f"3-D parameters {sorted(three_d)} in {type(module).__name__}: no known expert layout"
    if call is None:
        return (
            [],
            f"{type(module).__name__}.forward takes neither (hidden, top_k_index, top_k_weights) nor (hidden)",
        )
    if not callable(getattr(module, "act_fn", None)):
        return [], f"{type(module).__name__} has no act_fn: its gating is unknown"
    biases = {
        "gate_up_bias": "gate_up_proj_bias" if hasattr(module, "gate_up_proj_bias") else None,
        "down_bias": "down_proj_bias" if hasattr(module, "down_proj_bias") else None,
    }
    base = ExpertsLayout(module=path, gate=gate, up=up, down=down, call=call, **biases)
    # Interleaved gate/up is declared by the families that use it (gpt-oss); a loader could not
    # tell it from concatenated by shapes, so undeclared modules are tried concatenated only.
    return [replace(base, transposed=transposed) for transposed in (False, True)], ""


def layout_without_proof(
    path: str, module: nn.Module, names: tuple[str, str, str] = DEFAULT_NAMES
) -> ExpertsLayout | None:
    """The layout a loader assumes for a fused module it cannot run (weights on meta): the first
    candidate whose shapes fit. The quantizer proved the same choice on the real weights
    (candidates are tried in the same order, and for a layout the shapes fix, the proof picks it
    too); a module it could not prove is listed in ``modules_to_not_convert`` and not unfused."""
    candidates, _ = candidate_layouts(path, module, names)
    for layout in candidates:
        try:
            build_routed_experts(module, layout, path)  # views only: cheap, also on meta
        except TemplateError:
            continue
        return layout
    return None


def _reference_copy(fused: nn.Module, max_bytes: int, generator: torch.Generator) -> tuple[nn.Module, int]:
    """A float32 copy of ``fused`` (or of a few of its experts, renumbered) and its number of experts."""
    tensors = list(fused.parameters(recurse=False))
    n_experts = next(p.shape[0] for p in tensors if p.dim() == 3)
    size = 4 * sum(p.numel() for p in tensors)
    if size <= max_bytes:
        return copy.deepcopy(fused).float(), n_experts
    # Too large to copy: a weightless copy holding a few experts, with every integer attribute
    # equal to the expert count set to the new count (the forward loops over range(num_experts)).
    keep = torch.randperm(n_experts, generator=generator)[:SUBSET_EXPERTS].sort().values
    shell = weightless_copy(fused)
    for name, p in fused.named_parameters(recurse=False):
        data = p.detach()[keep] if p.dim() >= 2 and p.shape[0] == n_experts else p.detach()
        shell._parameters[name] = nn.Parameter(data.float().clone(), requires_grad=False)
    for key, value in vars(fused).items():
        if isinstance(value, int) and not isinstance(value, bool) and value == n_experts:
            setattr(shell, key, len(keep))
    return shell, len(keep)


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"the experts module returned {type(out).__name__}, not a tensor")


@torch.no_grad()
def prove_unfused(
    fused: nn.Module, layout: ExpertsLayout, seed: int = 0, max_bytes: int = MAX_PROOF_BYTES
) -> float:
    """Relative error between ``fused`` and its per-expert form under ``layout``, float32.

    Random hidden states, random top-k routing with random weights, every
    expert routed at least one token (a stacked module gets random rows for
    every expert). Raises :class:`TemplateError` if either form cannot run.
    """
    generator = torch.Generator().manual_seed(seed)
    reference, n_experts = _reference_copy(fused, max_bytes, generator)
    # The proof is about the layout, not the weights: random ones (biases too, often zero at
    # initialisation) make every tensor's role visible.
    for p in reference.parameters(recurse=False):
        p.data.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p.shape[-1]))
    routed = build_routed_experts(reference, layout, f"experts module {layout.module!r}")
    _check_roles(routed, layout, generator)
    hidden = routed[0].get_submodule(layout.down).out_features
    tokens = max(PROOF_TOKENS, n_experts)
    try:
        if layout.call == "stacked":
            x = _spread(torch.randn(n_experts * tokens, hidden, generator=generator))
            args: tuple[Any, ...] = (x,)
        else:
            x = _spread(torch.randn(tokens, hidden, generator=generator))
            k = min(2, n_experts)
            order = torch.rand(tokens, n_experts, generator=generator).argsort(dim=-1)[:, :k]
            first = torch.arange(tokens) % n_experts  # every expert gets a token
            order[:, 0] = first
            if k > 1:  # keep the slots distinct
                clash = order[:, 1] == first
                order[clash, 1] = (first[clash] + 1) % n_experts
            weights = torch.rand(tokens, k, generator=generator) + 0.1
            args = (x, order, weights)
        expected = _first_tensor(reference(*args)).float()
        actual = routed(*args).float()
    except TemplateError:
        raise
    except Exception as exc:  # a layout whose shapes do not even run
        raise TemplateError(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    if expected.shape != actual.shape:
        raise TemplateError(
            f"output shapes differ: fused {tuple(expected.shape)}, per-expert {tuple(actual.shape)}"
        )
    scale = float(expected.double().norm())
    if not scale or not torch.isfinite(expected).all():
        raise TemplateError(
            "the fused module's output on random inputs is zero or not finite: nothing to compare"
        )
    return float((actual.double() - expected.double()).norm()) / scale


def _spread(x: torch.Tensor) -> torch.Tensor:
    """Every other row 8x larger: pre-activations reach the clamps of clamped SwiGLUs (limit ~7)."""
    x[::2] *= 8
    return x


GATE_OFF = -30.0  # a gate pre-activation every gated activation maps to ~0 (silu, gelu, relu, sigmoid-glu)


def _check_roles(routed: RoutedExperts, layout: ExpertsLayout, generator: torch.Generator) -> None:
    """The rows the layout calls the gate act as the gate: switched off, they zero the expert.

    The proof alone cannot tell: with a gating that re-fuses gate and up before use
    (``apply_gate``), reading the fused rows in the wrong order and writing them back in the
    same wrong order computes the same function, while the per-expert linears named gate and up
    would hold a mix of both (wrong for every loader that reads them by name).
    """
    if not layout.has_gate:
        return
    gating = routed[0].gating
    inter = routed[0].get_submodule(layout.up).out_features
    values = 2 * torch.randn(8, inter, generator=generator)
    off = torch.full((8, inter), GATE_OFF)
    gate_off = gating(off, values).double().abs().max()
    up_off = gating(values, off).double().abs().max()
    if not (gate_off < 1e-6 * max(float(up_off), 1e-30)):
        raise TemplateError(
            f"the rows read as the gate do not gate: switching them off leaves {float(gate_off):.3g} "
            f"(switching the up rows off leaves {float(up_off):.3g})"
        )


def discover_experts(
    layer: nn.Module, names: Mapping[str, tuple[str, str, str]] | None = None, seed: int = 0
) -> list[ExpertsFinding]:
    """Every fused experts module of ``layer``: its proven layout, or the reason it stays fused."""
    findings = []
    for path, module in fused_expert_modules(layer).items():
        candidates, reason = candidate_layouts(path, module, names_for(path, names or {}))
        errors = []
        accepted = None
        for layout in candidates:
            try:
                error = prove_unfused(module, layout, seed)
            except TemplateError as exc:
                errors.append(f"{_describe(layout)}: {exc}")
                continue
            if error <= PROOF_TOLERANCE:
                accepted = ExpertsFinding(path, layout, error=error)
                break
            errors.append(f"{_describe(layout)}: output differs by {error:.3g} (relative)")
        if accepted is None:
            why = reason or "no candidate layout reproduces the fused module (" + "; ".join(errors) + ")"
            findings.append(ExpertsFinding(path, None, why))
        else:
            findings.append(accepted)
    return findings


def _describe(layout: ExpertsLayout) -> str:
    storage = "[E, in, out]" if layout.transposed else "[E, out, in]"
    order = "interleaved" if layout.interleaved else "concatenated"
    return f"{storage} {order} gate/up, {layout.gating}"


__all__ = [
    "ExpertsFinding",
    "candidate_layouts",
    "checkpoint_expert_names",
    "discover_experts",
    "fused_expert_modules",
    "layer_prefix_renames",
    "layout_without_proof",
    "looks_like_experts",
    "names_for",
    "prove_unfused",
    "save_time_transforms",
]
