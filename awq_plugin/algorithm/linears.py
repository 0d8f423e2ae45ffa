"""Which decoder linears a quantization config quantizes, and their reference fake quantization.

A config here is anything with ``bits``, ``group_size`` and ``zero_point`` (``QuantConfigLike``;
:class:`~awq_plugin.config.AwqQuantConfig` has them all): the algorithm also runs on plain
namespaces, and on bit widths that cannot be packed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol, TypeVar

import torch
from torch import nn

from awq_plugin.algorithm.search import replaced_weights
from awq_plugin.errors import ConfigError
from awq_plugin.models.grouped_linear import loaded_name
from awq_plugin.numerics import effective_group_size
from awq_plugin.numerics.quant_ref import fake_quantize
from awq_plugin.numerics.search_quant import GroupFakeQuantizer
from awq_plugin.templates import BlockTemplate, ResolvedTemplate

logger = logging.getLogger(__name__)
QuantConfigT = TypeVar("QuantConfigT")


class QuantConfigLike(Protocol):
    """What the algorithm reads from a quantization config (``AwqQuantConfig`` has it all)."""

    bits: int
    group_size: int
    zero_point: bool


def make_fake_quantizer(quant_config: QuantConfigLike) -> Callable[[torch.Tensor], torch.Tensor]:
    """The reference quantize-dequantize for this config (``awq_plugin.numerics.quant_ref``)."""

    # The searches call this hundreds of times per linear: weights were checked when loaded,
    # and the packing quantizer checks them again, so there is no finiteness scan; the fused
    # pieces give quant_ref's bits (numerics.search_quant).
    return GroupFakeQuantizer(quant_config.bits, quant_config.group_size, quant_config.zero_point)


def _skips(quant_config: QuantConfigLike, full_name: str) -> bool:
    skips = getattr(quant_config, "skips_module", None)
    if callable(skips):
        return bool(skips(full_name))
    return any(p in full_name for p in getattr(quant_config, "modules_to_not_convert", ()) or ())


#: A linear whose input width the group size does not divide stays in full precision (and is
#: added to ``modules_to_not_convert``) when it holds at most this share of its block's linear
#: weights: a small projection such as Mamba's ``dt_proj`` (48 inputs; 2% of a real Mamba
#: block, 15% of the bench's tiny one). Beyond it (hidden size 576 at group 128 would leave
#: most of the model unquantized) an error asks for another group size.
UNGROUPABLE_MAX_SHARE = 0.25


def ungroupable_linears(
    layers: Sequence[nn.Module], resolved: ResolvedTemplate, quant_config: QuantConfigLike
) -> tuple[str, ...]:
    """Full names of the decoder linears to keep in full precision because the group size does not
    divide their input width; :class:`ConfigError` naming the first one if it is not small.

    Works on a skeleton with parameters on the meta device (only shapes are read).
    """
    g = quant_config.group_size
    kept: list[str] = []
    for i, block in enumerate(layers):
        groups = resolved.block(i)
        linears = {n: block.get_submodule(n) for n in groups.linears}
        linears = {n: m for n, m in linears.items() if not _skips(quant_config, groups.full_name(n))}
        bad = [n for n, m in linears.items() if m.in_features % effective_group_size(g, m.in_features)]
        if not bad:
            continue

        sizes = {n: m.in_features * m.out_features for n, m in linears.items()}
        share = sum(sizes[n] for n in bad) / sum(sizes.values())
        if share > UNGROUPABLE_MAX_SHARE:
            first = linears[bad[0]]
            raise ConfigError(
                f"linear '{groups.full_name(bad[0])}' has in_features={first.in_features}, not a multiple "
                f"of group_size={g} (with {len(bad) - 1} more such linears, {share:.0%} of the block's "
                "linear weights); choose a group size that divides it or list the module in "
                "modules_to_not_convert"
            )
        # a grouped linear's parts are listed as the grouped linear, the module loaders see
        kept.extend(dict.fromkeys(groups.full_name(loaded_name(block, name)) for name in bad))
    return tuple(kept)


def keeping_ungroupable_in_full_precision(
    layers: Sequence[nn.Module], resolved: ResolvedTemplate, quant_config: QuantConfigT
) -> QuantConfigT:
    """``quant_config`` with :func:`ungroupable_linears` added to ``modules_to_not_convert``, logged."""
    kept = ungroupable_linears(layers, resolved, quant_config)
    if not kept:
        return quant_config
    logger.warning(
        "%d linear(s) kept in full precision: group_size=%d does not divide their input width "
        "(listed in modules_to_not_convert): %s%s",
        len(kept),
        quant_config.group_size,
        ", ".join(kept[:4]),
        " ..." if len(kept) > 4 else "",
    )
    return dataclasses.replace(
        quant_config, modules_to_not_convert=(*quant_config.modules_to_not_convert, *kept)
    )


def quantized_linear_names(
    block: nn.Module, groups: BlockTemplate, quant_config: QuantConfigLike
) -> list[str]:
    """The block's linears that will be quantized, checked against the group size."""
    names = []
    for name in groups.linears:
        if _skips(quant_config, groups.full_name(name)):
            continue
        k = block.get_submodule(name).in_features
        g = quant_config.group_size
        if k % effective_group_size(g, k) != 0:
            raise ConfigError(
                f"linear '{groups.full_name(name)}' has in_features={k}, not a multiple of group_size={g}; "
                "choose a group size that divides it or list the module in modules_to_not_convert"
            )
        names.append(name)
    return names


@contextmanager
def fake_quantized(
    block: nn.Module, names: Sequence[str], quant_config: QuantConfigLike, dtype: torch.dtype | None = None
) -> Iterator[None]:
    """Temporarily replace the named linears' weights by their reference fake quantization,
    held in ``dtype`` when given (the dtype the forwards run their matmuls in under autocast,
    which would cast each weight to it on every call: the same products, for half the memory
    of float32 copies)."""
    quantize = make_fake_quantizer(quant_config)
    linears = [block.get_submodule(n) for n in names]
    # one float32 result at a time before its cast
    copies = [
        quantize(lin.weight.data) if dtype is None else quantize(lin.weight.data).to(dtype) for lin in linears
    ]
    with replaced_weights(linears, copies):
        yield


def quantized_decoder_linears(
    model: nn.Module, resolved: ResolvedTemplate, quant_config: QuantConfigLike
) -> Iterator[tuple[nn.Module, str]]:
    """Every (decoder block, linear name in it) that ``quant_config`` quantizes."""
    for i, block in enumerate(model.get_submodule(resolved.decoder_layers)):
        for name in quantized_linear_names(block, resolved.block(i), quant_config):
            yield block, name


@torch.no_grad()
def fake_quantize_decoder_linears(
    model: nn.Module, resolved: ResolvedTemplate, quant_config: QuantConfigLike
) -> None:
    """Replace every quantized decoder linear's weight by its reference fake quantization, in place.

    Quantized from fp32 and written back in the weight's own dtype; any bit width (2/3/4/8), so
    this is also how schemes that cannot be packed are studied.
    """
    for block, name in quantized_decoder_linears(model, resolved, quant_config):
        weight = block.get_submodule(name).weight
        weight.copy_(
            fake_quantize(weight.float(), quant_config.bits, quant_config.group_size, quant_config.zero_point)
        )
