"""Convert 4-bit checkpoints between the AutoAWQ, compressed-tensors and GPTQ layouts.

All three store the same numbers (``w = (q - z) * s`` over contiguous groups of input
channels), so a conversion is exact: every quantized linear is unpacked to its integers,
scales and zeros and packed again in the target layout (:mod:`awq_plugin.numerics.layouts`,
:mod:`awq_plugin.numerics.pack`); every other tensor is copied as it is. Where the target
cannot hold the numbers exactly, the conversion is refused with the reason, and nothing
is left at the output (it is written in a staging folder, removed on error):

- a GPTQ source whose ``g_idx`` is not contiguous (act-order without static groups);
- scales that the target's dtype does not hold exactly (compressed-tensors stores them in
  the model's dtype, bf16 for many models; AutoAWQ and GPTQ store fp16);
- zero points other than 8 for a symmetric target, and a zero point of 0 for GPTQ's v1
  format (write ``gptq_v2``);
- anything but 4-bit weight-only integer schemes (8-bit, FP8, activation quantization,
  sparsity, mixed schemes in one checkpoint).

The output is written to a staging folder and renamed into place, shard by shard with
bounded memory (one linear at a time), as the quantizer writes its checkpoints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from awq_plugin.config import AwqQuantConfig
from awq_plugin.errors import CheckpointError
from awq_plugin.format.checkpoint import (
    SafetensorsReader,
    TensorSpec,
    _meta_model,
    copy_side_files,
    declared_dtype,
    read_json,
    write_model_config,
    write_sharded,
)
from awq_plugin.fsutil import atomic_output_dir, atomic_write_json
from awq_plugin.models.grouped_linear import input_groups
from awq_plugin.numerics import PER_CHANNEL
from awq_plugin.numerics.layouts import (
    SYMMETRIC_ZERO,
    CompressedTensorsPacked,
    GptqPacked,
    pack_compressed_tensors,
    pack_gptq,
    unpack_compressed_tensors,
    unpack_gptq,
)
from awq_plugin.numerics.pack import AwqPacked, pack, unpack
from awq_plugin.numerics.quant_ref import GroupQuantized

#: The layouts ``awq-plugin convert --to`` writes (and reads).
FORMATS = ("autoawq", "compressed-tensors", "gptq")
#: Each layout's tensor suffixes of one quantized linear (the first marks the linear).
LAYOUT_SUFFIXES = {
    "autoawq": ("qweight", "qzeros", "scales"),
    "compressed-tensors": (
        "weight_packed",
        "weight_scale",
        "weight_zero_point",
        "weight_shape",
        "weight_g_idx",
    ),
    "gptq": ("qweight", "qzeros", "scales", "g_idx"),
}


@dataclass(frozen=True)
class Scheme:
    """What a 4-bit checkpoint's config says about its numbers, whatever its layout."""

    layout: str  # one of FORMATS
    group_size: int  # PER_CHANNEL (-1) for one group per row
    symmetric: bool  # zero points all 8 (none stored by compressed-tensors)
    scale_dtype: torch.dtype = torch.float16
    gptq_format: str = "gptq"  # GPTQ's checkpoint_format (v1 stores z - 1)
    not_converted: tuple[str, ...] = ()  # AutoAWQ's modules_to_not_convert


def read_scheme(config: Mapping[str, Any]) -> Scheme:
    """The scheme of a quantized checkpoint's ``config.json``; a clear error for anything this
    package cannot carry (it names the field)."""
    quant = config.get("quantization_config")
    if not isinstance(quant, Mapping):
        raise CheckpointError("config.json has no quantization_config: this is not a quantized checkpoint")
    method = str(quant.get("quant_method", "")).lower()
    if method == "awq":
        from awq_plugin.config import load_quant_config

        awq = load_quant_config(config)
        awq.check_packable()
        return Scheme(
            "autoawq",
            awq.group_size,
            symmetric=not awq.zero_point,
            not_converted=tuple(awq.modules_to_not_convert),
        )
    if method == "gptq":
        return _gptq_scheme(quant)
    if method == "compressed-tensors":
        return _compressed_tensors_scheme(config, quant)
    raise CheckpointError(
        f"quantization_config.quant_method is {quant.get('quant_method')!r}; convert reads 'awq', 'gptq' "
        "and 'compressed-tensors' checkpoints"
    )


