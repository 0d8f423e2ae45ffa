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

The work dir (``.OUT.awq-work`` beside OUT) makes runs resumable: it is keyed
by a fingerprint of every input (source tensors, config, calibration, options,
torch version and thread count); a rerun with the same fingerprint continues
after the last finished block, and because every intermediate is stored
exactly (fp32 safetensors), the result is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from tqdm.auto import tqdm

from awq_plugin.algorithm.awq import AwqOptions, AwqResults, BlockAwqResult, awq_block_step, quant_config_dict
from awq_plugin.algorithm.awq import quantized_linear_names as block_linear_names
from awq_plugin.calibration.capture import capture_decoder_inputs, forward_block
from awq_plugin.calibration.text import calibration_windows
from awq_plugin.config import AwqQuantConfig
from awq_plugin.errors import AwqPluginError, CalibrationError, CheckpointError, ConfigError
from awq_plugin.format.checkpoint import (
    SafetensorsReader,
    TensorSpec,
    copy_side_files,
    read_json,
    read_safetensors_header,
    validate_checkpoint,
    write_model_config,
    write_sharded,
)
from awq_plugin.format.packing import packed_state_dict
from awq_plugin.fsutil import atomic_output_dir, atomic_write_bytes, atomic_write_json, check_output_dir
from awq_plugin.models.experts import split_fused_expert_tensors
from awq_plugin.numerics.quant_ref import is_all_finite
from awq_plugin.procmem import peak_rss_bytes, release_freed_memory  # peak: VmHWM, see there
from awq_plugin.runtime.modeling import build_empty_model, hf_config_from_dict, remote_code_files
from awq_plugin.templates import ResolvedTemplate, resolve_template

log = logging.getLogger(__name__)

METHODS = ("awq", "rtn")
RESULTS_FILE = "awq_plugin/awq_results.safetensors"  # inside OUT; not top-level, so loaders that
# glob "*.safetensors" (vLLM without an index) never mistake it for weights
WORK_FORMAT = 2  # 2: block inputs kept per layer (hidden_NNNNN.safetensors)


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        lines = [
            f"quantized ({self.method}, {self.scheme}) -> {self.out}",
            f"time {self.seconds:.0f} s with {self.threads} threads; peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB",
            f"size {self.source_bytes / 2**20:.1f} MiB -> {self.output_bytes / 2**20:.1f} MiB "
            f"({self.source_bytes / max(self.output_bytes, 1):.2f}x smaller)",
        ]
        if self.resumed_from_block:
            lines.append(f"resumed after block {self.resumed_from_block - 1}")
        if self.blocks and "mse_awq" in self.blocks[0]:
            lines.append("block output MSE vs full precision: plain rounding -> AWQ")
            for b in self.blocks:
                lines.append(f"  layer {b['layer']:3d}: {b['mse_rtn']:.4g} -> {b['mse_awq']:.4g}")
        return "\n".join(lines)


