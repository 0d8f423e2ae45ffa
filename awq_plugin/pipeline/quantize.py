"""The streaming quantizer: source checkpoint -> AWQ checkpoint, one decoder block in memory.

Flow (one direction)::

    source shards --(embeddings only)--> skeleton on meta --> capture block-0 inputs
        -> drop the embeddings
    for each block i:
        read block i from the shards -> AWQ search/apply (or plain rounding) -> quantize + pack
        -> write block i's tensors, its search results and block i+1's inputs to the work dir
        -> drop block i from memory (and hand the freed heap back to the OS)
    assemble shards + config + tokenizer in a staging dir, one tensor at a time
        -> validate -> rename to OUT

Peak memory is therefore the larger of: the embeddings in fp32 while capturing,
and one block in fp32 plus the calibration activations and the search's
temporaries; it does not grow with the number of blocks (``awq-plugin bench
large-model`` measures it on a model several times larger).

Runs are resumable through the work dir (``pipeline.workdir``); the blocks move through
``pipeline.blocks`` and the output is written by ``pipeline.assemble``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from awq_plugin.algorithm.awq import (
    AwqOptions,
    AwqResults,
    awq_block_step,
    keeping_ungroupable_in_full_precision,
)
from awq_plugin.algorithm.awq import quantized_linear_names as block_linear_names
from awq_plugin.algorithm.forward_dtype import resolve_search_dtype
from awq_plugin.algorithm.options import QUANTIZER_VERSION
from awq_plugin.algorithm.phases import recording_phases
from awq_plugin.algorithm.precision import keeping_full_precision_listed
from awq_plugin.calibration.capture import capture_decoder_inputs, forward_block
from awq_plugin.calibration.settings import DEFAULTS
from awq_plugin.calibration.text import CalibSource, calibration_ids
from awq_plugin.config import AwqQuantConfig, quant_config_dict
from awq_plugin.errors import AwqPluginError, CalibrationError, ConfigError, TemplateError
from awq_plugin.format.checkpoint import SafetensorsReader, read_json
from awq_plugin.fsutil import check_output_dir
from awq_plugin.models import as_plain_linears, has_submodule
from awq_plugin.pipeline.assemble import RESULTS_FILE, assemble_checkpoint
from awq_plugin.pipeline.blocks import (
    layer_as_built,
    load_block,
    load_non_layer,
    pack_block,
    release_non_layer,
)
from awq_plugin.pipeline.device import materialized_to, resolve_device
from awq_plugin.pipeline.guard import (
    GUARD_WINDOWS,
    GuardResult,
    GuardStreams,
    check_guard_mode,
    held_out_windows,
)
from awq_plugin.pipeline.workdir import WorkDir, fingerprint, source_fingerprint, work_dir_path
from awq_plugin.procmem import peak_rss_bytes, release_freed_memory  # peak: VmHWM, see there
from awq_plugin.runtime.checkpoint_keys import renamed_reader
from awq_plugin.runtime.modeling import build_empty_model, hf_config_from_dict
from awq_plugin.templates import ResolvedTemplate, resolve_template
from awq_plugin.templates.infer import find_decoder_layers, infer_template, template_without_experts
from awq_plugin.templates.resolve import INFER
from awq_plugin.templates.shipped import find_shipped_template

log = logging.getLogger(__name__)

__all__ = ["METHODS", "RESULTS_FILE", "QuantizeReport", "WorkDir", "quantize_checkpoint", "work_dir_path"]

METHODS = ("awq", "rtn")


@dataclass
class QuantizeReport:
    """What a quantization run did, for the CLI summary and the demo report."""

    out: str
    method: str
    scheme: str
    seconds: float
    peak_rss_bytes: int
    source_bytes: int
    output_bytes: int
    n_samples: int
    seq_len: int
    threads: int
    resumed_from_block: int
    blocks: list[dict[str, Any]] = field(default_factory=list)
    guard: dict[str, Any] | None = None  # the end-to-end check against plain rounding (pipeline.guard)
    precision: dict[str, Any] = field(default_factory=dict)  # INT4 share of the decoder's matrix weights
    precision_lines: list[str] = field(default_factory=list)  # its summary (PrecisionReport.lines)
    device: str = "cpu"  # where the blocks were computed
    costs: list[dict[str, Any]] = field(default_factory=list)  # BlockCost per block searched in this run

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        lines = [
            f"quantized ({self.method}, {self.scheme}) -> {self.out}",
            f"time {self.seconds:.0f} s on {self.device} with {self.threads} threads; peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB",
            f"size {self.source_bytes / 2**20:.1f} MiB -> {self.output_bytes / 2**20:.1f} MiB "
            f"({self.source_bytes / max(self.output_bytes, 1):.2f}x smaller)",
        ]
        lines += self.precision_lines
        if self.costs:
            fe = statistics.median(c["forward_equivalents"] for c in self.costs)
            seconds = statistics.median(c["seconds"] for c in self.costs)
            lines.append(
                f"cost per block: {fe:.1f} forward equivalents (median of {len(self.costs)} blocks: "
                f"{seconds:.1f} s per block over one full-precision forward of it on the calibration tokens)"
            )
        if self.resumed_from_block:
            lines.append(f"resumed after block {self.resumed_from_block - 1}")
        if self.blocks and "mse_awq" in self.blocks[0]:
            lines.append("held-out block output error vs full precision: plain rounding -> what was kept")
            for b in self.blocks:
                kept = b.get("choice", "awq")
                mark = {"awq": "", "rounding": "  (rounded: AWQ lost)"}
                lines.append(
                    f"  layer {b['layer']:3d}: {b['mse_rtn']:.4g} -> {b['mse_awq']:.4g}{mark.get(kept, '')}"
                )
        if self.guard:  # last, so that it is the CLI's closing line
            lines.append(self.guard["message"])
        return "\n".join(lines)


@dataclass(frozen=True)
class BlockCost:
    """One block's wall time (read, search, guard streams, pack) and its cost in *forward
    equivalents*: that time over the time of the block's own full-precision forward over the
    calibration tokens (the step's recording forward, same threads, device and dtype), a figure
    that does not depend on the machine."""

    layer: int
    seconds: float
    forward_seconds: float

    @property
    def forward_equivalents(self) -> float:
        return self.seconds / self.forward_seconds if self.forward_seconds > 0 else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "forward_equivalents": self.forward_equivalents}


@dataclass
class _Source:
    """The source folder, opened: its config, a reader over its shards, an empty skeleton, the template."""

    folder: Path
    config: dict[str, Any]
    reader: SafetensorsReader
    model: torch.nn.Module  # parameters on the meta device until a block is loaded
    resolved: ResolvedTemplate

    @property
    def layers(self) -> torch.nn.ModuleList:
        return self.model.get_submodule(self.resolved.decoder_layers)


def _open_source(
    folder: Path, template: str | Path | dict[str, Any] | None, trust_remote_code: bool
) -> _Source:
    config = read_json(folder / "config.json")
    if "quantization_config" in config:
        raise ConfigError(f"{folder} is already quantized (its config.json has a quantization_config)")
    reader = SafetensorsReader(folder)
    hf_config = hf_config_from_dict(config, trust_remote_code, folder)
    model = build_empty_model(hf_config, torch.float32, trust_remote_code)
    as_plain_linears(model)  # Conv1D and grouped linears as nn.Linear (the source's tensors load unchanged)
    reader = renamed_reader(reader, model)  # transformers' key renamings (VLM checkpoint layouts)
    if template == INFER or (template is None and not _has_shipped_template(model)):
        template = _inferred_template(model, reader)
    resolved = resolve_template(model, template)
    missing = _unreadable_experts(resolved, model, reader)
    if missing is not None and resolved.name.startswith("inferred-"):
        # Experts found in the model but not readable from the source: keep them fused (in full
        # precision, reported) rather than fail. A reviewed template naming them is trusted and
        # fails on the first missing tensor instead.
        log.warning("%s", missing)
        model = build_empty_model(hf_config, torch.float32, trust_remote_code)
        as_plain_linears(model)
        reader = renamed_reader(SafetensorsReader(folder), model)
        resolved = resolve_template(model, template_without_experts(resolved.data, missing))
    return _Source(folder, config, reader, model, resolved)


def _unreadable_experts(resolved: ResolvedTemplate, model: torch.nn.Module, reader: Any) -> str | None:
    """Why the source cannot fill the unfused experts (None: it can): a checkpoint storing them
    neither per expert under the names found nor fused (ERNIE-VL's text and vision experts share
    one stored list)."""
    layout = resolved.experts
    if layout is None:
        return None
    layers = model.get_submodule(resolved.decoder_layers)
    names = set(reader)
    for i, layer in enumerate(layers):
        if not has_submodule(layer, layout.module):
            continue
        prefix = f"{resolved.decoder_layers}.{i}.{layout.module}."
        wanted = f"{prefix}0.{layout.up}.weight"
        if wanted not in names and f"{prefix}{layout.fused_gate_up}" not in names:
            return (
                f"{layout.module}: fused experts kept in full precision: the source checkpoint stores them "
                f"neither per expert ({wanted}) nor fused ({prefix}{layout.fused_gate_up})"
            )
    return None


def _has_shipped_template(model: torch.nn.Module) -> bool:
    config = model.config
    architectures = getattr(config, "architectures", None) or [type(model).__name__]
    try:
        find_shipped_template(architectures[0], getattr(config, "model_type", None))
    except TemplateError:
        return False
    return True


def _inferred_template(model: torch.nn.Module, reader: SafetensorsReader) -> dict[str, Any]:
    """No shipped template: infer one from the source's weights, one decoder layer in memory at a time.

    Deterministic (seeded probe tokens), so a resumed run infers the same template.
    """
    layers_path = find_decoder_layers(model)
    load_non_layer(model, layers_path, reader)
    try:
        template, report = infer_template(
            model, layer_weights=lambda i: layer_as_built(model, layers_path, i, reader)
        )
    finally:
        release_non_layer(model, layers_path)
    log.warning(
        "no shipped template for %s: using one inferred from its data flow, every fold proven (%d groups); "
        "'awq-plugin template infer' prints it for review",
        type(model).__name__,
        len(template["scaling_layers"]),
    )
    report.warn_unscaled(log)
    return template


def _calibration_tokens(
    src: _Source,
    calib: CalibSource,
    n_samples: int,
    seq_len: int,
    seed: int,
    trust_remote_code: bool,
    guard_windows: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The calibration windows ``[n, L]`` and the end-to-end guard's held-out ones (None: none
    asked for, or no text left over; token ids given as calibration have no held-out text)."""
    tokenizer = None
    if not isinstance(calib, torch.Tensor):  # token ids need no tokenizer
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(src.folder, trust_remote_code=trust_remote_code)
    ids = calibration_ids(calib, tokenizer, n_samples, seq_len, seed)
    held = None
    if guard_windows:
        held = held_out_windows(tokenizer, calib, n_samples, seq_len, seed, guard_windows)
        if held is None:
            log.info("end-to-end check skipped: the calibration leaves no held-out text")
    return ids, held


def _run_fingerprint(
    src: _Source,
    quant: AwqQuantConfig,
    method: str,
    calib_ids: torch.Tensor,
    options: AwqOptions,
    held: torch.Tensor | None,
    device: torch.device,
) -> str:
    """Every input that decides the output bytes: a work dir with another fingerprint is not resumed."""
    return fingerprint(
        {
            "source": source_fingerprint(src.reader, src.folder),
            "quant": quant.to_quantization_config(),
            "method": method,
            "calib_ids": hashlib.sha256(calib_ids.numpy().tobytes()).hexdigest(),
            "guard_ids": None if held is None else hashlib.sha256(held.numpy().tobytes()).hexdigest(),
            "device": device.type,
            "options": options.to_dict(),
            "template": src.resolved.to_json(),
            "quantizer": QUANTIZER_VERSION,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
    )


def _quantize_blocks(
    src: _Source,
    work: WorkDir,
    done: int,
    calib_ids: torch.Tensor,
    held: torch.Tensor | None,
    quant: AwqQuantConfig,
    method: str,
    options: AwqOptions,
    device: torch.device,
    progress: bool,
    on_block: Callable[[int, int], None] | None,
    costs: list[BlockCost],
) -> tuple[list[str], GuardStreams | None]:
    """Capture block 0's inputs, then search, pack and store each block not yet done.

    Returns the names of the source's tensors outside the decoder layers (copied at
    assembly) and the end-to-end guard's streams (None without held-out windows); appends
    each AWQ block's cost to ``costs``.
    """
    layers_path, layers, resolved = src.resolved.decoder_layers, src.layers, src.resolved
    non_layer_names = load_non_layer(src.model, layers_path, src.reader, device=device)
    materialized_to(src.model, device)  # buffers built with the skeleton (rotary tables)
    calib_ids, held = calib_ids.to(device), None if held is None else held.to(device)
    captured = capture_decoder_inputs(src.model, layers, calib_ids, options.micro_batch_size)
    streams = None
    if held is not None:  # one window per micro-batch: the tail scores window by window
        captured_held = capture_decoder_inputs(src.model, layers, held, 1)
        streams = GuardStreams(held, captured_held, dtype=resolve_search_dtype(options.search_dtype, device))
        if done:
            streams.restore(*work.load_extra(done), device)
    release_non_layer(src.model, layers_path)  # from here on memory holds one block and the activations
    hidden = captured.hidden_states if done == 0 else [h.to(device) for h in work.load_hidden(done)]
    # asymmetric calibration: the full-precision model's hidden states (None while one stream)
    reference = None if done == 0 else work.load_reference(done, device)
    bar = tqdm(
        total=len(layers), initial=done, desc=f"{method.upper()} blocks", unit="block", disable=not progress
    )
    for i in range(done, len(layers)):
        started = time.perf_counter()
        block = load_block(src.model, resolved, i, src.reader, device)
        groups = resolved.block(i)
        names = block_linear_names(block, groups, quant)
        inputs = captured.for_layer(i, hidden, reference)
        if streams is not None:  # plain rounding's view of this block, before the search moves weights
            streams.advance("rtn", i, block, names, quant)
        if method == "awq":
            with recording_phases() as phases:
                result, next_inputs = awq_block_step(block, groups, inputs, quant, options)
            hidden, reference = next_inputs.hidden_states, next_inputs.reference
            work.save_result(result)
            bar.set_postfix(mse_rtn=f"{result.mse_rtn:.3g}", mse_awq=f"{result.mse_awq:.3g}")
        else:
            hidden = forward_block(block, inputs)
        if streams is not None:
            streams.advance("awq", i, block, names, quant)
        if not all(torch.isfinite(h).all() for h in hidden):
            raise CalibrationError(f"calibration activations became NaN or Inf at the output of layer {i}")
        work.save_block(i, pack_block(block, f"{layers_path}.{i}.", names, quant, resolved))
        if method == "awq":
            costs.append(BlockCost(i, time.perf_counter() - started, phases.get("record forward", math.nan)))
        work.save_hidden(i + 1, hidden, streams.state() if streams is not None else None, reference)
        work.mark_done(i + 1)
        block.to("meta")  # free the block's weights; the next block is read fresh from the shards
        release_freed_memory()  # else heap fragmentation makes the peak creep up block after block
        bar.update(1)
        if on_block is not None:
            on_block(i + 1, len(layers))
    bar.close()
    return non_layer_names, streams


def _guard_verdict(
    src: _Source, streams: GuardStreams, text: str, device: torch.device
) -> GuardResult | None:
    """Score the guard's streams through the model's tail (the non-layer weights, head included,
    loaded for the purpose). A model whose tail cannot be replayed gets a warning, not a failed run."""
    layers_path = src.resolved.decoder_layers
    try:
        load_non_layer(src.model, layers_path, src.reader, with_head=True, device=device)
        verdict = streams.score(src.model, src.layers, text)
    except Exception as exc:
        log.warning("end-to-end check against plain rounding could not run: %s: %s", type(exc).__name__, exc)
        return None
    finally:
        release_non_layer(src.model, layers_path)
        release_freed_memory()
    return verdict


def _round_blocks(src: _Source, work: WorkDir, quant: AwqQuantConfig, device: torch.device) -> None:
    """Replace every stored block by its plain rounding (the guard's fallback): read, round, pack."""
    layers_path, resolved = src.resolved.decoder_layers, src.resolved
    for i in range(len(src.layers)):
        block = load_block(src.model, resolved, i, src.reader, device)
        names = block_linear_names(block, resolved.block(i), quant)
        work.save_block(i, pack_block(block, f"{layers_path}.{i}.", names, quant, resolved))
        block.to("meta")
        release_freed_memory()


def quantize_checkpoint(
    source: str | Path,
    out: str | Path,
    quant: AwqQuantConfig,
    *,
    method: str = "awq",
    calib: CalibSource = DEFAULTS.source,
    n_samples: int = DEFAULTS.n_samples,
    seq_len: int = DEFAULTS.seq_len,
    template: str | Path | dict[str, Any] | None = None,
    options: AwqOptions | None = None,
    guard: str = "fallback",
    device: str | torch.device | None = "auto",
    overwrite: bool = False,
    progress: bool = True,
    trust_remote_code: bool = False,
    on_block: Callable[[int, int], None] | None = None,
) -> QuantizeReport:
    """Quantize the transformers folder ``source`` into an AWQ checkpoint at ``out``.

    Holds one decoder block and the calibration activations in memory (the embeddings only
    while the block-0 inputs are captured); resumable (see the module docstring).
    ``method="rtn"`` skips the search: plain round-to-nearest, the baseline AWQ is measured
    against. ``calib`` is a built-in text name, a file, documents, or token ids
    ``[n_samples, seq_len]``. ``guard`` is what to do when AWQ ends worse than plain
    rounding on held-out windows (:mod:`awq_plugin.pipeline.guard`): ``fallback`` writes
    rounding, ``warn`` keeps AWQ, ``off`` skips the check. ``device`` is where each block
    is computed (``auto``: the first CUDA device if there is one, else the CPU); the
    source and the results stay on the host. Python code shipped with ``source``
    (``auto_map``) is imported only with ``trust_remote_code=True``. ``on_block(done,
    total)`` is called after each block is stored (the quantize-on-start cache logs
    progress with it).
    """
    started = time.monotonic()
    source, out = Path(source), Path(out)
    if method not in METHODS:
        raise ConfigError(f"quantization method {method!r} is unknown; choose one of {list(METHODS)}")
    check_guard_mode(guard)
    device = resolve_device(device)
    quant.check_packable()
    options = options or AwqOptions()
    check_output_dir(out, overwrite)
    src = _open_source(source, template, trust_remote_code)
    quant = keeping_ungroupable_in_full_precision(src.layers, src.resolved, quant)
    quant, precision = keeping_full_precision_listed(src.layers, src.resolved, quant)
    windows = GUARD_WINDOWS if method == "awq" and guard != "off" else 0
    calib_ids, held = _calibration_tokens(
        src, calib, n_samples, seq_len, options.seed, trust_remote_code, windows
    )
    n_layers = len(src.layers)
    fp = _run_fingerprint(src, quant, method, calib_ids, options, held, device)
    work = WorkDir(work_dir_path(out), fp)
    done = work.open()
    verdict = None
    costs: list[BlockCost] = []
    try:
        non_layer_names, streams = _quantize_blocks(
            src, work, done, calib_ids, held, quant, method, options, device, progress, on_block, costs
        )
        if streams is not None:
            name = calib if isinstance(calib, str) else "calibration text"
            verdict = _guard_verdict(src, streams, f"held-out windows of {name!r}", device)
        awq_results = None
        results = [work.load_result(i) for i in range(n_layers)] if method == "awq" else []
        if verdict is not None and verdict.awq_lost and guard == "fallback":
            _round_blocks(src, work, quant, device)
            verdict = dataclasses.replace(verdict, action="rounded")
        elif method == "awq":
            awq_results = AwqResults(
                blocks=[r for r in results if r is not None],
                template=dict(src.resolved.data),
                quant_config=quant_config_dict(quant),
                options=options.to_dict(),
            )
        if verdict is not None:
            (log.warning if verdict.awq_lost else log.info)("%s", verdict.message())
        output_bytes = assemble_checkpoint(
            out,
            overwrite,
            work,
            n_layers,
            src.reader,
            non_layer_names,
            source,
            src.config,
            quant,
            awq_results,
        )
    except AwqPluginError:
        # Bad input fails the same way on every rerun, and fixed input is a different run
        # (another fingerprint): nothing here is worth resuming. Interrupts and OS errors
        # (a full disk) keep the state.
        shutil.rmtree(work.path, ignore_errors=True)
        raise
    shutil.rmtree(work.path, ignore_errors=True)
    return QuantizeReport(
        out=str(out),
        method=method,
        scheme=quant.scheme,
        seconds=time.monotonic() - started,
        peak_rss_bytes=peak_rss_bytes(),
        source_bytes=src.reader.total_bytes(),
        output_bytes=output_bytes,
        n_samples=int(calib_ids.shape[0]),
        seq_len=int(calib_ids.shape[1]),
        threads=torch.get_num_threads(),
        resumed_from_block=done,
        blocks=[
            {"layer": r.layer_index, "mse_rtn": r.mse_rtn, "mse_awq": r.mse_awq, "choice": r.choice}
            for r in results
            if r
        ],
        guard=verdict.to_dict() if verdict else None,
        precision=precision.as_dict(),
        precision_lines=precision.lines(),
        device=str(device),
        costs=[c.to_dict() for c in costs],
    )