def _gptq_scheme(quant: Mapping[str, Any]) -> Scheme:
    bits = quant.get("bits")
    if bits != 4:
        raise CheckpointError(f"quantization_config.bits is {bits!r}; only 4-bit GPTQ checkpoints convert")
    group = quant.get("group_size")
    if not isinstance(group, int) or (group <= 0 and group != PER_CHANNEL):
        raise CheckpointError(
            f"quantization_config.group_size is {group!r}; expected a positive integer or -1"
        )
    fmt = str(quant.get("checkpoint_format", "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise CheckpointError(
            f"quantization_config.checkpoint_format is {fmt!r}; expected 'gptq' or 'gptq_v2'"
        )
    sym = quant.get("sym", True)
    return Scheme("gptq", group, symmetric=bool(sym), gptq_format=fmt)


def _compressed_tensors_scheme(config: Mapping[str, Any], quant: Mapping[str, Any]) -> Scheme:
    groups = quant.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        raise CheckpointError("quantization_config.config_groups is missing or empty")
    top_format = quant.get("format")
    schemes = []
    for name, group in groups.items():
        fmt = group.get("format") or top_format
        if fmt != "pack-quantized":
            raise CheckpointError(
                f"config_groups.{name}.format is {fmt!r}; only 'pack-quantized' (W4A16) layers convert"
            )
        weights = group.get("weights") or {}
        if group.get("input_activations") or group.get("output_activations"):
            raise CheckpointError(
                f"config_groups.{name} quantizes activations; only weight-only schemes convert"
            )
        if weights.get("num_bits") != 4 or weights.get("type", "int") != "int":
            raise CheckpointError(
                f"config_groups.{name}.weights is {weights.get('num_bits')}-bit {weights.get('type')!r}; "
                "only 4-bit integer weights convert"
            )
        strategy = weights.get("strategy")
        if strategy == "group":
            size = weights.get("group_size")
        elif strategy == "channel":
            size = PER_CHANNEL
        else:
            raise CheckpointError(
                f"config_groups.{name}.weights.strategy is {strategy!r}; expected 'group' or 'channel'"
            )
        if weights.get("actorder") not in (None, "static", "weight", "group"):
            raise CheckpointError(f"config_groups.{name}.weights.actorder is {weights.get('actorder')!r}")
        schemes.append((size, bool(weights.get("symmetric", True))))
    if len(set(schemes)) != 1:
        raise CheckpointError(
            f"quantization_config.config_groups hold different schemes {sorted(set(schemes))}; "
            "one checkpoint in the other layouts has one group size and one symmetry"
        )
    size, sym = schemes[0]
    return Scheme(
        "compressed-tensors", size, symmetric=sym, scale_dtype=getattr(torch, declared_dtype(config))
    )


def quantized_linears(reader: SafetensorsReader, layout: str) -> list[str]:
    """The module names that hold a quantized linear in ``layout``."""
    marker = LAYOUT_SUFFIXES[layout][0]
    return sorted(name.rsplit(".", 1)[0] for name in reader if name.endswith("." + marker))


def read_linear(reader: SafetensorsReader, prefix: str, scheme: Scheme) -> GroupQuantized:
    """One quantized linear of ``reader`` as integers, scales and zeros."""

    def get(leaf: str) -> torch.Tensor:
        return reader.get(f"{prefix}.{leaf}")

    try:
        if scheme.layout == "autoawq":
            return unpack(AwqPacked(get("qweight"), get("qzeros"), get("scales")))
        if scheme.layout == "gptq":
            packed = GptqPacked(get("qweight"), get("qzeros"), get("scales"), get("g_idx"))
            return unpack_gptq(packed, scheme.gptq_format)
        zero = f"{prefix}.weight_zero_point"
        if f"{prefix}.weight_g_idx" in reader:
            from awq_plugin.numerics.layouts import check_contiguous_groups

            k = int(get("weight_shape")[1])
            groups = reader.get_slice_shape(f"{prefix}.weight_scale")[1]
            check_contiguous_groups(get("weight_g_idx"), k // groups)
        packed_ct = CompressedTensorsPacked(
            get("weight_packed"),
            get("weight_scale"),
            reader.get(zero) if zero in reader else None,
            get("weight_shape"),
        )
        return unpack_compressed_tensors(packed_ct)
    except ValueError as exc:
        raise CheckpointError(f"{prefix}: {exc}") from None


def write_linear(gq: GroupQuantized, target: Scheme) -> dict[str, torch.Tensor]:
    """One linear's tensors in ``target``'s layout; refuses numbers the layout cannot hold."""
    if target.layout == "compressed-tensors":
        _check_scales_fit(gq.scales, target.scale_dtype)
        return pack_compressed_tensors(gq, target.symmetric, target.scale_dtype).tensors()
    _check_scales_fit(gq.scales, torch.float16)
    if target.layout == "gptq":
        return pack_gptq(gq, target.gptq_format).tensors()
    if target.symmetric and not bool((gq.zeros == SYMMETRIC_ZERO).all()):
        raise ValueError("a symmetric AutoAWQ config (zero_point false) needs every zero point to be 8")
    packed = pack(gq)
    return {"qweight": packed.qweight, "qzeros": packed.qzeros, "scales": packed.scales}


def _check_scales_fit(scales: torch.Tensor, dtype: torch.dtype) -> None:
    if scales.dtype == dtype:
        return
    if not torch.equal(scales.to(dtype).to(scales.dtype), scales):
        raise ValueError(
            f"its {str(scales.dtype).removeprefix('torch.')} scales are not exactly representable in "
            f"{str(dtype).removeprefix('torch.')}, which the target layout stores"
        )


def target_scheme(
    source: Scheme, to: str, config: Mapping[str, Any], gptq_format: str | None = None
) -> Scheme:
    """The scheme written for ``to``: the source's numbers in the target layout's terms."""
    if to not in FORMATS:
        raise CheckpointError(f"--to must be one of {FORMATS}, got {to!r}")
    # The scales keep their dtype where the target lets them: compressed-tensors stores any
    # (its writers use the model's); AutoAWQ and GPTQ store fp16.
    scale_dtype = source.scale_dtype if to == "compressed-tensors" else torch.float16
    fmt = gptq_format or ("gptq" if source.symmetric else "gptq_v2")
    target = dataclasses.replace(source, layout=to, scale_dtype=scale_dtype, gptq_format=fmt)
    if to == "autoawq":
        _autoawq_config(target)  # refuses a group size AutoAWQ configs do not take, before any work
    return target


def check_layout_holds_architecture(config: Mapping[str, Any], to: str) -> None:
    """Refuse ``to`` for an architecture with grouped linears (DeepSeek-V4's ``o_a_proj``) unless
    it is AutoAWQ: compressed-tensors and GPTQ loaders would replace them by plain quantized
    linears, which compute ``x @ W.T`` over the whole weight instead of one block per group."""
    if to == "autoawq":
        return
    built = _meta_model(config)
    if built is None:
        return
    model, rename = built
    grouped = [rename(name) for name, module in model.named_modules() if input_groups(module) is not None]
    if grouped:
        raise CheckpointError(
            f"{grouped[0]} (and {len(grouped) - 1} more) is a grouped linear, which {to} loaders would run as "
            "one plain linear over the whole weight; keep the AutoAWQ layout (--to autoawq / --format autoawq)"
        )


def _autoawq_config(target: Scheme) -> AwqQuantConfig:
    return AwqQuantConfig(
        bits=4,
        group_size=target.group_size,
        zero_point=not target.symmetric,
        modules_to_not_convert=target.not_converted,
    )


def _specs(gq_shape: tuple[int, int], groups: int, target: Scheme) -> dict[str, TensorSpec]:
    """The tensor specs one linear of ``[N, K]`` with ``groups`` groups takes in ``target``."""
    n, k = gq_shape
    if target.layout == "compressed-tensors":
        specs = {
            "weight_packed": TensorSpec(torch.int32, (n, k // 8)),
            "weight_scale": TensorSpec(target.scale_dtype, (n, groups)),
            "weight_shape": TensorSpec(torch.int64, (2,)),
        }
        if not target.symmetric:
            specs["weight_zero_point"] = TensorSpec(torch.int32, (n // 8, groups))
        return specs
    if target.layout == "gptq":
        return {
            "qweight": TensorSpec(torch.int32, (k // 8, n)),
            "qzeros": TensorSpec(torch.int32, (groups, n // 8)),
            "scales": TensorSpec(torch.float16, (groups, n)),
            "g_idx": TensorSpec(torch.int32, (k,)),
        }
    return {
        "qweight": TensorSpec(torch.int32, (k, n // 8)),
        "qzeros": TensorSpec(torch.int32, (groups, n // 8)),
        "scales": TensorSpec(torch.float16, (groups, n)),
    }


def _linear_shape(reader: SafetensorsReader, prefix: str, scheme: Scheme) -> tuple[tuple[int, int], int]:
    """``((N, K), groups)`` of a quantized linear, from the headers alone."""
    if scheme.layout == "autoawq":
        k, n8 = reader.get_slice_shape(f"{prefix}.qweight")
        return (n8 * 8, k), reader.get_slice_shape(f"{prefix}.scales")[0]
    if scheme.layout == "gptq":
        k8, n = reader.get_slice_shape(f"{prefix}.qweight")
        return (n, k8 * 8), reader.get_slice_shape(f"{prefix}.scales")[0]
    n, k = (int(x) for x in reader.get(f"{prefix}.weight_shape").tolist())
    return (n, k), reader.get_slice_shape(f"{prefix}.weight_scale")[1]


def convert_checkpoint(
    source: str | Path,
    out: str | Path,
    to: str,
    *,
    gptq_format: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``source`` (an AutoAWQ, compressed-tensors or GPTQ 4-bit checkpoint) to ``out`` in
    layout ``to`` (one of :data:`FORMATS`), exactly; raise :class:`CheckpointError` naming the
    linear and the reason where the target cannot hold its numbers."""
    source = Path(source)
    config = read_json(source / "config.json")
    scheme = read_scheme(config)
    reader = SafetensorsReader(source)
    linears = quantized_linears(reader, scheme.layout)
    if not linears:
        raise CheckpointError(f"{source} holds no {scheme.layout} quantized linear")
    if scheme.layout == "compressed-tensors":  # the scales' dtype as stored (writers differ)
        stored = reader.get_spec(f"{linears[0]}.weight_scale").dtype
        scheme = dataclasses.replace(scheme, scale_dtype=stored)
    target = target_scheme(scheme, to, config, gptq_format)
    check_layout_holds_architecture(config, to)
    if target.layout != "autoawq" and any(_linear_shape(reader, p, scheme)[0][0] % 8 for p in linears):
        raise CheckpointError("a quantized linear's output size is not a multiple of 8")
    owned = {f"{p}.{leaf}" for p in linears for leaf in LAYOUT_SUFFIXES[scheme.layout]}
    sources: dict[str, Any] = {}
    specs: dict[str, TensorSpec] = {}
    for name in reader:
        if name not in owned:
            sources[name] = ("copy", name)
            specs[name] = reader.get_spec(name)
    for prefix in linears:
        shape, groups = _linear_shape(reader, prefix, scheme)
        for leaf, spec in _specs(shape, groups, target).items():
            sources[f"{prefix}.{leaf}"] = ("linear", prefix, leaf)
            specs[f"{prefix}.{leaf}"] = spec
    converted: dict[str, dict[str, torch.Tensor]] = {}  # the linear being written (one at a time)

    def load(src: tuple[str, ...], name: str) -> torch.Tensor:
        if src[0] == "copy":
            return reader.get(name)
        prefix, leaf = src[1], src[2]
        if prefix not in converted:
            converted.clear()
            try:
                converted[prefix] = write_linear(read_linear(reader, prefix, scheme), target)
            except ValueError as exc:
                # The staging folder goes with the error: OUT is never half written.
                raise CheckpointError(f"{prefix}: {exc}; nothing was written") from None
        return converted[prefix][leaf]

    with atomic_output_dir(Path(out), overwrite=overwrite) as staging:
        write_sharded(staging, sources, load, specs)
        _write_config(config, staging, target, linears)
        copy_side_files(source, staging)
    return Path(out)


def _write_config(config: Mapping[str, Any], dest: Path, target: Scheme, linears: Iterable[str]) -> None:
    if target.layout == "autoawq":
        config_in = {k: v for k, v in config.items() if k != "quantization_config"}
        write_model_config(config_in, dest, _autoawq_config(target))
        return
    out = {k: v for k, v in config.items() if k != "quantization_config"}
    out["torch_dtype"] = declared_dtype(config)
    out.pop("dtype", None)
    if target.layout == "gptq":
        out["quantization_config"] = gptq_quantization_config(target)
    else:
        out["quantization_config"] = compressed_tensors_quantization_config(
            target, unquantized_linears(config, linears)
        )
    atomic_write_json(dest / "config.json", out)


def gptq_quantization_config(scheme: Scheme) -> dict[str, Any]:
    """``quantization_config`` of a GPTQ checkpoint with contiguous groups (no act-order)."""
    return {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": scheme.group_size,
        "desc_act": False,
        "static_groups": False,
        "sym": scheme.symmetric,
        "true_sequential": True,
        "damp_percent": 0.01,
        "checkpoint_format": scheme.gptq_format,
        "lm_head": False,
    }


def compressed_tensors_quantization_config(scheme: Scheme, ignore: list[str]) -> dict[str, Any]:
    """``quantization_config`` of a W4A16 pack-quantized checkpoint: every ``Linear`` but
    ``ignore`` carries 4-bit weights (llm-compressor's own form for such checkpoints)."""
    channel = scheme.group_size == PER_CHANNEL
    weights = {
        "num_bits": 4,
        "type": "int",
        "symmetric": scheme.symmetric,
        "strategy": "channel" if channel else "group",
        "group_size": None if channel else scheme.group_size,
        "block_structure": None,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
                "format": "pack-quantized",
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "global_compression_ratio": None,
    }


def unquantized_linears(config: Mapping[str, Any], quantized: Iterable[str]) -> list[str]:
    """Every ``nn.Linear`` of the architecture not in ``quantized`` (the output head among
    them), by checkpoint name: compressed-tensors' ``ignore`` list. Without a buildable
    architecture, the output head only."""
    quantized = set(quantized)
    built = _meta_model(config)
    if built is None:
        return ["lm_head"]
    model, rename = built
    names = {
        rename(name)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and rename(name) not in quantized
    }
    names.add("lm_head")
    return sorted(names)


def describe(scheme: Scheme) -> str:
    group = "per channel" if scheme.group_size == PER_CHANNEL else f"group {scheme.group_size}"
    sym = "symmetric" if scheme.symmetric else "asymmetric"
    extra = f", {scheme.gptq_format}" if scheme.layout == "gptq" else ""
    return f"{scheme.layout} ({group}, {sym}{extra})"
