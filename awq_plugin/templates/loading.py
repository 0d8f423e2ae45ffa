"""What loaders need from a template: the experts layout and checkpoint names, without the AWQ resolver.

A checkpoint of a mixture-of-experts model stores one quantized layer per
expert (``mlp.experts.3.gate_proj``), while transformers builds the experts
fused. Loading therefore unfuses the experts (an exact change of
representation, :func:`awq_plugin.models.experts.unfuse_experts`) and maps the
checkpoint's module names to the model's. That needs two fields of the shipped
template (``experts``, ``checkpoint_names``) and ``model_decoder_layers``;
scaling groups, coverage and config requirements are the quantizer's business
and are not checked here.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from awq_plugin.errors import TemplateError
from awq_plugin.models.discover_experts import names_for
from awq_plugin.models.experts import ExpertsLayout, unfuse_experts
from awq_plugin.templates.schema import CheckpointNames
from awq_plugin.templates.shipped import find_shipped_template


def unfuse_experts_for_loading(model: nn.Module, keep_fused: Sequence[str] = ()) -> CheckpointNames | None:
    """Unfuse a MoE model's experts in place; return how its checkpoint names modules (None: not MoE).

    The model's shipped template (looked up by ``architectures[0]``, then
    ``model_type``) says where each decoder layer keeps its experts. Without
    one, every fused experts module of the decoder layers is unfused in the
    layout the quantizer found for it (:func:`layout_without_proof`), except
    those matched by a ``keep_fused`` pattern (the checkpoint's
    ``modules_to_not_convert``: experts the quantizer could not prove stay fused
    and in full precision). Dense models are left untouched (None).
    """
    config = getattr(model, "config", None)
    architectures = getattr(config, "architectures", None) or [type(model).__name__]
    try:
        data, source = find_shipped_template(architectures[0], getattr(config, "model_type", None))
    except TemplateError:
        return _unfuse_discovered(model, keep_fused)
    if data["experts"] is None:
        return None
    layout = ExpertsLayout(**data["experts"])
    where = f"architecture template '{data['name']}' from {source}"
    try:
        layers = model.get_submodule(data["model_decoder_layers"])
    except AttributeError:
        raise TemplateError(
            f"{where}: field 'model_decoder_layers' = {data['model_decoder_layers']!r} matches no module"
        ) from None
    for i, layer in enumerate(layers):
        unfuse_experts(layer, layout, f"{where}, decoder layer {i}")
    return CheckpointNames(data["model_decoder_layers"], dict(data["checkpoint_names"]))


def _unfuse_discovered(model: nn.Module, keep_fused: Sequence[str]) -> CheckpointNames | None:
    from awq_plugin.models.discover_experts import (
        checkpoint_expert_names,
        fused_expert_modules,
        layout_without_proof,
    )
    from awq_plugin.templates.infer import find_decoder_layers

    try:
        layers_path = find_decoder_layers(model)
    except TemplateError:
        return None
    from awq_plugin.models.discover_experts import layer_prefix_renames

    names = checkpoint_expert_names(model)
    renames: dict[str, str] | None = None
    for i, layer in enumerate(model.get_submodule(layers_path)):
        for path, module in fused_expert_modules(layer).items():
            if any(pattern in f"{layers_path}.{i}.{path}" for pattern in keep_fused):
                continue
            layout = layout_without_proof(path, module, names_for(path, names))
            if layout is None:
                continue
            if renames is None:  # read off the fused model, as the quantizer's template did
                renames = layer_prefix_renames(model, layers_path, within=path.rpartition(".")[0] or path)
            unfuse_experts(layer, layout, f"decoder layer {i}")
    return CheckpointNames(layers_path, renames) if renames is not None else None
