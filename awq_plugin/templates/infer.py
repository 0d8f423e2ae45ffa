"""Infer a template from the model itself: data flow observed on a few tokens, every fold proven.

Where no reviewed template exists, the scaling groups are read off the live
model instead of a file:

1. **Decoder layers**: the ``nn.ModuleList`` of blocks holding ``nn.Linear``
   layers with the most parameters inside the language model
   (``get_decoder()`` when the model has one, so a VLM's vision tower is not
   taken for it).
2. **Shared inputs**: one block runs on a few tokens with hooks on every
   module; linears whose inputs are the same tensor form one group (they must:
   a fold divides the producer's output for every reader).
3. **Producers**: the candidates for ``prev_op`` are the norms whose output
   *is* that tensor (Gemma's ``x * (1 + w)`` norms included: both weight
   offsets are tried) and the linears that ran before the group with as many
   output rows as the group has scales, or as many per KV head (grouped-query
   v -> o), or more (fused qkv / gate_up, whose trailing rows feed it).
4. **Proof**: a candidate is kept only if folding a random per-channel scale
   into it and its inverse into the group leaves the block's float32 output
   unchanged (:mod:`awq_plugin.templates.verify`). The first proven candidate,
   nearest first, wins; a group with none is quantized without a scale
   (``unscaled``: clip search + rounding) and reported.
5. **module2inspect**: a group fed by a norm is judged on the smallest module
   holding all its layers and their siblings (the attention or MLP sub-block;
   ``""``, the decoder layer itself, where one norm feeds parallel attention and
   MLP); a group fed by a linear on its layers (one layer: itself).

Only groups present and proven in every decoder layer are kept (hybrid models
alternate block kinds); the result is a template dict in the shipped schema,
which :func:`awq_plugin.templates.resolve_template` then checks like any other.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from awq_plugin.calibration.capture import BlockInputs, capture_decoder_inputs, first_output
from awq_plugin.errors import TemplateError
from awq_plugin.models import as_plain_linears, has_submodule
from awq_plugin.models.discover_experts import (
    ExpertsFinding,
    checkpoint_expert_names,
    discover_experts,
    layer_prefix_renames,
)
from awq_plugin.models.experts import ExpertsLayout, RoutedExperts, unfuse_experts
from awq_plugin.numerics.pack import PACK_FACTOR
from awq_plugin.templates.layer_config import config_of_layer
from awq_plugin.templates.schema import WILDCARD, ScalingGroup
from awq_plugin.templates.verify import FOLD_TOLERANCE, measure_group_fold

logger = logging.getLogger(__name__)

N_PROBE_TOKENS = 16  # tokens per probe sequence: data flow, not statistics, is what is observed
MAX_LINEAR_CANDIDATES = 4  # nearest preceding linears tried as prev_op per group


@dataclass
class InferenceReport:
    """What inference found, for the template's notes and the coverage tool."""

    proven: list[str] = field(default_factory=list)  # group names with a proven fold
    unscaled: list[str] = field(default_factory=list)  # linears quantized without a scale
    reasons: dict[str, str] = field(default_factory=dict)  # unscaled linear -> why

    def warn_unscaled(self, log: logging.Logger) -> None:
        for name, reason in self.reasons.items():
            log.warning("inferred template: %s is quantized without an AWQ scale: %s", name, reason)


# ---------------------------------------------------------------------------------------------
# Finding the decoder layers and the non-layer modules
# ---------------------------------------------------------------------------------------------


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _has_linear(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) for m in module.modules())


def _embeddings(model: nn.Module, getter: str) -> nn.Module | None:
    """``model.get_input_embeddings()`` (or the output one); None where the model has none to give
    (transformers raises NotImplementedError for some encoder-decoders, e.g. PP-FormulaNet)."""
    try:
        return getattr(model, getter)() if hasattr(model, getter) else None
    except NotImplementedError:
        return None


