"""The Python API: quantize a model or a checkpoint, fake-quantize for studies, evaluate.

``quantize`` takes either a folder (streamed block by block into a checkpoint)
or an in-memory transformers model (quantized in place: its linears become
:class:`~awq_plugin.runtime.qlinear.AwqLinear`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from awq_plugin.algorithm.awq import (
    AwqOptions,
    AwqResults,
    fake_quantize_decoder_linears,
    keeping_ungroupable_in_full_precision,
    quantized_decoder_linears,
    run_awq,
)
from awq_plugin.algorithm.forward_dtype import resolve_search_dtype
from awq_plugin.algorithm.precision import keeping_full_precision_listed
from awq_plugin.calibration.settings import DEFAULTS
from awq_plugin.calibration.text import CalibSource, calibration_ids, evaluation_windows
from awq_plugin.config import AwqQuantConfig
from awq_plugin.errors import ConfigError
from awq_plugin.evaluate import PerplexityResult, perplexity
from awq_plugin.pipeline.guard import InMemoryGuard, check_guard_mode, held_out_windows
from awq_plugin.pipeline.quantize import METHODS, QuantizeReport, quantize_checkpoint
from awq_plugin.templates import resolve_template

log = logging.getLogger(__name__)


def as_quant_config(config: AwqQuantConfig | str | dict[str, Any] | None) -> AwqQuantConfig:
    """A config from a config object, a scheme name (``uint4_wo_64``) or a dict in any dialect."""
    if config is None:
        return AwqQuantConfig()
    if isinstance(config, AwqQuantConfig):
        return config
    if isinstance(config, str):
        return AwqQuantConfig.from_scheme(config)
    if isinstance(config, dict):
        return AwqQuantConfig.from_dict(config)
    raise ConfigError(f"expected an AwqQuantConfig, a scheme name or a dict, got {type(config).__name__}")


def quantize(
    model: nn.Module | str | Path,
    config: AwqQuantConfig | str | dict[str, Any] | None = None,
    calib_data: CalibSource = DEFAULTS.source,
    *,
    out_dir: str | Path | None = None,
    tokenizer: Any = None,
    method: str = "awq",
    n_samples: int = DEFAULTS.n_samples,
    seq_len: int = DEFAULTS.seq_len,
    template: str | Path | dict[str, Any] | None = None,
    options: AwqOptions | None = None,
    backend: str | None = None,
    guard: str = "fallback",
    device: str | None = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> nn.Module | QuantizeReport:
    """Quantize with AWQ (or plain rounding with ``method="rtn"``).

    - ``model`` a folder: streamed into an AWQ checkpoint at ``out_dir`` (required);
      returns the :class:`QuantizeReport`. ``calib_data`` may be token ids here too.
      ``guard`` (``fallback``, ``warn``, ``off``) decides what happens when AWQ ends worse
      than plain rounding on held-out windows; ``device`` (``auto``, ``cpu``, ``cuda[:N]``)
      is where each block is computed.
    - ``model`` an ``nn.Module``: searched, scaled and packed in place (its linears
      become ``AwqLinear`` running ``backend``); returns the model. ``tokenizer`` is
      needed unless ``calib_data`` is already token ids ``[n, seq_len]``. The same
      end-to-end ``guard`` runs (token ids as calibration leave no held-out text: then
      it is skipped, with a log line); its verdict is ``model.awq_guard``.
    """
    quant = as_quant_config(config)
    options = options or AwqOptions()
    if isinstance(model, (str, Path)):
        if out_dir is None:
            raise ConfigError("quantizing a folder writes a checkpoint: pass out_dir=...")
        return quantize_checkpoint(
            model,
            out_dir,
            quant,
            method=method,
            calib=calib_data,
            n_samples=n_samples,
            seq_len=seq_len,
            template=template,
            options=options,
            guard=guard,
            device=device,
            overwrite=overwrite,
            progress=progress,
        )
    return quantize_model(
        model,
        quant,
        calib_data,
        tokenizer=tokenizer,
        method=method,
        n_samples=n_samples,
        seq_len=seq_len,
        template=template,
        options=options,
        backend=backend,
        guard=guard,
    )


def quantize_model(
    model: nn.Module,
    quant: AwqQuantConfig,
    calib_data: CalibSource = DEFAULTS.source,
    *,
    tokenizer: Any = None,
    method: str = "awq",
    n_samples: int = DEFAULTS.n_samples,
    seq_len: int = DEFAULTS.seq_len,
    template: str | Path | dict[str, Any] | None = None,
    options: AwqOptions | None = None,
    backend: str | None = None,
    guard: str = "fallback",
) -> nn.Module:
    """In-memory quantization: AWQ search (unless rtn) under the end-to-end ``guard``, then pack
    every quantized linear."""
    from awq_plugin.format.packing import pack_linear
    from awq_plugin.numerics.pack import AwqPacked
    from awq_plugin.runtime.modeling import replace_module
    from awq_plugin.runtime.qlinear import AwqLinear

    quant.check_packable()
    resolved, quant = _scale_model(
        model, quant, calib_data, tokenizer, method, n_samples, seq_len, template, options, guard
    )
    for block, name in quantized_decoder_linears(model, resolved, quant):
        linear = block.get_submodule(name)
        tensors = pack_linear(linear, quant)
        packed = AwqPacked(tensors["qweight"], tensors["qzeros"], tensors["scales"])
        bias = linear.bias.detach() if linear.bias is not None else None
        new = AwqLinear.from_packed(packed, bias, backend=backend).to(linear.weight.device)
        replace_module(block, name, new)
    return model


def _scale_model(
    model: nn.Module,
    quant: AwqQuantConfig,
    calib_data: CalibSource,
    tokenizer: Any,
    method: str,
    n_samples: int,
    seq_len: int,
    template: Any,
    options: AwqOptions | None,
    guard: str,
) -> tuple[Any, AwqQuantConfig]:
    """Resolve the template, search and apply AWQ (unless rtn) under the end-to-end ``guard``;
    return the template and the config (with the linears the group size cannot split added to
    ``modules_to_not_convert``). The guard's verdict is ``model.awq_guard`` (None: not run)."""
    if method not in METHODS:
        raise ConfigError(f"quantization method {method!r} is unknown; choose one of {list(METHODS)}")
    check_guard_mode(guard)
    options = options or AwqOptions()
    resolved = resolve_template(model, template)
    layers = model.get_submodule(resolved.decoder_layers)
    quant = keeping_ungroupable_in_full_precision(layers, resolved, quant)
    quant, precision = keeping_full_precision_listed(layers, resolved, quant)
    model.awq_precision = precision  # the INT4 share and what stays in full precision, with reasons
    model.awq_guard = None
    if method == "awq":
        ids = calibration_ids(calib_data, tokenizer, n_samples, seq_len, options.seed)
        watch = _in_memory_guard(
            model, resolved, quant, calib_data, tokenizer, n_samples, seq_len, options, guard
        )
        results: AwqResults | None = run_awq(model, quant, ids, dict(resolved.data), options, observer=watch)
        if watch is not None:
            verdict = watch.verdict(model, f"held-out windows of {_text_name(calib_data)}")
            if verdict.awq_lost and guard == "fallback":
                watch.restore()
                results, verdict = None, dataclasses.replace(verdict, action="rounded")
            (log.warning if verdict.awq_lost else log.info)("%s", verdict.message())
            model.awq_guard = verdict
        model.awq_results = results  # kept for inspection / saving alongside the model (None: rounded)
    return resolved, quant


