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

import copy
import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from awq_plugin.errors import TemplateError

GATINGS = ("act_mul", "apply_gate", "act_only")
CALLS = ("routed", "stacked")


@dataclass(frozen=True)
class ExpertsLayout:
    """Where a decoder layer keeps its routed experts, how they are stored and what their linears are called.

    The ``experts`` field of an architecture template, validated (names are
    relative to one decoder layer). The storage fields describe transformers'
    fused module:

    * ``fused_gate_up`` ``[E, 2I, H]`` (``transposed``: ``[E, H, 2I]``): gate and
      up rows concatenated (gate first) or, ``interleaved``, alternating
      (gate, up, gate, up ...); with ``gating`` ``"act_only"`` there is no gate
      and the tensor is up alone, ``[E, I, H]``;
    * ``fused_down`` ``[E, H, I]`` (``transposed``: ``[E, I, H]``);
    * optional biases ``gate_up_bias`` ``[E, 2I]`` and ``down_bias`` ``[E, H]``.

    ``gating`` is what joins gate and up: ``"act_mul"`` ``act(gate) * up`` with
    ``act`` the module's ``activation`` attribute; ``"apply_gate"`` the module's
    own ``_apply_gate`` on the fused gate/up output (transformers' hook for
    clamped or biased SwiGLUs); ``"act_only"`` ``act(up)`` (no gate). ``call``:
    ``"routed"`` modules are called ``(hidden [T, H], top_k_index [T, k],
    top_k_weights [T, k])``; ``"stacked"`` ones (Llama 4) ``(hidden [E*T, H])``
    with every expert's tokens already weighted, one slice per expert.
    ``every_layer`` False: only some decoder layers have the module (dense
    first layers, hybrid stacks).
    """

    module: str  # the experts module, e.g. "mlp.experts"
    gate: str  # per-expert linear names as in checkpoints: Mixtral "w1", Qwen "gate_proj"
    up: str  # Mixtral "w3", Qwen "up_proj"
    down: str  # Mixtral "w2", Qwen "down_proj"
    fused_gate_up: str = "gate_up_proj"
    fused_down: str = "down_proj"
    activation: str = "act_fn"  # attribute of the fused module holding the activation
    transposed: bool = False
    interleaved: bool = False
    gate_up_bias: str | None = None
    down_bias: str | None = None
    gating: str = "act_mul"
    call: str = "routed"
    every_layer: bool = True

    @property
    def has_gate(self) -> bool:
        return self.gating != "act_only"

    @property
    def linear_names(self) -> tuple[str, ...]:
        return (self.gate, self.up, self.down) if self.has_gate else (self.up, self.down)

    def as_dict(self) -> dict[str, object]:
        """The template field (every field, defaults included)."""
        return dataclasses.asdict(self)


