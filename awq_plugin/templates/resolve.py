"""The resolver: a validated template checked, name by name, against a live (or meta) model."""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from awq_plugin.errors import TemplateError
from awq_plugin.models import as_plain_linears, has_submodule
from awq_plugin.models.experts import ExpertsLayout, unfuse_experts
from awq_plugin.numerics.pack import PACK_FACTOR
from awq_plugin.templates.layer_config import config_of_layer
from awq_plugin.templates.schema import (
    WILDCARD,
    BlockTemplate,
    ResolvedTemplate,
    ScalingGroup,
    validate_template_data,
)
from awq_plugin.templates.shipped import find_shipped_template, load_template

logger = logging.getLogger(__name__)

INFER = "infer"  # template= value asking for a template inferred from the model itself


def _expand(name: str, index: int) -> str:
    return name.replace(WILDCARD, str(index))


def _expand_all(names: Sequence[str], n_experts: int) -> list[str]:
    """Every name with ``*`` replaced by each expert index in turn (others unchanged)."""
    out: list[str] = []
    for name in names:
        out += [_expand(name, e) for e in range(n_experts)] if WILDCARD in name else [name]
    return out


def _expand_groups(
    groups: Sequence[Mapping[str, Any]], n_experts: int, with_experts: bool = True
) -> list[tuple[str, dict[str, Any]]]:
    """(field for messages, group) with the expert wildcards expanded for ``n_experts`` experts.

    ``with_experts`` False (a layer without the experts module): groups naming experts are left out.
    """
    out: list[tuple[str, dict[str, Any]]] = []
    for gi, group in enumerate(groups):
        field = f"scaling_layers[{gi}]"
        if not with_experts and any(WILDCARD in n for n in (group["prev_op"], *group["layers"])):
            continue
        if WILDCARD in group["prev_op"]:
            for e in range(n_experts):
                spec = dict(group)
                for key in ("prev_op", "inp", "module2inspect"):
                    if spec[key] is not None:
                        spec[key] = _expand(spec[key], e)
                spec["layers"] = [_expand(n, e) for n in group["layers"]]
                spec["unquantized_readers"] = [_expand(n, e) for n in group["unquantized_readers"]]
                out.append((f"{field} (expert {e})", spec))
        else:
            spec = dict(group)
            spec["layers"] = _expand_all(group["layers"], n_experts)
            spec["unquantized_readers"] = _expand_all(group["unquantized_readers"], n_experts)
            out.append((field, spec))
    return out


# ---------------------------------------------------------------------------------------------
# Resolution against a model
# ---------------------------------------------------------------------------------------------


def resolve_template(
    model_or_config: nn.Module | Any, template: str | Path | Mapping[str, Any] | None = None
) -> ResolvedTemplate:
    """Pick, validate and check a template against a model; raise :class:`TemplateError` on any mismatch.

    ``model_or_config`` is the model (its weights may live on the ``meta``
    device) or a transformers config, from which a meta-device skeleton is
    built. ``template`` is None (look up a shipped template by
    ``architectures[0]``, then ``model_type``), a shipped template's name, a
    path to a JSON file, a dict, or ``"infer"``. With None and no shipped
    template, a model with real weights gets a template inferred from its own
    data flow (:mod:`awq_plugin.templates.infer`); a meta-device model gets
    an error naming the fix. Every name in the template is checked in
    every decoder layer; a name that matches nothing raises an error naming the
    template, the field, the layer and the closest existing names.
    """
    model = _as_model(model_or_config)
    config = getattr(model, "config", None)
    if template == INFER:
        data, source = _inferred(model)
    elif template is None:
        architectures = getattr(config, "architectures", None) or [type(model).__name__]
        try:
            data, source = find_shipped_template(architectures[0], getattr(config, "model_type", None))
        except TemplateError as exc:
            if not _has_weights(model):
                raise
            logger.warning("%s; inferring the scaling groups from the model's own data flow instead", exc)
            data, source = _inferred(model)
    else:
        data, source = load_template(template)
    where = f"'{data['name']}' from {source}"
    _check_config_requirements(data, config, where)
    layers = _find_module(model, data["model_decoder_layers"], where, "model_decoder_layers")
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise TemplateError(
            f"architecture template {where}: field 'model_decoder_layers' = {data['model_decoder_layers']!r} "
            f"is a {type(layers).__name__}, expected a non-empty nn.ModuleList of decoder layers"
        )
    for gi, group in enumerate(data["scaling_layers"]):
        beyond = [i for i in group["decoder_layers"] or () if i >= len(layers)]
        if beyond:
            raise TemplateError(
                f"architecture template {where}: field 'scaling_layers[{gi}].decoder_layers' names layers "
                f"{beyond}, but the model has {len(layers)} decoder layers"
            )
    non_layer = {}
    for role, path in data["non_layer_modules"].items():
        _find_module(model, path, where, f"non_layer_modules.{role}")
        non_layer[role] = path
    layout = ExpertsLayout(**data["experts"]) if data["experts"] is not None else None
    if layout is not None:
        for i, layer in enumerate(layers):
            if not layout.every_layer and not has_submodule(layer, layout.module):
                continue  # a dense layer of a model whose other layers route to experts
            _find_module(
                layer, layout.module, where, "experts.module", f"decoder layer {i} ({type(layer).__name__})"
            )
            # Every AWQ step works on nn.Linear: fused 3-D expert weights become per-expert linears.
            unfuse_experts(layer, layout, f"architecture template {where}, decoder layer {i}")
    blocks = tuple(
        _resolve_block(
            layer, i, f"{data['model_decoder_layers']}.{i}", data, config_of_layer(config, i), where, layout
        )
        for i, layer in enumerate(layers)
    )
    for part in data["unsupported"]:
        logger.warning("template %s does not cover %s", where, part)
    return ResolvedTemplate(
        name=data["name"],
        source=source,
        decoder_layers=data["model_decoder_layers"],
        non_layer_modules=non_layer,
        blocks=blocks,
        unsupported=tuple(data["unsupported"]),
        notes=data["notes"],
        data=data,
        experts=layout,
        checkpoint_names=dict(data["checkpoint_names"]),
    )


