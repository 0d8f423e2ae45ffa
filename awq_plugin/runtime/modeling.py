"""Building transformers models for our own use: empty skeletons and AWQ loading.

This is the one core module that constructs models with transformers. It never
uses transformers' quantizer machinery (that lives in ``integrations/``): an AWQ
checkpoint is loaded by swapping ``nn.Linear`` for :class:`AwqLinear` in an empty
skeleton and assigning the stored tensors.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from awq_plugin.config import load_quant_config
from awq_plugin.errors import CheckpointError
from awq_plugin.format.checkpoint import (
    QUANT_SUFFIXES,
    SafetensorsReader,
    iter_quantized_prefixes,
    read_json,
    validate_checkpoint,
)
from awq_plugin.models.auto import auto_model_class
from awq_plugin.models.grouped_linear import input_groups, split_linear
from awq_plugin.models.tied import tied_parameters
from awq_plugin.runtime.qlinear import AwqGroupedLinear, AwqLinear
from awq_plugin.templates import unfuse_experts_for_loading

log = logging.getLogger(__name__)


def hf_config_from_dict(
    config: Mapping[str, Any], trust_remote_code: bool = False, folder: str | Path | None = None
) -> Any:
    """The transformers config of ``config`` (a config.json's contents), without running checkpoint code.

    An architecture transformers does not ship is described by ``auto_map``, which points at
    Python files in the checkpoint folder. Those run only with ``trust_remote_code=True``
    (the CLI's ``--trust-remote-code``); otherwise the error says so and nothing is imported.
    """
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    data = {k: v for k, v in decode_special_floats(config).items() if k != "quantization_config"}
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise CheckpointError("config.json has no 'model_type'")
    if model_type not in CONFIG_MAPPING and "auto_map" in config:
        if not trust_remote_code:
            raise CheckpointError(
                f"config.json: model_type {model_type!r} is not built into transformers and its "
                "'auto_map' asks to run Python code shipped with the checkpoint; awq-plugin runs none "
                "unless you pass --trust-remote-code (trust_remote_code=True)"
            )
        if folder is None:
            raise CheckpointError(f"config.json: model_type {model_type!r} needs its folder to load its code")
        return AutoConfig.from_pretrained(folder, trust_remote_code=True)
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError) as exc:
        raise CheckpointError(
            f"config.json: transformers cannot build model_type {model_type!r}: {exc}"
        ) from None


_FLOAT_TAG = "__float__"  # transformers writes inf/nan in config.json as {"__float__": "Infinity"}
_FLOAT_TAG_VALUES = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def decode_special_floats(value: Any) -> Any:
    """``value`` (config.json data) with transformers' tagged floats decoded, at any depth.

    JSON has no infinity or NaN, so transformers' ``to_json_string`` writes them as
    ``{"__float__": "Infinity"}`` (Granite 4 hybrid, Falcon-H1, Mamba 2 time-step limits);
    its ``from_pretrained`` decodes them, ``AutoConfig.for_model`` does not.
    """
    if isinstance(value, Mapping):
        if set(value) == {_FLOAT_TAG} and value[_FLOAT_TAG] in _FLOAT_TAG_VALUES:
            return _FLOAT_TAG_VALUES[value[_FLOAT_TAG]]
        return {k: decode_special_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_special_floats(v) for v in value]
    return value


def remote_code_files(config: Mapping[str, Any], folder: Path) -> list[str]:
    """The Python files in ``folder`` that ``config``'s ``auto_map`` names (local ones only)."""
    entries: list[str] = []
    for value in dict(config.get("auto_map") or {}).values():
        entries += value if isinstance(value, list) else [value]
    names = {
        f"{e.rsplit('.', 1)[0]}.py" for e in entries if isinstance(e, str) and "--" not in e and "." in e
    }
    return sorted(n for n in names if (folder / n).is_file())


def build_empty_model(
    hf_config: Any, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> nn.Module:
    """The model with parameters on the meta device and buffers (rotary tables) real."""
    from accelerate import init_empty_weights

    auto = auto_model_class(hf_config)
    with init_empty_weights(include_buffers=False):
        model = auto.from_config(hf_config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.eval()


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise CheckpointError(f"model has no module {path!r}") from None


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def swap_in_awq_linears(
    model: nn.Module, prefixes: Iterable[str], group_size: int, backend: str | None, dtype: torch.dtype
) -> None:
    """Replace each ``nn.Linear`` named in ``prefixes`` by an empty :class:`AwqLinear`."""
    from transformers.pytorch_utils import Conv1D

    for prefix in prefixes:
        old = get_submodule(model, prefix)
        groups = input_groups(old) if isinstance(old, nn.Linear) else None
        if groups is not None:  # DeepSeek-V4's o_a_proj: G linears side by side
            n_in, n_out, bias = old.in_features, old.out_features, old.bias is not None
            new = AwqGroupedLinear(n_in, n_out, group_size, bias, groups, backend=backend, dtype=dtype)
            replace_module(model, prefix, new)
            continue
        if isinstance(old, nn.Linear):
            n_in, n_out = old.in_features, old.out_features
        elif isinstance(old, Conv1D):  # GPT-2's linear, weight stored [in, out]
            n_in, n_out = old.weight.shape
        else:
            raise CheckpointError(
                f"checkpoint quantizes {prefix!r}, which is a {type(old).__name__}, not a Linear"
            )
        new = AwqLinear(n_in, n_out, group_size, old.bias is not None, backend=backend, dtype=dtype)
        replace_module(model, prefix, new)


def dequantize_awq_linears(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Every :class:`AwqLinear` of ``model`` back to an ``nn.Linear`` holding its dequantized weight
    (the reference math, ``(q - z) * s``), in place; returns ``model``."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, AwqLinear)]
    for name, module in targets:
        weight = module.dequantized_weight(dtype)  # (N, K)
        if isinstance(module, AwqGroupedLinear):  # its G plain linears, in its grouped math
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            dense.to(device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                dense.weight.copy_(weight)
                if module.bias is not None:
                    dense.bias.copy_(module.bias)
            replace_module(model, name, split_linear(dense, module.input_groups))
            continue
        linear = nn.Linear(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(weight)
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        replace_module(model, name, linear)
    return model


def load_awq_model(
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    backend: str | None = None,
    validate: bool = True,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Load an AWQ checkpoint into a transformers model whose quantized linears are :class:`AwqLinear`.

    ``backend`` picks the kernel (None: the fastest available; "reference": the
    pure-PyTorch math). Non-quantized tensors are cast to ``dtype``. Code shipped with the
    checkpoint (``auto_map``) runs only with ``trust_remote_code=True``.
    """
    folder = Path(folder)
    if validate:
        validate_checkpoint(folder)
    config = read_json(folder / "config.json")
    quant = load_quant_config(config, str(folder / "config.json"))
    reader = SafetensorsReader(folder)
    hf_config = hf_config_from_dict(config, trust_remote_code, folder)
    model = build_empty_model(hf_config, dtype, trust_remote_code)
    # MoE: unfuse the experts so that each per-expert checkpoint layer has a module to load into.
    names = unfuse_experts_for_loading(model, quant.modules_to_not_convert)
    to_model_name = names.from_checkpoint_name if names is not None else str
    prefixes = [to_model_name(p) for p in iter_quantized_prefixes(reader.keys())]
    swap_in_awq_linears(model, prefixes, quant.group_size, backend, dtype)
    state = {}
    for name in reader:
        tensor = reader.get(name)
        if name.rsplit(".", 1)[-1] not in QUANT_SUFFIXES and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[to_model_name(name)] = tensor
    result = model.load_state_dict(state, strict=False, assign=True)
    tied = tied_parameters(model)  # the checkpoint stores only the other side of a tie
    missing = [k for k in result.missing_keys if k not in tied]
    if missing:
        raise CheckpointError(f"{folder}: tensors missing for {len(missing)} parameters, e.g. {missing[0]!r}")
    if result.unexpected_keys:
        raise CheckpointError(f"{folder}: unexpected tensor {result.unexpected_keys[0]!r}")
    if tied:
        model.tie_weights()
    return model.eval()


def load_fp_model(
    folder: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> nn.Module:
    """Load a full-precision transformers folder from safetensors only (no pickle)."""
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    return (
        auto_model_class(hf_config)
        .from_pretrained(folder, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code)
        .eval()
    )


def is_awq_checkpoint(folder: str | Path) -> bool:
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        return False
    qc = read_json(config_path).get("quantization_config")
    return isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == "awq"


def load_model(
    folder: str | Path, dtype: torch.dtype = torch.float32, backend: str | None = None
) -> nn.Module:
    """Load either kind of folder: AWQ checkpoints through our path, others through transformers."""
    if is_awq_checkpoint(folder):
        return load_awq_model(folder, dtype=dtype, backend=backend)
    return load_fp_model(folder, dtype=dtype)
