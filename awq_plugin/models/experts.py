"""Mixture-of-experts blocks as per-expert linears: the form AWQ, checkpoints and loaders share.

transformers (5.x) keeps a block's routed experts fused, as two 3-D parameters
of one module (Mixtral, Qwen2-MoE and Qwen3-MoE alike)::

    experts.gate_up_proj  [E, 2I, H]   rows [:I] are expert e's gate, rows [I:] its up
    experts.down_proj     [E, H, I]

AWQ scales and quantizes ``nn.Linear`` layers, and AutoAWQ checkpoints (what
vLLM reads) store one ``qweight``/``qzeros``/``scales`` triple per expert and
projection (``experts.3.w1``, ``experts.3.gate_proj``). So before anything
else, :func:`unfuse_experts` replaces the fused module by a :class:`RoutedExperts`
list of :class:`ExpertMLP` modules, each holding three linears named as the
checkpoint names them. The replacement computes the same function with the
same call signature ``(hidden_states, top_k_index, top_k_weights)``; the router
and the rest of the block are untouched. Loaders build the same structure (on
the meta device) and swap the linears for quantized ones.

Calibration hooks: while :class:`RoutedExperts` runs an expert it exposes the
positions (within the current micro-batch) of the tokens routed to it
(:attr:`RoutedExperts.active_positions`), and it counts the tokens each expert
receives. An expert can also be told to see every token
(:meth:`RoutedExperts.calibrate_on_all_tokens`): that is the fallback for
experts the calibration text leaves (almost) unused, see
:func:`awq_plugin.algorithm.moe_fallback.calibrate_underused_experts`.

The module depends on torch only; the template machinery
(:mod:`awq_plugin.templates`) says where a layer keeps its experts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from awq_plugin.errors import TemplateError


@dataclass(frozen=True)
class ExpertsLayout:
    """Where a decoder layer keeps its routed experts and what their linears are called.

    The ``experts`` field of an architecture template, validated (names are
    relative to one decoder layer).
    """

    module: str  # the experts module, e.g. "mlp.experts"
    gate: str  # per-expert linear names as in checkpoints: Mixtral "w1", Qwen "gate_proj"
    up: str  # Mixtral "w3", Qwen "up_proj"
    down: str  # Mixtral "w2", Qwen "down_proj"
    fused_gate_up: str = "gate_up_proj"  # transformers' fused parameter [E, 2I, H] (gate rows first)
    fused_down: str = "down_proj"  # transformers' fused parameter [E, H, I]
    activation: str = "act_fn"  # attribute of the fused module holding the gate activation

    @property
    def linear_names(self) -> tuple[str, str, str]:
        return (self.gate, self.up, self.down)


class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))`` with three bias-free linears named per the layout."""

    def __init__(
        self,
        layout: ExpertsLayout,
        hidden_size: int,
        intermediate_size: int,
        act_fn: Callable[[torch.Tensor], torch.Tensor],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.names = layout.linear_names
        kwargs = {"bias": False, "device": device, "dtype": dtype}
        self.add_module(layout.gate, nn.Linear(hidden_size, intermediate_size, **kwargs))
        self.add_module(layout.up, nn.Linear(hidden_size, intermediate_size, **kwargs))
        self.add_module(layout.down, nn.Linear(intermediate_size, hidden_size, **kwargs))
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, name) for name in self.names)
        return down(self.act_fn(gate(x)) * up(x))  # (T, H) -> (T, I) -> (T, H)