def _fingerprint(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _source_fingerprint(reader: SafetensorsReader, folder: Path) -> dict[str, Any]:
    files = sorted({reader.shard_of(n) for n in reader})
    return {
        "tensors": {n: [reader.get_dtype(n), list(reader.get_slice_shape(n))] for n in reader},
        "files": {f: (folder / f).stat().st_size for f in files},
        "config": hashlib.sha256((folder / "config.json").read_bytes()).hexdigest(),
    }


def work_dir_path(out: Path) -> Path:
    """Where a run writing ``out`` keeps its resumable state: a hidden folder beside it."""
    return out.with_name(f".{out.name}.awq-work")


class WorkDir:
    """The resumable state of one run: finished blocks, their results, the next block's inputs."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path = path
        self.fingerprint = fingerprint

    def open(self) -> int:
        """Prepare the directory; return how many blocks are already done (0 for a fresh run)."""
        state_file = self.path / "progress.json"
        if state_file.is_file():
            try:
                state = json.loads(state_file.read_text())
            except json.JSONDecodeError:
                state = {}
            if state.get("fingerprint") == self.fingerprint and state.get("format") == WORK_FORMAT:
                done = int(state.get("done", 0))
                self.mark_done(done)  # rewritten: a resumed run shows it is alive
                return done
            log.info("work dir %s belongs to a different run; starting afresh", self.path)
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True)
        self.mark_done(0)
        return 0

    def mark_done(self, done: int) -> None:
        """Record that ``done`` blocks are finished; then drop inputs no resume can need."""
        atomic_write_json(
            self.path / "progress.json",
            {"fingerprint": self.fingerprint, "format": WORK_FORMAT, "done": done},
        )
        for path in self.path.glob("hidden_*.safetensors"):
            if int(path.stem.split("_")[1]) < done:
                path.unlink()

    def block_file(self, i: int) -> Path:
        return self.path / f"block_{i:05d}.safetensors"

    def result_file(self, i: int) -> Path:
        return self.path / f"result_{i:05d}.safetensors"

    def save_block(self, i: int, tensors: dict[str, torch.Tensor]) -> None:
        atomic_write_bytes(self.block_file(i), safetensors_bytes(tensors, metadata={"format": "pt"}))

    def save_result(self, result: BlockAwqResult) -> None:
        tensors, meta = result.to_state()
        data = safetensors_bytes(tensors, metadata={"result": json.dumps(meta, sort_keys=True)})
        atomic_write_bytes(self.result_file(result.layer_index), data)

    def load_result(self, i: int) -> BlockAwqResult | None:
        path = self.result_file(i)
        if not path.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["result"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
        return BlockAwqResult.from_state(tensors, meta)

    def hidden_file(self, next_layer: int) -> Path:
        return self.path / f"hidden_{next_layer:05d}.safetensors"

    def save_hidden(self, next_layer: int, hidden: Sequence[torch.Tensor]) -> None:
        """Store block ``next_layer``'s inputs beside the previous block's.

        The previous file is dropped only by :meth:`mark_done`, after the marker moved on: a
        kill between this write and the marker's finds the inputs the marker points at.
        """
        tensors = {f"hidden.{m}": h.contiguous() for m, h in enumerate(hidden)}
        data = safetensors_bytes(tensors, metadata={"next_layer": str(next_layer)})
        atomic_write_bytes(self.hidden_file(next_layer), data)

    def load_hidden(self, next_layer: int) -> list[torch.Tensor]:
        from safetensors import safe_open

        path = self.hidden_file(next_layer)
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: the work dir {self.path} is damaged; delete it")
        with safe_open(str(path), framework="pt") as f:
            count = len(list(f.keys()))
            return [f.get_tensor(f"hidden.{m}") for m in range(count)]


def _check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    for name, tensor in tensors.items():
        if not is_all_finite(tensor):
            raise CheckpointError(f"{what}: tensor {name} contains NaN or Inf")


def _load_block(
    model: torch.nn.Module, resolved: ResolvedTemplate, i: int, reader: SafetensorsReader
) -> torch.nn.Module:
    """Read decoder layer ``i`` from the source into the model (names as the template maps them)."""
    layers_path = resolved.decoder_layers
    prefix = f"{layers_path}.{i}."
    state = {
        resolved.from_checkpoint_name(name)[len(prefix) :]: reader.get(name, torch.float32)
        for name in reader
        if name.startswith(prefix)
    }
    if resolved.experts is not None:  # a source that stores the experts fused
        state = split_fused_expert_tensors(state, resolved.experts)
    _check_finite({prefix + k: v for k, v in state.items()}, "source checkpoint")
    block = model.get_submodule(f"{layers_path}.{i}")
    result = block.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys:
        raise CheckpointError(f"source checkpoint lacks tensor {prefix}{result.missing_keys[0]}")
    if result.unexpected_keys:
        raise CheckpointError(f"source checkpoint has unexpected tensor {prefix}{result.unexpected_keys[0]}")
    return block


def _output_head_names(model: torch.nn.Module) -> set[str]:
    """The output head's own parameters (``lm_head.weight``), unless it is tied to the embeddings."""
    head = model.get_output_embeddings()
    if head is None or getattr(model.config, "tie_word_embeddings", False):
        return set()
    return {
        f"{name}.{leaf}" if name else leaf
        for name, module in model.named_modules()
        if module is head
        for leaf, _ in module.named_parameters(recurse=False)
    }


def _load_non_layer(model: torch.nn.Module, layers_path: str, reader: SafetensorsReader) -> list[str]:
    """Load the tensors outside the decoder layers that the capture forward needs, in fp32.

    The output head is checked (present, right shape) but not read: the capture
    stops at the last decoder layer, and the head, as large as the embeddings,
    is copied tensor by tensor when the checkpoint is assembled. Returns the
    names of all the source's non-layer tensors.
    """
    names = [n for n in reader if not n.startswith(layers_path + ".")]
    head = _output_head_names(model)
    state = {n: reader.get(n, torch.float32) for n in names if n not in head}
    _check_finite(state, "source checkpoint")
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise CheckpointError(f"source checkpoint has unexpected tensor {result.unexpected_keys[0]}")
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [
        k
        for k in result.missing_keys
        if not k.startswith(layers_path + ".") and not (tied and k == "lm_head.weight") and k not in head
    ]
    for name in sorted(head):
        if name not in reader:
            missing.append(name)
        elif tuple(reader.get_slice_shape(name)) != tuple(model.get_parameter(name).shape):
            raise CheckpointError(
                f"source tensor {name} has shape {list(reader.get_slice_shape(name))}, "
                f"the architecture expects {list(model.get_parameter(name).shape)}"
            )
    if missing:
        raise CheckpointError(f"source checkpoint lacks tensor {missing[0]}")
    if tied:
        model.tie_weights()
    return names


def _release_non_layer(model: torch.nn.Module, layers_path: str) -> None:
    """Move every parameter outside the decoder layers to the meta device (frees the embeddings).

    Once the calibration inputs of the decoder stack are captured, nothing
    before or after it runs again in this process.
    """
    for name, module in model.named_modules():
        if name == layers_path or name.startswith(layers_path + "."):
            continue
        for leaf, param in list(module.named_parameters(recurse=False)):
            setattr(module, leaf, torch.nn.Parameter(param.to("meta"), requires_grad=False))


def _pack_block(
    block: torch.nn.Module,
    prefix: str,
    names: Sequence[str],
    quant: AwqQuantConfig,
    resolved: ResolvedTemplate,
) -> dict[str, torch.Tensor]:
    """A finished block's checkpoint tensors: packed linears plus everything else in fp16.

    Names are the checkpoint's (``resolved.to_checkpoint_name``): per-expert
    layers as AutoAWQ and vLLM read them, e.g. Mixtral's ``block_sparse_moe``.
    """
    tensors = packed_state_dict(block, names, quant, prefix=prefix, rename=resolved.to_checkpoint_name)
    for name, tensor in tensors.items():  # inputs were finite: anything else is fp16 overflow
        if tensor.is_floating_point() and not is_all_finite(tensor):
            raise CheckpointError(
                f"{name} overflows float16 (max 65504), the format's type for scales and "
                "unquantized weights: the source weights are too large to store"
            )
    return tensors


def quantize_checkpoint(
    source: str | Path,
    out: str | Path,
    quant: AwqQuantConfig,
    *,
    method: str = "awq",
    calib: str | Path | Sequence[str] = "enwiki",
    n_samples: int = 128,
    seq_len: int = 512,
    template: str | Path | dict[str, Any] | None = None,
    options: AwqOptions | None = None,
    overwrite: bool = False,
    progress: bool = True,
    trust_remote_code: bool = False,
) -> QuantizeReport:
    """Quantize the transformers folder ``source`` into an AWQ checkpoint at ``out``.

    Holds one decoder block and the calibration activations in memory (the
    embeddings only while the block-0 inputs are captured); resumable (see the module docstring). ``method="rtn"`` skips the
    search: plain round-to-nearest, the baseline AWQ is measured against. Python code shipped
    with ``source`` (``auto_map``) is imported only with ``trust_remote_code=True``.
    """
    started = time.monotonic()
    source, out = Path(source), Path(out)
    if method not in METHODS:
        raise ConfigError(f"quantization method {method!r} is unknown; choose one of {list(METHODS)}")
    quant.check_packable()
    options = options or AwqOptions()
    check_output_dir(out, overwrite)
    source_config = read_json(source / "config.json")
    if "quantization_config" in source_config:
        raise ConfigError(f"{source} is already quantized (its config.json has a quantization_config)")
    reader = SafetensorsReader(source)
    hf_config = hf_config_from_dict(source_config, trust_remote_code, source)
    model = build_empty_model(hf_config, torch.float32, trust_remote_code)
    resolved = resolve_template(model, template)
    layers_path = resolved.decoder_layers
    layers = model.get_submodule(layers_path)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    calib_ids = calibration_windows(tokenizer, calib, n_samples, seq_len, seed=options.seed)
    fingerprint = _fingerprint(
        {
            "source": _source_fingerprint(reader, source),
            "quant": quant.to_quantization_config(),
            "method": method,
            "calib_ids": hashlib.sha256(calib_ids.numpy().tobytes()).hexdigest(),
            "options": options.to_dict(),
            "template": resolved.to_json(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
    )
    work = WorkDir(work_dir_path(out), fingerprint)
    done = work.open()
    try:
        non_layer_names = _load_non_layer(model, layers_path, reader)
        captured = capture_decoder_inputs(model, layers, calib_ids, options.micro_batch_size)
        _release_non_layer(model, layers_path)  # from here on memory holds one block and the activations
        hidden = captured.hidden_states if done == 0 else work.load_hidden(done)

        bar = tqdm(
            total=len(layers),
            initial=done,
            desc=f"{method.upper()} blocks",
            unit="block",
            disable=not progress,
        )
        for i in range(done, len(layers)):
            prefix = f"{layers_path}.{i}."
            block = _load_block(model, resolved, i, reader)
            groups = resolved.block(i)
            inputs = captured.for_layer(i, hidden)
            if method == "awq":
                result, next_inputs = awq_block_step(block, groups, inputs, quant, options)
                hidden = next_inputs.hidden_states
                work.save_result(result)
                bar.set_postfix(mse_rtn=f"{result.mse_rtn:.3g}", mse_awq=f"{result.mse_awq:.3g}")
            else:
                hidden = forward_block(block, inputs)
            if not all(torch.isfinite(h).all() for h in hidden):
                raise CalibrationError(
                    f"calibration activations became NaN or Inf at the output of layer {i}"
                )
            names = block_linear_names(block, groups, quant)
            work.save_block(i, _pack_block(block, prefix, names, quant, resolved))
            work.save_hidden(i + 1, hidden)
            work.mark_done(i + 1)
            block.to("meta")  # free the block's weights; the next block is read fresh from the shards
            release_freed_memory()  # else heap fragmentation makes the peak creep up block after block
            bar.update(1)
        bar.close()

        results = [work.load_result(i) for i in range(len(layers))] if method == "awq" else []
        output_bytes = _assemble(
            out,
            overwrite,
            work,
            len(layers),
            reader,
            non_layer_names,
            source,
            source_config,
            quant,
            AwqResults(
                blocks=[r for r in results if r is not None],
                template=dict(resolved.data),
                quant_config=quant_config_dict(quant),
                options=options.to_dict(),
            )
            if method == "awq"
            else None,
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
        source_bytes=reader.total_bytes(),
        output_bytes=output_bytes,
        n_samples=n_samples,
        seq_len=seq_len,
        threads=torch.get_num_threads(),
        resumed_from_block=done,
        blocks=[{"layer": r.layer_index, "mse_rtn": r.mse_rtn, "mse_awq": r.mse_awq} for r in results if r],
    )


def _assemble(
    out: Path,
    overwrite: bool,
    work: WorkDir,
    n_layers: int,
    reader: SafetensorsReader,
    non_layer_names: Sequence[str],
    source: Path,
    source_config: dict[str, Any],
    quant: AwqQuantConfig,
    results: AwqResults | None,
) -> int:
    """Write the final checkpoint from the work dir and the source's non-layer tensors.

    Tensor specs come from the headers alone, so the shards are written one
    tensor at a time (see :func:`write_sharded`): peak memory here is one
    block file plus the largest source tensor, not one 2 GiB output shard.
    """
    sources: dict[str, tuple[str, Any]] = {}
    specs: dict[str, TensorSpec] = {}
    for name in non_layer_names:
        sources[name] = ("source", name)
        spec = reader.get_spec(name)
        specs[name] = TensorSpec(torch.float16, spec.shape) if spec.dtype.is_floating_point else spec
    for i in range(n_layers):
        entries, _ = read_safetensors_header(work.block_file(i))
        for name, entry in entries.items():
            sources[name] = ("block", i)
            specs[name] = entry.spec
    cache: dict[int, dict[str, torch.Tensor]] = {}

    def load(where: tuple[str, Any], name: str) -> torch.Tensor:
        kind, key = where
        if kind == "source":  # read straight into fp16 (see SafetensorsReader.get)
            tensor = reader.get(name, specs[name].dtype)
            _check_finite({name: tensor}, "source checkpoint (in fp16)")  # the head was not read before
            return tensor
        if key not in cache:
            cache.clear()  # hold one block file at a time
            cache[key] = load_file(str(work.block_file(key)))
        return cache[key][name]

    with atomic_output_dir(out, overwrite=overwrite) as staging:
        write_sharded(staging, sources, load, specs)
        write_model_config(source_config, staging, quant)
        copy_side_files(source, staging)
        for name in remote_code_files(source_config, source):  # the code its config.json names
            shutil.copyfile(source / name, staging / name)
        if results is not None:
            (staging / RESULTS_FILE).parent.mkdir(parents=True, exist_ok=True)
            results.save(staging / RESULTS_FILE)
        validate_checkpoint(staging)
        total = sum(f.stat().st_size for f in staging.glob("*.safetensors"))
    return total
