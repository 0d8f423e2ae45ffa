"""A content-addressed cache of AWQ checkpoints quantized from full-precision model folders.

Serving's quantize-on-first-start (``vllm serve FP_DIR --quantization awq``) and
transformers' quantize-on-load both come here, so one model with one set of options
is quantized once for both. The core of the package: it never imports vLLM.

Layout of the cache root, ``models/`` under ``$AWQ_PLUGIN_CACHE`` (default
``~/.cache/awq_plugin/models``; the built CPU kernels live beside it)::

    <key>/                                a finished AWQ checkpoint, published atomically
    <key>/awq_plugin/cache_entry.json     where it came from (for ``awq-plugin cache list``)
    .<key>.awq-work/                      an unfinished run's resumable state (the pipeline's)
    .locks/<key>.lock                     flock: one process quantizes a key, the others wait

An entry exists only once it is complete: :func:`quantize_checkpoint` writes into a
staging folder and renames it into place. A killed run leaves only its work dir, which
the next run with the same key resumes; bad input leaves nothing (the pipeline drops
its work dir), and so does a full disk (:func:`ensure_quantized` drops it: keeping
it would keep the disk full).

The key
-------
sha256 of: the source fingerprint (below), the resolved request (scheme, method,
calibration text and size, every AWQ search option, the guard mode), :data:`CACHE_FORMAT`,
the checkpoint config schema version and the quantizer's own output version
(:data:`~awq_plugin.algorithm.options.QUANTIZER_VERSION`, bumped whenever its bytes can
change; the package version is not a signal of that). The device is not in it: an entry
made on a GPU serves a CPU host too.

The source fingerprint reads no weights: per ``*.safetensors`` file its name, size,
mtime (ns) and the sha256 of its header (every tensor's name, dtype, shape and
offsets); every other file of the folder (config, tokenizer, chat template, generation
config: small, and copied into the entry) by the sha256 of its content. Hashing the
weights themselves would cost a full read of the model on every start (minutes for a
large model, more than the cached start is meant to take). Any rewrite of a weight file
gives it a new mtime and a new layout a new header, so a changed model is a new entry;
a copied model (new mtimes) is a miss that costs one quantization, never a wrong
answer. The one false hit left is a weight file rewritten in place to the same size
with its mtime set back by hand.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import shutil
import struct
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from awq_plugin.algorithm.options import GUARD_MODES, QUANTIZER_VERSION
from awq_plugin.calibration.settings import DEFAULTS as CALIBRATION
from awq_plugin.config import CONFIG_SCHEMA_VERSION, AwqQuantConfig
from awq_plugin.errors import AwqPluginError, CheckpointError, ConfigError
from awq_plugin.fsutil import CACHE_ENV, cache_base

MODELS_DIR = "models"  # beside the CPU kernel builds that share the base
#: Layout of an entry and of the key's inputs; bump to invalidate every entry.
CACHE_FORMAT = 1
ENTRY_INFO = "awq_plugin/cache_entry.json"  # inside an entry, beside the pipeline's results
KEY_CHARS = 24  # hex digits of the key in folder names (96 bits)
DEFAULT_METHOD = "awq"
DEFAULT_CALIB = CALIBRATION.source  # a built-in text's name
#: Group sizes tried for the default scheme, largest first.
DEFAULT_GROUPS = (128, 64, 32)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_BIG_SIDE_FILE = 64 * 2**20  # side files above this are fingerprinted by size and mtime
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)

log = logging.getLogger(__name__)


class CacheFullError(AwqPluginError, OSError):
    """The cache's disk has no room for the quantized model."""


def cache_root() -> Path:
    """``$AWQ_PLUGIN_CACHE/models``, else ``~/.cache/awq_plugin/models``."""
    return cache_base() / MODELS_DIR


