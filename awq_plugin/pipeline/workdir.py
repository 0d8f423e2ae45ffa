"""The pipeline's resumable state: a work dir beside the output, keyed by a fingerprint.

The work dir (``.OUT.awq-work`` beside OUT) is keyed by a fingerprint of every input (source
tensors, config, calibration, options, torch version and thread count); a rerun with the same
fingerprint continues after the last finished block, and because every intermediate is stored
exactly (fp32 safetensors), the result is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from awq_plugin.algorithm.results import BlockAwqResult
from awq_plugin.errors import CheckpointError
from awq_plugin.format.checkpoint import SafetensorsReader
from awq_plugin.fsutil import atomic_write_json, read_tensor_file, write_tensor_file

log = logging.getLogger(__name__)

WORK_FORMAT = 3  # 2: block inputs kept per layer (hidden_NNNNN.safetensors); 3: with the guard's streams


def fingerprint(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def source_fingerprint(reader: SafetensorsReader, folder: Path) -> dict[str, Any]:
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
        write_tensor_file(self.block_file(i), tensors, {"format": "pt"})

    def save_result(self, result: BlockAwqResult) -> None:
        result.save(self.result_file(result.layer_index))

    def load_result(self, i: int) -> BlockAwqResult | None:
        path = self.result_file(i)
        return BlockAwqResult.load(path) if path.is_file() else None

    def hidden_file(self, next_layer: int) -> Path:
        return self.path / f"hidden_{next_layer:05d}.safetensors"

    def save_hidden(
        self,
        next_layer: int,
        hidden: Sequence[torch.Tensor],
        extra: tuple[dict[str, torch.Tensor], dict[str, str]] | None = None,
        reference: Sequence[torch.Tensor] | None = None,
    ) -> None:
        """Store block ``next_layer``'s inputs beside the previous block's, with ``extra`` tensors
        and metadata (the end-to-end guard's streams, :meth:`GuardStreams.state`) and the
        full-precision model's inputs of the block (``reference``, asymmetric calibration).

        The previous file is dropped only by :meth:`mark_done`, after the marker moved on: a
        kill between this write and the marker's finds the inputs the marker points at.
        """
        tensors = {f"hidden.{m}": h.detach().cpu().contiguous() for m, h in enumerate(hidden)}
        for m, h in enumerate(reference or ()):
            tensors[f"reference.{m}"] = h.detach().cpu().contiguous()
        metadata = {"next_layer": str(next_layer)}
        if extra is not None:
            tensors.update(extra[0])
            metadata.update(extra[1])
        write_tensor_file(self.hidden_file(next_layer), tensors, metadata)

    def load_hidden(self, next_layer: int) -> list[torch.Tensor]:
        return _numbered(self._hidden_file(next_layer)[0], "hidden.")

    def load_reference(
        self, next_layer: int, device: torch.device | str = "cpu"
    ) -> list[torch.Tensor] | None:
        """The ``reference`` hidden states :meth:`save_hidden` stored for block ``next_layer``
        (None if it stored none)."""
        reference = _numbered(self._hidden_file(next_layer)[0], "reference.")
        return [h.to(device) for h in reference] if reference else None

    def load_extra(self, next_layer: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """What :meth:`save_hidden` stored beside block ``next_layer``'s inputs as ``extra``."""
        tensors, metadata = self._hidden_file(next_layer)
        own = ("hidden.", "reference.")
        return {k: v for k, v in tensors.items() if not k.startswith(own)}, dict(metadata or {})

    def _hidden_file(self, next_layer: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        path = self.hidden_file(next_layer)
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: the work dir {self.path} is damaged; delete it")
        return read_tensor_file(path)


def _numbered(tensors: dict[str, torch.Tensor], prefix: str) -> list[torch.Tensor]:
    """``tensors[prefix + "0"]``, ``tensors[prefix + "1"]``, ...: the micro-batches stored so."""
    count = sum(name.startswith(prefix) for name in tensors)
    return [tensors[f"{prefix}{m}"] for m in range(count)]
