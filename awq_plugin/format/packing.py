"""From quantized weights to checkpoint tensors: the one place linears are packed.

A checkpoint's state dict is "the named linears packed (``qweight``, ``qzeros``,
``scales``, fp16 ``bias``), every other tensor in fp16". The streaming pipeline
packs one block at a time, the in-memory API packs a whole model; both go
through :func:`packed_state_dict`, so the bytes cannot drift apart (a test pins
them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from awq_plugin.config import AwqQuantConfig
from awq_plugin.format.checkpoint import save_awq_checkpoint
from awq_plugin.models.grouped_linear import COLUMN_LEAVES, GroupedLinearSplit
from awq_plugin.numerics.pack import pack
from awq_plugin.numerics.quant_ref import quantize


def pack_linear(
    linear: nn.Linear, quant: AwqQuantConfig, clip_max: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized linear (``qweight``, ``qzeros``, ``scales``, ``bias``)."""
    quant.check_packable()
    gq = quantize(linear.weight.detach(), quant.bits, quant.group_size, quant.zero_point, clip_max=clip_max)
    packed = pack(gq)
    tensors = {"qweight": packed.qweight, "qzeros": packed.qzeros, "scales": packed.scales}
    if linear.bias is not None:
        tensors["bias"] = linear.bias.detach().to(torch.float16)
    return tensors


def packed_state_dict(
    module: nn.Module,
    linear_names: Iterable[str],
    quant: AwqQuantConfig,
    *,
    clip: Mapping[str, torch.Tensor] | None = None,
    prefix: str = "",
    rename: Callable[[str], str] = str,
    skip_keys: Iterable[str] = (),
) -> dict[str, torch.Tensor]:
    """``module``'s state dict with the named linears packed and every other float tensor in fp16.

    ``linear_names`` are relative to ``module``; output keys are ``rename(prefix + key)``
    (the pipeline passes a block's prefix and the template's checkpoint renaming);
    ``clip`` maps a linear name to its clip bounds; ``skip_keys`` are left out (a tied head).
    """
    names = set(linear_names)
    skipped = set(skip_keys)
    packed = {name: pack_linear(module.get_submodule(name), quant, (clip or {}).get(name)) for name in names}
    packed, joined = _join_grouped(module, packed)
    state: dict[str, torch.Tensor] = {}
    for name in sorted(packed):
        for leaf, tensor in packed[name].items():
            state[rename(f"{prefix}{name}.{leaf}")] = tensor
    for key, tensor in module.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if owner in names or owner in joined or key in skipped:
            continue
        value = tensor.detach()
        state[rename(prefix + key)] = value.to(torch.float16) if value.is_floating_point() else value
    return state


def _join_grouped(
    module: nn.Module, packed: dict[str, dict[str, torch.Tensor]]
) -> tuple[dict[str, dict[str, torch.Tensor]], set[str]]:
    """The packed parts of each grouped linear (:class:`GroupedLinearSplit`) joined into the one AWQ
    linear its checkpoint name stands for; returns the packed map and the joined names."""
    joined = set()
    for name, split in module.named_modules():
        if not isinstance(split, GroupedLinearSplit):
            continue
        parts = [f"{name}.{g}" if name else str(g) for g in range(len(split))]
        present = [part in packed for part in parts]
        if not any(present):
            continue
        if not all(present):
            raise ValueError(f"{name}: a grouped linear is quantized whole or not at all, not in part")
        tensors = [packed.pop(part) for part in parts]
        packed[name] = {
            leaf: torch.cat([t[leaf] for t in tensors], dim=1 if leaf in COLUMN_LEAVES else 0)
            for leaf in tensors[0]
        }
        joined.add(name)
    return packed, joined


def decoder_linear_names(
    model: nn.Module, decoder_layers: str, quant: AwqQuantConfig, skip: Iterable[str] = ()
) -> list[str]:
    """Every ``nn.Linear`` inside the decoder layers, less ``skip`` and ``modules_to_not_convert``."""
    skip_patterns = tuple(skip)
    names = []
    for name, module in model.get_submodule(decoder_layers).named_modules():
        full = f"{decoder_layers}.{name}"
        if not isinstance(module, nn.Linear):
            continue
        if quant.skips_module(full) or any(p in full for p in skip_patterns):
            continue
        names.append(full)
    return names


def model_state_dict(
    model: nn.Module,
    linear_names: Iterable[str],
    quant: AwqQuantConfig,
    clip: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """A whole model's checkpoint state dict; a tied output head is stored once, as the embedding."""
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    return packed_state_dict(
        model, linear_names, quant, clip=clip, skip_keys=("lm_head.weight",) if tied else ()
    )


def write_packed_model(
    model: nn.Module,
    out_dir: str | Path,
    quant: AwqQuantConfig,
    *,
    decoder_layers: str = "model.layers",
    source_dir: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Pack every decoder linear of an in-memory (already scaled, or plain) model and write it.

    With unscaled weights this is plain round-to-nearest: the baseline, and the quick way to
    make a checkpoint for tests and benchmarks.
    """
    names = decoder_linear_names(model, decoder_layers, quant)
    state = model_state_dict(model, names, quant)
    config: dict[str, Any] = model.config.to_dict()
    if source_dir is not None:
        import json

        config = json.loads((Path(source_dir) / "config.json").read_text())
    return save_awq_checkpoint(out_dir, state, config, quant, source_dir=source_dir, overwrite=overwrite)