# ---------------------------------------------------------------------------------------------
# The request: what to quantize with
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizeRequest:
    """The options of a quantize-on-start / quantize-on-load run; every field is in the key.

    ``None`` means the default, resolved by :meth:`resolved` against the source model.
    """

    scheme: str | None = None  # None: uint4_wo_128, or the largest group dividing every layer's input
    method: str = DEFAULT_METHOD  # "awq", or "rtn" (plain rounding)
    calib: str = DEFAULT_CALIB  # built-in text (enwiki, news, pydoc) or a .txt/.jsonl path
    n_samples: int | None = None  # calibration windows; None: the pipeline's default
    seq_len: int | None = None  # tokens per window; None: the pipeline's default
    options: Mapping[str, Any] = field(default_factory=dict)  # AwqOptions fields that differ from defaults
    guard: str = "fallback"  # when AWQ loses to rounding end to end: fallback, warn or off
    device: str = "auto"  # where blocks are computed; not in the key (the same algorithm anywhere)

    #: Keys of the user-facing dict besides AwqOptions' fields and the format fields.
    KEYS = ("scheme", "method", "calib", "n_samples", "seq_len", "guard", "device")
    _FORMAT_KEYS = ("bits", "w_bit", "group_size", "q_group_size", "zero_point", "version", "format")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> QuantizeRequest:
        """Read the user's dict, e.g. ``--hf-overrides '{"quantization_config": {...}}'``'s.

        Keys: ``scheme`` (or the format fields ``bits`` / ``group_size`` / ``zero_point``),
        ``method``, ``calib``, ``n_samples``, ``seq_len`` and any :class:`AwqOptions` field
        (``duo_scaling``, ``clip``, ``search_tokens``, ``seed`` ...); ``quant_method``, if
        given, must be ``"awq"``. Unknown keys are an error that lists the known ones.
        """
        from awq_plugin.algorithm.awq import AwqOptions

        data = dict(data or {})
        method = data.pop("quant_method", "awq")
        if str(method).lower() not in ("awq", "awq_plugin"):
            raise ConfigError(
                f"quantization_config field 'quant_method' = {method!r} is invalid; allowed: 'awq'"
            )
        option_names = {f.name for f in dataclasses.fields(AwqOptions)}
        format_fields = {k: data.pop(k) for k in cls._FORMAT_KEYS if k in data}
        options = {k: data.pop(k) for k in sorted(option_names & set(data))}
        unknown = sorted(set(data) - set(cls.KEYS))
        if unknown:
            known = sorted({*cls.KEYS, *cls._FORMAT_KEYS, *option_names, "quant_method"})
            raise ConfigError(f"quantization_config has unknown field '{unknown[0]}'; known fields: {known}")
        scheme = data.get("scheme")
        if format_fields:
            if scheme is not None:
                raise ConfigError(
                    "quantization_config gives 'scheme' and format fields (bits, group_size ...); give one"
                )
            format_fields.setdefault("bits", format_fields.pop("w_bit", 4))
            format_fields.setdefault("group_size", format_fields.pop("q_group_size", 128))
            scheme = AwqQuantConfig.from_dict(format_fields).scheme
        request = cls(
            scheme=scheme,
            method=data.get("method", DEFAULT_METHOD),
            calib=data.get("calib", DEFAULT_CALIB),
            n_samples=data.get("n_samples"),
            seq_len=data.get("seq_len"),
            options=options,
            guard=data.get("guard", "fallback"),
            device=data.get("device", "auto"),
        )
        request.check()
        return request

    def check(self) -> None:
        """Validate every field; raise :class:`ConfigError` naming the field."""
        from awq_plugin.algorithm.awq import AwqOptions
        from awq_plugin.pipeline.quantize import METHODS

        if self.scheme is not None:
            AwqQuantConfig.from_scheme(self.scheme).check_packable()
        if self.method not in METHODS:
            raise ConfigError(
                f"quantization_config field 'method' = {self.method!r} is invalid; allowed: {list(METHODS)}"
            )
        if not isinstance(self.calib, str) or not self.calib:
            raise ConfigError(
                f"quantization_config field 'calib' = {self.calib!r} must be a text name or a path"
            )
        for name, low in (("n_samples", 1), ("seq_len", 2)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ConfigError(f"quantization_config field '{name}' = {value!r} must be an int >= {low}")
        AwqOptions(**self.options)  # validates its own fields
        if self.guard not in GUARD_MODES:
            raise ConfigError(
                f"quantization_config field 'guard' = {self.guard!r} is invalid; allowed: {list(GUARD_MODES)}"
            )
        if not isinstance(self.device, str) or not self.device:
            raise ConfigError(f"quantization_config field 'device' = {self.device!r} must be a device name")

    def resolved(self, source: Path, tp_size: int = 1) -> QuantizeRequest:
        """Every default filled in: the scheme for this model, the pipeline's calibration size."""
        return dataclasses.replace(
            self,
            scheme=self.scheme or default_scheme(source, tp_size),
            n_samples=self.n_samples or CALIBRATION.n_samples,
            seq_len=self.seq_len or CALIBRATION.seq_len,
        )

    def key_dict(self) -> dict[str, Any]:
        """The request as it enters the key: all AwqOptions fields, defaults included."""
        from awq_plugin.algorithm.awq import AwqOptions

        calib: Any = self.calib
        path = Path(self.calib).expanduser()
        if path.is_file():  # a user's text file: its content decides the calibration
            calib = {"file": str(path.resolve()), "sha256": _sha256_file(path)}
        return {
            "scheme": self.scheme,
            "method": self.method,
            "calib": calib,
            "n_samples": self.n_samples,
            "seq_len": self.seq_len,
            "options": AwqOptions(**self.options).to_dict(),
            "guard": self.guard,
        }

    def describe(self) -> str:
        return (
            f"{self.scheme}, {self.method}, calibration {self.calib} {self.n_samples} x {self.seq_len} tokens"
        )


def _linear_input_sizes(source: Path) -> set[int]:
    """Input sizes of the 2-D weights inside the decoder (headers only; no weights read)."""
    from awq_plugin.format.checkpoint import read_safetensors_header

    sizes: set[int] = set()
    for file in sorted(source.glob("*.safetensors")):
        entries, _ = read_safetensors_header(file)
        for name, entry in entries.items():
            shape = tuple(entry.spec.shape)
            if len(shape) == 2 and name.endswith(".weight") and ".layers." in name:
                sizes.add(shape[1])
    return sizes


def default_scheme(source: Path, tp_size: int = 1) -> str:
    """``uint4_wo_128``, or the largest group (64, 32) that divides every layer's input.

    Tensor parallelism splits row-parallel layers' inputs ``tp_size`` ways, and each rank
    must hold whole groups, so the group must divide ``K / tp_size``.
    """
    sizes = _linear_input_sizes(source)
    for group in DEFAULT_GROUPS:
        if sizes and all(k % (group * tp_size) == 0 for k in sizes):
            return f"uint4_wo_{group}"
    return f"uint4_wo_{DEFAULT_GROUPS[0]}"  # no group fits: the quantizer's own error names the layer


# ---------------------------------------------------------------------------------------------
# The key
# ---------------------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _safetensors_header_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return hashlib.sha256(handle.read(length)).hexdigest()


def source_fingerprint(source: Path) -> dict[str, Any]:
    """What identifies the source model without reading its weights (see the module docstring)."""
    weights: dict[str, Any] = {}
    others: dict[str, Any] = {}
    for path in sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith(".")):
        stat = path.stat()
        if path.suffix == ".safetensors":
            try:
                header = _safetensors_header_sha256(path)
            except (OSError, struct.error) as exc:
                raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None
            weights[path.name] = [stat.st_size, stat.st_mtime_ns, header]
        elif path.suffix in _WEIGHT_SUFFIXES or stat.st_size > _BIG_SIDE_FILE:
            others[path.name] = [stat.st_size, stat.st_mtime_ns]
        else:
            others[path.name] = _sha256_file(path)
    return {"weights": weights, "files": others}