def _text_name(source: CalibSource) -> str:
    return repr(source) if isinstance(source, str) else "the calibration text"


def _in_memory_guard(
    model: nn.Module,
    resolved: Any,
    quant: AwqQuantConfig,
    calib_data: CalibSource,
    tokenizer: Any,
    n_samples: int,
    seq_len: int,
    options: AwqOptions,
    guard: str,
) -> InMemoryGuard | None:
    """The guard's streams over the calibration text's held-out windows (None: off, or no text)."""
    if guard == "off":
        return None
    held = held_out_windows(tokenizer, calib_data, n_samples, seq_len, options.seed)
    if held is None:
        log.info(
            "end-to-end check skipped: the calibration (token ids, or no text left over) has no held-out windows"
        )
        return None
    dtype = resolve_search_dtype(options.search_dtype, next(model.parameters()).device)
    return InMemoryGuard(model, resolved, quant, held, keep_originals=guard == "fallback", dtype=dtype)


def fake_quantize_model(
    model: nn.Module,
    quant: AwqQuantConfig,
    calib_data: CalibSource = DEFAULTS.source,
    *,
    tokenizer: Any = None,
    method: str = "awq",
    n_samples: int = DEFAULTS.n_samples,
    seq_len: int = DEFAULTS.seq_len,
    template: Any = None,
    options: AwqOptions | None = None,
    guard: str = "fallback",
) -> nn.Module:
    """Replace every quantized linear's weight by its quantize-dequantize (any bit width: 2/3/4/8).

    This is how schemes that cannot be packed (2- and 3-bit) are studied. The end-to-end
    ``guard`` runs as in :func:`quantize` (verdict in ``model.awq_guard``).
    """
    resolved, quant = _scale_model(
        model, quant, calib_data, tokenizer, method, n_samples, seq_len, template, options, guard
    )
    fake_quantize_decoder_linears(model, resolved, quant)
    return model


def evaluate_perplexity(
    model: nn.Module,
    tokenizer: Any,
    text: str | Path | Sequence[str] = "enwiki-heldout",
    n_windows: int | None = 40,
    seq_len: int = 512,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity on the first ``n_windows`` windows of held-out text (the same windows every time)."""
    windows = evaluation_windows(tokenizer, text, n_windows, seq_len)
    return perplexity(model, windows, progress=progress)
