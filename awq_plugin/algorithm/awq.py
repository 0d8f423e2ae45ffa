"""AWQ, block by block: search scales and clips, apply them, return them as plain data.

The public pieces, in the order a driver uses them::

    resolved = resolve_template(model)                        # awq_plugin.templates
    captured = capture_decoder_inputs(model, layers, ids)     # awq_plugin.calibration.capture
    inputs = captured.for_layer(0)
    for i, block in enumerate(layers):
        result, next_hidden = awq_block_step(block, resolved.block(i), inputs, quant_config, options)
        ...                                                   # quantize + pack block i, save result
        inputs = captured.for_layer(i + 1, next_hidden.hidden_states)

The pieces live in one module each, all re-exported here: ``options`` (:class:`AwqOptions`),
``linears`` (which linears a config quantizes; their fake quantization), ``block`` (one block's
step, :func:`awq_block_step`, and :func:`apply_awq_block`), ``moe_fallback`` (experts the
calibration leaves unused) and ``results`` (the results as data). This module drives them over
a whole in-memory model: :func:`run_awq` and :func:`apply_awq`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from awq_plugin.algorithm.block import (
    SEARCH_CHUNK_ROWS,
    SEARCH_DTYPES,
    apply_awq_block,
    awq_block_step,
    computing_in_float32,
    run_awq_block,
)
from awq_plugin.algorithm.linears import (
    UNGROUPABLE_MAX_SHARE,
    QuantConfigLike,
    fake_quantize_decoder_linears,
    fake_quantized,
    keeping_ungroupable_in_full_precision,
    make_fake_quantizer,
    quantized_decoder_linears,
    quantized_linear_names,
    ungroupable_linears,
)
from awq_plugin.algorithm.moe_fallback import calibrate_underused_experts
from awq_plugin.algorithm.options import PROPAGATE_CHOICES, SEARCH_DTYPE_NAMES, AwqOptions
from awq_plugin.algorithm.results import AwqResults, BlockAwqResult, GroupScaleResult
from awq_plugin.calibration.capture import capture_decoder_inputs
from awq_plugin.config import quant_config_dict
from awq_plugin.errors import TemplateError
from awq_plugin.templates import ResolvedTemplate, resolve_template

__all__ = [
    "PROPAGATE_CHOICES",
    "SEARCH_CHUNK_ROWS",
    "SEARCH_DTYPES",
    "SEARCH_DTYPE_NAMES",
    "UNGROUPABLE_MAX_SHARE",
    "AwqOptions",
    "AwqResults",
    "BlockAwqResult",
    "GroupScaleResult",
    "QuantConfigLike",
    "apply_awq",
    "apply_awq_block",
    "awq_block_step",
    "calibrate_underused_experts",
    "computing_in_float32",
    "fake_quantize_decoder_linears",
    "fake_quantized",
    "keeping_ungroupable_in_full_precision",
    "make_fake_quantizer",
    "quant_config_dict",
    "quantized_decoder_linears",
    "quantized_linear_names",
    "run_awq",
    "run_awq_block",
    "ungroupable_linears",
]


class BlockObserver(Protocol):
    """Called around each block's AWQ step in :func:`run_awq` (the end-to-end guard's streams)."""

    def before_block(self, index: int, block: nn.Module) -> None: ...

    def after_block(self, index: int, block: nn.Module) -> None: ...


def run_awq(
    model: nn.Module,
    quant_config: QuantConfigLike,
    calib_input_ids: torch.Tensor,
    template: str | Path | Mapping[str, Any] | None = None,
    options: AwqOptions | None = None,
    progress: bool = True,
    observer: BlockObserver | None = None,
) -> AwqResults:
    """AWQ over a whole in-memory model; the model ends up scaled and clipped (not quantized).

    ``calib_input_ids`` ``[n_samples, seq_len]``. For models larger than memory
    use the streaming driver, which calls :func:`awq_block_step` per block.
    ``progress`` draws a bar over the decoder blocks; ``observer`` sees each block just
    before its step (full precision) and just after it (scaled and clipped).
    """
    options = options or AwqOptions()
    resolved = resolve_template(model, template)
    layers = model.get_submodule(resolved.decoder_layers)
    model.eval()
    captured = capture_decoder_inputs(model, layers, calib_input_ids, options.micro_batch_size)
    hidden, reference = captured.hidden_states, None
    results = []
    for i, block in enumerate(tqdm(layers, desc="AWQ blocks", unit="block", disable=not progress)):
        if observer is not None:
            observer.before_block(i, block)
        result, next_inputs = awq_block_step(
            block, resolved.block(i), captured.for_layer(i, hidden, reference), quant_config, options
        )
        if observer is not None:
            observer.after_block(i, block)
        results.append(result)
        hidden, reference = next_inputs.hidden_states, next_inputs.reference
    return AwqResults(
        blocks=results,
        template=dict(resolved.data),
        quant_config=quant_config_dict(quant_config),
        options=options.to_dict(),
    )


def apply_awq(
    model: nn.Module, results: AwqResults, template: str | Path | Mapping[str, Any] | None = None
) -> ResolvedTemplate:
    """Re-apply saved results to a fresh model (the template stored in the results by default)."""
    resolved = resolve_template(model, template if template is not None else results.template)
    layers = model.get_submodule(resolved.decoder_layers)
    if len(results.blocks) != len(layers):
        raise TemplateError(
            f"AWQ results cover {len(results.blocks)} blocks but the model has {len(layers)} layers"
        )
    for block_result in results.blocks:
        i = block_result.layer_index
        apply_awq_block(layers[i], resolved.block(i), block_result)
    return resolved
