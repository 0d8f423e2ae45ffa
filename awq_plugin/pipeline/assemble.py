"""The last step of a run: the work dir's packed blocks plus the source's other tensors become
the checkpoint, written in a staging folder, validated, then renamed into place."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from awq_plugin.algorithm.results import AwqResults
from awq_plugin.config import AwqQuantConfig
from awq_plugin.format.checkpoint import (
    SafetensorsReader,
    TensorSpec,
    copy_side_files,
    read_safetensors_header,
    validate_checkpoint,
    write_model_config,
    write_sharded,
)
from awq_plugin.fsutil import atomic_output_dir
from awq_plugin.pipeline.blocks import check_finite
from awq_plugin.pipeline.workdir import WorkDir
from awq_plugin.runtime.modeling import remote_code_files

RESULTS_FILE = "awq_plugin/awq_results.safetensors"  # inside OUT; not top-level, so loaders that
# glob "*.safetensors" (vLLM without an index) never mistake it for weights


def assemble_checkpoint(
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
            check_finite({name: tensor}, "source checkpoint (in fp16)")  # the head was not read before
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
