"""The architecture sweep's config shrink, extended to the 2026 hybrid and heterogeneous families.

``bench_architectures._shrink`` shrinks every config field it knows; these families also keep
per-layer data it does not touch, so their tiny models fail to build or run before AWQ is
reached:

* Gemma 4: ``head_dim`` is a per-layer attribute (sliding vs full attention layers); reading
  it from the global config raises. The per-layer overrides are re-keyed onto the tiny layer
  count (one layer per kind) with the sizes shrunk, so the tiny model stays heterogeneous.
  Its per-layer input embeddings (262144 x 256 per layer) are shrunk too: they cost seconds.
* Laguna: ``num_attention_heads_per_layer`` must have one entry per layer.
* Zamba2, Nemotron-H: ``layers_block_type`` (and Zamba2's ``hybrid_layer_ids`` derived from it)
  must have one entry per layer; one layer of each kind is kept. Zamba2 derives its Mamba and
  attention widths from the hidden size before the shrink: they are derived again.
* Jamba: attention every 8th layer from offset 4 leaves no attention layer in 2 layers, and its
  cache then fails; attention and experts are put on layer 1.
* Nemotron-H: ``moe_shared_expert_intermediate_size`` (7688) is not a multiple of the group size;
  its Mamba mixer (128 heads of 64) is shrunk to 8 heads of 16.

:func:`shrink` wraps the sweep's own shrink with these steps; the tests pass it to ``run_one``
in place of the sweep's (monkeypatched), until the sweep takes them over.
"""

from __future__ import annotations

from typing import Any

from awq_plugin.tools import bench_architectures as bench

SWEEP_SHRINK = bench._shrink
N_LAYERS = bench.SMALL["num_hidden_layers"]


def _configs(config: Any, seen: set[int] | None = None) -> list[Any]:
    """``config`` and its nested sub-configs."""
    from transformers import PretrainedConfig

    seen = seen if seen is not None else set()
    if id(config) in seen:
        return []
    seen.add(id(config))
    out = [config]
    for value in list(vars(config).values()):
        if isinstance(value, PretrainedConfig):
            out += _configs(value, seen)
    return out


def _one_of_each_kind(kinds: list[Any], n: int) -> list[Any]:
    """The first entries of ``kinds``, ``n`` or as many as it has kinds, with one of each kind."""
    n = max(n, len(set(kinds)))
    kept = kinds[:n]
    missing = [k for k in dict.fromkeys(kinds) if k not in kept]
    return kept[: n - len(missing)] + missing


def _small(key: str, value: Any) -> Any:
    """A per-layer override's value at the tiny size: twice the sweep's (so it still differs)."""
    if isinstance(value, int) and not isinstance(value, bool) and key in bench.SMALL:
        return min(value, 2 * bench.SMALL[key])
    return value


def shrink(config: Any, seen: set[int] | None = None) -> None:
    """The sweep's shrink plus the per-layer data of the families above."""
    heterogeneous = []
    for cfg in _configs(config):
        spec = cfg.__dict__.get("_heterogeneity_spec")
        if spec is None:
            continue
        kinds = list(getattr(cfg, "layer_types", None) or [])
        by_kind: dict[Any, dict[str, Any]] = {}
        for index, overrides in spec.per_layer_overrides.items():
            by_kind.setdefault(kinds[index] if index < len(kinds) else index, dict(overrides))
        cfg.allow_global_per_layer_attribute_access = True  # the sweep's shrink reads them all
        heterogeneous.append((cfg, by_kind))
    for cfg in _configs(config):
        blocks = getattr(cfg, "layers_block_type", None)
        settable = not isinstance(getattr(type(cfg), "layers_block_type", None), property)  # Jamba derives it
        if settable and isinstance(blocks, list) and len(blocks) > N_LAYERS:
            cfg.layers_block_type = _one_of_each_kind(blocks, N_LAYERS)
            cfg.num_hidden_layers = len(cfg.layers_block_type)
            if isinstance(getattr(cfg, "hybrid_layer_ids", None), list):
                cfg.hybrid_layer_ids = [i for i, kind in enumerate(cfg.layers_block_type) if kind == "hybrid"]
        if getattr(cfg, "attn_layer_period", 0) > N_LAYERS:
            cfg.attn_layer_period, cfg.attn_layer_offset = N_LAYERS, N_LAYERS - 1
        if getattr(cfg, "expert_layer_period", 0) >= N_LAYERS:
            cfg.expert_layer_period, cfg.expert_layer_offset = N_LAYERS, N_LAYERS - 1
        if getattr(cfg, "vocab_size_per_layer_input", 0) > bench.SMALL["vocab_size"]:
            cfg.vocab_size_per_layer_input = bench.SMALL["vocab_size"]  # Gemma 4: 262144 x 256 per layer
            cfg.hidden_size_per_layer_input = 32  # a multiple of the sweep's group size
        if getattr(cfg, "mamba_num_heads", 0) > 8 and getattr(cfg, "mamba_head_dim", None):
            # Nemotron-H: 128 Mamba heads of 64 make the tiny model's mixer 8192 wide (30 s a run)
            cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.ssm_state_size = 8, 16, 16
        if getattr(cfg, "moe_shared_expert_intermediate_size", 0):
            cfg.moe_shared_expert_intermediate_size = bench.SMALL["intermediate_size"]
    SWEEP_SHRINK(config, seen)
    for cfg in _configs(config):
        per_layer = getattr(cfg, "num_attention_heads_per_layer", None)
        if isinstance(per_layer, list) and len(per_layer) != cfg.num_hidden_layers:
            cfg.num_attention_heads_per_layer = [cfg.num_attention_heads] * cfg.num_hidden_layers
        if getattr(cfg, "n_mamba_heads", None) and getattr(cfg, "mamba_headdim", None):
            # Zamba2 derives these from the hidden size in __post_init__, before the shrink
            cfg.mamba_headdim = int(cfg.mamba_expand * cfg.hidden_size) // cfg.n_mamba_heads
            cfg.attention_hidden_size = 2 * cfg.hidden_size
            cfg.attention_head_dim = cfg.attention_hidden_size // cfg.num_attention_heads
    for cfg, by_kind in heterogeneous:
        kinds = list(getattr(cfg, "layer_types", None) or [])
        overrides = {
            i: {key: _small(key, value) for key, value in by_kind[kind].items()}
            for i, kind in enumerate(kinds)
            if kind in by_kind
        }
        cfg.per_layer_config = overrides or None
        cfg.allow_global_per_layer_attribute_access = False  # the code under test must not read them
