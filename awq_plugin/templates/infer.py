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
import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from awq_plugin.calibration.capture import BlockInputs, capture_decoder_inputs, first_output
from awq_plugin.errors import TemplateError
from awq_plugin.models.conv1d import linearize_conv1d
from awq_plugin.numerics.pack import PACK_FACTOR
from awq_plugin.templates.layer_config import config_of_layer
from awq_plugin.templates.schema import ScalingGroup
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


@torch.no_grad()
def _observe(block: nn.Module, hidden: torch.Tensor, kwargs: Mapping[str, Any]) -> _Observation:
    obs = _Observation([], {}, {})
    handles = []

    def hook(name: str, is_linear: bool) -> Any:
        def run(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if name in obs.outputs or not isinstance(out, torch.Tensor):
                return
            obs.order.append(name)
            obs.outputs[name] = out.detach()
            if is_linear and args and isinstance(args[0], torch.Tensor):
                obs.inputs[name] = args[0].detach()
                if not _computes_linear(module, args[0], out):
                    obs.not_linear.add(name)

        return run

    for name, module in block.named_modules():
        if isinstance(module, nn.Linear) or _is_norm(module):
            handles.append(module.register_forward_hook(hook(name, isinstance(module, nn.Linear))))
    try:
        block(hidden, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return obs


def _same_object(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The very same tensor (storage, shape and strides), not merely equal values."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and (_same_object(a, b) or torch.equal(a, b))


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
        if len(set(level)) != 1:
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
    k = block.get_submodule(layers[0]).in_features
    x = obs.inputs[layers[0]]
    first = obs.order.index(layers[0])
    out: list[_Proposal] = []
    norms = [
        n
        for n in obs.order[:first]
        if not isinstance(block.get_submodule(n), nn.Linear)
        and block.get_submodule(n).weight.numel() == k
        and _same_tensor(obs.outputs[n], x)
    ]
    norms.sort(key=lambda n: not _same_object(obs.outputs[n], x))  # the very tensor first
    for name in norms:
        out += [_Proposal(name, False, norm_offset=0.0), _Proposal(name, False, norm_offset=1.0)]
    heads = _head_dim(config)
    linears = [n for n in reversed(obs.order[:first]) if isinstance(block.get_submodule(n), nn.Linear)]
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
    block: nn.Module, hidden: torch.Tensor, kwargs: Mapping[str, Any], config: Any, seed: int = 0
) -> tuple[list[_ProvenGroup], dict[str, str]]:
    """Proven groups of one block (float32 copy) and, per unscaled linear, the reason.

    A linear whose observed output is not ``x @ W.T + b`` has the reason :data:`NOT_A_LINEAR`:
    an AWQ linear would compute something else, so it stays in full precision.
    """
    block = copy.deepcopy(block).float()
    inputs = BlockInputs([hidden], [dict(kwargs)]).to(torch.float32)
    hidden, kwargs = inputs.hidden_states[0], inputs.kwargs[0]
    references = [first_output(block(hidden, **kwargs))]
    obs = _observe(block, hidden, kwargs)
    linears = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    reasons = {n: "never called on the probe tokens" for n in linears if n not in obs.inputs}
    for name in [n for n in linears if n in obs.not_linear]:
        reasons[name] = NOT_A_LINEAR
        linears.remove(name)
    generator = torch.Generator().manual_seed(seed)
    heads = _head_dim(config)
    proven: list[_ProvenGroup] = []
    for layers in _shared_input_sets(obs, linears):
        k = block.get_submodule(layers[0]).in_features
        found = None
        for proposal in _proposals(block, obs, layers, config):
            group = _as_group(proposal, layers, k, heads[1] if heads else 0)
            try:
                error, observed = measure_group_fold(block, group, inputs, references, generator)
            except (RuntimeError, ValueError):  # shapes that do not fold at all
                continue
            if observed and error <= FOLD_TOLERANCE:
                found = proposal
                break
        if found is None:
            for name in layers:
                reasons[name] = "no producer whose fold leaves the block output unchanged"
            continue
        inspect = _module_to_inspect(block, layers, found)  # "": the search runs the whole block
        proven.append(_ProvenGroup(tuple(layers), found, inspect))
    return proven, reasons


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
    linearize_conv1d(model)  # GPT-2's Conv1D is a linear: make it one, in place
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
    for i, block in enumerate(layers):
        inputs = captured.for_layer(i)
        with layer_weights(i) if layer_weights is not None else contextlib.nullcontext():
            proven, why = infer_block_groups(
                block, inputs.hidden_states[0], inputs.kwargs[0], config_of_layer(config, i), seed + i
            )
        per_layer.append({g.layers: g for g in proven})
        for name, reason in why.items():
            reasons.setdefault(name, f"{reason} (decoder layer {i})")
            if reason == NOT_A_LINEAR:
                not_linear.add(name)
    linear_sets = [_linear_names(layer) for layer in layers]
    # Keep a group only where every layer holding its linears proved the same fold (every layer, in
    # a homogeneous stack); order by the first calls.
    held_by = _groups_by_layer(per_layer, linear_sets)
    groups = list(held_by)
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
    groups = [g for g in groups if not set(g.layers) & unpackable_anywhere]
    report = InferenceReport(proven=[f"{g.proposal.prev_op} -> {', '.join(g.layers)}" for g in groups])
    scaled = {name for g in groups for name in g.layers}
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
        "scaling_layers": [
            _group_json(g, [config_of_layer(config, i) for i in range(len(layers))], held_by[g])
            for g in groups
        ],
        # Listed only where every layer has the linear (hybrid stacks alternate block kinds); the
        # resolver quantizes any other unscaled linear too, and logs it.
        "unscaled": [n for n in report.unscaled if all(_has_module(layer, n) for layer in layers)],
        "not_quantized": unpackable,
        "norm_weight_offset": offset,
        "notes": "Inferred from the model's data flow; every fold proven numerically. Unscaled: "
        + ("; ".join(f"{n}: {r}" for n, r in report.reasons.items()) or "none"),
    }
    return template, report


def _linear_names(block: nn.Module) -> list[str]:
    return [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]


def _groups_by_layer(
    per_layer: Sequence[Mapping[tuple[str, ...], _ProvenGroup]], linear_sets: Sequence[Sequence[str]]
) -> dict[_ProvenGroup, list[int] | None]:
    """Each group proven alike in every decoder layer that holds all its linears -> those layers
    (None: every layer), in first-call order.

    Hybrid stacks alternate block kinds (attention, SSM or linear-attention mixers, dense or MoE
    feed-forward): a group is judged in the layers of its kind. In a homogeneous stack every layer
    holds every linear, so a group must be proven in all of them, as before.
    """
    out: dict[_ProvenGroup, list[int] | None] = {}
    seen: set[tuple[str, ...]] = set()
    for proven in per_layer:
        for key, group in proven.items():
            if key in seen:
                continue
            seen.add(key)
            holders = [j for j, names in enumerate(linear_sets) if set(key) <= set(names)]
            if all(per_layer[j].get(key) == group for j in holders):
                out[group] = None if len(holders) == len(per_layer) else holders
    return out


def _has_module(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


def _config_kv_repeat(config: Any) -> int | None:
    """Query heads per KV head as the resolver derives it from the default config keys."""
    text = getattr(config, "get_text_config", None)
    cfg = text() if callable(text) else config
    heads = getattr(cfg, "num_attention_heads", None)
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    return heads // kv if heads and kv and heads % kv == 0 else None


def _group_json(g: _ProvenGroup, layer_configs: Sequence[Any], held_by: list[int] | None) -> dict[str, Any]:
    """The group as template JSON; ``layer_configs``: each decoder layer's config; ``held_by``: the
    decoder layers it applies to (None: all)."""
    out: dict[str, Any] = {"prev_op": g.proposal.prev_op, "layers": list(g.layers), "inp": g.layers[0]}
    if held_by is not None:
        out["decoder_layers"] = held_by
        layer_configs = [layer_configs[i] for i in held_by]
    if g.module2inspect is not None:
        out["module2inspect"] = g.module2inspect
    if g.proposal.kv_repeat > 1:
        # The resolver reads the head ratio from each layer's config; where the config's names do
        # not give the proven ratio in every layer (Falcon's multi_query), the template states it.
        from_config = all(_config_kv_repeat(c) == g.proposal.kv_repeat for c in layer_configs)
        out["repeat_kv"] = True if from_config else g.proposal.kv_repeat
    if g.proposal.fused:
        out["fused_prev_op"] = True
    return out


__all__ = ["InferenceReport", "find_decoder_layers", "find_non_layer_modules", "infer_template"]
