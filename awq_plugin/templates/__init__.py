"""Architecture templates: where AWQ may fold scales in a decoder block, as data.

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
        "embed_tokens": "model.embed_tokens",   #   required roles: embed_tokens, norm, lm_head
        "rotary_emb": "model.rotary_emb",       #   any other role is optional
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
                                                #   compares; absent = the single layer
          "repeat_kv": false,                   # optional, see "Grouped-query attention"
          "fused_prev_op": false                # optional, see "Fused previous linears"
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

Folding rules (what :mod:`awq_plugin.algorithm.scale` does with a resolved group)
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
* Grouped-query attention (``repeat_kv: true``, for the v -> o group): when the
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

import copy
import dataclasses
import difflib
import functools
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from awq_plugin.errors import TemplateError
from awq_plugin.models.experts import ExpertsLayout, unfuse_experts

logger = logging.getLogger(__name__)

REQUIRED_ROLES = ("embed_tokens", "norm", "lm_head")
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
    "repeat_kv": ((bool,), False, False),
    "fused_prev_op": ((bool,), False, False),
    "unquantized_readers": ((list,), False, []),
}
# "experts" field -> (required?, default)
_EXPERTS_FIELDS: dict[str, tuple[bool, str | None]] = {
    "module": (True, None),
    "gate": (True, None),
    "up": (True, None),
    "down": (True, None),
    "fused_gate_up": (False, "gate_up_proj"),
    "fused_down": (False, "down_proj"),
    "activation": (False, "act_fn"),
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
        return self._rename(name, self.checkpoint_names)

    def from_checkpoint_name(self, name: str) -> str:
        """Inverse of :meth:`to_checkpoint_name`."""
        return self._rename(name, {v: k for k, v in self.checkpoint_names.items()})

    def _rename(self, name: str, renames: Mapping[str, str]) -> str:
        prefix = self.decoder_layers + "."
        if not renames or not name.startswith(prefix):
            return name
        index, _, rest = name[len(prefix) :].partition(".")
        for old, new in renames.items():
            if rest == old or rest.startswith(old + "."):
                return f"{prefix}{index}.{new}{rest[len(old) :]}"
        return name

    def to_json(self) -> str:
        """The template as JSON, e.g. to store beside results for later re-application."""
        return json.dumps(dict(self.data), sort_keys=True)


# ---------------------------------------------------------------------------------------------
# Loading and schema validation
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
    if not out["scaling_layers"]:
        raise _error(source, "scaling_layers", "is empty; a template needs at least one scaling group")
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


def _validate_experts(experts: Mapping[str, Any], source: str) -> dict[str, str]:
    unknown = sorted(set(experts) - set(_EXPERTS_FIELDS))
    if unknown:
        raise _error(
            source, f"experts.{unknown[0]}", f"is not an experts field; known: {sorted(_EXPERTS_FIELDS)}"
        )
    out = {}
    for key, (required, default) in _EXPERTS_FIELDS.items():
        if key not in experts:
            if required:
                raise _error(source, f"experts.{key}", "is missing")
            out[key] = default
            continue
        value = experts[key]
        if not isinstance(value, str) or not value or WILDCARD in value:
            raise _error(source, f"experts.{key}", f"must be a non-empty name without '*', got {value!r}")
        out[key] = value
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


def _expand(name: str, index: int) -> str:
    return name.replace(WILDCARD, str(index))


def _expand_all(names: Sequence[str], n_experts: int) -> list[str]:
    """Every name with ``*`` replaced by each expert index in turn (others unchanged)."""
    out: list[str] = []
    for name in names:
        out += [_expand(name, e) for e in range(n_experts)] if WILDCARD in name else [name]
    return out


def _expand_groups(groups: Sequence[Mapping[str, Any]], n_experts: int) -> list[tuple[str, dict[str, Any]]]:
    """(field for messages, group) with the expert wildcards expanded for ``n_experts`` experts."""
    out: list[tuple[str, dict[str, Any]]] = []
    for gi, group in enumerate(groups):
        field = f"scaling_layers[{gi}]"
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
    if out["module2inspect"] is None and len(out["layers"]) > 1:
        raise _error(source, f"{field}.module2inspect", "is required when a group has more than one layer")
    return out


def _templates_dir() -> Any:
    return resources.files(__name__)


def load_shipped_templates() -> dict[str, dict[str, Any]]:
    """All templates shipped with the package, validated, keyed by name (a fresh copy each call)."""
    return copy.deepcopy(_load_shipped_templates())


@functools.cache
def _load_shipped_templates() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for entry in sorted(_templates_dir().iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".json"):
            continue
        source = f"'{entry.name}' (shipped)"
        data = validate_template_data(_parse_json(entry.read_text(encoding="utf-8"), source), source)
        data.setdefault("name", None)
        data["name"] = data["name"] or entry.name[: -len(".json")]
        if data["name"] in found:
            raise TemplateError(f"two shipped templates are named '{data['name']}'")
        found[data["name"]] = data
    _check_unique_keys(found)
    return found


def _check_unique_keys(templates: Mapping[str, Mapping[str, Any]]) -> None:
    for field in ("architectures", "model_types"):
        owner: dict[str, str] = {}
        for name, data in templates.items():
            for key in data[field]:
                if key in owner:
                    raise TemplateError(
                        f"shipped templates '{owner[key]}' and '{name}' both claim {field} '{key}'"
                    )
                owner[key] = name


def _parse_json(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise TemplateError(f"architecture template {source} is not valid JSON: {exc}") from None


def load_template(template: str | Path | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """Read a user template (a dict, a JSON file path, or a shipped template's name).

    Returns the validated dict and a description of where it came from.
    """
    if isinstance(template, Mapping):
        source = "<dict>"
        data = validate_template_data(template, source)
        data["name"] = data["name"] or "custom"
        return data, source
    shipped = load_shipped_templates()
    if isinstance(template, str) and template in shipped:
        return shipped[template], f"'{template}.json' (shipped)"
    path = Path(template)
    if not path.is_file():
        raise TemplateError(
            f"architecture template {str(template)!r} is neither a JSON file nor a shipped template; "
            f"shipped: {sorted(shipped)}"
        )
    source = f"'{path}'"
    data = validate_template_data(_parse_json(path.read_text(encoding="utf-8"), source), source)
    data["name"] = data["name"] or path.stem
    return data, source


def find_shipped_template(architecture: str | None, model_type: str | None) -> tuple[dict[str, Any], str]:
    """The shipped template for an architecture (first) or model type (second)."""
    shipped = load_shipped_templates()
    for field, key in (("architectures", architecture), ("model_types", model_type)):
        if key is None:
            continue
        for name, data in shipped.items():
            if key in data[field]:
                return data, f"'{name}.json' (shipped, matched {field[:-1]} '{key}')"
    known = sorted(a for data in shipped.values() for a in data["architectures"])
    raise TemplateError(
        f"no shipped architecture template for architecture {architecture!r} / model_type {model_type!r}; "
        f"shipped architectures: {known}. Write a template JSON (schema in awq_plugin/templates/__init__.py) "
        "and pass it as template=PATH (CLI: --template FILE)"
    )


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
    path to a JSON file, or a dict. Every name in the template is checked in
    every decoder layer; a name that matches nothing raises an error naming the
    template, the field, the layer and the closest existing names.
    """
    model = _as_model(model_or_config)
    config = getattr(model, "config", None)
    if template is None:
        architectures = getattr(config, "architectures", None) or [type(model).__name__]
        data, source = find_shipped_template(architectures[0], getattr(config, "model_type", None))
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
    non_layer = {}
    for role, path in data["non_layer_modules"].items():
        _find_module(model, path, where, f"non_layer_modules.{role}")
        non_layer[role] = path
    layout = ExpertsLayout(**data["experts"]) if data["experts"] is not None else None
    if layout is not None:
        for i, layer in enumerate(layers):
            _find_module(
                layer, layout.module, where, "experts.module", f"decoder layer {i} ({type(layer).__name__})"
            )
            # Every AWQ step works on nn.Linear: fused 3-D expert weights become per-expert linears.
            unfuse_experts(layer, layout, f"architecture template {where}, decoder layer {i}")
    blocks = tuple(
        _resolve_block(layer, i, f"{data['model_decoder_layers']}.{i}", data, config, where, layout)
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


def resolve_experts_for_loading(model: nn.Module) -> ResolvedTemplate | None:
    """For loaders: the resolved shipped template when the model has routed experts, else None.

    Resolving unfuses the experts (see :func:`awq_plugin.models.experts.unfuse_experts`),
    so the per-expert tensors of an AWQ checkpoint have modules to load into;
    :meth:`ResolvedTemplate.from_checkpoint_name` maps the checkpoint's names
    to the model's. Dense models and models without a shipped template are
    left untouched.
    """
    config = getattr(model, "config", None)
    architectures = getattr(config, "architectures", None) or [type(model).__name__]
    try:
        data, _ = find_shipped_template(architectures[0], getattr(config, "model_type", None))
    except TemplateError:
        return None
    if data["experts"] is None:
        return None
    return resolve_template(model, data["name"])


def _as_model(model_or_config: Any) -> nn.Module:
    if isinstance(model_or_config, nn.Module):
        return model_or_config
    # A config: build the module tree without allocating weights (names are all we need).
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_or_config)


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
    n_experts = len(layer.get_submodule(layout.module)) if layout is not None else 0
    all_linears = [name for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)]
    lists = {
        field: _expand_all(data[field], n_experts) for field in ("not_quantized", "unscaled", "clip_skip")
    }
    for field, names in lists.items():
        for i, name in enumerate(names):
            _find_linear(layer, name, where, f"{field}[{i}]", context)
    not_quantized = set(lists["not_quantized"])
    groups = []
    scaled: dict[str, str] = {}
    for field, spec in _expand_groups(data["scaling_layers"], n_experts):
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
            if isinstance(module, nn.Linear) and name not in not_quantized:
                raise TemplateError(
                    f"architecture template {where}: '{name}' is an unquantized reader of {field} but is "
                    "not listed in 'not_quantized'; list it there, or move it to the group's layers"
                )
        groups.append(group)
    linears = tuple(n for n in all_linears if n not in not_quantized)
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
        experts=(layout.module,) if layout is not None else (),
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
        outside = [n for n in spec["layers"] if not n.startswith(inspect_name + ".")]
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
        kv_repeat, head_dim = _kv_repeat(data, config, k, where, field)
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
    data: Mapping[str, Any], config: Any, in_features: int, where: str, field: str
) -> tuple[int, int]:
    """(query heads per KV head, head_dim) from the model config, checked against in_features."""
    keys = data["config_keys"]
    n_heads = getattr(config, keys["num_attention_heads"], None)
    n_kv = getattr(config, keys["num_key_value_heads"], None) or n_heads
    head_dim = getattr(config, keys["head_dim"], None)
    if not n_heads:
        raise TemplateError(
            f"architecture template {where}: field '{field}.repeat_kv' needs the config attribute "
            f"'{keys['num_attention_heads']}' (set config_keys.num_attention_heads)"
        )
    if not head_dim:
        head_dim = getattr(config, "hidden_size", 0) // n_heads
    if n_heads % n_kv != 0 or n_heads * head_dim != in_features:
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
