"""Source checkpoints in transformers' older key layouts, read under the model's own names.

transformers 5 renames checkpoint keys while loading (``conversion_mapping``): a
LLaVA-style or Gemma 3 checkpoint stores ``language_model.model.layers.0...``
while the model names the module ``model.language_model.layers.0``; its
``save_pretrained`` even writes the old layout back. A streaming quantizer
reads tensors by name, so it must apply the same renamings:
:func:`renamed_reader` wraps a shard reader so that it lists and serves
tensors under the names the model uses. Only pure renamings are applied;
conversions that reshape tensors (merging per-expert weights) are not, and a
tensor they would have produced shows up as missing, by name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch import nn


def checkpoint_key_renamer(model: nn.Module) -> Callable[[str], str] | None:
    """transformers' load-time key renaming for ``model`` (None when it has none)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # an older transformers: keys are used as they are
        return None
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    if not renamings:
        return None

    def rename(key: str) -> str:
        return rename_source_key(key, renamings, [])[0]

    return rename


class RenamedReader:
    """A shard reader (``SafetensorsReader``) whose tensor names are the model's.

    Every name-taking method maps the model's name back to the stored one;
    other attributes (``folder``, ``total_bytes``) are the wrapped reader's.
    """

    def __init__(self, reader: Any, to_source: dict[str, str]) -> None:
        self._reader = reader
        self._to_source = to_source  # model name -> stored name

    def keys(self) -> list[str]:
        return sorted(self._to_source)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __contains__(self, name: str) -> bool:
        return name in self._to_source

    def _source(self, name: str) -> str:
        return self._to_source.get(name, name)

    def get(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self._reader.get(self._source(name), *args, **kwargs)

    def get_spec(self, name: str) -> Any:
        return self._reader.get_spec(self._source(name))

    def get_slice_shape(self, name: str) -> Any:
        return self._reader.get_slice_shape(self._source(name))

    def get_dtype(self, name: str) -> str:
        return self._reader.get_dtype(self._source(name))

    def tensors_with_prefix(self, prefix: str) -> dict[str, Any]:
        """All tensors whose (model) name starts with ``prefix``, keyed by the rest of the name."""
        return {name[len(prefix) :]: self.get(name) for name in self.keys() if name.startswith(prefix)}

    def shard_of(self, name: str) -> str:
        return self._reader.shard_of(self._source(name))

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._reader, attr)


def renamed_reader(reader: Any, model: nn.Module) -> Any:
    """``reader`` itself when no stored name changes, else a :class:`RenamedReader` for ``model``."""
    rename = checkpoint_key_renamer(model)
    if rename is None:
        return reader
    to_source = {rename(name): name for name in reader}
    if all(model_name == name for model_name, name in to_source.items()):
        return reader
    return RenamedReader(reader, to_source)
