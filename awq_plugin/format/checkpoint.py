"""Reading source checkpoints tensor by tensor, and writing / validating AWQ checkpoints.

Only safetensors and JSON are ever read: no pickle, so a checkpoint cannot run
code. Source shards are memory-mapped and read one tensor at a time, which is
what lets the quantizer hold a single decoder block in memory.

An AWQ checkpoint is a transformers folder whose quantized linear layers store
``<prefix>.qweight``, ``<prefix>.qzeros`` and ``<prefix>.scales`` (layout in
:mod:`awq_plugin.numerics.pack`) instead of ``<prefix>.weight``, and whose config.json
carries ``quantization_config`` (see :mod:`awq_plugin.config`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from awq_plugin.config import AwqQuantConfig, load_quant_config
from awq_plugin.errors import CheckpointError, ConfigError
from awq_plugin.fsutil import atomic_output_dir, atomic_write_json, dir_size_bytes
from awq_plugin.numerics import effective_group_size
from awq_plugin.numerics.pack import PACK_FACTOR

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
QUANT_SUFFIXES = ("qweight", "qzeros", "scales")
DEFAULT_SHARD_BYTES = 2 * 1024**3
READ_CHUNK_BYTES = 16 * 2**20  # converting reads go through a buffer this large
# Files copied verbatim from the source folder into a quantized checkpoint.
COPIED_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    # multimodal processors (vision-language models): what AutoProcessor and vLLM read
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
)


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON object file, naming the file in any error."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


# safetensors dtype names -> (torch dtype, bytes per element)
_ST_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}
_MAX_HEADER_BYTES = 100 * 2**20  # the format's own limit


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in a safetensors file, as its header says (validated)."""

    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(_ST_DTYPES[self.dtype][0], self.shape)


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse and validate a safetensors header without mapping the file.

    Checks what a truncated, corrupted or hostile file could get wrong: header
    length, JSON syntax, dtypes, shapes, offsets inside the file and sizes that
    match ``numel * itemsize``. Returns the entries and the ``__metadata__`` dict.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path} is not a readable safetensors file: shorter than 8 bytes")
            header_len = int.from_bytes(prefix, "little")
            if header_len > min(_MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(
                    f"{path} is not a readable safetensors file: header length {header_len} exceeds the file"
                )
            raw = handle.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be read: {exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: bad header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a readable safetensors file: header is not a JSON object")
    data_start = 8 + header_len
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path} is not a readable safetensors file: '__metadata__' is not an object")
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        where = f"{path} is not a readable safetensors file: tensor {name!r}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{where} has no description")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
            raise CheckpointError(f"{where} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise CheckpointError(f"{where} has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise CheckpointError(f"{where} has invalid data_offsets {offsets!r}")
        nbytes = math.prod(shape) * _ST_DTYPES[dtype][1]
        if offsets[1] - offsets[0] != nbytes:
            raise CheckpointError(f"{where} spans {offsets[1] - offsets[0]} bytes, its shape needs {nbytes}")
        if data_start + offsets[1] > size:
            raise CheckpointError(f"{where} ends past the end of the file (truncated?)")
        entries[name] = TensorEntry(dtype, tuple(shape), data_start + offsets[0], nbytes)
    return entries, {str(k): str(v) for k, v in metadata.items()}


class SafetensorsReader:
    """Tensor-by-tensor access to a folder of safetensors shards (single file or indexed).

    Every shard's header is read and validated up front, so a missing, truncated
    or corrupted shard is reported by name before any work starts. Tensors are
    read with plain positional reads, not memory maps: the process holds only
    the tensors it asked for, which keeps the quantizer's resident memory
    bounded by one block (a mapped shard counts toward RSS once touched).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"model folder {self.folder} does not exist")
        self._where: dict[str, str] = {}
        self._entries: dict[str, TensorEntry] = {}
        index = self.folder / INDEX_FILE
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index} has no 'weight_map' object")
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard file names")
            shards = sorted(set(weight_map.values()))
            for shard in shards:
                if "/" in shard or "\\" in shard or shard.startswith("."):
                    raise CheckpointError(f"{index} names an invalid shard file {shard!r}")
                if not (self.folder / shard).is_file():
                    raise CheckpointError(
                        f"shard {shard} is listed in {INDEX_FILE} but missing from {self.folder}"
                    )
        elif (self.folder / SINGLE_FILE).is_file():
            shards, weight_map = [SINGLE_FILE], None
        else:
            pickles = sorted(p.name for p in self.folder.glob("*.bin")) + sorted(
                p.name for p in self.folder.glob("*.pt")
            )
            hint = (
                f" (found {pickles}: pickle files are never loaded, convert them to safetensors)"
                if pickles
                else ""
            )
            raise CheckpointError(f"{self.folder} holds no {SINGLE_FILE} or {INDEX_FILE}{hint}")
        for shard in shards:
            entries, _ = read_safetensors_header(self.folder / shard)
            for name, entry in entries.items():
                if weight_map is not None and weight_map.get(name) != shard:
                    continue
                self._where[name] = shard
                self._entries[name] = entry
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self._where))
            if missing:
                raise CheckpointError(
                    f"{len(missing)} tensors listed in {INDEX_FILE} are not in their shards, e.g. {missing[0]!r}"
                )

    def keys(self) -> list[str]:
        return sorted(self._where)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shard_of(self, name: str) -> str:
        return self._where[name]

    def _entry(self, name: str) -> TensorEntry:
        if name not in self._entries:
            raise CheckpointError(f"tensor {name!r} is missing from {self.folder}")
        return self._entries[name]

    def get(
        self, name: str, dtype: torch.dtype | None = None, chunk_bytes: int = READ_CHUNK_BYTES
    ) -> torch.Tensor:
        """Load one tensor (a private copy), naming it and its file if it cannot be read.

        With ``dtype`` the tensor is converted while it is read, ``chunk_bytes``
        of the file at a time, so memory holds the result and one chunk, never
        the stored copy as well (reading a bf16 embedding as fp32 needs 2x its
        size, not 3x).
        """
        entry = self._entry(name)
        path = self.folder / self._where[name]
        stored = _ST_DTYPES[entry.dtype][0]
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=dtype or stored)
        convert = dtype is not None and dtype != stored
        out = torch.empty(entry.shape, dtype=dtype) if convert else None
        itemsize = _ST_DTYPES[entry.dtype][1]
        step = max(itemsize, chunk_bytes // itemsize * itemsize) if convert else entry.nbytes
        buffer = bytearray(min(step, entry.nbytes))
        done = 0
        try:
            with open(path, "rb") as handle:
                handle.seek(entry.start)
                while done < entry.nbytes:
                    want = min(step, entry.nbytes - done)
                    got = handle.readinto(memoryview(buffer)[:want])
                    if got != want:
                        raise CheckpointError(
                            f"tensor {name!r} in {path} is truncated ({done + got} of {entry.nbytes} bytes)"
                        )
                    if out is not None:  # (numel,) flat view of the result, filled chunk by chunk
                        chunk = torch.frombuffer(buffer, dtype=stored, count=want // itemsize)
                        out.view(-1)[done // itemsize : (done + want) // itemsize].copy_(chunk)
                    done += want
        except OSError as exc:
            raise CheckpointError(f"tensor {name!r} in {path} cannot be read: {exc}") from None
        if out is not None:
            return out
        return torch.frombuffer(buffer, dtype=stored).reshape(entry.shape)

    def get_slice_shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, read from the header without loading the data."""
        return self._entry(name).shape

    def get_dtype(self, name: str) -> str:
        return self._entry(name).dtype

    def get_spec(self, name: str) -> TensorSpec:
        """A tensor's torch dtype and shape, from the header."""
        return self._entry(name).spec

    def tensors_with_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """All tensors whose name starts with ``prefix``, keyed by the rest of the name."""
        return {name[len(prefix) :]: self.get(name) for name in self.keys() if name.startswith(prefix)}

    def total_bytes(self) -> int:
        return sum((self.folder / shard).stat().st_size for shard in set(self._where.values()))


# ---- writing ---------------------------------------------------------------------------------


# safetensors' own order of the data section: dtypes from its dtype enum, highest first (so
# wider elements come first and every tensor stays aligned), then names. Following it makes our
# streamed files byte-identical to ``safetensors.torch.save_file``'s.
_ST_DATA_ORDER = ("I64", "F64", "F32", "I32", "BF16", "F16", "I16", "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL")
_TORCH_TO_ST = {dtype: name for name, (dtype, _) in _ST_DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's dtype and shape, known before its data: what a safetensors header needs."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorSpec:
        return cls(tensor.dtype, tuple(tensor.shape))

    @property
    def st_dtype(self) -> str:
        if self.dtype not in _TORCH_TO_ST:
            raise CheckpointError(f"dtype {self.dtype} cannot be stored in safetensors by this writer")
        return _TORCH_TO_ST[self.dtype]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ST_DTYPES[self.st_dtype][1]


def safetensors_header(
    specs: Mapping[str, TensorSpec], metadata: Mapping[str, str] | None = None
) -> tuple[bytes, list[str]]:
    """The header of a safetensors file (length prefix included) and the order of its data.

    Same layout as the safetensors library: compact JSON, ``__metadata__``
    first, data sorted by dtype then name, header padded with spaces to a
    multiple of 8 bytes.
    """
    rank = {name: i for i, name in enumerate(_ST_DATA_ORDER)}
    order = sorted(specs, key=lambda n: (rank[specs[n].st_dtype], n))
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    offset = 0
    for name in order:
        spec = specs[name]
        header[name] = {
            "dtype": spec.st_dtype,
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, order


def write_safetensors(
    path: Path,
    specs: Mapping[str, TensorSpec],
    load: Any,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a safetensors file holding one tensor in memory at a time.

    The header is written first from ``specs``; then ``load(name)`` produces
    each tensor, which must match its spec, and its bytes are appended. The
    bytes equal ``safetensors.torch.save_file``'s for the same tensors (for
    metadata of more than one key that library's order varies; ours is sorted).
    """
    header, order = safetensors_header(specs, metadata)
    with open(path, "wb") as handle:
        handle.write(header)
        for name in order:
            tensor = load(name)
            if TensorSpec.of(tensor) != specs[name]:
                raise CheckpointError(
                    f"tensor {name} is {tensor.dtype} {list(tensor.shape)}, but its header entry says "
                    f"{specs[name].dtype} {list(specs[name].shape)}"
                )
            if tensor.numel():
                # (numel,) viewed as raw bytes, little-endian as on every platform torch supports
                handle.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del tensor


def plan_shards(sizes: Mapping[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Split tensor names (in sorted order) into shards of at most ``max_shard_bytes``."""
    shards: list[list[str]] = [[]]
    current = 0
    for name in sorted(sizes):
        size = sizes[name]
        if shards[-1] and current + size > max_shard_bytes:
            shards.append([])
            current = 0
        shards[-1].append(name)
        current += size
    return shards


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def write_sharded(
    folder: Path,
    tensor_sources: Mapping[str, Any],
    load: Any,
    specs: Mapping[str, TensorSpec],
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> list[str]:
    """Write tensors to ``folder`` as HF-style shards plus index (or one file).

    ``tensor_sources`` maps each tensor name to whatever ``load(source, name)``
    needs to produce it; ``specs`` gives every tensor's dtype and shape up
    front, so each shard's header is written first and its tensors are then
    loaded and written one at a time: memory stays bounded by the largest
    tensor, not by a shard. Output is deterministic: names are sorted,
    metadata is fixed.
    """
    sizes = {name: spec.nbytes for name, spec in specs.items()}
    groups = plan_shards(sizes, max_shard_bytes)
    names = (
        [SINGLE_FILE]
        if len(groups) == 1
        else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    )
    weight_map: dict[str, str] = {}
    for file_name, group in zip(names, groups, strict=True):
        write_safetensors(
            folder / file_name,
            {name: specs[name] for name in group},
            lambda name: load(tensor_sources[name], name),
            metadata={"format": "pt"},
        )
        weight_map.update(dict.fromkeys(group, file_name))
    if len(groups) > 1:
        atomic_write_json(
            folder / INDEX_FILE,
            {"metadata": {"total_size": int(sum(sizes.values()))}, "weight_map": weight_map},
        )
    return names


def copy_side_files(source: Path, dest: Path) -> list[str]:
    """Copy tokenizer and generation files that exist in ``source`` to ``dest``."""
    copied = []
    for name in COPIED_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, dest / name)
            copied.append(name)
    return copied


FLOAT_DTYPES = ("float16", "bfloat16", "float32")  # dtypes a checkpoint may declare for its model
DEFAULT_DTYPE = "float16"  # AutoAWQ's, where the source declares none


def declared_dtype(source_config: Mapping[str, Any]) -> str:
    """The dtype the source model declares (``dtype``, or the older ``torch_dtype``), float16 if none.

    The checkpoint keeps it so that ``from_pretrained`` reloads the model in its own dtype, not
    narrowed to float16: some models do not run in float16 at all (DeepSeek-V4 keeps its norms in
    float32 through ``_keep_in_fp32_modules_strict``; their float32 output then meets the float16
    weight of a linear kept in full precision). The stored tensors keep the format's types (INT4,
    float16 for everything else); loading casts the float16 ones to the declared dtype.
    """
    for key in ("dtype", "torch_dtype"):
        value = source_config.get(key)
        name = str(value).removeprefix("torch.") if value is not None else None
        if name in FLOAT_DTYPES:
            return name
    return DEFAULT_DTYPE


def write_model_config(source_config: Mapping[str, Any], dest: Path, quant: AwqQuantConfig) -> None:
    """Write config.json: the source's, with our ``quantization_config`` and its own dtype.

    ``dest`` holds the checkpoint's shards already: the modules they keep in full precision
    outside the quantized layer stacks (a VLM's vision tower and projector) are added to
    ``modules_to_not_convert`` (see :func:`full_precision_modules`).
    """
    config = dict(source_config)
    if any(Path(dest).glob("*.safetensors")):
        extra = full_precision_modules(config, iter_quantized_prefixes(SafetensorsReader(dest).keys()))
        listed = tuple(quant.modules_to_not_convert)
        missing = tuple(p for p in extra if p not in listed)
        if missing:
            quant = dataclasses.replace(quant, modules_to_not_convert=listed + missing)
    config["quantization_config"] = quant.to_quantization_config()
    config["torch_dtype"] = declared_dtype(source_config)
    config.pop("dtype", None)
    atomic_write_json(dest / "config.json", config)


# ---- validation ------------------------------------------------------------------------------


@dataclass
class CheckpointSummary:
    """What ``awq-plugin inspect`` reports about a valid AWQ checkpoint."""

    path: str
    architecture: str
    quant: dict[str, Any]
    quantized_layers: int
    unquantized_tensors: int
    decoder_layers: int | None
    disk_bytes: int  # the safetensors files
    folder_bytes: int  # everything in the folder, tokenizer included
    fp16_equivalent_bytes: int
    quantized_params: int
    other_params: int
    quantized_layer_bytes: int  # bytes the packed layers take (qweight + qzeros + scales)
    layer_names: list[str] = field(default_factory=list)

    @property
    def compression_ratio(self) -> float:
        """fp16 size of all weights over the size of the weight files."""
        return self.fp16_equivalent_bytes / max(self.disk_bytes, 1)

    @property
    def layer_compression_ratio(self) -> float:
        """fp16 size of the quantized layers over their packed size."""
        return 2 * self.quantized_params / max(self.quantized_layer_bytes, 1)

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k != "layer_names"}
        data["compression_ratio"] = round(self.compression_ratio, 3)
        data["layer_compression_ratio"] = round(self.layer_compression_ratio, 3)
        return data

    def render(self) -> str:
        q = self.quant
        lines = [
            f"AWQ checkpoint   {self.path}",
            f"architecture     {self.architecture} ({self.decoder_layers} decoder layers)",
            f"scheme           {q['scheme']}: {q['bits']}-bit, group {q['group_size']}, "
            f"{'asymmetric (zero points)' if q['zero_point'] else 'symmetric'}, layout {q['version']}",
            f"quantized        {self.quantized_layers} linear layers, {self.quantized_params / 1e6:.1f}M weights "
            f"in {self.quantized_layer_bytes / 2**20:.1f} MiB ({self.layer_compression_ratio:.2f}x smaller than fp16)",
            f"not quantized    {self.unquantized_tensors} tensors, {self.other_params / 1e6:.1f}M values",
            f"weights on disk  {self.disk_bytes / 2**20:.1f} MiB "
            f"(fp16 would be {self.fp16_equivalent_bytes / 2**20:.1f} MiB: {self.compression_ratio:.2f}x smaller); "
            f"folder {self.folder_bytes / 2**20:.1f} MiB",
        ]
        return "\n".join(lines)


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckpointError(message)


def validate_quantized_layer(
    reader: SafetensorsReader, prefix: str, quant: AwqQuantConfig
) -> tuple[int, int]:
    """Check one layer's three tensors for dtype and consistent shapes; return (K, N)."""
    for suffix in QUANT_SUFFIXES:
        _expect(f"{prefix}.{suffix}" in reader, f"layer {prefix}: tensor {prefix}.{suffix} is missing")
    qweight, qzeros, scales = (f"{prefix}.{s}" for s in QUANT_SUFFIXES)
    for name, dtype in ((qweight, "I32"), (qzeros, "I32"), (scales, "F16")):
        actual = reader.get_dtype(name)
        _expect(actual == dtype, f"tensor {name} has dtype {actual}, expected {dtype}")
    qw_shape = reader.get_slice_shape(qweight)
    _expect(len(qw_shape) == 2, f"tensor {qweight} has shape {list(qw_shape)}, expected 2-D [K, N/8]")
    k, n = qw_shape[0], qw_shape[1] * PACK_FACTOR
    group = effective_group_size(quant.group_size, k)
    _expect(
        k % group == 0,
        f"layer {prefix}: in_features K={k} is not divisible by group_size={quant.group_size}",
    )
    n_groups = k // group
    expected = {qzeros: (n_groups, n // PACK_FACTOR), scales: (n_groups, n)}
    for name, shape in expected.items():
        actual = reader.get_slice_shape(name)
        _expect(
            tuple(actual) == shape,
            f"tensor {name} has shape {list(actual)}, expected {list(shape)} (K={k}, N={n}, group_size={group})",
        )
    return k, n


def _meta_model(config: Mapping[str, Any]) -> tuple[torch.nn.Module, Any] | None:
    """(the architecture on the meta device, model name -> checkpoint name), None if unknown."""
    try:
        from transformers import AutoConfig

        from awq_plugin.models.auto import auto_model_class
        from awq_plugin.templates import unfuse_experts_for_loading

        hf_config = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "quantization_config"})
        with torch.device("meta"):  # a VLM's checkpoint holds the whole model, not its text part
            model = auto_model_class(hf_config).from_config(hf_config)
        # MoE: transformers' fused experts become the per-expert layers checkpoints store.
        keep = (config.get("quantization_config") or {}).get("modules_to_not_convert") or ()
        names = unfuse_experts_for_loading(model, keep)
    except Exception:  # an architecture transformers cannot build: fall back to the generic checks
        return None
    return model, (names.to_checkpoint_name if names is not None else str)


def _meta_model_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]] | None:
    """Parameter shapes of the architecture, built on the meta device (None if unknown).

    As the checkpoint stores them, except that a linear's weight is ``[out, in]`` also where
    the architecture keeps it transposed (GPT-2's ``Conv1D``), which only a quantized layer's
    check reads: a full-precision ``Conv1D`` weight is checked in its own layout.
    """
    from transformers.pytorch_utils import Conv1D

    from awq_plugin.models.tied import tied_parameters

    built = _meta_model(config)
    if built is None:
        return None
    model, rename = built
    tied = tied_parameters(model)  # a checkpoint stores only the other side of a tie
    shapes = {rename(name): tuple(p.shape) for name, p in model.named_parameters() if name not in tied}
    for name, module in model.named_modules():
        if isinstance(module, Conv1D):
            shapes[rename(f"{name}.weight:linear")] = tuple(reversed(module.weight.shape))
    return shapes


def full_precision_modules(config: Mapping[str, Any], quantized: Iterable[str]) -> list[str]:
    """Module-name patterns (``"model.visual."``) covering the linears kept in full precision
    outside the quantized layer stacks, for ``modules_to_not_convert``.

    For each ``nn.Linear`` of the architecture that is not quantized, the outermost module
    holding it and no quantized layer: a VLM's vision tower (``model.visual``,
    ``model.vision_tower``) or projector. Loaders that give every linear the AWQ method unless
    the list says otherwise (vLLM) need it. Not listed: the output head (never quantized, no
    loader expects it listed) and linears inside a numbered layer stack (a router, a linear
    with an ungroupable input), which the templates and the pipeline already handle. The
    trailing dot keeps the substring match from catching a sibling (``model.visual_proj``).
    Empty when the architecture cannot be built.
    """
    built = _meta_model(config)
    if built is None:
        return []
    model, rename = built
    quantized = set(quantized)
    holding = {".".join(q.split(".")[:i]) for q in quantized for i in range(1, q.count(".") + 2)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    patterns: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        name = rename(name)
        if name in quantized or any(name == p or name.startswith(p) for p in patterns if p.endswith(".")):
            continue
        parts = name.split(".")
        outer = next(
            ".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) not in holding
        )
        if any(part.isdigit() for part in outer.split(".")):
            continue  # inside a layer stack
        patterns.append(outer + "." if outer != name else outer)
    return patterns


def validate_checkpoint(folder: str | Path, check_architecture: bool = True) -> CheckpointSummary:
    """Validate an AWQ checkpoint folder; raise :class:`CheckpointError` naming the first problem.

    Checks config.json and its quantization_config, every quantized layer's three
    tensors (presence, dtype, shapes, K divisible by the group size) and, when the
    architecture can be built by transformers, that every parameter the model has
    is present with the right shape (as a dense weight or as a quantized layer).
    """
    folder = Path(folder)
    config = read_json(folder / "config.json")
    try:
        quant = load_quant_config(config, str(folder / "config.json"))
        quant.check_packable()
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    reader = SafetensorsReader(folder)
    names = reader.keys()
    prefixes = sorted({n.rsplit(".", 1)[0] for n in names if n.rsplit(".", 1)[-1] in QUANT_SUFFIXES})
    _expect(
        bool(prefixes), f"{folder} has a quantization_config but no quantized layers (no '*.qweight' tensors)"
    )
    quantized_params = 0
    quantized_bytes = 0
    dense_shapes: dict[str, tuple[int, ...]] = {}
    layer_shapes: dict[str, tuple[int, int]] = {}
    for prefix in prefixes:
        k, n = validate_quantized_layer(reader, prefix, quant)
        layer_shapes[prefix] = (k, n)
        quantized_params += k * n
        quantized_bytes += 4 * k * n // PACK_FACTOR + sum(
            2 * math.prod(reader.get_slice_shape(f"{prefix}.{s}")) for s in ("qzeros", "scales")
        )
    other_params = 0
    for name in names:
        if name.rsplit(".", 1)[0] in layer_shapes and name.rsplit(".", 1)[-1] in QUANT_SUFFIXES:
            continue
        shape = reader.get_slice_shape(name)
        dense_shapes[name] = shape
        other_params += int(torch.Size(shape).numel())
    if check_architecture:
        expected = _meta_model_shapes(config)
        if expected is not None:
            _check_against_architecture(expected, dense_shapes, layer_shapes)
    return CheckpointSummary(
        path=str(folder),
        architecture=(config.get("architectures") or [config.get("model_type", "?")])[0],
        quant={**quant.to_quantization_config(), "scheme": quant.scheme},
        quantized_layers=len(prefixes),
        unquantized_tensors=len(dense_shapes),
        decoder_layers=config.get("num_hidden_layers"),
        disk_bytes=reader.total_bytes(),
        folder_bytes=dir_size_bytes(folder),
        fp16_equivalent_bytes=2 * (quantized_params + other_params),
        quantized_params=quantized_params,
        other_params=other_params,
        quantized_layer_bytes=quantized_bytes,
        layer_names=prefixes,
    )


def _check_against_architecture(
    expected: Mapping[str, tuple[int, ...]],
    dense: Mapping[str, tuple[int, ...]],
    quantized: Mapping[str, tuple[int, int]],
) -> None:
    for name, shape in expected.items():
        if name.endswith(":linear"):  # a Conv1D weight as [out, in]: see _meta_model_shapes
            continue
        prefix, leaf = name.rsplit(".", 1) if "." in name else ("", name)
        if prefix in quantized and leaf == "weight":
            k, n = quantized[prefix]
            shape = expected.get(f"{name}:linear", shape)
            _expect(
                (n, k) == tuple(shape),
                f"quantized layer {prefix} is [K={k}, N={n}] but the architecture expects "
                f"in_features={shape[1]}, out_features={shape[0]}",
            )
            continue
        _expect(name in dense, f"tensor {name} (shape {list(shape)}) is missing from the checkpoint")
        _expect(
            tuple(dense[name]) == tuple(shape),
            f"tensor {name} has shape {list(dense[name])}, the architecture expects {list(shape)}",
        )


def iter_quantized_prefixes(names: Iterable[str]) -> Iterator[str]:
    seen = set()
    for name in names:
        prefix, _, leaf = name.rpartition(".")
        if leaf == "qweight" and prefix not in seen:
            seen.add(prefix)
            yield prefix


def save_awq_checkpoint(
    out_dir: str | Path,
    state: Mapping[str, torch.Tensor],
    source_config: Mapping[str, Any],
    quant: AwqQuantConfig,
    source_dir: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a complete AWQ checkpoint atomically (staging directory, then rename)."""
    out = Path(out_dir)
    with atomic_output_dir(out, overwrite=overwrite) as staging:
        specs = {name: TensorSpec.of(tensor) for name, tensor in state.items()}
        write_sharded(staging, state, lambda tensor, _name: tensor, specs)
        write_model_config(source_config, staging, quant)
        if source_dir is not None:
            copy_side_files(Path(source_dir), staging)
        validate_checkpoint(staging)
    return out