def weightless_copy(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` without its own parameters or hooks (attributes, buffers and
    children shared): its methods still run, its tensors are not kept alive by it."""
    shell = copy.copy(module)
    shell._parameters = {}
    shell._buffers = dict(module._buffers)
    shell._modules = dict(module._modules)
    shell._forward_hooks, shell._forward_pre_hooks = OrderedDict(), OrderedDict()
    return shell


class _Gating(nn.Module):
    """``inner(gate_out, up_out)``: what joins an expert's gate and up outputs (see ExpertsLayout.gating)."""

    def __init__(self, layout: ExpertsLayout, fused: nn.Module) -> None:
        super().__init__()
        self.kind = layout.gating
        self.interleaved = layout.interleaved
        if self.kind == "apply_gate":
            # The fused module's own gate function, bound to a weightless copy of it (its
            # thresholds and activation, not its experts' tensors: they are freed with it).
            shell = weightless_copy(fused)
            # Not a registered child: module walks (weight initialisation, hooks, dtype casts)
            # would take the weightless copy for the experts module it mimics.
            object.__setattr__(self, "_fused", shell)
        else:
            act = getattr(fused, layout.activation, None)
            if not callable(act):
                raise TemplateError(
                    f"field 'experts.activation' = {layout.activation!r} is not a callable attribute of "
                    f"{type(fused).__name__}"
                )
            self.act_fn = act

    def forward(self, gate: torch.Tensor | None, up: torch.Tensor) -> torch.Tensor:
        if self.kind == "act_only":
            return self.act_fn(up)
        if self.kind == "act_mul":
            return self.act_fn(gate) * up
        if self.interleaved:
            merged = torch.stack((gate, up), dim=-1).flatten(-2)  # (T, 2I): g0 u0 g1 u1 ...
        else:
            merged = torch.cat((gate, up), dim=-1)  # (T, 2I): gates, then ups
        return self._fused._apply_gate(merged)


class ExpertMLP(nn.Module):
    """One expert: ``down(gating(gate(x), up(x)))`` with linears named per the layout."""

    def __init__(
        self,
        layout: ExpertsLayout,
        hidden_size: int,
        intermediate_size: int,
        gating: nn.Module,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.names = layout.linear_names
        up_bias, down_bias = layout.gate_up_bias is not None, layout.down_bias is not None
        kwargs = {"device": device, "dtype": dtype}
        if layout.has_gate:
            self.add_module(layout.gate, nn.Linear(hidden_size, intermediate_size, bias=up_bias, **kwargs))
        self.add_module(layout.up, nn.Linear(hidden_size, intermediate_size, bias=up_bias, **kwargs))
        self.add_module(layout.down, nn.Linear(intermediate_size, hidden_size, bias=down_bias, **kwargs))
        self.gating = gating

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *gate_up, down = (getattr(self, name) for name in self.names)
        gate = gate_up[0](x) if len(gate_up) == 2 else None
        return down(self.gating(gate, gate_up[-1](x)))  # (T, H) -> (T, I) -> (T, H)


class RoutedExperts(nn.ModuleList):
    """A block's routed experts as a list of :class:`ExpertMLP`, called like transformers' fused module.

    ``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``:
    each token's output is the sum over its ``k`` chosen experts of the expert's
    output times the routing weight, accumulated in expert order (as
    transformers does, so the sums match bit for bit). A ``stacked`` module is
    called ``forward(hidden_states [E*T, H]) -> [E*T, H]``: expert ``e`` maps
    rows ``e*T .. (e+1)*T`` (tokens already weighted by their routing score,
    zero for tokens not routed to it).
    """

    def __init__(self, experts: Iterable[ExpertMLP], stacked: bool = False) -> None:
        super().__init__(experts)
        self.stacked = stacked
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
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor | None = None,
        top_k_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.stacked:
            return self._forward_stacked(hidden_states)
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

    def _forward_stacked(self, hidden_states: torch.Tensor) -> torch.Tensor:
        chunks = hidden_states.view(len(self), -1, hidden_states.shape[-1])  # (E, T, H)
        outs = []
        for e, expert in enumerate(self):
            rows = chunks[e]  # (T, H): zero rows are tokens not routed to e
            routed = rows.abs().amax(dim=-1) > 0
            self.token_counts[e] += int(routed.sum())
            self.active_positions = None if e in self._all_tokens else torch.where(routed)[0]
            try:
                outs.append(expert(rows))
            finally:
                self.active_positions = None
        return torch.cat(outs, dim=0)  # (E*T, H)


# ---------------------------------------------------------------------------------------------
# Fused <-> per-expert
# ---------------------------------------------------------------------------------------------


def _fused_tensor(
    fused: nn.Module, name: str | None, dims: int, field: str, where: str
) -> torch.Tensor | None:
    if name is None:
        return None
    tensor = getattr(fused, name, None)
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != dims:
        shape = None if not isinstance(tensor, torch.Tensor) else tuple(tensor.shape)
        raise TemplateError(
            f"{where}: field 'experts.{field}' = {name!r}: the experts module {type(fused).__name__} has no "
            f"{dims}-D tensor of that name (found shape {shape})"
        )
    return tensor


def _sizes(
    layout: ExpertsLayout, gate_up: torch.Tensor, down: torch.Tensor, where: str
) -> tuple[int, int, int]:
    """(experts E, hidden H, intermediate I) of the fused tensors, checked against each other."""
    n_experts = gate_up.shape[0]
    rows, hidden = (gate_up.shape[2], gate_up.shape[1]) if layout.transposed else gate_up.shape[1:]
    inter = rows // 2 if layout.has_gate else rows
    expected_down = (n_experts, inter, hidden) if layout.transposed else (n_experts, hidden, inter)
    if (layout.has_gate and rows % 2) or tuple(down.shape) != expected_down:
        order = "[E, H, 2I] and [E, I, H]" if layout.transposed else "[E, 2I, H] and [E, H, I]"
        raise TemplateError(
            f"{where}: fused experts have {layout.fused_gate_up} {tuple(gate_up.shape)} and "
            f"{layout.fused_down} {tuple(down.shape)}; expected {order}"
        )
    return n_experts, hidden, inter


def _expert_tensors(
    layout: ExpertsLayout,
    e: int,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """Expert ``e``'s ``{name}.weight`` / ``{name}.bias`` as views of the fused tensors ([out, in] weights)."""
    w = gate_up[e].t() if layout.transposed else gate_up[e]  # (2I, H) or (I, H)
    out: dict[str, torch.Tensor] = {}
    if layout.has_gate:
        inter = w.shape[0] // 2
        pick = (
            (slice(0, None, 2), slice(1, None, 2))
            if layout.interleaved
            else (slice(0, inter), slice(inter, None))
        )
        for name, rows in zip((layout.gate, layout.up), pick):
            out[f"{name}.weight"] = w[rows]
            if gate_up_bias is not None:
                out[f"{name}.bias"] = gate_up_bias[e][rows]
    else:
        out[f"{layout.up}.weight"] = w
        if gate_up_bias is not None:
            out[f"{layout.up}.bias"] = gate_up_bias[e]
    out[f"{layout.down}.weight"] = down[e].t() if layout.transposed else down[e]  # (H, I)
    if down_bias is not None:
        out[f"{layout.down}.bias"] = down_bias[e]
    return out


def build_routed_experts(fused: nn.Module, layout: ExpertsLayout, where: str = "experts") -> RoutedExperts:
    """The per-expert form of ``fused`` (weights are views of its tensors; on meta, nothing is allocated)."""
    gate_up = _fused_tensor(fused, layout.fused_gate_up, 3, "fused_gate_up", where)
    down = _fused_tensor(fused, layout.fused_down, 3, "fused_down", where)
    gate_up_bias = _fused_tensor(fused, layout.gate_up_bias, 2, "gate_up_bias", where)
    down_bias = _fused_tensor(fused, layout.down_bias, 2, "down_bias", where)
    n_experts, hidden, inter = _sizes(layout, gate_up, down, where)
    try:
        gating = _Gating(layout, fused)
    except TemplateError as exc:
        raise TemplateError(f"{where}: {exc}") from None
    experts = []
    for e in range(n_experts):
        expert = ExpertMLP(layout, hidden, inter, gating, device="meta", dtype=gate_up.dtype)
        if gate_up.device.type != "meta":
            for name, tensor in _expert_tensors(
                layout,
                e,
                gate_up.data,
                down.data,
                None if gate_up_bias is None else gate_up_bias.data,
                None if down_bias is None else down_bias.data,
            ).items():
                module_name, _, leaf = name.rpartition(".")
                setattr(expert.get_submodule(module_name), leaf, nn.Parameter(tensor, requires_grad=False))
        experts.append(expert)
    return RoutedExperts(experts, stacked=layout.call == "stacked")


def unfuse_experts(layer: nn.Module, layout: ExpertsLayout, where: str = "experts") -> RoutedExperts | None:
    """Replace ``layer``'s fused experts module by an equivalent :class:`RoutedExperts` (in place).

    The per-expert weights are views of the fused tensors (no copy); on the
    meta device nothing is allocated. A layer whose experts are already a
    :class:`RoutedExperts` is left as it is; one without the module returns None
    when the layout allows it (``every_layer`` False).
    """
    try:
        fused = layer.get_submodule(layout.module)
    except AttributeError:
        if not layout.every_layer:
            return None
        raise TemplateError(
            f"{where}: field 'experts.module' = {layout.module!r} matches no module"
        ) from None
    if isinstance(fused, RoutedExperts):
        return fused
    routed = build_routed_experts(fused, layout, where)
    parent_path, _, child = layout.module.rpartition(".")
    parent = layer.get_submodule(parent_path) if parent_path else layer
    setattr(parent, child, routed)
    # transformers' weight initialisation may reach the fused tensors through the parent
    # (Qwen3-Omni's MoE block initialises ``experts.gate_up_proj``): the parent's weights come
    # from the checkpoint or are already set, so it is marked as initialised.
    parent._is_hf_initialized = True
    return routed


def split_fused_expert_tensors(
    state: Mapping[str, torch.Tensor], layout: ExpertsLayout
) -> dict[str, torch.Tensor]:
    """Layer-relative tensors with fused expert weights split into per-expert ``.weight`` tensors.

    A source checkpoint written with the fused names (``mlp.experts.gate_up_proj``)
    becomes loadable into an unfused layer; other names pass through.
    """
    out = dict(state)
    keys = {
        field: f"{layout.module}.{name}"
        for field, name in (
            ("gate_up", layout.fused_gate_up),
            ("down", layout.fused_down),
            ("gate_up_bias", layout.gate_up_bias),
            ("down_bias", layout.down_bias),
        )
        if name is not None
    }
    present = [k for k in keys.values() if k in out]
    if not present:
        return out
    if len(present) != len(keys):
        missing = sorted(set(keys.values()) - set(present))
        raise TemplateError(f"checkpoint has {present} but not {missing}")
    tensors = {field: out.pop(key) for field, key in keys.items()}
    gate_up, down = tensors["gate_up"], tensors["down"]
    _sizes(layout, gate_up, down, "checkpoint")
    for e in range(gate_up.shape[0]):
        per_expert = _expert_tensors(
            layout, e, gate_up, down, tensors.get("gate_up_bias"), tensors.get("down_bias")
        )
        for name, tensor in per_expert.items():
            out[f"{layout.module}.{e}.{name}"] = tensor.contiguous()
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
