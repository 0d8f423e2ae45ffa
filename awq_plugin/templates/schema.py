"""The template schema: field tables, validation of template data, and the resolved dataclasses.

AWQ protects salient weight channels by multiplying a linear layer's input
columns by a per-channel scale ``s`` and dividing the module that *produces*
that input by ``s``. Which module feeds which linears is architecture
knowledge; it lives in one JSON file per model family (``templates/*.json``,
the Quark schema extended with the fields a streaming driver needs), never in
``if "llama" in class_name`` branches. :func:`resolve_template` is the one
function that picks a template, validates it and checks every name in it
against the real model.

Schema
------
Names inside ``scaling_layers``, ``clip_skip``, ``not_quantized`` and
``unscaled`` are relative to one decoder layer (``self_attn.q_proj``); other
paths are relative to the model (``model.layers``). Fields::

    {
      "name": "llama",                          # optional; defaults to the file stem
      "architectures": ["LlamaForCausalLM"],    # config.architectures[0] values it serves
      "model_types": ["llama"],                 # config.model_type values (fallback key)
      "model_decoder_layers": "model.layers",   # the nn.ModuleList of decoder layers
      "non_layer_modules": {                    # role -> path, for a streaming driver
        "embed_tokens": "model.embed_tokens",   #   required roles: embed_tokens, lm_head; any
        "rotary_emb": "model.rotary_emb",       #   other is optional (OpenAI GPT, post-norm,
                                                #   has no final norm)
        "norm": "model.norm",
        "lm_head": "lm_head"
      },
      "scaling_layers": [                       # the scaling groups, in search order
        {
          "prev_op": "input_layernorm",         # produces the input of `layers`; 1/s folds here
          "layers": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                                                # nn.Linear layers whose input columns get * s
          "inp": "self_attn.q_proj",            # module whose input is recorded (stats, search)
          "module2inspect": "self_attn",        # optional: module whose output the search
                                                #   compares; absent = the single layer;
                                                #   "" = the decoder layer itself
          "repeat_kv": false,                   # optional, see "Grouped-query attention"
          "fused_prev_op": false,               # optional, see "Fused previous linears"
          "decoder_layers": [0, 2]              # optional: the decoder layers (indices) the group
                                                #   is in; absent = every layer. Hybrid stacks
                                                #   alternate block kinds (attention, SSM mixer)
        }
      ],
      "clip_skip": ["self_attn.q_proj", "self_attn.k_proj"],
                                                # linears left out of the clip search
      "not_quantized": [],                      # linears kept in full precision (routers ...)
      "unscaled": [],                           # linears quantized without an AWQ scale
      "norm_weight_offset": 0.0,                # norms compute x_hat * (offset + weight)
      "config_keys": {                          # optional: config attribute names used by
        "num_attention_heads": "num_attention_heads",   # repeat_kv (these are the defaults)
        "num_key_value_heads": "num_key_value_heads",
        "head_dim": "head_dim"                  #   falls back to hidden_size // heads
      },
      "config_requirements": {"do_layer_norm_before": true},
                                                # optional: config values the template assumes
      "experts": {                              # optional: the layer's routed experts (MoE)
        "module": "mlp.experts",                #   the experts module (fused in transformers 5)
        "gate": "w1", "up": "w3", "down": "w2", #   per-expert linear names, as checkpoints spell them
        "fused_gate_up": "gate_up_proj",        #   optional: transformers' fused [E, 2I, H] parameter
        "fused_down": "down_proj",              #   optional: transformers' fused [E, H, I] parameter
        "activation": "act_fn"                  #   optional: the fused module's gate activation
      },
      "checkpoint_names": {"mlp": "block_sparse_moe"},
                                                # optional: layer-relative module prefixes that
                                                #   checkpoints spell differently (model -> file)
      "unsupported": [],                        # parts of the model AWQ does not scale yet
      "notes": ""                               # free text for humans
    }

A group may also list ``"unquantized_readers"``: modules with a 2-D ``weight``
that read ``prev_op``'s output too but stay in full precision (an MoE router,
Qwen2-MoE's ``shared_expert_gate``). Their input columns are multiplied by
``s`` like the layers', so the fold stays exact; they are neither quantized nor
part of the search.

Unknown keys, missing required keys and wrong types are errors that name the
field and the template file. Lookup order: ``config.architectures[0]`` (the
model's class name when the config has none), then ``config.model_type``.

Folding rules (what :mod:`awq_plugin.templates.folds` does with a resolved group)
-----------------------------------------------------------------------
* ``prev_op`` an ``nn.Linear``: its output rows (and bias entries) are divided
  by ``s``. ``layers`` then sees ``prev_op``'s output through an elementwise
  step that must commute with a positive per-channel scale: nothing,
  attention-probability mixing (v -> o), a gating product (``up * act(gate)``)
  or a ReLU. The template author vouches for that; the tests check it.
* ``prev_op`` a norm: its ``weight`` (and ``bias``, LayerNorm) are divided by
  ``s``. With ``norm_weight_offset`` = 1 (Gemma's ``x_hat * (1 + w)``) the new
  weight is ``(1 + w) / s - 1``.
* Fused previous linears (``fused_prev_op: true``): ``prev_op`` is a
  concatenation (Phi-3 ``qkv_proj``, ``gate_up_proj``) and only its LAST
  ``len(s)`` output rows feed ``layers`` (the v part, the up part). 1/s
  divides exactly those rows; the others are untouched. Without the flag, a
  ``prev_op`` whose row count differs from ``len(s)`` is an error.
* Grouped-query attention (``repeat_kv: true``, or the number of query heads per KV
  head where the config does not say it under the config_keys names, as Falcon's
  ``multi_query``; for the v -> o group): when the
  model has fewer KV heads than query heads, ``v_proj`` has ``n_kv * head_dim``
  rows but ``o_proj`` has ``n_heads * head_dim`` input columns, each KV head
  serving ``n_rep = n_heads / n_kv`` query heads. There is one scale per KV
  channel; it multiplies the ``n_rep`` ``o_proj`` columns fed by that channel,
  and the activation/weight statistics of those columns are averaged. This is
  exact (the attention mixes each head's value vectors linearly). With
  ``n_rep = 1`` the flag changes nothing.

Mixture of experts (``experts``): resolution first replaces each layer's fused
experts module by per-expert linears (:func:`awq_plugin.models.experts.unfuse_experts`, an
exact change of representation, in place), so that ``mlp.experts.3.w1`` is an
``nn.Linear`` like any other. In names, ``*`` stands for the expert index:

* a group whose ``prev_op`` contains ``*`` is repeated once per expert, with
  the same index everywhere in it (each expert's up -> down);
* in a group whose ``prev_op`` has no ``*``, a ``*`` in ``layers`` or
  ``unquantized_readers`` expands to every expert, all sharing the group's one
  scale (the norm -> every expert's gate/up: they all read the same normed
  input). ``inp`` and ``module2inspect`` of such a group name one module (the
  MoE block), whose input statistics are those of every token;
* in ``clip_skip``, ``not_quantized`` and ``unscaled``, ``*`` expands to every
  expert.

Coverage: every ``nn.Linear`` of a decoder layer must be in some group's
``layers``, in ``unscaled`` or in ``not_quantized``; a linear in none of them
is still quantized (without a scale) and reported in the log, never skipped
silently.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from awq_plugin.errors import TemplateError
from awq_plugin.models.experts import CALLS, GATINGS, ExpertsLayout

REQUIRED_ROLES = ("embed_tokens", "lm_head")
DEFAULT_CONFIG_KEYS = {
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads",
    "head_dim": "head_dim",
}

# field -> (accepted python types, required?, default)
_TOP_FIELDS: dict[str, tuple[tuple[type, ...], bool, Any]] = {
    "name": ((str,), False, None),
    "architectures": ((list,), True, None),
    "model_types": ((list,), True, None),
    "model_decoder_layers": ((str,), True, None),
    "non_layer_modules": ((dict,), True, None),
    "scaling_layers": ((list,), True, None),
    "clip_skip": ((list,), False, []),
    "not_quantized": ((list,), False, []),
    "unscaled": ((list,), False, []),
    "norm_weight_offset": ((int, float), False, 0.0),
    "config_keys": ((dict,), False, {}),
    "config_requirements": ((dict,), False, {}),
    "experts": ((dict, type(None)), False, None),
    "checkpoint_names": ((dict,), False, {}),
    "unsupported": ((list,), False, []),
    "notes": ((str,), False, ""),
}
_GROUP_FIELDS: dict[str, tuple[tuple[type, ...], bool, Any]] = {
    "prev_op": ((str,), True, None),
    "layers": ((list,), True, None),
    "inp": ((str,), True, None),
    "module2inspect": ((str, type(None)), False, None),
    "repeat_kv": ((bool, int), False, False),
    "fused_prev_op": ((bool,), False, False),
    "unquantized_readers": ((list,), False, []),
    "decoder_layers": ((list, type(None)), False, None),
}
# "experts" field -> (accepted types, required?, default); see ExpertsLayout for their meaning
_EXPERTS_FIELDS: dict[str, tuple[tuple[type, ...], bool, Any]] = {
    "module": ((str,), True, None),
    "gate": ((str,), True, None),
    "up": ((str,), True, None),
    "down": ((str,), True, None),
    "fused_gate_up": ((str,), False, "gate_up_proj"),
    "fused_down": ((str,), False, "down_proj"),
    "activation": ((str,), False, "act_fn"),
    "transposed": ((bool,), False, False),
    "interleaved": ((bool,), False, False),
    "gate_up_bias": ((str, type(None)), False, None),
    "down_bias": ((str, type(None)), False, None),
    "gating": ((str,), False, "act_mul"),
    "call": ((str,), False, "routed"),
    "every_layer": ((bool,), False, True),
}
WILDCARD = "*"  # stands for the expert index in names
_STRING_LIST_FIELDS = (
    "architectures",
    "model_types",
    "clip_skip",
    "not_quantized",
    "unscaled",
    "unsupported",
)


# ---------------------------------------------------------------------------------------------
# Resolved data
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScalingGroup:
    """One scaling group, checked against a decoder layer.

    ``n_scales`` is the length of the scale vector: the layers' ``in_features``
    divided by ``kv_repeat`` (the query heads per KV head; 1 without GQA).
    """

    prev_op: str
    layers: tuple[str, ...]
    inp: str
    module2inspect: str | None
    prev_op_is_linear: bool
    fused_prev_op: bool
    in_features: int
    kv_repeat: int = 1
    head_dim: int = 0  # only meaningful when kv_repeat > 1
    norm_weight_offset: float = 0.0
    readers: tuple[str, ...] = ()  # full-precision modules that also read prev_op (routers)

    @property
    def n_scales(self) -> int:
        return self.in_features // self.kv_repeat

    @property
    def name(self) -> str:
        return f"{self.prev_op} -> {', '.join(self.layers)}"

    def expand_scales(self, s: torch.Tensor) -> torch.Tensor:
        """Scales per KV channel ``[n_scales]`` -> per input column of ``layers`` ``[in_features]``."""
        if self.kv_repeat == 1:
            return s
        n_kv = self.n_scales // self.head_dim
        per_head = s.reshape(n_kv, 1, self.head_dim)  # (n_kv, 1, head_dim)
        # Query head h reads KV head h // n_rep (transformers' repeat_kv order).
        return per_head.expand(n_kv, self.kv_repeat, self.head_dim).reshape(-1)  # (n_kv*n_rep*hd,)

    def reduce_columns(self, v: torch.Tensor) -> torch.Tensor:
        """Per input column ``[in_features]`` -> per scale ``[n_scales]``, averaging repeated heads."""
        if self.kv_repeat == 1:
            return v
        n_kv = self.n_scales // self.head_dim
        return v.reshape(n_kv, self.kv_repeat, self.head_dim).mean(dim=1).reshape(-1)  # (n_kv*hd,)


@dataclass(frozen=True)
class BlockTemplate:
    """Everything the per-block AWQ functions need to know about decoder layer ``index``."""

    index: int
    prefix: str  # full module path of the layer, e.g. "model.layers.3"
    groups: tuple[ScalingGroup, ...]
    linears: tuple[str, ...]  # every nn.Linear of the layer except not_quantized, in module order
    clip_skip: frozenset[str]
    unscaled: tuple[str, ...]  # quantized linears that no group scales
    experts: tuple[str, ...] = ()  # paths of the layer's RoutedExperts modules (MoE)

    def full_name(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name


@dataclass(frozen=True)
class CheckpointNames:
    """How checkpoints spell the model's layer-relative module prefixes (``checkpoint_names``).

    ``renames`` maps a model prefix to the checkpoint's (Mixtral ``mlp`` ->
    ``block_sparse_moe``) inside each layer of ``decoder_layers``; names
    outside the decoder layers pass through unchanged.
    """

    decoder_layers: str  # e.g. "model.layers"
    renames: Mapping[str, str] = dataclasses.field(default_factory=dict)  # model prefix -> checkpoint's

    def to_checkpoint_name(self, name: str) -> str:
        """A model tensor or module name as checkpoints spell it."""
        return self._rename(name, self.renames)

    def from_checkpoint_name(self, name: str) -> str:
        """Inverse of :meth:`to_checkpoint_name`."""
        return self._rename(name, {v: k for k, v in self.renames.items()})

    def _rename(self, name: str, renames: Mapping[str, str]) -> str:
        prefix = self.decoder_layers + "."
        if not renames or not name.startswith(prefix):
            return name
        index, _, rest = name[len(prefix) :].partition(".")  # "3", "mlp.experts.0.w1.weight"
        for old, new in renames.items():
            if rest == old or rest.startswith(old + "."):
                return f"{prefix}{index}.{new}{rest[len(old) :]}"
        return name


@dataclass(frozen=True)
class ResolvedTemplate:
    """A template validated against one model."""

    name: str
    source: str
    decoder_layers: str
    non_layer_modules: Mapping[str, str]
    blocks: tuple[BlockTemplate, ...]
    unsupported: tuple[str, ...]
    notes: str
    data: Mapping[str, Any]  # the validated template dict (defaults filled in)
    experts: ExpertsLayout | None = None
    checkpoint_names: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def block(self, index: int) -> BlockTemplate:
        return self.blocks[index]

    def to_checkpoint_name(self, name: str) -> str:
        """A model tensor or module name as checkpoints spell it (``checkpoint_names``)."""
        return CheckpointNames(self.decoder_layers, self.checkpoint_names).to_checkpoint_name(name)

    def from_checkpoint_name(self, name: str) -> str:
        """Inverse of :meth:`to_checkpoint_name`."""
        return CheckpointNames(self.decoder_layers, self.checkpoint_names).from_checkpoint_name(name)

    def to_json(self) -> str:
        """The template as JSON, e.g. to store beside results for later re-application."""
        return json.dumps(dict(self.data), sort_keys=True)


# ---------------------------------------------------------------------------------------------
# Schema validation
# ---------------------------------------------------------------------------------------------


def _error(source: str, field: str, problem: str) -> TemplateError:
    return TemplateError(f"architecture template {source}: field '{field}' {problem}")


def validate_template_data(data: Any, source: str) -> dict[str, Any]:
    """Check a template dict against the schema; return a copy with defaults filled in."""
    if not isinstance(data, Mapping):
        raise TemplateError(
            f"architecture template {source}: expected a JSON object, got {type(data).__name__}"
        )
    unknown = sorted(set(data) - set(_TOP_FIELDS))
    if unknown:
        raise _error(source, unknown[0], f"is not a template field; known fields: {sorted(_TOP_FIELDS)}")
    out = _check_fields(data, _TOP_FIELDS, source, prefix="")
    for key in _STRING_LIST_FIELDS:
        _check_string_list(out[key], source, key)
    if not out["architectures"] and not out["model_types"]:
        raise _error(source, "architectures", "and 'model_types' are both empty; give at least one key")
    _check_string_map(out["non_layer_modules"], source, "non_layer_modules")
    for role in REQUIRED_ROLES:
        if role not in out["non_layer_modules"]:
            raise _error(
                source,
                f"non_layer_modules.{role}",
                "is missing (required roles: embed_tokens, norm, lm_head)",
            )
    _check_string_map(out["config_keys"], source, "config_keys")
    unknown_keys = sorted(set(out["config_keys"]) - set(DEFAULT_CONFIG_KEYS))
    if unknown_keys:
        raise _error(
            source, f"config_keys.{unknown_keys[0]}", f"is unknown; known: {sorted(DEFAULT_CONFIG_KEYS)}"
        )
    out["config_keys"] = {**DEFAULT_CONFIG_KEYS, **out["config_keys"]}
    if not out["scaling_layers"] and not out["unscaled"]:
        raise _error(
            source,
            "scaling_layers",
            "is empty and so is 'unscaled'; list at least one scaling group, or the linears to quantize "
            "without a scale",
        )
    out["scaling_layers"] = [
        _validate_group(group, source, f"scaling_layers[{i}]")
        for i, group in enumerate(out["scaling_layers"])
    ]
    out["norm_weight_offset"] = float(out["norm_weight_offset"])
    _check_string_map(out["checkpoint_names"], source, "checkpoint_names")
    if out["experts"] is not None:
        out["experts"] = _validate_experts(out["experts"], source)
    _check_wildcards(out, source)
    return out


def _validate_experts(experts: Mapping[str, Any], source: str) -> dict[str, Any]:
    if not isinstance(experts, Mapping):
        raise _error(source, "experts", f"must be an object, got {type(experts).__name__}")
    unknown = sorted(set(experts) - set(_EXPERTS_FIELDS))
    if unknown:
        raise _error(
            source, f"experts.{unknown[0]}", f"is not an experts field; known: {sorted(_EXPERTS_FIELDS)}"
        )
    out = _check_fields(experts, _EXPERTS_FIELDS, source, prefix="experts.")
    for key, value in out.items():
        if isinstance(value, str) and (not value or WILDCARD in value):
            raise _error(source, f"experts.{key}", f"must be a non-empty name without '*', got {value!r}")
    for key, allowed in (("gating", GATINGS), ("call", CALLS)):
        if out[key] not in allowed:
            raise _error(source, f"experts.{key}", f"must be one of {list(allowed)}, got {out[key]!r}")
    if len({out["gate"], out["up"], out["down"]}) != 3:
        raise _error(
            source,
            "experts",
            f"names gate/up/down must differ, got {out['gate']!r}, {out['up']!r}, {out['down']!r}",
        )
    return out


def _check_wildcards(data: Mapping[str, Any], source: str) -> None:
    """``*`` (the expert index) needs an ``experts`` field and may not name a group's single modules."""
    names: list[tuple[str, str]] = [
        (f"{field}[{i}]", name)
        for field in ("clip_skip", "not_quantized", "unscaled")
        for i, name in enumerate(data[field])
    ]
    for gi, group in enumerate(data["scaling_layers"]):
        field = f"scaling_layers[{gi}]"
        per_expert = WILDCARD in group["prev_op"]
        names.append((f"{field}.prev_op", group["prev_op"]))
        names += [(f"{field}.layers[{i}]", n) for i, n in enumerate(group["layers"])]
        names += [
            (f"{field}.unquantized_readers[{i}]", n) for i, n in enumerate(group["unquantized_readers"])
        ]
        for key in ("inp", "module2inspect"):
            value = group[key]
            if value is None:
                continue
            names.append((f"{field}.{key}", value))
            if WILDCARD in value and not per_expert:
                raise _error(
                    source,
                    f"{field}.{key}",
                    f"= {value!r} has '*' but prev_op does not: a group shared by all experts inspects "
                    "one module (put '*' in prev_op for one group per expert)",
                )
    if data["experts"] is None:
        for field, name in names:
            if WILDCARD in name:
                raise _error(
                    source, field, f"= {name!r} uses '*' (the expert index) but the template has no 'experts'"
                )