class RoutedExperts(nn.ModuleList):
    """A block's routed experts as a list of :class:`ExpertMLP`, called like transformers' fused module.

    ``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``:
    each token's output is the sum over its ``k`` chosen experts of the expert's
    output times the routing weight, accumulated in expert order (as
    transformers does, so the sums match bit for bit).
    """

    def __init__(self, experts: Iterable[ExpertMLP]) -> None:
        super().__init__(experts)
        # Calibration aids, never used at inference:
        self.active_positions: torch.Tensor | None = None  # rows of the running expert's input
        self.token_counts = [0] * len(self)  # tokens routed to each expert since reset_token_counts
        self._all_tokens: frozenset[int] = frozenset()

    def reset_token_counts(self) -> None:
        self.token_counts = [0] * len(self)

    @contextmanager
    def calibrate_on_all_tokens(self, experts: Iterable[int]) -> Iterator[None]:
        """Within the block, run ``experts`` on every token (the routed outputs are unchanged).

        Each listed expert is applied to all rows of its input; the rows routed
        to it are taken from that result, the others discarded. Hooks inside
        the expert therefore see every token reaching the block: the documented
        fallback for experts the calibration set leaves (almost) unused.
        """
        self._all_tokens = frozenset(experts)
        try:
            yield
        finally:
            self._all_tokens = frozenset()

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)  # (T, H)
        hit = set(torch.unique(top_k_index).tolist())
        for e, expert in enumerate(self):
            if e not in hit and e not in self._all_tokens:
                continue
            tokens, slots = torch.where(top_k_index == e)  # (n_e,) each, tokens ascending
            self.token_counts[e] += int(tokens.numel())
            if e in self._all_tokens:
                y = expert(hidden_states)[tokens]  # (n_e, H): every token seen, routed rows kept
            else:
                self.active_positions = tokens
                try:
                    y = expert(hidden_states[tokens])  # (n_e, H)
                finally:
                    self.active_positions = None
            if tokens.numel():
                weighted = y * top_k_weights[tokens, slots, None]  # (n_e, H)
                out.index_add_(0, tokens, weighted.to(out.dtype))
        return out


# ---------------------------------------------------------------------------------------------
# Fused <-> per-expert
# ---------------------------------------------------------------------------------------------