def _has_weights(model: nn.Module) -> bool:
    """True when no parameter is on the meta device (inference needs to run the model)."""
    return all(p.device.type != "meta" for p in model.parameters())


def _inferred(model: nn.Module) -> tuple[dict[str, Any], str]:
    """A template inferred from ``model`` (every fold proven), validated like a user's."""
    from awq_plugin.templates.infer import infer_template  # imports the fold machinery

    if not _has_weights(model):
        raise TemplateError(
            "inferring a template needs the model's weights (its parameters are on the meta device); "
            "run 'awq-plugin template infer MODEL_DIR' and pass the result with --template"
        )
    data, report = infer_template(model)
    report.warn_unscaled(logger)
    return validate_template_data(data, "<inferred>"), "the model's data flow (inferred, every fold proven)"


def _as_model(model_or_config: Any) -> nn.Module:
    if isinstance(model_or_config, nn.Module):
        as_plain_linears(model_or_config)  # Conv1D, grouped linears: plain nn.Linear, in place
        return model_or_config
    # A config: build the module tree without allocating weights (names are all we need).
    from awq_plugin.models.auto import auto_model_class

    with torch.device("meta"):
        model = auto_model_class(model_or_config).from_config(model_or_config)
    as_plain_linears(model)  # a grouped linear's parts have names of their own
    return model


def _check_config_requirements(data: Mapping[str, Any], config: Any, where: str) -> None:
    for key, wanted in data["config_requirements"].items():
        actual = getattr(config, key, None)
        if isinstance(actual, tuple):
            actual = list(actual)
        if actual != wanted:
            raise TemplateError(
                f"architecture template {where}: field 'config_requirements.{key}' wants {wanted!r} but the "
                f"model config has {actual!r}; this template does not describe that variant"
            )


def _find_module(root: nn.Module, path: str, where: str, field: str, context: str = "the model") -> nn.Module:
    """``root.get_submodule(path)`` with an error naming the field and the closest existing names."""
    try:
        return root.get_submodule(path)
    except AttributeError:
        pass
    names = [n for n, _ in root.named_modules() if n]
    close = difflib.get_close_matches(path, names, n=3, cutoff=0.5)
    hint = f"; close matches: {close}" if close else f"; modules there include: {names[:12]}"
    raise TemplateError(
        f"architecture template {where}: field '{field}' = {path!r} matches no module in {context}{hint}"
    )


