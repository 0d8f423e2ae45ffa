"""Grouped (block-diagonal) linears as the plain linears they are made of.

DeepSeek-V4's output projection ``o_a_proj`` is an ``nn.Linear`` subclass with ``n_groups``
head groups: its weight ``[G * r, k]`` holds G blocks of ``r`` rows, and group ``g`` of an input
``[..., G, k]`` meets block ``g`` alone, giving ``[..., G, r]``. It is not ``x @ W.T``, so
nothing that works on ``nn.Linear`` (template inference, folds, searches, clip, compensated
rounding, packing) may treat it as one. It is, though, G ordinary linears side by side:

* :func:`input_groups` recognises such a module by what it computes (a proof on random weights,
  once per class and shape), never by its name;
* :class:`GroupedLinearSplit` holds the G linears (children ``0`` ... ``G-1``) and computes the
  same function. Its state dict is the grouped module's: the children's tensors are joined along
  the output channels on the way out (``weight``, ``bias`` on dim 0; the AWQ triple's
  ``qweight``, ``qzeros``, ``scales`` on dim 1) and split on the way in. So a source loads into
  it unchanged, and a checkpoint stores ``o_a_proj.qweight`` ``[k, G * r / 8]``, one AWQ linear
  whose output channels happen to come in groups;
* the loaders build :class:`awq_plugin.runtime.qlinear.AwqGroupedLinear` for it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

#: Checkpoint leaves whose output channels run along dim 1 (AutoAWQ's packed triple).
COLUMN_LEAVES = frozenset({"qweight", "qzeros", "scales"})
_PROOF_TOLERANCE = 1e-4

_proven: dict[tuple[Any, ...], bool] = {}


def input_groups(module: nn.Module) -> int | None:
    """G if ``module`` is a grouped linear (``[..., G, k] -> [..., G, r]``, group g through rows
    ``g*r:(g+1)*r`` of its weight), proven on random weights; None for anything else, plain
    linears included."""
    if isinstance(module, GroupedLinearSplit):
        return len(module)
    if not isinstance(module, nn.Linear) or type(module).forward is nn.Linear.forward:
        return None
    groups = getattr(module, "n_groups", None)
    if not isinstance(groups, int) or groups < 1 or module.out_features % groups:
        return None
    key = (type(module), module.in_features, module.out_features, groups, module.bias is not None)
    if key not in _proven:
        _proven[key] = _computes_grouped(module, groups)
    return groups if _proven[key] else None


def _computes_grouped(module: nn.Linear, groups: int) -> bool:
    """Whether ``module``'s forward, on random weights and inputs, is the block-diagonal product."""
    probe = copy.deepcopy(module).to_empty(device="cpu").float()
    generator = torch.Generator().manual_seed(0)
    rows = module.out_features // groups
    with torch.no_grad():
        probe.weight.copy_(torch.randn(probe.weight.shape, generator=generator))
        if probe.bias is not None:
            probe.bias.copy_(torch.randn(probe.bias.shape, generator=generator))
        x = torch.randn(3, 2, groups, module.in_features, generator=generator)
        try:
            y = probe(x)
        except Exception:
            return False
        blocks = probe.weight.view(groups, rows, module.in_features)
        expected = torch.einsum("...gk,grk->...gr", x, blocks)
        if probe.bias is not None:
            expected = expected + probe.bias.view(groups, rows)
    if not isinstance(y, torch.Tensor) or y.shape != expected.shape:
        return False
    scale = float(expected.abs().max())
    return torch.allclose(y, expected, rtol=_PROOF_TOLERANCE, atol=_PROOF_TOLERANCE * scale)


class GroupedLinearSplit(nn.ModuleList):
    """G linears, child ``g`` applied to group ``g`` of an input ``[..., G, k]``: ``[..., G, r]``.

    The state dict reads and writes the grouped module's tensors (see the module docstring).
    """

    def __init__(self, linears: list[nn.Module]) -> None:
        super().__init__(linears)
        self.register_state_dict_post_hook(_join_children)
        self.register_load_state_dict_pre_hook(_split_for_children)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] != len(self):
            raise ValueError(f"grouped linear of {len(self)} groups got an input of shape {tuple(x.shape)}")
        return torch.stack([linear(x[..., g, :]) for g, linear in enumerate(self)], dim=-2)


def _join_children(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    leaves = [key[len(prefix) + 2 :] for key in state if key.startswith(f"{prefix}0.")]
    for leaf in leaves:
        if "." in leaf:  # a child's own submodules: none in practice
            continue
        parts = [state.pop(f"{prefix}{g}.{leaf}") for g in range(len(module))]
        state[prefix + leaf] = torch.cat(parts, dim=1 if leaf in COLUMN_LEAVES else 0)


def _split_for_children(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
    for key in [k for k in state if k.startswith(prefix) and "." not in k[len(prefix) :]]:
        leaf = key[len(prefix) :]
        tensor = state.pop(key)
        dim = 1 if leaf in COLUMN_LEAVES else 0
        if tensor.shape[dim] % len(module):
            raise ValueError(
                f"{key}: {tuple(tensor.shape)} does not split into {len(module)} groups along dim {dim}"
            )
        for g, part in enumerate(tensor.chunk(len(module), dim=dim)):
            state[f"{prefix}{g}.{leaf}"] = part.contiguous()


def loaded_name(root: nn.Module, name: str) -> str:
    """The module of ``root`` a loader sees for ``name``: a grouped linear's part
    (``o_a_proj.3``) is the grouped linear (``o_a_proj``), split only while quantizing."""
    parent = name.rpartition(".")[0]
    if parent and isinstance(root.get_submodule(parent), GroupedLinearSplit):
        return parent
    return name


def split_linear(module: nn.Linear, groups: int) -> GroupedLinearSplit:
    """The G plain linears of a grouped one (weights copied; meta stays meta)."""
    rows = module.out_features // groups
    device, dtype = module.weight.device, module.weight.dtype
    linears = []
    for g in range(groups):
        linear = nn.Linear(module.in_features, rows, bias=module.bias is not None, device=device, dtype=dtype)
        if device.type != "meta":
            with torch.no_grad():
                linear.weight.copy_(module.weight[g * rows : (g + 1) * rows])
                if module.bias is not None:
                    linear.bias.copy_(module.bias[g * rows : (g + 1) * rows])
        linears.append(linear)
    return GroupedLinearSplit(linears)


def split_grouped_linears(model: nn.Module) -> list[str]:
    """Replace every proven grouped linear in ``model`` by its :class:`GroupedLinearSplit`, in place;
    returns the names replaced (none for most models)."""
    found = [
        (name, module, groups)
        for name, module in model.named_modules()
        if not isinstance(module, GroupedLinearSplit) and (groups := input_groups(module)) is not None
    ]
    for name, module, groups in found:
        parent_name, _, child = name.rpartition(".")
        setattr(
            model.get_submodule(parent_name) if parent_name else model, child, split_linear(module, groups)
        )
    return [name for name, _, _ in found]
