"""Source checkpoints in transformers' stored layouts, read under the model's own names.

transformers 5 converts checkpoint keys while loading (``conversion_mapping``)
and reverses the conversion in ``save_pretrained``, so a model's checkpoint
need not store its parameters under their names:

* pure renamings: a LLaVA-style or Gemma 3 checkpoint stores
  ``language_model.model.layers.0...`` while the model names the module
  ``model.language_model.layers.0``;
* conversions that build a tensor from several stored ones: a mixture-of-experts
  model holding its experts fused (``mlp.experts.gate_up_proj`` [E, 2I, H],
  ``mlp.experts.down_proj`` [E, H, I]) is saved one tensor per expert
  (``mlp.experts.3.gate_proj.weight``, ``...up_proj.weight``, ``...down_proj.weight``),
  and ``from_pretrained`` stacks and concatenates them back.

A streaming quantizer reads tensors by name, so it must apply the same
conversions: :func:`renamed_reader` wraps a shard reader so that it lists and
serves tensors under the names the model uses. It takes transformers' own
mapping for the model (every model type transformers knows is covered, with its
exact operations), applied as ``from_pretrained`` applies it: renamings first,
then at most one converter per key, source keys in transformers' natural order.

A converted tensor is *virtual*: its name, dtype and shape come from running the
conversion on meta tensors when the reader is built; its data is assembled only
when :meth:`RenamedReader.get` asks for it, from the stored tensors it needs
(one decoder block's experts at a time: loading stays streaming).

Which names are listed follows the model as it is *now*: a converted tensor is
listed while the model has a parameter (or buffer) of that name; once the
model no longer has it (a template unfused the experts into per-expert linears
named as the checkpoint stores them), the stored tensors are listed instead,
under their renamed names. A conversion transformers' own loader could not
apply (its result is no tensor of the model) leaves the stored tensors listed
as they are, and a tensor it would have produced shows up as missing, by name.
"""

from __future__ import annotations

from collections.abc import Iterator
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from awq_plugin.errors import CheckpointError
from awq_plugin.format.checkpoint import TensorSpec


def _transformers_mapping(model: nn.Module) -> tuple[list[Any], list[Any]] | None:
    """transformers' (renamings, converters) for ``model``; None for an older transformers or none at all."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:  # an older transformers: keys are used as they are
        return None
    try:
        transforms = get_model_conversion_mapping(model)
    except Exception:  # not a PreTrainedModel (a bare nn.Module in a test): no conversions
        return None
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    if not renamings and not converters:
        return None
    return renamings, converters


def _saved_names(model: nn.Module, names: set[str]) -> dict[str, str]:
    """Stored name -> model name, for the model's tensors ``save_pretrained`` stores under a renamed key.

    transformers' load-time mapping does not always invert its save-time one: a model built from
    scratch is saved without the mapping's prefix changes, and a mapping chosen by the config's
    ``model_type`` can carry a prefix change for another class (a ``shieldgemma2`` config builds a
    ``Gemma3ForConditionalGeneration``, whose ``model.language_model.*`` is saved as
    ``model.language_model.model.*``, which the load mapping turns into ``model.model.language_model.model.*``).
    Reproducing the save renaming (as ``revert_weight_conversion`` does for a model built from
    scratch) reads such a checkpoint back; tensors a converter merges are left to the converters.
    """
    from awq_plugin.models.discover_experts import save_time_transforms

    reverse = save_time_transforms(model)
    if reverse is None:
        return {}
    from transformers.core_model_loading import rename_source_key

    renamings, converters = reverse
    saved: dict[str, str] = {}
    for name in sorted(names):
        try:
            stored, pattern = rename_source_key(name, renamings, converters, reverse=True)
        except Exception:
            return {}
        if pattern is None:  # stored as is, or renamed
            saved[stored] = name
    return saved


def checkpoint_key_renamer(model: nn.Module) -> Any:
    """transformers' load-time pure key renaming for ``model`` (None when it has none).

    Keys that a converter would merge are only renamed, not converted: see
    :func:`renamed_reader` for the full conversion.
    """
    mapping = _transformers_mapping(model)
    if mapping is None or not mapping[0]:
        return None
    from transformers.core_model_loading import rename_source_key

    renamings = mapping[0]

    def rename(key: str) -> str:
        return rename_source_key(key, renamings, [])[0]

    return rename


@dataclass
class _Conversion:
    """One converter applied to the stored tensors that produce one (or a few) of the model's tensors."""

    layer_name: str  # the first target's name: what transformers calls the converter with
    converter: Any  # transformers' WeightConverter (a template; each use works on a deep copy)
    sources: list[tuple[str, str]]  # (source pattern, stored name), in transformers' order
    renamed: dict[str, str]  # the stored tensors under their renamed-only names -> stored name
    targets: dict[str, TensorSpec] = field(default_factory=dict)  # model name -> dtype and shape


