"""What a run stores in INT4 and what it keeps in full precision, inside the decoder layers.

Counted: every matrix weight (a parameter with 2 or more dimensions) of the
decoder layers, after the template's resolution (fused experts unfused where
proven). A quantized linear's weight counts as INT4; everything else as full
precision, each with its reason: an MoE router (a small ``[E, H]`` matrix:
routing stays exact, as every loader expects), a linear the template does not
quantize or whose rows or input the packing cannot take, experts whose
per-expert form could not be proven (3-D tensors), convolutions and other
non-linear matrices of SSM mixers. Norms and biases are vectors and are not
counted.

The leaf modules kept in full precision go to ``modules_to_not_convert``:
vLLM and transformers give every linear-like layer the quantized method unless
that list names it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

from awq_plugin.algorithm.linears import QuantConfigT, _skips
from awq_plugin.models.grouped_linear import loaded_name
from awq_plugin.numerics import effective_group_size
from awq_plugin.numerics.pack import PACK_FACTOR
from awq_plugin.templates import ResolvedTemplate

logger = logging.getLogger(__name__)

MAX_LISTED = 12  # full-precision entries printed in a summary (all of them go to the config)


@dataclass
class PrecisionReport:
    """INT4 and full-precision matrix weights of the decoder layers, and why each kept one is kept."""

    int4_weights: int = 0
    fp_weights: int = 0
    full_precision: dict[str, str] = field(default_factory=dict)  # full module name -> reason
    not_convertible: dict[str, str] = field(default_factory=dict)  # kept, but no loader quantizes it

    @property
    def int4_share(self) -> float:
        total = self.int4_weights + self.fp_weights
        return self.int4_weights / total if total else 1.0

    def lines(self) -> list[str]:
        """The summary: the share, then the kept modules grouped by reason and layer-relative name."""
        out = [
            f"decoder matrix weights in INT4: {100 * self.int4_share:.1f}% "
            f"({self.int4_weights:,} INT4, {self.fp_weights:,} full precision)"
        ]
        kept = {**self.full_precision, **self.not_convertible}
        if not kept:
            return out
        by_reason: dict[tuple[str, str], int] = {}
        for name, reason in kept.items():
            key = (_layer_relative(name), reason)
            by_reason[key] = by_reason.get(key, 0) + 1
        out.append("kept in full precision:")
        for i, ((name, reason), count) in enumerate(by_reason.items()):
            if i == MAX_LISTED:
                out.append(f"  ... {len(by_reason) - MAX_LISTED} more (see modules_to_not_convert)")
                break
            layers = f" ({count} layers)" if count > 1 else ""
            out.append(f"  {name}{layers}: {reason}")
        return out

    def as_dict(self) -> dict[str, object]:
        return {
            "int4_weights": self.int4_weights,
            "fp_matrix_weights": self.fp_weights,
            "int4_share": round(self.int4_share, 4),
            "full_precision": {**self.full_precision, **self.not_convertible},
        }


def _layer_relative(name: str) -> str:
    """``model.layers.3.mlp.gate`` -> ``layers.*.mlp.gate`` (the layer index folded away)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join([*parts[max(i - 1, 0) : i], "*", *parts[i + 1 :]])
    return name


def decoder_precision(
    layers: Sequence[nn.Module], resolved: ResolvedTemplate, quant_config: object
) -> PrecisionReport:
    """Count the decoder layers' matrix weights (works on meta-device skeletons: shapes only)."""
    report = PrecisionReport()
    not_quantized = set(resolved.data.get("not_quantized", ()))
    routers = {r for g in resolved.data.get("scaling_layers", ()) for r in g.get("unquantized_readers", ())}
    kept_fused = _kept_fused_reasons(resolved.data.get("unsupported", ()))
    for i, block in enumerate(layers):
        groups = resolved.block(i)
        quantized = set(_quantized_names(block, groups, quant_config))
        for name, module in block.named_modules():
            own = [p for p in module.parameters(recurse=False) if p.dim() >= 2]
            if not own:
                continue
            size = sum(p.numel() for p in own)
            if name in quantized:
                report.int4_weights += size
                continue
            report.fp_weights += size
            full = groups.full_name(loaded_name(block, name))
            leaf = not any(True for _ in module.children())
            reason = _reason(name, module, groups, quant_config, not_quantized, routers, kept_fused)
            if isinstance(module, nn.Linear) or (leaf and _weight_2d(module)) or _is_fused_experts(module):
                report.full_precision[full] = reason
            else:  # parameters of a mixer itself (Mamba's A_log): no loader quantizes those
                report.not_convertible[full] = reason
    return report