def _path_of(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    for name, module in model.named_modules():
        if module is target:
            return name
    return None


def find_decoder_layers(model: nn.Module) -> str:
    """The path of the model's decoder-layer list; :class:`TemplateError` naming what was looked for."""
    decoder = None
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            decoder = get_decoder()
        except Exception:  # some models raise instead of returning None
            decoder = None
    scope = _path_of(model, decoder) if isinstance(decoder, nn.Module) else None
    if scope is not None and not any(isinstance(m, nn.ModuleList) for m in decoder.modules()):
        scope = None  # get_decoder() names something else (ModernBERT's decoder head)
    best, best_size = None, 0
    blocks_without_linears = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if scope and not (name == scope or name.startswith(scope + ".")):
            continue
        if not all(isinstance(b, nn.Module) and _n_params(b) > 0 for b in module):
            continue
        if not all(_has_linear(b) for b in module):
            blocks_without_linears.append(name)
            continue
        size = _n_params(module)
        if size > best_size:
            best, best_size = name, size
    if best is None:
        where = f" inside {scope!r}" if scope else ""
        if blocks_without_linears:
            raise TemplateError(
                f"{type(model).__name__}: the decoder-layer lists{where} ({blocks_without_linears}) hold no "
                "nn.Linear layers; AWQ quantizes nn.Linear weights and found none to quantize"
            )
        raise TemplateError(
            f"{type(model).__name__}: no decoder-layer list found{where}: looked for an nn.ModuleList of "
            "blocks containing nn.Linear layers (like model.layers); pass a template naming it "
            "(model_decoder_layers)"
        )
    return best


def _is_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    own = list(module.parameters(recurse=False))
    return (
        not isinstance(module, (nn.Linear, nn.Embedding))
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 1
        and all(p.dim() == 1 for p in own)
        and not any(True for _ in module.children())
    )


def find_non_layer_modules(model: nn.Module, layers_path: str) -> dict[str, str]:
    """Roles embed_tokens, lm_head (and norm, rotary_emb when present) as model paths."""
    roles: dict[str, str] = {}
    embed = _path_of(model, _embeddings(model, "get_input_embeddings"))
    head = _path_of(model, _embeddings(model, "get_output_embeddings"))
    parent = layers_path.rpartition(".")[0]
    base = model.get_submodule(parent) if parent else model
    prefix = f"{parent}." if parent else ""
    # A final norm: with a weight, or (OLMo's non-parametric LayerNorm) named like one.
    norms = [n for n, m in base.named_children() if _is_norm(m)] or [
        n for n, m in base.named_children() if "norm" in type(m).__name__.lower()
    ]
    if not norms:  # post-norm stacks (RoFormer) end without one: the last norm outside the layers
        outside = [
            n
            for n, m in model.named_modules()
            if _is_norm(m) and not (n == layers_path or n.startswith(layers_path + "."))
        ]
        norms = [f"/{n}" for n in outside[-1:]]  # "/": a model path, not relative to the base
    rotary = [n for n, m in base.named_children() if "rotary" in type(m).__name__.lower()]
    for role, path in (("embed_tokens", embed), ("lm_head", head)):
        if path is None:
            raise TemplateError(
                f"{type(model).__name__}: cannot infer non_layer_modules.{role} (looked for the "
                "model's input and output embeddings)"
            )
        roles[role] = path
    if norms:  # a post-norm stack may have none at all (OpenAI GPT)
        roles["norm"] = norms[-1][1:] if norms[-1].startswith("/") else prefix + norms[-1]
    if rotary:
        roles["rotary_emb"] = prefix + rotary[0]
    return roles


# ---------------------------------------------------------------------------------------------
# Observing one block
# ---------------------------------------------------------------------------------------------


@dataclass
class _Observation:
    order: list[str]  # module names in first-call order
    inputs: dict[str, torch.Tensor]  # linear -> its (first call's) input
    outputs: dict[str, torch.Tensor]  # norm / linear -> its (first call's) output
    # linears whose first call did not compute x @ W.T + b, judged in the call (the block may
    # change the tensors in place afterwards, as Falcon's attention does)
    not_linear: set[str] = field(default_factory=set)


def _is_weighted_reader(module: nn.Module) -> bool:
    """A leaf that is no linear but applies a 2-D ``weight`` to its input (an MoE router class)."""
    weight = getattr(module, "weight", None)
    return (
        not isinstance(module, (nn.Linear, nn.Embedding))
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and not any(True for _ in module.children())
    )


def expert_input_names(path: str, layout: ExpertsLayout) -> list[str]:
    """The per-expert linears that read a :class:`RoutedExperts` module's input, as wildcard names."""
    readers = (layout.gate, layout.up) if layout.has_gate else (layout.up,)
    return [f"{path}.{WILDCARD}.{name}" for name in readers]


@torch.no_grad()
def _observe(
    block: nn.Module, hidden: torch.Tensor, kwargs: Mapping[str, Any], experts: Mapping[str, ExpertsLayout]
) -> _Observation:
    """Record each linear's (and norm's) first call. An unfused experts module ``P`` counts as its
    gate/up linears ``P.*.gate``/``P.*.up`` reading the module's input (every token, before routing)."""
    obs = _Observation([], {}, {})
    handles = []

    def hook(name: str, records_input: bool) -> Any:
        def run(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if name in obs.order:
                return
            if isinstance(out, torch.Tensor):
                obs.outputs[name] = out.detach()
            elif not records_input:  # a norm whose output is no tensor: nothing to fold into
                return
            obs.order.append(name)  # a router returning (logits, weights, indices) still reads its input
            if records_input and args and isinstance(args[0], torch.Tensor):
                obs.inputs[name] = args[0].detach()
                # judged in the call: the block may change the tensors in place afterwards
                linear = isinstance(module, nn.Linear) and isinstance(out, torch.Tensor)
                if linear and not _computes_linear(module, args[0], out):
                    obs.not_linear.add(name)

        return run

    def experts_hook(path: str) -> Any:
        def run(module: nn.Module, args: tuple[Any, ...]) -> None:
            names = expert_input_names(path, experts[path])
            if names[0] in obs.inputs or not args or not isinstance(args[0], torch.Tensor):
                return
            for name in names:
                obs.order.append(name)
                obs.inputs[name] = args[0].detach()

        return run

    for name, module in block.named_modules():
        if isinstance(module, RoutedExperts) and name in experts:
            handles.append(module.register_forward_pre_hook(experts_hook(name)))
        elif isinstance(module, nn.Linear) or _is_norm(module) or _is_weighted_reader(module):
            records = isinstance(module, nn.Linear) or _is_weighted_reader(module)
            handles.append(module.register_forward_hook(hook(name, records)))
    try:
        block(hidden, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return obs


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]) if t.dim() else t


def _same_object(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The very same tensor (storage, shape and strides), not merely equal values; a contiguous
    tensor and its ``[-1, K]`` view (an MoE block flattens tokens before routing) count as one."""
    if a.data_ptr() != b.data_ptr():
        return False
    if a.shape == b.shape and a.stride() == b.stride():
        return True
    return a.is_contiguous() and b.is_contiguous() and a.numel() == b.numel() and a.shape[-1:] == b.shape[-1:]


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() != b.numel() or a.shape[-1:] != b.shape[-1:]:
        return False
    return _same_object(a, b) or torch.equal(_rows(a), _rows(b))


def _module(block: nn.Module, name: str) -> nn.Module:
    """``block.get_submodule``, where a ``*`` (any expert) stands for expert 0."""
    return block.get_submodule(name.replace(WILDCARD, "0"))


def _expanded(block: nn.Module, names: Sequence[str]) -> list[str]:
    """Names with ``*`` replaced by every expert index of the experts module before it."""
    out: list[str] = []
    for name in names:
        if WILDCARD not in name:
            out.append(name)
            continue
        path = name.split(f".{WILDCARD}.")[0]
        out += [name.replace(WILDCARD, str(e)) for e in range(len(block.get_submodule(path)))]
    return out


def _shared_input_sets(obs: _Observation, linears: Sequence[str]) -> list[list[str]]:
    """Linears grouped by the very same input tensor, in call order.

    Identity, not equal values: two freshly initialised norms give equal outputs that
    different linears read (GPT-NeoX's parallel attention and MLP).
    """
    groups: list[list[str]] = []
    for name in [n for n in obs.order if n in linears and n in obs.inputs]:
        for group in groups:
            if _same_object(obs.inputs[group[0]], obs.inputs[name]):
                group.append(name)
                break
        else:
            groups.append([name])
    return groups


def _common_parent(names: Sequence[str]) -> str:
    parts = [n.split(".")[:-1] for n in names]  # parents
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1 or level[0] == WILDCARD:
            break
        common.append(level[0])
    return ".".join(common)


# ---------------------------------------------------------------------------------------------
# Proposing and proving folds
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Proposal:
    prev_op: str
    prev_is_linear: bool
    kv_repeat: int = 1
    fused: bool = False
    norm_offset: float = 0.0


def _head_dim(config: Any) -> tuple[int, int] | None:
    """(num_attention_heads, head_dim) from the (text) config, or None."""
    text = getattr(config, "get_text_config", None)
    cfg = text() if callable(text) else config
    heads = getattr(cfg, "num_attention_heads", None)
    if not heads:
        return None
    head_dim = getattr(cfg, "head_dim", None) or getattr(cfg, "hidden_size", 0) // heads
    return heads, head_dim


def _proposals(block: nn.Module, obs: _Observation, layers: Sequence[str], config: Any) -> list[_Proposal]:
    k = _in_features(_module(block, layers[0]))
    x = obs.inputs[layers[0]]
    first = obs.order.index(layers[0])
    out: list[_Proposal] = []
    norms = [
        n
        for n in obs.order[:first]
        if n in obs.outputs
        and _is_norm(block.get_submodule(n))
        and block.get_submodule(n).weight.numel() == k
        and _same_tensor(obs.outputs[n], x)
    ]
    norms.sort(key=lambda n: not _same_object(obs.outputs[n], x))  # the very tensor first
    for name in norms:
        out += [_Proposal(name, False, norm_offset=0.0), _Proposal(name, False, norm_offset=1.0)]
    heads = _head_dim(config)
    linears = [
        n
        for n in reversed(obs.order[:first])
        if WILDCARD not in n and isinstance(block.get_submodule(n), nn.Linear)
    ]
    tried = 0
    for name in linears:
        if name in layers or tried >= MAX_LINEAR_CANDIDATES:
            continue
        rows = block.get_submodule(name).out_features
        proposal = None
        if rows == k:
            proposal = _Proposal(name, True)
        elif rows < k and k % rows == 0 and heads and heads[1] and rows % heads[1] == 0:
            proposal = _Proposal(name, True, kv_repeat=k // rows)  # grouped-query v -> o
        elif rows > k:
            if heads and heads[1] and heads[0] * heads[1] == k and (rows - k) % (2 * heads[1]) == 0:
                n_kv = (rows - k) // (2 * heads[1])  # fused qkv: only the v rows, one scale per KV channel
                if n_kv and heads[0] % n_kv == 0 and n_kv != heads[0]:
                    out.append(_Proposal(name, True, kv_repeat=heads[0] // n_kv, fused=True))
            proposal = _Proposal(name, True, fused=True)  # the trailing k rows feed the group
        if proposal is not None:
            out.append(proposal)
            tried += 1
    return out


def _in_features(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.weight.shape[1]


def _as_group(p: _Proposal, layers: Sequence[str], k: int, head_dim: int) -> ScalingGroup:
    return ScalingGroup(
        prev_op=p.prev_op,
        layers=tuple(layers),
        inp=layers[0],
        module2inspect=None,
        prev_op_is_linear=p.prev_is_linear,
        fused_prev_op=p.fused,
        in_features=k,
        kv_repeat=p.kv_repeat,
        head_dim=head_dim if p.kv_repeat > 1 else 0,
        norm_weight_offset=p.norm_offset,
    )


@dataclass(frozen=True)
class _ProvenGroup:
    layers: tuple[str, ...]
    proposal: _Proposal
    module2inspect: str | None


@torch.no_grad()
def infer_block_groups(
    block: nn.Module,
    hidden: torch.Tensor,
    kwargs: Mapping[str, Any],
    config: Any,
    seed: int = 0,
    expert_names: Mapping[str, tuple[str, str, str]] | None = None,
) -> tuple[list[_ProvenGroup], dict[str, str], list[ExpertsFinding]]:
    """Proven groups of one block (float32 copy), per unscaled linear the reason, and its experts.

    Fused experts are unfused first where their per-expert form is proven
    (:func:`awq_plugin.models.discover_experts.discover_experts`); their gate/up
    linears then join the groups of the tensor the experts module reads, under
    wildcard names (``mlp.experts.*.gate_proj``), and each expert's up -> down
    is tried as its own group.

    A linear whose observed output is not ``x @ W.T + b`` has the reason :data:`NOT_A_LINEAR`:
    an AWQ linear would compute something else, so it stays in full precision.
    """
    block = copy.deepcopy(block).float()
    findings = discover_experts(block, expert_names, seed)
    experts: dict[str, ExpertsLayout] = {}
    for finding in findings:
        if finding.layout is not None:
            unfuse_experts(block, finding.layout)
            experts[finding.path] = finding.layout
    inputs = BlockInputs([hidden], [dict(kwargs)]).to(torch.float32)
    hidden, kwargs = inputs.hidden_states[0], inputs.kwargs[0]
    references = [first_output(block(hidden, **kwargs))]
    obs = _observe(block, hidden, kwargs, experts)
    inside = tuple(path + "." for path in experts)
    linears = [n for n, m in block.named_modules() if isinstance(m, nn.Linear) and not n.startswith(inside)]
    readers = [n for n, m in block.named_modules() if _is_weighted_reader(m) and n in obs.inputs]
    pseudo = [n for path, layout in experts.items() for n in expert_input_names(path, layout)]
    reasons = {n: "never called on the probe tokens" for n in linears if n not in obs.inputs}
    for name in [n for n in linears if n in obs.not_linear]:
        reasons[name] = NOT_A_LINEAR
        linears.remove(name)
    generator = torch.Generator().manual_seed(seed)
    heads = _head_dim(config)
    proven: list[_ProvenGroup] = []
    for layers in _shared_input_sets(obs, linears + readers + pseudo):
        if all(n in readers for n in layers):  # routers alone: nothing to quantize
            continue
        k = _in_features(_module(block, layers[0]))
        found = None
        for proposal in _proposals(block, obs, layers, config):
            group = _as_group(proposal, _expanded(block, layers), k, heads[1] if heads else 0)
            try:
                error, observed = measure_group_fold(block, group, inputs, references, generator)
            except (RuntimeError, ValueError):  # shapes that do not fold at all
                continue
            if observed and error <= FOLD_TOLERANCE:
                found = proposal
                break
        if found is None:
            for name in layers:
                if name not in readers:
                    reasons[name] = "no producer whose fold leaves the block output unchanged"
            continue
        inspect = _module_to_inspect(block, layers, found)  # "": the search runs the whole block
        proven.append(_ProvenGroup(tuple(layers), found, inspect))
    proven += _expert_down_groups(block, obs, experts, inputs, references, generator, reasons)
    return proven, reasons, findings


MAX_EXPERT_FOLD_PROOFS = 4  # experts whose up -> down fold is measured (the others are built alike)


def _expert_down_groups(
    block: nn.Module,
    obs: _Observation,
    experts: Mapping[str, ExpertsLayout],
    inputs: BlockInputs,
    references: Sequence[torch.Tensor],
    generator: torch.Generator,
    reasons: dict[str, str],
) -> list[_ProvenGroup]:
    """``P.*.up -> P.*.down`` for every experts module whose measured experts all fold exactly."""
    out = []
    for path, layout in experts.items():
        routed = block.get_submodule(path)
        down = f"{path}.{WILDCARD}.{layout.down}"
        hit = [e for e in range(len(routed)) if f"{path}.{e}.{layout.down}" in obs.inputs]
        if not hit:
            reasons[down] = "no probe token was routed to any expert"
            continue
        k = routed[hit[0]].get_submodule(layout.down).in_features
        proposal = _Proposal(f"{path}.{WILDCARD}.{layout.up}", True)
        exact = True
        for e in hit[:MAX_EXPERT_FOLD_PROOFS]:
            group = _as_group(_Proposal(f"{path}.{e}.{layout.up}", True), [f"{path}.{e}.{layout.down}"], k, 0)
            try:
                error, observed = measure_group_fold(block, group, inputs, references, generator)
            except (RuntimeError, ValueError):
                exact = False
                break
            if not observed or error > FOLD_TOLERANCE:
                exact = False
                break
        if exact:
            out.append(_ProvenGroup((down,), proposal, None))
        else:
            reasons[down] = f"the experts' {layout.gating} gating does not commute with a scale on up"
    return out


NOT_A_LINEAR = "kept in full precision: its forward does not compute x @ W.T + b"


def _computes_linear(module: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether a call with input ``x`` and output ``y`` computed ``x @ W.T + b``. An ``nn.Linear``
    subclass may not (DeepSeek-V4's grouped ``o_a_proj`` multiplies each head group by its own
    slice of W)."""
    if x.shape[-1] != module.in_features:
        return False
    expected = nn.functional.linear(x, module.weight, module.bias)
    if expected.shape != y.shape:
        return False
    scale = float(y.abs().max()) if y.numel() else 0.0
    return torch.allclose(expected, y, rtol=1e-4, atol=1e-4 * scale)  # fp32 sums in another order


def _module_to_inspect(block: nn.Module, layers: Sequence[str], proposal: _Proposal) -> str | None:
    """None: each layer alone; "": only the whole block would do (parallel attention and MLP
    reading one norm, as in GPT-J, Falcon, CodeGen); else the sub-module's path."""
    if proposal.prev_is_linear and len(layers) == 1:
        return None
    parent = _common_parent(layers)
    if parent == "":
        return None if len(layers) == 1 else ""
    return parent


# ---------------------------------------------------------------------------------------------
# The whole model
# ---------------------------------------------------------------------------------------------


def _probe_ids(model: nn.Module, n_tokens: int, seed: int) -> torch.Tensor:
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None) or model.get_input_embeddings().num_embeddings
    # Low ids avoid special image/audio placeholder tokens that multimodal models intercept.
    high = max(2, min(int(vocab), 1000))
    return torch.randint(1, high, (2, n_tokens), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def infer_template(
    model: nn.Module,
    input_ids: torch.Tensor | None = None,
    seed: int = 0,
    layer_weights: Callable[[int], AbstractContextManager[Any]] | None = None,
) -> tuple[dict[str, Any], InferenceReport]:
    """A template dict (shipped schema) whose every group was proven on every decoder layer.

    ``model`` has real weights (random ones do: the proofs are about data flow).
    ``input_ids`` ``[B, T]`` are the probe tokens (default: two random sequences).
    ``layer_weights(i)``: where the decoder layers' weights are not in memory (the
    streaming quantizer holds one at a time), a context in which layer ``i`` has them;
    the modules outside the layers must have theirs.
    """
    config = getattr(model, "config", None)
    as_plain_linears(model)  # Conv1D, grouped linears: plain nn.Linear, in place
    layers_path = find_decoder_layers(model)
    layers = model.get_submodule(layers_path)
    non_layer = find_non_layer_modules(model, layers_path)
    ids = input_ids if input_ids is not None else _probe_ids(model, N_PROBE_TOKENS, seed)
    was_training = model.training
    model.eval()
    captured = capture_decoder_inputs(model, layers, ids, micro_batch_size=ids.shape[0])
    model.train(was_training)
    per_layer: list[dict[tuple[str, ...], _ProvenGroup]] = []
    reasons: dict[str, str] = {}
    not_linear: set[str] = set()  # linears whose forward is not x @ W.T + b in some layer
    expert_names = checkpoint_expert_names(model)
    findings: list[list[ExpertsFinding]] = []
    for i, block in enumerate(layers):
        inputs = captured.for_layer(i)
        with layer_weights(i) if layer_weights is not None else contextlib.nullcontext():
            proven, why, found = infer_block_groups(
                block,
                inputs.hidden_states[0],
                inputs.kwargs[0],
                config_of_layer(config, i),
                seed + i,
                expert_names,
            )
        per_layer.append({g.layers: g for g in proven})
        findings.append(found)
        for name, reason in why.items():
            reasons.setdefault(name, f"{reason} (decoder layer {i})")
            if reason == NOT_A_LINEAR:
                not_linear.add(name)
    layout, kept_fused = _experts_layout(findings)
    with_experts = [layout is not None and any(f.path == layout.module for f in found) for found in findings]
    linear_sets = [_linear_names(layer) for layer in layers]

    def applicable(g: _ProvenGroup) -> list[int]:
        """Layers a group must be proven in: those with the experts for a group naming them, else
        those holding its modules (every layer, unless a hybrid stack alternates block kinds:
        attention, SSM or linear-attention mixers, dense or MoE feed-forward)."""
        if any(WILDCARD in n for n in (g.proposal.prev_op, *g.layers)):
            return [i for i, has in enumerate(with_experts) if has]
        return [i for i, layer in enumerate(layers) if all(has_submodule(layer, n) for n in g.layers)]

    # Keep a group only where every layer it applies to proved the same fold; order by first call.
    candidates: dict[tuple[str, ...], _ProvenGroup] = {}
    for i, layer_groups in enumerate(per_layer):
        for g in layer_groups.values():
            if g.layers not in candidates and i == (applicable(g) or [-1])[0]:
                candidates[g.layers] = g
    groups = [
        g
        for g in candidates.values()
        if (layout is not None or not any(WILDCARD in n for n in g.layers))
        and applicable(g)
        and all(per_layer[i].get(g.layers) == g for i in applicable(g))
    ]
    offsets = {g.proposal.norm_offset for g in groups if not g.proposal.prev_is_linear}
    offset = 0.0
    if len(offsets) > 1:  # one offset per template: keep the norms that agree with the majority
        counts = {
            o: sum(g.proposal.norm_offset == o for g in groups if not g.proposal.prev_is_linear)
            for o in offsets
        }
        offset = max(counts, key=counts.get)
        groups = [g for g in groups if g.proposal.prev_is_linear or g.proposal.norm_offset == offset]
    elif offsets:
        offset = offsets.pop()
    # Every decoder layer's linears, in first-seen order (hybrid stacks alternate block kinds).
    all_linears = list(dict.fromkeys(n for names in linear_sets for n in names))
    # Output rows pack PACK_FACTOR to an int32: a linear with fewer or a remainder (a router
    # over 4 experts) stays in full precision, and no group may scale it.
    unpackable_anywhere = {
        n
        for n in all_linears
        if any(
            n in names and layer.get_submodule(n).out_features % PACK_FACTOR
            for layer, names in zip(layers, linear_sets)
        )
    }
    unpackable_anywhere |= not_linear  # an AWQ linear would compute something else
    unpackable = [
        n for n in all_linears if n in unpackable_anywhere and all(n in names for names in linear_sets)
    ]
    partial = sorted(not_linear - set(unpackable))
    if partial:  # not_quantized names a linear in every layer; quantizing these would be wrong
        raise TemplateError(
            f"{type(model).__name__}: {partial} do not compute x @ W.T + b and exist in only some decoder "
            "layers, so an inferred template cannot keep them in full precision; pass a template"
        )
    # a linear that cannot pack in a layer where it cannot be listed as not quantized: no group
    groups = [g for g in groups if not set(g.layers) & (unpackable_anywhere - set(unpackable))]
    n_experts = _experts_count(layers, layout)
    routers = sorted(
        {
            n
            for g in groups
            if any(WILDCARD in m for m in g.layers)
            for n in g.layers
            if _is_router(layers, with_experts, n, n_experts)
        }
    )
    layer_configs = [config_of_layer(config, i) for i in range(len(layers))]
    json_groups = []
    for g in groups:
        readers = [
            n for n in g.layers if n in unpackable or n in routers or not _is_linear_somewhere(layers, n)
        ]
        if len(readers) < len(g.layers):
            held_by = applicable(g)
            held_by = None if len(held_by) == len(layers) or any(WILDCARD in n for n in g.layers) else held_by
            json_groups.append(_group_json(g, layer_configs, readers, layout, held_by))
    groups = [g for g in groups if any(n not in unpackable and n not in routers for n in g.layers)]
    report = InferenceReport(proven=[f"{g.proposal.prev_op} -> {', '.join(g.layers)}" for g in groups])
    scaled = {name for g in groups for name in g.layers if name not in unpackable and name not in routers}
    for name in all_linears:
        if name in not_linear:
            report.reasons[name] = NOT_A_LINEAR
        elif name in unpackable_anywhere:
            report.reasons[name] = f"kept in full precision: {PACK_FACTOR} does not divide its output rows"
        elif name not in scaled:
            report.unscaled.append(name)
            report.reasons[name] = reasons.get(name, "its fold is not proven in every decoder layer")
    if not groups:  # still AWQ's clip search + rounding for every linear, just no scale
        logger.warning(
            "%s: no scaling group could be proven in %r (linears: %s); every linear gets clip search "
            "and rounding without an AWQ scale",
            type(model).__name__,
            layers_path,
            all_linears[:8],
        )
    architectures = list(getattr(config, "architectures", None) or [type(model).__name__])
    model_type = getattr(config, "model_type", None)
    template = {
        "name": f"inferred-{model_type or type(model).__name__}",
        "architectures": architectures[:1],
        "model_types": [model_type] if model_type else [],
        "model_decoder_layers": layers_path,
        "non_layer_modules": non_layer,
        "scaling_layers": json_groups,
        # Listed only where every layer has the linear (hybrid stacks alternate block kinds); the
        # resolver quantizes any other unscaled linear too, and logs it.
        "unscaled": [n for n in report.unscaled if all(has_submodule(layer, n) for layer in layers)]
        + _unscaled_expert_linears(layout, scaled),
        "not_quantized": unpackable
        + [r for r in routers if r not in unpackable and _is_linear_somewhere(layers, r)],
        "norm_weight_offset": offset,
        "experts": layout.as_dict() if layout is not None else None,
        # How the family's checkpoints spell the MoE block (PhiMoE: block_sparse_moe), so that the
        # experts' AWQ tensors carry the names vLLM's loader reads.
        "checkpoint_names": _moe_checkpoint_names(model, layers_path, layout),
        "unsupported": [
            f"{path}: fused experts kept in full precision: {why}" for path, why in kept_fused.items()
        ],
        "notes": "Inferred from the model's data flow; every fold proven numerically. Unscaled: "
        + ("; ".join(f"{n}: {r}" for n, r in report.reasons.items()) or "none"),
    }
    return template, report


def _linear_names(block: nn.Module) -> list[str]:
    return [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]


def template_without_experts(template: Mapping[str, Any], reason: str) -> dict[str, Any]:
    """``template`` with its experts left fused (no ``experts``, no group or list naming them)."""
    out = copy.deepcopy(dict(template))
    out["experts"] = None
    out["scaling_layers"] = [
        g for g in out["scaling_layers"] if not any(WILDCARD in n for n in (g["prev_op"], *g["layers"]))
    ]
    for key in ("unscaled", "not_quantized", "clip_skip"):
        out[key] = [n for n in out.get(key, []) if WILDCARD not in n]
    out["unsupported"] = [*out.get("unsupported", []), reason]
    return out


def _config_kv_repeat(config: Any) -> int | None:
    """Query heads per KV head as the resolver derives it from the default config keys."""
    text = getattr(config, "get_text_config", None)
    cfg = text() if callable(text) else config
    heads = getattr(cfg, "num_attention_heads", None)
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    return heads // kv if heads and kv and heads % kv == 0 else None


def _group_json(
    g: _ProvenGroup,
    layer_configs: Sequence[Any],
    readers: Sequence[str] = (),
    layout: ExpertsLayout | None = None,
    held_by: list[int] | None = None,
) -> dict[str, Any]:
    """The group as template JSON; ``layer_configs``: each decoder layer's config; ``held_by``: the
    decoder layers it applies to (None: all)."""
    layers = [n for n in g.layers if n not in readers]
    naming_experts = layout is not None and any(n.startswith(f"{layout.module}.{WILDCARD}.") for n in layers)
    # Experts' gate/up read the experts module's input (every token): its statistics are theirs.
    inp = layout.module if naming_experts and WILDCARD not in g.proposal.prev_op else layers[0]
    out: dict[str, Any] = {"prev_op": g.proposal.prev_op, "layers": layers, "inp": inp}
    if held_by is not None:
        out["decoder_layers"] = held_by
        layer_configs = [layer_configs[i] for i in held_by]
    if readers:
        out["unquantized_readers"] = list(readers)
    inspect = g.module2inspect
    if inspect is None and len(layers) > 1:
        inspect = _common_parent(layers)
    if inspect is not None:
        out["module2inspect"] = inspect
    if g.proposal.kv_repeat > 1:
        # The resolver reads the head ratio from each layer's config; where the config's names do
        # not give the proven ratio in every layer (Falcon's multi_query), the template states it.
        from_config = all(_config_kv_repeat(c) == g.proposal.kv_repeat for c in layer_configs)
        out["repeat_kv"] = True if from_config else g.proposal.kv_repeat
    if g.proposal.fused:
        out["fused_prev_op"] = True
    return out


def _experts_layout(
    findings: Sequence[Sequence[ExpertsFinding]],
) -> tuple[ExpertsLayout | None, dict[str, str]]:
    """The one experts layout proven in every layer that has its module, and the modules kept fused."""
    kept: dict[str, str] = {}
    by_path: dict[str, list[ExpertsFinding]] = {}
    for i, found in enumerate(findings):
        for f in found:
            by_path.setdefault(f.path, []).append(f)
            if f.layout is None:
                kept.setdefault(f.path, f"{f.reason} (decoder layer {i})")
    chosen = None
    for path, found in by_path.items():
        if path in kept:
            continue
        layouts = {f.layout for f in found}
        if len(layouts) != 1:
            kept[path] = "its layers store the experts in different layouts"
        elif chosen is not None:
            kept[path] = f"a second experts module per layer (beside {chosen.module}) is not supported yet"
        else:
            chosen = layouts.pop()
    if chosen is not None:
        every = len(by_path[chosen.module]) == len(findings)
        chosen = dataclasses.replace(chosen, every_layer=every)
    return chosen, kept


def _unscaled_expert_linears(layout: ExpertsLayout | None, scaled: set[str]) -> list[str]:
    if layout is None:
        return []
    names = [f"{layout.module}.{WILDCARD}.{n}" for n in layout.linear_names]
    return [n for n in names if n not in scaled]


def _moe_checkpoint_names(model: nn.Module, layers_path: str, layout: ExpertsLayout | None) -> dict[str, str]:
    if layout is None:
        return {}
    return layer_prefix_renames(model, layers_path, within=layout.module.rpartition(".")[0] or layout.module)


def _experts_count(layers: nn.ModuleList, layout: ExpertsLayout | None) -> int:
    if layout is None:
        return 0
    for layer in layers:
        if has_submodule(layer, layout.module):
            module = layer.get_submodule(layout.module)
            tensor = getattr(module, layout.fused_gate_up, None)
            return len(module) if isinstance(module, RoutedExperts) else int(tensor.shape[0])
    return 0


def _is_router(layers: nn.ModuleList, with_experts: Sequence[bool], name: str, n_experts: int) -> bool:
    """A module reading the experts' input with one output per expert: it routes, it stays in full precision."""
    if WILDCARD in name:
        return False
    for layer, has in zip(layers, with_experts):
        if has and has_submodule(layer, name):
            module = layer.get_submodule(name)
            rows = (
                module.out_features
                if isinstance(module, nn.Linear)
                else getattr(module, "weight", None).shape[0]
            )
            return rows == n_experts
    return False


def _is_linear_somewhere(layers: nn.ModuleList, name: str) -> bool:
    if WILDCARD in name:
        return True
    return any(
        has_submodule(layer, name) and isinstance(layer.get_submodule(name), nn.Linear) for layer in layers
    )


__all__ = [
    "InferenceReport",
    "find_decoder_layers",
    "find_non_layer_modules",
    "infer_template",
    "template_without_experts",
]