def _resolve_block(
    layer: nn.Module,
    index: int,
    prefix: str,
    data: Mapping[str, Any],
    config: Any,
    where: str,
    layout: ExpertsLayout | None = None,
) -> BlockTemplate:
    context = f"decoder layer {index} ({type(layer).__name__})"
    has_experts = layout is not None and has_submodule(layer, layout.module)
    n_experts = len(layer.get_submodule(layout.module)) if has_experts else 0
    all_linears = [name for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)]
    lists = {
        field: _expand_all(data[field], n_experts) for field in ("not_quantized", "unscaled", "clip_skip")
    }
    if layout is not None and not has_experts:  # a dense layer has no router to keep
        routers = {
            r
            for g in data["scaling_layers"]
            if any(WILDCARD in n for n in g["layers"])
            for r in g["unquantized_readers"]
        }
        lists["not_quantized"] = [n for n in lists["not_quantized"] if n not in routers]
    for field, names in lists.items():
        for i, name in enumerate(names):
            _find_linear(layer, name, where, f"{field}[{i}]", context)
    not_quantized = set(lists["not_quantized"])
    groups = []
    scaled: dict[str, str] = {}
    # Groups naming experts ('*') apply to the layers that have them (all of them unless the
    # layout says otherwise).
    for field, spec in _expand_groups(data["scaling_layers"], n_experts, with_experts=has_experts):
        if spec["decoder_layers"] is not None and index not in spec["decoder_layers"]:
            continue  # a hybrid stack's group of another block kind
        group = _resolve_group(layer, spec, field, data, config, where, context)
        for name in group.layers:
            if name in scaled:
                raise TemplateError(
                    f"architecture template {where}: linear '{name}' is in the layers of two groups "
                    f"({scaled[name]} and {field}); a linear's input can be scaled only once"
                )
            if name in not_quantized:
                raise TemplateError(
                    f"architecture template {where}: linear '{name}' is listed in 'not_quantized' and scaled "
                    f"by {field}; scaling an unquantized linear gains nothing"
                )
            scaled[name] = field
        for name in group.readers:
            module = layer.get_submodule(name)
            packable = isinstance(module, nn.Linear) and module.out_features % PACK_FACTOR == 0
            if packable and name not in not_quantized:
                raise TemplateError(
                    f"architecture template {where}: '{name}' is an unquantized reader of {field} but is "
                    "not listed in 'not_quantized'; list it there, or move it to the group's layers"
                )
        groups.append(group)
    # int4 packs PACK_FACTOR output rows to an int32: a linear with fewer or a remainder (a small
    # router or gate) stays in full precision, as 'not_quantized' would keep it.
    unpackable = [
        n
        for n in all_linears
        if n not in scaled and n not in not_quantized and layer.get_submodule(n).out_features % PACK_FACTOR
    ]
    if unpackable:
        logger.info(
            "%s: %s kept in full precision (output rows not a multiple of %d)",
            context,
            unpackable,
            PACK_FACTOR,
        )
    linears = tuple(n for n in all_linears if n not in not_quantized and n not in unpackable)
    unscaled = tuple(n for n in linears if n not in scaled)
    uncovered = [n for n in unscaled if n not in lists["unscaled"]]
    if uncovered and index == 0:
        logger.warning(
            "template '%s': linears %s of %s are in no scaling group and not listed in 'unscaled'; "
            "they will be quantized without an AWQ scale",
            data["name"],
            uncovered,
            context,
        )
    return BlockTemplate(
        index=index,
        prefix=prefix,
        groups=tuple(groups),
        linears=linears,
        clip_skip=frozenset(lists["clip_skip"]),
        unscaled=unscaled,
        experts=(layout.module,) if has_experts else (),
    )


def _find_linear(layer: nn.Module, name: str, where: str, field: str, context: str) -> nn.Linear:
    module = _find_module(layer, name, where, field, context)
    if not isinstance(module, nn.Linear):
        raise TemplateError(
            f"architecture template {where}: field '{field}' = {name!r} in {context} is a "
            f"{type(module).__name__}, not an nn.Linear"
        )
    return module


