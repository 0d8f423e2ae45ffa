"""Architecture templates: where AWQ may fold scales in a decoder block, as data.

AWQ protects salient weight channels by multiplying a linear layer's input
columns by a per-channel scale ``s`` and dividing the module that *produces*
that input by ``s``. Which module feeds which linears is architecture
knowledge; it lives in one JSON file per model family (``templates/*.json``,
the Quark schema extended with the fields a streaming driver needs), never in
``if "llama" in class_name`` branches.

Modules, in the order a template travels through them:

* :mod:`~awq_plugin.templates.schema`: the fields (documented there), their
  validation, and the resolved dataclasses (:class:`ScalingGroup`,
  :class:`BlockTemplate`, :class:`ResolvedTemplate`);
* :mod:`~awq_plugin.templates.shipped`: reading a user's JSON or dict, and the
  shipped ``*.json`` lookup by architecture / model type;
* :mod:`~awq_plugin.templates.resolve`: :func:`resolve_template`, the one
  function that picks a template, validates it and checks every name in it
  against the real model;
* :mod:`~awq_plugin.templates.loading`: what a checkpoint loader needs (MoE
  experts unfused, checkpoint names), without running the resolver.
"""

from awq_plugin.templates.loading import unfuse_experts_for_loading
from awq_plugin.templates.resolve import resolve_template
from awq_plugin.templates.schema import (
    DEFAULT_CONFIG_KEYS,
    REQUIRED_ROLES,
    WILDCARD,
    BlockTemplate,
    CheckpointNames,
    ResolvedTemplate,
    ScalingGroup,
    validate_template_data,
)
from awq_plugin.templates.shipped import find_shipped_template, load_shipped_templates, load_template

__all__ = [
    "DEFAULT_CONFIG_KEYS",
    "REQUIRED_ROLES",
    "WILDCARD",
    "BlockTemplate",
    "CheckpointNames",
    "ResolvedTemplate",
    "ScalingGroup",
    "find_shipped_template",
    "load_shipped_templates",
    "load_template",
    "resolve_template",
    "unfuse_experts_for_loading",
    "validate_template_data",
]
