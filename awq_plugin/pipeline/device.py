"""Where the quantizer computes: ``auto``, ``cpu`` or ``cuda[:N]``, one block at a time.

The pipeline is one code path for every device: the source is read on the host, each
block (and the calibration activations) moves to the device while it is searched,
and the packed tensors come back to the host to be written.
"""

from __future__ import annotations

import torch
from torch import nn

from awq_plugin.errors import ConfigError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None) is the first CUDA device when there is one, else the CPU.

    An explicit CUDA device that this machine lacks is an error naming it.
    """
    if device is None or device == "auto":
        return (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r} is not a device; use {DEVICE_CHOICES}") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not supported; use {DEVICE_CHOICES}")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} was asked for, but this machine has no CUDA device")
        index = torch.cuda.current_device() if resolved.index is None else resolved.index
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {device!r} was asked for, but this machine has {torch.cuda.device_count()} CUDA devices"
            )
        resolved = torch.device("cuda", index)
    return resolved


def materialized_to(module: nn.Module, device: torch.device) -> None:
    """Move the parameters and buffers that hold data (not those on ``meta``) to ``device``."""
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            if param.device.type != "meta" and param.device != device:
                setattr(sub, name, nn.Parameter(param.data.to(device), requires_grad=param.requires_grad))
        for name, buffer in list(sub.named_buffers(recurse=False)):
            if buffer is not None and buffer.device.type != "meta" and buffer.device != device:
                sub._buffers[name] = buffer.to(device)
