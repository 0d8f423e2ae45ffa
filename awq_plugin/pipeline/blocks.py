"""Moving one decoder block at a time between the source shards, memory and packed tensors.

The streaming quantizer holds the embeddings only while block 0's inputs are captured, then
one block in fp32 at a time: :func:`load_block` reads it from the shards, :func:`pack_block`
turns the finished block into checkpoint tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from awq_plugin.config import AwqQuantConfig
from awq_plugin.errors import CheckpointError
from awq_plugin.format.checkpoint import SafetensorsReader
from awq_plugin.format.packing import packed_state_dict
from awq_plugin.models.experts import split_fused_expert_tensors
from awq_plugin.models.tied import tied_parameters
from awq_plugin.numerics.quant_ref import is_all_finite
from awq_plugin.pipeline.device import materialized_to
from awq_plugin.templates import ResolvedTemplate


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    for name, tensor in tensors.items():
        if not is_all_finite(tensor):
            raise CheckpointError(f"{what}: tensor {name} contains NaN or Inf")


def load_block(
    model: torch.nn.Module,
    resolved: ResolvedTemplate,
    i: int,
    reader: SafetensorsReader,
    device: torch.device | str = "cpu",
) -> torch.nn.Module:
    """Read decoder layer ``i`` from the source into the model (names as the template maps them),
    in fp32 on ``device``."""
    layers_path = resolved.decoder_layers
    prefix = f"{layers_path}.{i}."
    state = {
        resolved.from_checkpoint_name(name)[len(prefix) :]: reader.get(name, torch.float32)
        for name in reader
        if name.startswith(prefix)
    }
    if resolved.experts is not None:  # a source that stores the experts fused
        state = split_fused_expert_tensors(state, resolved.experts)
    check_finite({prefix + k: v for k, v in state.items()}, "source checkpoint")
    block = _assign_block(model, layers_path, i, {k: v.to(device) for k, v in state.items()})
    materialized_to(block, torch.device(device))  # buffers the checkpoint lacks (rotary tables)
    return block


def _assign_block(
    model: torch.nn.Module, layers_path: str, i: int, state: dict[str, torch.Tensor]
) -> torch.nn.Module:
    prefix = f"{layers_path}.{i}."
    block = model.get_submodule(f"{layers_path}.{i}")
    result = block.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys:
        raise CheckpointError(f"source checkpoint lacks tensor {prefix}{result.missing_keys[0]}")
    if result.unexpected_keys:
        raise CheckpointError(f"source checkpoint has unexpected tensor {prefix}{result.unexpected_keys[0]}")
    return block


@contextlib.contextmanager
def layer_as_built(
    model: torch.nn.Module, layers_path: str, i: int, reader: SafetensorsReader
) -> Iterator[None]:
    """Decoder layer ``i`` with its weights, as transformers builds it (fused experts stay fused:
    the reader serves the model's names), back on the meta device afterwards."""
    prefix = f"{layers_path}.{i}."
    state = {
        name[len(prefix) :]: reader.get(name, torch.float32) for name in reader if name.startswith(prefix)
    }
    check_finite({prefix + k: v for k, v in state.items()}, "source checkpoint")
    block = _assign_block(model, layers_path, i, state)
    try:
        yield
    finally:  # parameters only: buffers the checkpoint lacks (GPT-J's position table) must stay
        for module in block.modules():
            _parameters_to_meta(module)


def output_head_names(model: torch.nn.Module) -> set[str]:
    """The output head's own parameters (``lm_head.weight``), except those tied to another one."""
    head = model.get_output_embeddings()
    if head is None:
        return set()
    tied = tied_parameters(model)
    return {
        f"{name}.{leaf}" if name else leaf
        for name, module in model.named_modules()
        if module is head
        for leaf, _ in module.named_parameters(recurse=False)
        if (f"{name}.{leaf}" if name else leaf) not in tied
    }


def load_non_layer(
    model: torch.nn.Module,
    layers_path: str,
    reader: SafetensorsReader,
    with_head: bool = False,
    device: torch.device | str = "cpu",
) -> list[str]:
    """Load the tensors outside the decoder layers in fp32 onto ``device``.

    Unless ``with_head``, the output head is checked (present, right shape) but not
    read: the capture stops at the last decoder layer, and the head, as large as the
    embeddings, is copied tensor by tensor when the checkpoint is assembled; the
    end-to-end guard reads it to score its windows. Returns the names of all the
    source's non-layer tensors.
    """
    names = [n for n in reader if not n.startswith(layers_path + ".")]
    head = set() if with_head else output_head_names(model)
    state = {n: reader.get(n, torch.float32).to(device) for n in names if n not in head}
    check_finite(state, "source checkpoint")
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise CheckpointError(f"source checkpoint has unexpected tensor {result.unexpected_keys[0]}")
    tied = tied_parameters(model)  # the checkpoint stores only the other side of a tie
    missing = [
        k
        for k in result.missing_keys
        if not k.startswith(layers_path + ".") and k not in tied and k not in head
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


def release_non_layer(model: torch.nn.Module, layers_path: str) -> None:
    """Move every parameter outside the decoder layers to the meta device (frees the embeddings).

    Once the calibration inputs of the decoder stack are captured, nothing
    before or after it runs again in this process.
    """
    for name, module in model.named_modules():
        if name == layers_path or name.startswith(layers_path + "."):
            continue
        _parameters_to_meta(module)


def _parameters_to_meta(module: torch.nn.Module) -> None:
    """Free a module's own parameters (not its children's, not its buffers)."""
    for leaf, param in list(module.named_parameters(recurse=False)):
        setattr(module, leaf, torch.nn.Parameter(param.to("meta"), requires_grad=False))


def pack_block(
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
    tensors = {name: tensor.cpu() for name, tensor in tensors.items()}  # written from the host
    for name, tensor in tensors.items():  # inputs were finite: anything else is fp16 overflow
        if tensor.is_floating_point() and not is_all_finite(tensor):
            raise CheckpointError(
                f"{name} overflows float16 (max 65504), the format's type for scales and "
                "unquantized weights: the source weights are too large to store"
            )
    return tensors