def _tensor_of(model: nn.Module, name: str) -> torch.Tensor | None:
    """The model's parameter or buffer called ``name`` (None: it has none)."""
    path, _, leaf = name.rpartition(".")
    try:
        module = model.get_submodule(path) if path else model
    except AttributeError:
        return None
    tensor = module._parameters.get(leaf)
    return tensor if tensor is not None else module._buffers.get(leaf)


def _has_tensor(model: nn.Module, name: str) -> bool:
    return _tensor_of(model, name) is not None


class RenamedReader:
    """A shard reader (``SafetensorsReader``) whose tensor names are the model's.

    Every name-taking method maps the model's name back to the stored one, or
    (for a converted tensor) to the stored tensors it is built from; other
    attributes (``folder``, ``total_bytes``) are the wrapped reader's.
    """

    def __init__(
        self,
        reader: Any,
        to_source: dict[str, str],
        conversions: list[_Conversion] | None = None,
        model: nn.Module | None = None,
    ) -> None:
        self._reader = reader
        self._to_source = to_source  # model name -> stored name (renamed or unchanged keys)
        self._conversions = conversions or []
        self._model = model
        self._state: tuple[bool, ...] | None = None
        self._view: dict[str, str | _Conversion] = {}

    # ---- which names exist now -------------------------------------------------------------

    def _refresh(self) -> dict[str, str | _Conversion]:
        """The name -> source view for the model as it is now (recomputed only when that changed)."""
        state = tuple(
            self._model is not None and all(_has_tensor(self._model, t) for t in c.targets)
            for c in self._conversions
        )
        if state != self._state:
            view: dict[str, str | _Conversion] = dict(self._to_source)
            for converted, conversion in zip(state, self._conversions, strict=True):
                if converted:
                    view.update(dict.fromkeys(conversion.targets, conversion))
                else:
                    view.update(conversion.renamed)
            self._state, self._view = state, view
        return self._view

    def _lookup(self, name: str) -> str | _Conversion:
        # The last view first: reads happen per tensor, the model changes rarely (a name it
        # lost still reads correctly; a name it gained refreshes the view).
        source = self._view.get(name)
        if source is None:
            source = self._refresh().get(name, name)
        return source

    def keys(self) -> list[str]:
        return sorted(self._refresh())

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __contains__(self, name: str) -> bool:
        return name in self._refresh()

    # ---- reading ---------------------------------------------------------------------------

    def _convert(self, conversion: _Conversion, name: str, dtype: torch.dtype | None) -> torch.Tensor:
        """Build ``name`` with transformers' converter from the stored tensors (read in ``dtype``)."""
        converter = deepcopy(conversion.converter)
        for pattern, stored in conversion.sources:
            converter.collected_tensors[pattern].append(lambda stored=stored: self._reader.get(stored, dtype))
        model = self._model
        try:
            produced = converter.convert(
                conversion.layer_name, model=model, config=getattr(model, "config", None)
            )
        except Exception as exc:
            raise CheckpointError(
                f"tensor {name}: transformers' conversion {converter!r} of "
                f"{conversion.sources[0][1]} and {len(conversion.sources) - 1} more stored tensors failed: {exc}"
            ) from None
        tensor = produced[name]
        tensor = tensor[0] if isinstance(tensor, list) else tensor
        del produced
        if dtype is not None and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        return tensor.contiguous()

    def get(self, name: str, *args: Any, **kwargs: Any) -> Any:
        source = self._lookup(name)
        if isinstance(source, _Conversion):
            dtype = args[0] if args else kwargs.get("dtype")
            return self._convert(source, name, dtype)
        return self._reader.get(source, *args, **kwargs)

    def get_spec(self, name: str) -> Any:
        source = self._lookup(name)
        if isinstance(source, _Conversion):
            return source.targets[name]
        return self._reader.get_spec(source)

    def get_slice_shape(self, name: str) -> Any:
        source = self._lookup(name)
        if isinstance(source, _Conversion):
            return source.targets[name].shape
        return self._reader.get_slice_shape(source)

    def get_dtype(self, name: str) -> str:
        source = self._lookup(name)
        if isinstance(source, _Conversion):
            return source.targets[name].st_dtype
        return self._reader.get_dtype(source)

    def tensors_with_prefix(self, prefix: str) -> dict[str, Any]:
        """All tensors whose (model) name starts with ``prefix``, keyed by the rest of the name."""
        return {name[len(prefix) :]: self.get(name) for name in self.keys() if name.startswith(prefix)}

    def shard_of(self, name: str) -> str:
        source = self._lookup(name)
        if isinstance(source, _Conversion):  # the shard of its first stored tensor
            return self._reader.shard_of(source.sources[0][1])
        return self._reader.shard_of(source)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._reader, attr)