def cache_key(source: Path, request: QuantizeRequest) -> str:
    """The hex key of ``source`` quantized with the resolved ``request``."""
    parts = {
        "cache_format": CACHE_FORMAT,
        "config_schema": CONFIG_SCHEMA_VERSION,
        "quantizer": QUANTIZER_VERSION,
        "source": source_fingerprint(source),
        "request": request.key_dict(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:KEY_CHARS]


# ---------------------------------------------------------------------------------------------
# Entries
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheEntry:
    """One quantized model in the cache, and whether this call found it or made it."""

    path: Path
    key: str
    reused: bool
    seconds: float  # time spent in this call (waiting and quantizing included)


def _is_complete(entry: Path) -> bool:
    return (entry / "config.json").is_file()


def quantized_method(source: Path) -> str | None:
    """The quantization method a model folder already carries (config.json or a side file), or None."""
    from awq_plugin.format.checkpoint import read_json

    config = read_json(source / "config.json")
    for cfg in (config, config.get("text_config") or {}):
        quant = cfg.get("quantization_config") if isinstance(cfg, dict) else None
        if quant is not None:
            return str(quant.get("quant_method", "unknown")) if isinstance(quant, dict) else "unknown"
    for side in ("quant_config.json", "quantize_config.json"):  # AutoAWQ / AutoGPTQ side files
        if (source / side).is_file():
            return "awq" if side == "quant_config.json" else "gptq"
    return None


@contextlib.contextmanager
def _key_lock(root: Path, key: str, logger: logging.Logger) -> Iterator[None]:
    """Hold the key's flock: released by the kernel even when the holder is killed."""
    locks = root / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{key}.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("awq-plugin: another process is quantizing cache entry %s; waiting for it", key)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _total_layers(source: Path) -> int | None:
    from awq_plugin.format.checkpoint import read_json

    config = read_json(source / "config.json")
    for cfg in (config, config.get("text_config") or {}):
        if isinstance(cfg, dict) and isinstance(cfg.get("num_hidden_layers"), int):
            return cfg["num_hidden_layers"]
    return None


def _format_seconds(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class _ProgressLogger:
    """Logs each stored block with the rate and ETA of this run (the pipeline's ``on_block``).

    The rate counts from this run's start (so it includes the calibration capture) and only the
    blocks this run stored (a resumed run's earlier blocks cost it nothing).
    """

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.started = time.monotonic()
        self.resumed_at: int | None = None

    def __call__(self, done: int, total: int) -> None:
        if self.resumed_at is None:
            self.resumed_at = done - 1
        rate = (time.monotonic() - self.started) / (done - self.resumed_at)  # seconds per block
        self.logger.info(
            "awq-plugin: quantized block %d/%d (%s per block, ETA %s)",
            done,
            total,
            _format_seconds(rate),
            _format_seconds(rate * (total - done)),
        )


def _drop_partial(entry: Path) -> None:
    """Remove an unfinished entry's work dir and staging folders (they are not worth resuming)."""
    from awq_plugin.pipeline.quantize import work_dir_path

    shutil.rmtree(work_dir_path(entry), ignore_errors=True)
    for staging in entry.parent.glob(f".{entry.name}.tmp-*"):
        shutil.rmtree(staging, ignore_errors=True)


def _check_free_space(root: Path, source: Path) -> None:
    """Refuse at once when the disk cannot hold even 4 bits of every source weight."""
    weights = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    needed = weights // 4  # fp16/bf16 -> 4 bits: a lower bound of the entry's size
    free = shutil.disk_usage(root).free
    if free < needed:
        raise CacheFullError(
            f"the cache {root} has {free / 2**20:.0f} MiB free, and the quantized model needs at least "
            f"{needed / 2**20:.0f} MiB; free space there or point {CACHE_ENV} at a larger disk"
        )


def ensure_quantized(
    source: str | Path,
    request: QuantizeRequest | None = None,
    *,
    root: str | Path | None = None,
    tp_size: int = 1,
    trust_remote_code: bool = False,
    logger: logging.Logger = log,
) -> CacheEntry:
    """The cache entry of ``source`` quantized with ``request``: found, or made now.

    One process per key quantizes (a file lock); the others wait for it and reuse its
    result. A run killed midway is resumed by the next call with the same key. Bad input
    raises :class:`~awq_plugin.errors.AwqPluginError` and a full disk
    :class:`CacheFullError`, leaving no entry and no work dir behind. ``logger`` receives
    the progress lines (vLLM passes its own, so they show in the server log).
    """
    started = time.monotonic()
    source = Path(source).expanduser().resolve()
    if not (source / "config.json").is_file():
        raise CheckpointError(f"{source} is not a model folder (no config.json)")
    method = quantized_method(source)
    if method is not None:
        raise ConfigError(
            f"{source} is already quantized (quant_method {method!r}); quantizing on load "
            "needs a full-precision model"
        )
    request = (request or QuantizeRequest()).resolved(source, tp_size)
    request.check()
    root = Path(root).expanduser() if root is not None else cache_root()
    root.mkdir(parents=True, exist_ok=True)
    key = cache_key(source, request)
    entry = root / key
    if _is_complete(entry):
        logger.info("awq-plugin: reusing cache entry %s (%s, %s)", entry, source, request.describe())
        return CacheEntry(entry, key, True, time.monotonic() - started)
    with _key_lock(root, key, logger):
        if _is_complete(entry):  # another process finished it while we waited
            logger.info("awq-plugin: reusing cache entry %s (quantized by another process)", entry)
            return CacheEntry(entry, key, True, time.monotonic() - started)
        _quantize_into(entry, source, request, trust_remote_code, logger)
    seconds = time.monotonic() - started
    logger.info("awq-plugin: quantized %s in %s; cache entry %s", source, _format_seconds(seconds), entry)
    return CacheEntry(entry, key, False, seconds)


def _quantize_into(
    entry: Path, source: Path, request: QuantizeRequest, trust_remote_code: bool, logger: logging.Logger
) -> None:
    """Run the pipeline into ``entry`` (under the key's lock), then record where it came from."""
    from awq_plugin.algorithm.awq import AwqOptions
    from awq_plugin.fsutil import atomic_write_json
    from awq_plugin.pipeline.quantize import quantize_checkpoint, work_dir_path

    try:
        _check_free_space(entry.parent, source)
    except CacheFullError:
        _drop_partial(entry)
        raise
    logger.info(
        "awq-plugin: quantizing %s into cache entry %s (%s); once per model and options",
        source,
        entry,
        request.describe(),
    )
    work, total = work_dir_path(entry), _total_layers(source)
    with contextlib.suppress(OSError, ValueError, KeyError):
        done = int(json.loads((work / "progress.json").read_text())["done"])
        logger.info(
            "awq-plugin: found an interrupted run's state (%d of %s blocks done) in %s; the pipeline "
            "resumes it if its inputs are unchanged",
            done,
            total or "?",
            work,
        )
    try:
        report = quantize_checkpoint(
            source,
            entry,
            AwqQuantConfig.from_scheme(request.scheme),
            method=request.method,
            calib=request.calib,
            n_samples=request.n_samples,
            seq_len=request.seq_len,
            options=AwqOptions(**request.options),
            guard=request.guard,
            device=request.device,
            overwrite=True,  # the entry is absent (checked under the lock); leftovers are ours
            progress=sys.stderr.isatty(),
            trust_remote_code=trust_remote_code,
            on_block=_ProgressLogger(logger),
        )
    except OSError as exc:
        if exc.errno not in _NO_SPACE:
            raise
        _drop_partial(entry)  # a full disk would stay full with the work dir kept
        raise CacheFullError(
            f"the cache {entry.parent} ran out of disk space while quantizing {source} ({exc.strerror}); "
            f"nothing was kept; free space there or point {CACHE_ENV} at a larger disk"
        ) from None
    except AwqPluginError:
        _drop_partial(entry)  # the pipeline drops its work dir too; bad input is not resumable
        raise
    if report.resumed_from_block:
        logger.info(
            "awq-plugin: resumed the interrupted run after block %d (%d of %s blocks reused from it, not redone)",
            report.resumed_from_block - 1,
            report.resumed_from_block,
            total or "?",
        )
    info = {
        "source": str(source),
        "request": request.key_dict(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(report.seconds, 1),
        "resumed_from_block": report.resumed_from_block,
    }
    with contextlib.suppress(OSError):  # the entry is complete without it; list shows '?'
        (entry / ENTRY_INFO).parent.mkdir(exist_ok=True)
        atomic_write_json(entry / ENTRY_INFO, info)


# ---------------------------------------------------------------------------------------------
# Listing and clearing (awq-plugin cache list|clear)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheListing:
    key: str
    path: Path
    complete: bool  # False: an unfinished run's work dir
    size_bytes: int
    info: dict[str, Any]

    def render(self) -> str:
        if not self.complete:
            return f"{self.key}  unfinished ({self.size_bytes / 2**20:.1f} MiB of resumable state)"
        request = self.info.get("request", {})
        calib = request.get("calib")
        calib = calib.get("file") if isinstance(calib, dict) else calib
        return (
            f"{self.key}  {self.size_bytes / 2**20:8.1f} MiB  {request.get('scheme', '?')} "
            f"{request.get('method', '?')} {calib} {request.get('n_samples', '?')}x{request.get('seq_len', '?')}  "
            f"{self.info.get('created', '?')}  {self.info.get('source', '?')}"
        )


def list_entries(root: str | Path | None = None) -> list[CacheListing]:
    """Finished entries and unfinished runs in the cache, by key."""
    from awq_plugin.fsutil import dir_size_bytes

    root = Path(root).expanduser() if root is not None else cache_root()
    if not root.is_dir():
        return []
    found: list[CacheListing] = []
    for path in sorted(root.iterdir()):
        if not path.is_dir() or path.name == ".locks":
            continue
        if path.name.startswith(".") and path.name.endswith(".awq-work"):
            key = path.name[1 : -len(".awq-work")]
            found.append(CacheListing(key, path, False, dir_size_bytes(path), {}))
        elif not path.name.startswith(".") and _is_complete(path):
            try:
                info = json.loads((path / ENTRY_INFO).read_text())
            except (OSError, ValueError):
                info = {}
            found.append(CacheListing(path.name, path, True, dir_size_bytes(path), info))
    return found


def clear_entries(
    root: str | Path | None = None, keys: list[str] | None = None
) -> tuple[list[str], list[str]]:
    """Remove entries (all, or those whose key starts with one of ``keys``) and their work dirs.

    Entries whose key a running process holds locked are skipped. Returns (removed, busy) keys.
    """
    root = Path(root).expanduser() if root is not None else cache_root()
    removed: list[str] = []
    busy: list[str] = []
    for item in list_entries(root):
        if keys and not any(item.key.startswith(k) for k in keys):
            continue
        lock_path = root / ".locks" / f"{item.key}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                busy.append(item.key)
                continue
            shutil.rmtree(item.path, ignore_errors=True)
            if item.complete:
                _drop_partial(item.path)
            # The lock file stays: unlinking it while another process waits on it would let
            # a third one lock a new file of the same name.
            fcntl.flock(handle, fcntl.LOCK_UN)
        removed.append(item.key)
    return removed, busy
