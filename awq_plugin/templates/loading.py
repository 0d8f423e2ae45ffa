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

from torch import nn

from awq_plugin.errors import TemplateError
from awq_plugin.models.experts import ExpertsLayout, unfuse_experts
from awq_plugin.templates.schema import CheckpointNames
from awq_plugin.templates.shipped import find_shipped_template


def unfuse_experts_for_loading(model: nn.Module) -> CheckpointNames | None:
    """Unfuse a MoE model's experts in place; return how its checkpoint names modules (None: not MoE).

    The model's shipped template (looked up by ``architectures[0]``, then
    ``model_type``) says where each decoder layer keeps its experts. Dense
    models and models without a shipped template are left untouched (None).
    """
    config = getattr(model, "config", None)
    architectures = getattr(config, "architectures", None) or [type(model).__name__]
    try:
        data, source = find_shipped_template(architectures[0], getattr(config, "model_type", None))
    except TemplateError:
        return None
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