def _fused_parameters(
    fused: nn.Module, layout: ExpertsLayout, where: str
) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = []
    for field, name, dims in (
        ("fused_gate_up", layout.fused_gate_up, 3),
        ("fused_down", layout.fused_down, 3),
    ):
        tensor = getattr(fused, name, None)
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != dims:
            shape = None if not isinstance(tensor, torch.Tensor) else tuple(tensor.shape)
            raise TemplateError(
                f"{where}: field 'experts.{field}' = {name!r}: the experts module "
                f"{type(fused).__name__} has no 3-D tensor of that name (found shape {shape})"
            )
        tensors.append(tensor)
    gate_up, down = tensors
    n_experts, two_i, hidden = gate_up.shape
    if two_i % 2 or tuple(down.shape) != (n_experts, hidden, two_i // 2):
        raise TemplateError(
            f"{where}: fused experts have {layout.fused_gate_up} {tuple(gate_up.shape)} and "
            f"{layout.fused_down} {tuple(down.shape)}; expected [E, 2I, H] and [E, H, I]"
        )
    return gate_up, down


def unfuse_experts(layer: nn.Module, layout: ExpertsLayout, where: str = "experts") -> RoutedExperts:
    """Replace ``layer``'s fused experts module by an equivalent :class:`RoutedExperts` (in place).

    The per-expert weights are views of the fused tensors (no copy); on the
    meta device nothing is allocated. A layer whose experts are already a
    :class:`RoutedExperts` is left as it is.
    """
    try:
        fused = layer.get_submodule(layout.module)
    except AttributeError:
        raise TemplateError(
            f"{where}: field 'experts.module' = {layout.module!r} matches no module"
        ) from None
    if isinstance(fused, RoutedExperts):
        return fused
    gate_up, down = _fused_parameters(fused, layout, where)
    n_experts, two_i, hidden = gate_up.shape
    inter = two_i // 2
    act_fn = getattr(fused, layout.activation, None)
    if not callable(act_fn):
        raise TemplateError(
            f"{where}: field 'experts.activation' = {layout.activation!r} is not a callable attribute of "
            f"{type(fused).__name__}"
        )
    experts = []
    for e in range(n_experts):
        expert = ExpertMLP(layout, hidden, inter, act_fn, device="meta", dtype=gate_up.dtype)
        if gate_up.device.type != "meta":
            getattr(expert, layout.gate).weight = nn.Parameter(gate_up.data[e, :inter], requires_grad=False)
            getattr(expert, layout.up).weight = nn.Parameter(gate_up.data[e, inter:], requires_grad=False)
            getattr(expert, layout.down).weight = nn.Parameter(down.data[e], requires_grad=False)
        experts.append(expert)
    routed = RoutedExperts(experts)
    parent_path, _, child = layout.module.rpartition(".")
    parent = layer.get_submodule(parent_path) if parent_path else layer
    setattr(parent, child, routed)
    return routed


def split_fused_expert_tensors(
    state: Mapping[str, torch.Tensor], layout: ExpertsLayout
) -> dict[str, torch.Tensor]:
    """Layer-relative tensors with fused expert weights split into per-expert ``.weight`` tensors.

    A source checkpoint written with the fused names (``mlp.experts.gate_up_proj``)
    becomes loadable into an unfused layer; other names pass through.
    """
    out = dict(state)
    gate_up_key = f"{layout.module}.{layout.fused_gate_up}"
    down_key = f"{layout.module}.{layout.fused_down}"
    if gate_up_key not in out and down_key not in out:
        return out
    if gate_up_key not in out or down_key not in out:
        raise TemplateError(f"checkpoint has only one of {gate_up_key!r} and {down_key!r}")
    gate_up, down = out.pop(gate_up_key), out.pop(down_key)  # (E, 2I, H), (E, H, I)
    inter = gate_up.shape[1] // 2
    for e in range(gate_up.shape[0]):
        base = f"{layout.module}.{e}"
        out[f"{base}.{layout.gate}.weight"] = gate_up[e, :inter].contiguous()
        out[f"{base}.{layout.up}.weight"] = gate_up[e, inter:].contiguous()
        out[f"{base}.{layout.down}.weight"] = down[e].contiguous()
    return out


# ---------------------------------------------------------------------------------------------
# Calibration helpers
# ---------------------------------------------------------------------------------------------


def routed_experts_in(block: nn.Module, paths: Sequence[str]) -> dict[str, RoutedExperts]:
    """The :class:`RoutedExperts` modules at ``paths`` (layer-relative) of ``block``."""
    found = {}
    for path in paths:
        module = block.get_submodule(path)
        if not isinstance(module, RoutedExperts):
            raise TemplateError(
                f"{path!r} is a {type(module).__name__}, not RoutedExperts: resolve the template first"
            )
        found[path] = module
    return found


def row_positions_lookup(
    experts: Mapping[str, RoutedExperts],
) -> Callable[[str], torch.Tensor | None]:
    """``positions(name)``: for a module inside an expert, the micro-batch rows of its current input.

    ``None`` for every other module (its input holds every row, in order), and
    for an expert running on all tokens.
    """
    prefixes = [(path + ".", routed) for path, routed in experts.items()]

    def positions(name: str) -> torch.Tensor | None:
        for prefix, routed in prefixes:
            if name.startswith(prefix):
                return routed.active_positions
        return None

    return positions


@contextmanager
def experts_on_all_tokens(
    chosen: Mapping[str, Sequence[int]], experts: Mapping[str, RoutedExperts]
) -> Iterator[None]:
    """Run the chosen experts (``path -> indices``) on every token while the context is open."""
    contexts = [experts[path].calibrate_on_all_tokens(indices) for path, indices in chosen.items()]
    for context in contexts:
        context.__enter__()
    try:
        yield
    finally:
        for context in reversed(contexts):
            context.__exit__(None, None, None)
