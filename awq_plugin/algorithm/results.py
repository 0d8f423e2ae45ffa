"""AWQ's decisions as plain data: per group the scales and alpha, per linear the clip bounds.

Search returns these; applying them is a separate step (``awq.apply_awq``), so they can be
saved, inspected and re-applied bit for bit. Stored as safetensors with a JSON header (never
a pickle): one file per model in a checkpoint, one per block in the pipeline's work dir.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from awq_plugin.errors import CheckpointError
from awq_plugin.fsutil import read_tensor_file, write_tensor_file

RESULTS_FORMAT = "awq_plugin.awq_results"
RESULTS_VERSION = 1


@dataclass
class GroupScaleResult:
    """The scale chosen for one scaling group."""

    prev_op: str
    layers: tuple[str, ...]
    scales: torch.Tensor  # fp32 [n_scales]
    alpha: float | None  # None: plain rounding (s = 1) won
    loss_rtn: float  # search loss with s = 1
    loss_awq: float  # search loss with the chosen scales


@dataclass
class BlockAwqResult:
    """Everything AWQ decided for one decoder block, plus how much it helped."""

    layer_index: int
    groups: list[GroupScaleResult]
    clip_max: dict[str, torch.Tensor]  # linear name -> fp32 [N, K/G] upper clip bound
    # Block output error vs full precision on the held-out micro-batches (plan.decision_batches)
    mse_rtn: float  # with plain rounding
    mse_awq: float  # with what was kept (choice)
    # linear name -> fp32 [N, K/G] lower clip bound (asymmetric clip only; else -clip_max)
    clip_min: dict[str, torch.Tensor] = field(default_factory=dict)
    # What the block kept, by its held-out error (block.CHOICES): "awq" (scales and clips) or
    # "rounding" (AWQ lost: s = 1, no clips).
    choice: str = "awq"
    # How the kept weights are rounded to their grid: "nearest", or "compensated" (GPTQ's error
    # compensation, algorithm.compensate). Compensated weights cannot be re-derived from the
    # scales and clips: the checkpoint's integers are the record (apply_awq refuses them).
    rounding: str = "nearest"
    held_out: bool = True  # False: the calibration spared no micro-batch; judged on the search's
    # The dtype the block's forwards ran their matmuls in (AwqOptions.search_dtype resolved on
    # the block's device: "auto" is bfloat16 on some CPUs and float32 on others); "" if unknown.
    search_dtype: str = ""

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors (names relative to this block) and JSON-able metadata."""
        tensors = {f"scales.{i}": g.scales.contiguous() for i, g in enumerate(self.groups)}
        tensors.update({f"clip.{name}": c.contiguous() for name, c in self.clip_max.items()})
        tensors.update({f"clip_min.{name}": c.contiguous() for name, c in self.clip_min.items()})
        meta = {
            "layer_index": self.layer_index,
            "groups": [
                {
                    "prev_op": g.prev_op,
                    "layers": list(g.layers),
                    "alpha": g.alpha,
                    "loss_rtn": g.loss_rtn,
                    "loss_awq": g.loss_awq,
                }
                for g in self.groups
            ],
            "clip": list(self.clip_max),
            "clip_min": list(self.clip_min),
            "mse_rtn": self.mse_rtn,
            "mse_awq": self.mse_awq,
            "choice": self.choice,
            "rounding": self.rounding,
            "held_out": self.held_out,
            "search_dtype": self.search_dtype,
        }
        return tensors, meta

    def save(self, path: str | Path) -> Path:
        """One block's results as a safetensors file (the resumable work dir keeps these)."""
        tensors, meta = self.to_state()
        write_tensor_file(Path(path), tensors, {"result": json.dumps(meta, sort_keys=True)})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> BlockAwqResult:
        """Read a file written by :meth:`save`."""
        tensors, metadata = read_tensor_file(Path(path))
        return cls.from_state(tensors, json.loads(metadata["result"]))

    @classmethod
    def from_state(cls, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> BlockAwqResult:
        """Inverse of :meth:`to_state`."""
        groups = [
            GroupScaleResult(
                prev_op=g["prev_op"],
                layers=tuple(g["layers"]),
                scales=tensors[f"scales.{i}"],
                alpha=g["alpha"],
                loss_rtn=g["loss_rtn"],
                loss_awq=g["loss_awq"],
            )
            for i, g in enumerate(meta["groups"])
        ]
        clip_max = {name: tensors[f"clip.{name}"] for name in meta["clip"]}
        clip_min = {name: tensors[f"clip_min.{name}"] for name in meta.get("clip_min", [])}
        return cls(
            layer_index=meta["layer_index"],
            groups=groups,
            clip_max=clip_max,
            mse_rtn=meta["mse_rtn"],
            mse_awq=meta["mse_awq"],
            clip_min=clip_min,
            choice=meta.get("choice", "awq"),
            rounding=meta.get("rounding", "nearest"),
            held_out=meta.get("held_out", False),
            search_dtype=meta.get("search_dtype", ""),
        )


@dataclass
class AwqResults:
    """The AWQ results of a whole model, with what is needed to re-apply them."""

    blocks: list[BlockAwqResult]
    template: dict[str, Any]  # the validated template data the results refer to
    quant_config: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write one safetensors file; the metadata JSON rides in its header (no pickle)."""
        path = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        block_meta = []
        for block in self.blocks:
            block_tensors, meta = block.to_state()
            tensors.update({f"blocks.{block.layer_index}.{k}": v for k, v in block_tensors.items()})
            block_meta.append(meta)
        header = {
            "format": RESULTS_FORMAT,
            "version": RESULTS_VERSION,
            "template": self.template,
            "quant_config": self.quant_config,
            "options": self.options,
            "blocks": block_meta,
        }
        write_tensor_file(path, tensors, {"awq_results": json.dumps(header, sort_keys=True)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> AwqResults:
        """Read a file written by :meth:`save`."""
        tensors, metadata = read_tensor_file(path)
        raw = metadata.get("awq_results")
        if raw is None:
            raise CheckpointError(f"{path} is not an AWQ results file (no 'awq_results' metadata)")
        header = json.loads(raw)
        if header.get("format") != RESULTS_FORMAT or header.get("version") != RESULTS_VERSION:
            raise CheckpointError(
                f"{path}: unsupported AWQ results format {header.get('format')!r} "
                f"version {header.get('version')!r} (expected {RESULTS_FORMAT!r} v{RESULTS_VERSION})"
            )
        blocks = []
        for meta in header["blocks"]:
            prefix = f"blocks.{meta['layer_index']}."
            own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            blocks.append(BlockAwqResult.from_state(own, meta))
        return cls(
            blocks=blocks,
            template=header["template"],
            quant_config=header["quant_config"],
            options=header["options"],
        )

    def summary(self) -> list[dict[str, Any]]:
        """Per block: output MSE with plain rounding and with AWQ, and each group's alpha."""
        return [
            {
                "layer": b.layer_index,
                "mse_rtn": b.mse_rtn,
                "mse_awq": b.mse_awq,
                "alphas": [g.alpha for g in b.groups],
            }
            for b in self.blocks
        ]