def _check_fields(
    data: Mapping[str, Any], spec: Mapping[str, tuple[tuple[type, ...], bool, Any]], source: str, prefix: str
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, (types, required, default) in spec.items():
        field = f"{prefix}{key}"
        if key not in data:
            if required:
                raise _error(source, field, "is missing")
            out[key] = json.loads(json.dumps(default))  # a fresh copy of the default
            continue
        value = data[key]
        # bool is an int subclass: a number field must not accept true/false.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            wanted = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise _error(source, field, f"must be {wanted}, got {type(value).__name__} {value!r}")
        out[key] = value
    return out


def _check_string_list(value: list[Any], source: str, field: str) -> None:
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item:
            raise _error(source, f"{field}[{i}]", f"must be a non-empty string, got {item!r}")


def _check_string_map(value: Mapping[str, Any], source: str, field: str) -> None:
    for key, item in value.items():
        if not isinstance(item, str) or not item:
            raise _error(source, f"{field}.{key}", f"must be a non-empty string, got {item!r}")


def _validate_group(group: Any, source: str, field: str) -> dict[str, Any]:
    if not isinstance(group, Mapping):
        raise _error(source, field, f"must be an object, got {type(group).__name__}")
    unknown = sorted(set(group) - set(_GROUP_FIELDS))
    if unknown:
        raise _error(source, f"{field}.{unknown[0]}", f"is not a group field; known: {sorted(_GROUP_FIELDS)}")
    out = _check_fields(group, _GROUP_FIELDS, source, prefix=f"{field}.")
    if not out["layers"]:
        raise _error(source, f"{field}.layers", "is empty")
    _check_string_list(out["layers"], source, f"{field}.layers")
    if len(set(out["layers"])) != len(out["layers"]):
        raise _error(source, f"{field}.layers", f"lists a layer twice: {out['layers']}")
    repeat = out["repeat_kv"]
    if not isinstance(repeat, bool) and repeat < 1:
        raise _error(source, f"{field}.repeat_kv", f"must be true, false or a head ratio >= 1, got {repeat}")
    if out["module2inspect"] is None and len(out["layers"]) > 1:
        raise _error(source, f"{field}.module2inspect", "is required when a group has more than one layer")
    indices = out["decoder_layers"]
    if indices is not None:
        if not indices or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
            raise _error(
                source,
                f"{field}.decoder_layers",
                f"must be a non-empty list of layer indices >= 0, got {indices!r}",
            )
        if len(set(indices)) != len(indices):
            raise _error(source, f"{field}.decoder_layers", f"lists a layer twice: {indices}")
    return out