def _resolve_group(
    layer: nn.Module,
    spec: Mapping[str, Any],
    field: str,
    data: Mapping[str, Any],
    config: Any,
    where: str,
    context: str,
) -> ScalingGroup:
    linears = [
        _find_linear(layer, name, where, f"{field}.layers[{i}]", context)
        for i, name in enumerate(spec["layers"])
    ]
    in_features = {lin.in_features for lin in linears}
    if len(in_features) != 1:
        sizes = {name: lin.in_features for name, lin in zip(spec["layers"], linears)}
        raise TemplateError(
            f"architecture template {where}: field '{field}.layers' in {context} mixes in_features {sizes}; "
            "the layers of one group must share their input"
        )
    k = in_features.pop()
    inp = _find_module(layer, spec["inp"], where, f"{field}.inp", context)
    if isinstance(inp, nn.Linear) and inp.in_features != k:
        raise TemplateError(
            f"architecture template {where}: field '{field}.inp' = {spec['inp']!r} in {context} has "
            f"in_features {inp.in_features}, but the group's layers take {k}"
        )
    inspect_name = spec["module2inspect"]
    if inspect_name is not None:
        _find_module(layer, inspect_name, where, f"{field}.module2inspect", context)
        # "" is the decoder layer itself (parallel attention + MLP read one norm's output)
        outside = [n for n in spec["layers"] if inspect_name and not n.startswith(inspect_name + ".")]
        if outside:
            raise TemplateError(
                f"architecture template {where}: field '{field}.module2inspect' = {inspect_name!r} does not "
                f"contain the group's layers {outside}; the search could not see their quantization error"
            )
    for i, name in enumerate(spec["unquantized_readers"]):
        reader = _find_module(layer, name, where, f"{field}.unquantized_readers[{i}]", context)
        weight = getattr(reader, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != k:
            shape = None if not isinstance(weight, torch.Tensor) else tuple(weight.shape)
            raise TemplateError(
                f"architecture template {where}: field '{field}.unquantized_readers[{i}]' = {name!r} in "
                f"{context} has weight shape {shape}; a reader needs a 2-D weight with {k} input columns"
            )
    kv_repeat, head_dim = 1, 0
    if spec["repeat_kv"]:
        ratio = None if spec["repeat_kv"] is True else int(spec["repeat_kv"])
        kv_repeat, head_dim = _kv_repeat(data, config, k, where, field, ratio)
    n_scales = k // kv_repeat
    prev = _find_module(layer, spec["prev_op"], where, f"{field}.prev_op", context)
    _check_prev_op(prev, spec, n_scales, field, where, context)
    return ScalingGroup(
        prev_op=spec["prev_op"],
        layers=tuple(spec["layers"]),
        inp=spec["inp"],
        module2inspect=inspect_name,
        prev_op_is_linear=isinstance(prev, nn.Linear),
        fused_prev_op=spec["fused_prev_op"],
        in_features=k,
        kv_repeat=kv_repeat,
        head_dim=head_dim,
        norm_weight_offset=data["norm_weight_offset"],
        readers=tuple(spec["unquantized_readers"]),
    )


def _kv_repeat(
    data: Mapping[str, Any], config: Any, in_features: int, where: str, field: str, ratio: int | None = None
) -> tuple[int, int]:
    """(query heads per KV head, head_dim) from the model config (the head ratio itself where the
    template gives it), checked against in_features."""
    keys = data["config_keys"]
    if not hasattr(config, keys["num_attention_heads"]) and hasattr(config, "get_text_config"):
        config = config.get_text_config()  # a VLM: the language model's heads live in text_config
    n_heads = getattr(config, keys["num_attention_heads"], None)
    n_kv = getattr(config, keys["num_key_value_heads"], None) or n_heads
    if ratio is not None and n_heads:
        n_kv = max(n_heads // ratio, 1) if n_heads % ratio == 0 else 0
    head_dim = getattr(config, keys["head_dim"], None)
    if not n_heads:
        raise TemplateError(
            f"architecture template {where}: field '{field}.repeat_kv' needs the config attribute "
            f"'{keys['num_attention_heads']}' (set config_keys.num_attention_heads)"
        )
    if not head_dim:
        head_dim = getattr(config, "hidden_size", 0) // n_heads
    if not n_kv or n_heads % n_kv != 0 or n_heads * head_dim != in_features:
        raise TemplateError(
            f"architecture template {where}: field '{field}.repeat_kv': {n_heads} heads x head_dim {head_dim} "
            f"with {n_kv} KV heads does not match the layers' in_features {in_features}"
        )
    return n_heads // n_kv, head_dim


def _check_prev_op(
    prev: nn.Module, spec: Mapping[str, Any], n_scales: int, field: str, where: str, context: str
) -> None:
    name = spec["prev_op"]
    if isinstance(prev, nn.Linear):
        rows = prev.out_features
        if rows != n_scales and not (spec["fused_prev_op"] and rows > n_scales):
            raise TemplateError(
                f"architecture template {where}: field '{field}.prev_op' = {name!r} in {context} has "
                f'{rows} output rows but the group needs {n_scales} scales; set "fused_prev_op": true if '
                'its last rows alone feed the layers, or "repeat_kv": true for grouped-query v -> o'
            )
        return
    if spec["fused_prev_op"]:
        raise TemplateError(
            f"architecture template {where}: field '{field}.fused_prev_op' is true but prev_op {name!r} "
            f"in {context} is a {type(prev).__name__}, not an nn.Linear"
        )
    weight = getattr(prev, "weight", None)
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (n_scales,):
        shape = None if not isinstance(weight, torch.Tensor) else tuple(weight.shape)
        raise TemplateError(
            f"architecture template {where}: field '{field}.prev_op' = {name!r} in {context} is a "
            f"{type(prev).__name__} with weight shape {shape}; folding needs a norm with a weight of "
            f"shape ({n_scales},) or an nn.Linear"
        )
    bias = getattr(prev, "bias", None)
    if isinstance(bias, torch.Tensor) and tuple(bias.shape) != (n_scales,):
        raise TemplateError(
            f"architecture template {where}: field '{field}.prev_op' = {name!r} has a bias of shape "
            f"{tuple(bias.shape)}, expected ({n_scales},)"
        )