def _quantized_names(block: nn.Module, groups: object, quant_config: object) -> list[str]:
    names = []
    for name in groups.linears:
        if _skips(quant_config, groups.full_name(name)):
            continue
        k = block.get_submodule(name).in_features
        if k % effective_group_size(quant_config.group_size, k):
            continue
        names.append(name)
    return names


def _weight_2d(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return weight is not None and weight.dim() >= 2


def _is_fused_experts(module: nn.Module) -> bool:
    from awq_plugin.models.discover_experts import looks_like_experts

    return looks_like_experts(module)


def _kept_fused_reasons(unsupported: Sequence[str]) -> dict[str, str]:
    """``"mlp.experts: fused experts kept in full precision: why"`` entries of an inferred template."""
    out = {}
    for entry in unsupported:
        path, sep, reason = entry.partition(": ")
        if sep and " " not in path:
            out[path] = reason
    return out


def _reason(
    name: str,
    module: nn.Module,
    groups: object,
    quant_config: object,
    not_quantized: set[str],
    routers: set[str],
    kept_fused: Mapping[str, str],
) -> str:
    if _is_fused_experts(module):
        return kept_fused.get(name, "fused experts (3-D tensors) the template does not unfuse")
    if not isinstance(module, nn.Linear):
        if name in routers:
            return "MoE router (routing stays exact)"
        own = [n for n, p in module.named_parameters(recurse=False) if p.dim() >= 2]
        return f"{type(module).__name__} {', '.join(own)}, not a linear's weight"
    if name in routers:
        return "MoE router (routing stays exact)"
    if name in not_quantized or _matches_wildcard(name, not_quantized):
        return "the template keeps it in full precision (not_quantized)"
    if module.out_features % PACK_FACTOR:
        return f"{module.out_features} output rows, not a multiple of {PACK_FACTOR} (INT4 packs {PACK_FACTOR} per int32)"
    g = quant_config.group_size
    if module.in_features % effective_group_size(g, module.in_features):
        return f"in_features {module.in_features} not a multiple of group_size {g}"
    if _skips(quant_config, groups.full_name(name)):
        return "listed in modules_to_not_convert"
    return "in no scaling group and not quantized by the template"


def _matches_wildcard(name: str, patterns: set[str]) -> bool:
    parts = name.split(".")
    for pattern in patterns:
        p = pattern.split(".")
        if len(p) == len(parts) and all(a == b or a == "*" for a, b in zip(p, parts)):
            return True
    return False


def keeping_full_precision_listed(
    layers: Sequence[nn.Module], resolved: ResolvedTemplate, quant_config: QuantConfigT
) -> tuple[QuantConfigT, PrecisionReport]:
    """``quant_config`` with every decoder module kept in full precision in ``modules_to_not_convert``,
    and the report (logged: the share, and the kept modules with their reasons)."""
    report = decoder_precision(layers, resolved, quant_config)
    listed = tuple(getattr(quant_config, "modules_to_not_convert", ()) or ())
    missing = [name for name in report.full_precision if not any(p in name for p in listed)]
    quantized = {
        resolved.block(i).full_name(n)
        for i, block in enumerate(layers)
        for n in _quantized_names(block, resolved.block(i), quant_config)
    }
    clashes = [m for m in missing if any(m in q for q in quantized)]
    if clashes:  # loaders match substrings: listing it would also skip a quantized layer
        logger.warning(
            "full-precision modules %s are prefixes of quantized layer names; they are not listed in "
            "modules_to_not_convert (a loader would skip the quantized layers too)",
            clashes[:4],
        )
        missing = [m for m in missing if m not in clashes]
    log = logger.warning if report.full_precision or report.not_convertible else logger.info
    log("%s", "\n".join(report.lines()))
    if missing and dataclasses.is_dataclass(quant_config):
        quant_config = dataclasses.replace(quant_config, modules_to_not_convert=(*listed, *missing))
    return quant_config, report


__all__ = ["PrecisionReport", "decoder_precision", "keeping_full_precision_listed"]
