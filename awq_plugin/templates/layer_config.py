"""The config a decoder layer was built from: per-layer attributes read per layer.

transformers 5 configs can be heterogeneous: an attribute such as Gemma 4's
``head_dim`` differs between attention layers, and reading it from the global
config raises ``AmbiguousGlobalPerLayerAttributeError``. Everything that reads
head sizes for one decoder layer asks :func:`config_of_layer` for that layer's
config instead of the global one.
"""

from __future__ import annotations

from typing import Any


def _text_config(config: Any) -> Any:
    text = getattr(config, "get_text_config", None)
    return text() if callable(text) else config


def is_heterogeneous(config: Any) -> bool:
    """True when the (text) config has per-layer attributes that vary across decoder layers."""
    return config is not None and bool(getattr(_text_config(config), "is_heterogeneous", False))


def config_of_layer(config: Any, index: int) -> Any:
    """The config of decoder layer ``index``: ``config`` itself where every layer shares it
    (behaviour unchanged), else the (text) config's per-layer view, in which each per-layer
    attribute holds that layer's value."""
    if not is_heterogeneous(config):
        return config
    return _text_config(config).per_layer_config[index]


__all__ = ["config_of_layer", "is_heterogeneous"]