def _plan_conversions(
    reader: Any, model: nn.Module, renamings: list[Any], converters: list[Any]
) -> tuple[dict[str, str], list[_Conversion]]:
    """Group the stored keys as ``from_pretrained`` does: renamed keys, and keys each converter merges."""
    from transformers.core_model_loading import dot_natural_key, rename_source_key

    model_names = set(model.state_dict(keep_vars=True))
    pattern_to_converter = {p: c for c in converters for p in c.source_patterns}
    to_source: dict[str, str] = {}
    groups: dict[str, _Conversion] = {}
    saved: dict[str, str] | None = None  # built on the first stored key the load mapping misses
    for stored in sorted(reader, key=dot_natural_key):
        plain = rename_source_key(stored, renamings, [])[0]
        target, pattern = rename_source_key(stored, renamings, converters) if converters else (plain, None)
        if pattern is None or target not in model_names:
            if plain not in model_names:  # the load mapping misses it: is it the model's save name?
                saved = _saved_names(model, model_names) if saved is None else saved
                plain = saved.get(stored, plain)
            to_source[plain] = stored
            continue
        group = groups.setdefault(target, _Conversion(target, pattern_to_converter[pattern], [], {}))
        group.sources.append((pattern, stored))
        group.renamed[plain] = stored
    conversions = []
    for group in groups.values():
        targets = _meta_targets(reader, model, group)
        if targets is None:  # transformers could not convert these either: leave them as stored
            to_source.update(group.renamed)
            continue
        group.targets = targets
        conversions.append(group)
    return to_source, conversions


def _meta_targets(reader: Any, model: nn.Module, group: _Conversion) -> dict[str, TensorSpec] | None:
    """Names, dtypes and shapes the conversion produces, from running it on meta tensors (None: it fails)."""
    converter = deepcopy(group.converter)
    for pattern, stored in group.sources:
        spec = reader.get_spec(stored)
        converter.collected_tensors[pattern].append(
            lambda spec=spec: torch.empty(spec.shape, dtype=spec.dtype, device="meta")
        )
    try:
        produced = converter.convert(group.layer_name, model=model, config=getattr(model, "config", None))
    except Exception:
        return None
    targets = {}
    for name, tensor in produced.items():
        tensor = tensor[0] if isinstance(tensor, list) else tensor
        expected = _tensor_of(model, name)
        if not isinstance(tensor, torch.Tensor) or expected is None or tensor.shape != expected.shape:
            return None
        targets[name] = TensorSpec(tensor.dtype, tuple(tensor.shape))
    return targets or None


def renamed_reader(reader: Any, model: nn.Module) -> Any:
    """``reader`` itself when no stored name changes, else a :class:`RenamedReader` for ``model``."""
    mapping = _transformers_mapping(model)
    if mapping is None:
        return reader
    to_source, conversions = _plan_conversions(reader, model, *mapping)
    if not conversions and all(model_name == name for model_name, name in to_source.items()):
        return reader
    return RenamedReader(reader, to_source, conversions, model)
