"""Writing files so that a crash never leaves a half-written result.

Everything the package writes goes to a temporary name in the destination's
own directory (same filesystem, so ``os.replace`` is atomic) and is renamed
into place only once it is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from awq_plugin.errors import OutputExistsError

MODEL_MARKERS = ("config.json", "model.safetensors", "model.safetensors.index.json")

CACHE_ENV = "AWQ_PLUGIN_CACHE"  # the one cache root: kernels/ (CPU builds) and models/ (quantize-on-start)


def cache_base() -> Path:
    """``$AWQ_PLUGIN_CACHE``, else ``~/.cache/awq_plugin``."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/awq_plugin").expanduser()


def holds_model(path: Path) -> bool:
    """Whether ``path`` is a directory that already contains a model."""
    return path.is_dir() and any((path / marker).exists() for marker in MODEL_MARKERS)


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse an output location we must not or cannot write, before any work starts."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path {out} exists and is not a directory")
    if holds_model(out) and not overwrite:
        raise OutputExistsError(
            f"output directory {out} already holds a model; pass --overwrite to replace it"
        )
    if out.is_dir() and any(out.iterdir()) and not holds_model(out) and not overwrite:
        raise OutputExistsError(f"output directory {out} is not empty; pass --overwrite to replace it")
    parent = out.resolve().parent
    if not parent.exists():
        raise FileNotFoundError(f"cannot write {out}: its parent directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {out}: its parent directory {parent} is not writable")


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish_dir(staging: Path, out: Path, overwrite: bool) -> None:
    """Move a finished ``staging`` directory to ``out``, replacing an old one only if allowed."""
    old = None
    if out.exists():
        if not overwrite and any(out.iterdir()):
            raise OutputExistsError(f"output directory {out} appeared while we worked; not replacing it")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(staging, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(out: Path) -> None:
    """Remove staging dirs of ``out`` left by processes that were killed (their pid is gone)."""
    for candidate in out.parent.glob(f".{out.name}.tmp-*"):
        suffix = candidate.name.rsplit("-", 1)[-1]
        if suffix.isdigit() and not _pid_alive(int(suffix)):
            shutil.rmtree(candidate, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh staging directory; on success it becomes ``out``, on error it is removed."""
    out = Path(out)
    check_output_dir(out, overwrite)
    remove_stale_staging(out)
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        publish_dir(staging, out, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def dir_size_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def write_tensor_file(path: Path, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
    """Tensors and string metadata as one safetensors file, written atomically."""
    from safetensors.torch import save

    atomic_write_bytes(path, save(tensors, metadata=metadata))


def read_tensor_file(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Every tensor of a safetensors file, and its string metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    return tensors, metadata
