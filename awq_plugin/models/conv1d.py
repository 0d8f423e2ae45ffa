"""GPT-2's ``Conv1D`` as the ``nn.Linear`` it is, so that every stage can quantize it.

transformers' ``Conv1D`` (GPT-2, GPT-SW3, OpenAI GPT) computes ``x @ W + b`` with ``W``
stored ``[in, out]``: an ``nn.Linear`` with its weight transposed. The template inference,
the folds, the searches and the packing all work on ``nn.Linear``, so
:func:`linearize_conv1d` swaps each ``Conv1D`` for a :class:`Conv1DLinear`, which holds the
weight as ``[out, in]`` and transposes it when a state dict comes in or goes out: source
checkpoints load unchanged, and the weights a checkpoint keeps in full precision are written
in the layout transformers reads. Quantized ones are written as any AWQ linear
(``qweight`` ``[in, out / 8]``), which is also what vLLM's GPT-2 reads.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Conv1DLinear(nn.Linear):
    """An ``nn.Linear`` standing for a ``Conv1D``: its state dict keeps ``Conv1D``'s ``[in, out]`` weight."""

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        key = prefix + "weight"
        if key in state_dict:  # load_state_dict hands each module its own copy of the dict
            state_dict[key] = state_dict[key].t().contiguous()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = destination[prefix + "weight"].t().contiguous()


def linearize_conv1d(model: nn.Module) -> list[str]:
    """Replace every transformers ``Conv1D`` in ``model`` by an equal :class:`Conv1DLinear`, in place.

    Works on real and meta weights; returns the names replaced (none for most models).
    """
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return []
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, Conv1D)]
    for name, old in found:
        n_in, n_out = old.weight.shape
        new = Conv1DLinear(
            n_in, n_out, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype
        )
        with torch.no_grad():
            if old.weight.device.type == "meta":
                new.to_empty(device="meta")
            else:
                new.weight.copy_(old.weight.t())
                if old.bias is not None:
                    new.bias.copy_(old.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return [name for name, _ in found]
