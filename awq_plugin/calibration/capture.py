"""Hooks that record what flows into decoder blocks and into the modules inside them.

Two jobs:

* :func:`capture_decoder_inputs` runs the model's forward only as far as the
  decoder stack ("catcher" pattern): forward pre-hooks on the decoder layers
  record the hidden states entering layer 0 and the keyword arguments every
  layer receives (attention mask, rotary ``position_embeddings``, ...), then
  raise a private exception to stop. Kwargs are recorded per layer because
  they can differ between layers (sliding-window masks in Mistral/Gemma 2,
  local vs global rotary tables in Gemma 3). While capturing, each layer's
  ``forward`` is replaced by a pass-through, so no layer computes anything and
  the layers may even live on the ``meta`` device.
* :class:`InputRecorder` runs one block over its calibration inputs with
  pre-hooks on chosen submodules and keeps, per module: the per-channel sum of
  ``|x|`` over all tokens (AWQ's activation statistic); for the scale search,
  a seeded subsample of input rows or, for modules that mix tokens
  (attention), complete calls on a seeded subset of micro-batches; and for the
  clip search, the per-group Gram matrices of the input.

Calibration is processed in micro-batches of whole sequences to bound memory.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from awq_plugin.calibration.statistics import group_gram, rescale_gram
from awq_plugin.numerics.dense import symmetrize_upper_

logger = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by a hook once everything a forward was run for is recorded (the rest is skipped)."""


def _map_tensors(obj: Any, fn: Any) -> Any:
    """Apply ``fn`` to every tensor inside nested tuples/lists/dicts."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _to_float_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


@dataclass
class BlockInputs:
    """The inputs of one decoder block, in micro-batches.

    ``hidden_states[m]`` is ``[B, T, H]``; ``kwargs[m]`` holds the keyword
    arguments the model passes to this layer for that micro-batch.
    """

    hidden_states: list[torch.Tensor]
    kwargs: list[dict[str, Any]]
    # The hidden states the full-precision model gives this block on the same tokens, where they
    # differ from ``hidden_states`` (the quantized model's): asymmetric calibration's target.
    reference: list[torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if len(self.hidden_states) != len(self.kwargs):
            raise ValueError(
                f"BlockInputs: {len(self.hidden_states)} hidden-state micro-batches but {len(self.kwargs)} kwargs"
            )
        if self.reference is not None and len(self.reference) != len(self.hidden_states):
            raise ValueError(
                f"BlockInputs: {len(self.reference)} reference micro-batches but "
                f"{len(self.hidden_states)} hidden-state ones"
            )

    @property
    def n_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden_states)

    def tokens_per_batch(self) -> list[int]:
        return [h.shape[0] * h.shape[1] for h in self.hidden_states]

    def with_hidden_states(
        self, hidden_states: list[torch.Tensor], reference: list[torch.Tensor] | None = None
    ) -> BlockInputs:
        """The same kwargs with new hidden states (e.g. the previous block's outputs)."""
        return BlockInputs(
            hidden_states=list(hidden_states),
            kwargs=self.kwargs,
            reference=None if reference is None else list(reference),
        )

    def first_sequence(self) -> BlockInputs | None:
        """Micro-batch 0 cut to its first sequence (None when it holds only one).

        Every keyword tensor of two or more dimensions whose first one is the batch size is
        cut with it (masks, rotary tables); the rest is kept whole. A tensor whose first
        dimension only happens to equal the batch size is cut too, so callers must treat the
        result as a cheap first try that may fail, never as the only evidence.
        """
        hidden = self.hidden_states[0]
        batch = hidden.shape[0]
        if batch < 2:
            return None

        def cut(t: torch.Tensor) -> torch.Tensor:
            return t[:1] if t.dim() >= 2 and t.shape[0] == batch else t

        return BlockInputs(hidden_states=[hidden[:1]], kwargs=[_map_tensors(self.kwargs[0], cut)])

    def to(self, dtype: torch.dtype) -> BlockInputs:
        """Cast floating tensors (hidden states, rotary tables, masks) to ``dtype``."""
        return BlockInputs(
            hidden_states=[_to_float_dtype(h, dtype) for h in self.hidden_states],
            kwargs=[_map_tensors(kw, lambda t: _to_float_dtype(t, dtype)) for kw in self.kwargs],
            reference=None if self.reference is None else [_to_float_dtype(h, dtype) for h in self.reference],
        )


@dataclass
class CapturedInputs:
    """Layer-0 hidden states plus the kwargs of every layer: ``layer_kwargs[layer][micro_batch]``."""

    hidden_states: list[torch.Tensor]
    layer_kwargs: list[list[dict[str, Any]]]

    def for_layer(
        self,
        index: int,
        hidden_states: list[torch.Tensor] | None = None,
        reference: list[torch.Tensor] | None = None,
    ) -> BlockInputs:
        """Inputs of layer ``index``: given hidden states (default: layer 0's) with that layer's
        kwargs, and the full-precision model's where they differ (``reference``)."""
        hs = self.hidden_states if hidden_states is None else hidden_states
        return BlockInputs(
            hidden_states=list(hs),
            kwargs=self.layer_kwargs[index],
            reference=None if reference is None else list(reference),
        )


def _passthrough(*args: Any, **kwargs: Any) -> Any:
    return args[0] if args else kwargs["hidden_states"]


def _passthrough_pair(*args: Any, **kwargs: Any) -> Any:
    """For models that unpack a layer's output as ``(hidden, state)`` (xLSTM)."""
    return _passthrough(*args, **kwargs), None


def _split_hidden(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], where: str
) -> tuple[torch.Tensor, dict[str, Any]]:
    """A decoder layer's call as (hidden states, every other argument by keyword).

    Models since transformers 4.56 pass all but the hidden states as keywords; older
    designs (XGLM, mBART, RoFormer, ...) still pass the mask and friends positionally.
    Those are named from the layer's ``forward`` signature, so that every recorded call
    replays as ``layer(hidden, **kwargs)``.
    """
    kwargs = dict(kwargs)
    if len(args) > 1:
        try:
            bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs)
        except TypeError as exc:
            raise NotImplementedError(
                f"{where} is called with {len(args)} positional arguments that its forward signature "
                f"does not name ({exc})"
            ) from None
        params = list(bound.signature.parameters.values())
        if any(p.kind in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY) for p in params[: len(args) + 1]):
            raise NotImplementedError(
                f"{where} takes positional-only or *args parameters; its call cannot be replayed by keyword"
            )
        named = dict(bound.arguments)
        named.pop(params[0].name)  # self
        extra = named.pop(params[-1].name, {}) if params[-1].kind is params[-1].VAR_KEYWORD else {}
        hidden = named.pop(params[1].name)
        return hidden, {**named, **extra}
    if args:
        return args[0], kwargs
    if "hidden_states" not in kwargs:
        raise NotImplementedError(f"{where} was called without hidden states (keys: {sorted(kwargs)})")
    return kwargs.pop("hidden_states"), kwargs


@torch.no_grad()
def capture_decoder_inputs(
    model: nn.Module,
    decoder_layers: nn.ModuleList,
    input_ids: torch.Tensor,
    micro_batch_size: int = 8,
) -> CapturedInputs:
    """Record layer 0's hidden states and every layer's kwargs for ``input_ids`` ``[n, T]``.

    The model runs up to the last decoder layer only (embeddings, rotary tables
    and mask construction); the layers themselves are bypassed.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [n_sequences, seq_len], got shape {tuple(input_ids.shape)}")
    n_layers = len(decoder_layers)
    hidden: list[torch.Tensor] = []
    layer_kwargs: list[list[dict[str, Any]]] = [[] for _ in range(n_layers)]

    def make_hook(index: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            h, kw = _split_hidden(module, args, kwargs, f"decoder layer {index}")
            if index == 0:
                hidden.append(h.detach())
            layer_kwargs[index].append(kw)
            if index == n_layers - 1:
                raise _StopForward

        return hook

    def run(bypass: Callable[..., Any] | None) -> None:
        hidden.clear()
        for calls in layer_kwargs:
            calls.clear()
        handles = [
            layer.register_forward_pre_hook(make_hook(i), with_kwargs=True)
            for i, layer in enumerate(decoder_layers)
        ]
        # The layers must not compute while we only want their inputs: shadow their bound
        # forward with a pass-through (an instance attribute; removed again below).
        if bypass is not None:
            for layer in decoder_layers:
                layer.forward = bypass
        try:
            for batch in input_ids.split(micro_batch_size):
                try:
                    model(input_ids=batch, use_cache=False)
                except _StopForward:
                    continue
                raise RuntimeError(f"the forward pass never reached decoder layer {n_layers - 1}")
        finally:
            for handle in handles:
                handle.remove()
            if bypass is not None:
                for layer in decoder_layers:
                    del layer.forward

    # Most models pass a layer's output on as a tensor or take its first element; xLSTM
    # unpacks (hidden, state). Where neither stand-in fits, the layers compute (weights
    # in memory only); the last decoder layer is cut short either way.
    attempts: list[Callable[..., Any] | None] = [_passthrough, _passthrough_pair]
    if not any(p.device.type == "meta" for p in decoder_layers.parameters()):
        attempts.append(None)
    for n, bypass in enumerate(attempts, 1):
        try:
            run(bypass)
            break
        except (TypeError, ValueError, AttributeError, IndexError) as exc:
            if n == len(attempts):
                raise
            logger.debug("capturing decoder inputs with %s failed (%s); trying the next way", bypass, exc)
    return CapturedInputs(hidden_states=hidden, layer_kwargs=layer_kwargs)


def first_output(out: Any) -> torch.Tensor:
    """A module's main output: the tensor itself, or the first element of a tuple."""
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def forward_block(
    block: nn.Module, inputs: BlockInputs, batches: Sequence[int] | None = None
) -> list[torch.Tensor]:
    """Run ``block`` on its inputs (or on the micro-batches ``batches``); the outputs per micro-batch."""
    index = range(len(inputs.hidden_states)) if batches is None else batches
    return [first_output(block(inputs.hidden_states[m], **inputs.kwargs[m])) for m in index]


# ---------------------------------------------------------------------------------------------
# Sampling and recording inside a block
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplePlan:
    """Which calibration tokens each part of the block search sees (seeded, so reproducible).

    Row indices are local to a micro-batch: row ``b * T + t`` of its ``[B, T]`` tokens.
    """

    search_rows: tuple[torch.Tensor, ...]  # per micro-batch: sorted rows in the token-wise search loss
    # per micro-batch rows in the clip statistics; None = all (of the batches not held out)
    clip_rows: tuple[torch.Tensor, ...] | None
    search_batches: tuple[int, ...]  # micro-batches re-run for token-mixing modules
    # Micro-batches no search sees (neither the scale search's rows and calls nor the clip
    # statistics): the block's choice between AWQ and rounding is scored on them, so it judges
    # how the fit generalises. Empty when the calibration is too small to spare any.
    holdout_batches: tuple[int, ...] = ()

    @property
    def decision_batches(self) -> tuple[int, ...]:
        """Where the block's variants are compared: the held-out batches, else the search's."""
        return self.holdout_batches or self.search_batches


def _split_by_batch(flat: torch.Tensor, tokens_per_batch: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """Sorted flat token indices -> local row indices per micro-batch."""
    out, offset = [], 0
    for count in tokens_per_batch:
        out.append(flat[(flat >= offset) & (flat < offset + count)] - offset)
        offset += count
    return tuple(out)


def plan_samples(
    tokens_per_batch: Sequence[int], search_tokens: int | None, clip_tokens: int | None, seed: int
) -> SamplePlan:
    """Draw the seeded token and micro-batch subsamples (None or a count >= all tokens = everything).

    The search takes whole micro-batches in a seeded order until they cover
    ``search_tokens``; the next ones, as many tokens again, are held out (when any
    are left). The token samples are drawn from the other micro-batches only; the
    clip sample is a prefix of the same permutation as the search sample, so the
    smaller of the two is contained in the larger.
    """
    n = sum(tokens_per_batch)
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=generator)
    batch_perm = torch.randperm(len(tokens_per_batch), generator=generator).tolist()
    batches: list[int] = []
    holdout: list[int] = []
    covered = held = 0
    for m in batch_perm:
        if search_tokens is None or covered < search_tokens:
            batches.append(m)
            covered += tokens_per_batch[m]
        elif held < covered:
            holdout.append(m)
            held += tokens_per_batch[m]
        else:
            break
    if holdout:  # the token samples never come from a held-out micro-batch
        starts = torch.tensor([0, *tokens_per_batch]).cumsum(0)
        batch_of = torch.bucketize(perm, starts[1:], right=True)  # (n,) micro-batch of each token
        perm = perm[~torch.isin(batch_of, torch.tensor(holdout))]
    available = perm.numel()

    def take(count: int | None) -> torch.Tensor:
        chosen = perm if count is None or count >= available else perm[:count]
        return chosen.sort().values

    all_clip = clip_tokens is None or clip_tokens >= available  # every token outside the held-out batches
    return SamplePlan(
        search_rows=_split_by_batch(take(search_tokens), tokens_per_batch),
        clip_rows=None if all_clip else _split_by_batch(take(clip_tokens), tokens_per_batch),
        search_batches=tuple(sorted(batches)),
        holdout_batches=tuple(sorted(holdout)),
    )


def _local_rows(positions: torch.Tensor | None, wanted: torch.Tensor) -> torch.Tensor:
    """Indices into an input whose rows sit at micro-batch ``positions``, of those in ``wanted``.

    ``positions`` None: the input holds every row in order, so ``wanted`` itself.
    """
    if positions is None:
        return wanted
    return torch.isin(positions, wanted).nonzero().squeeze(1)


@dataclass
class ModuleCall:
    """One recorded call of a module, re-runnable with a different main input."""

    x: torch.Tensor
    args: tuple[Any, ...]  # the positional arguments after the main input
    kwargs: dict[str, Any]
    x_keyword: str | None  # None: x was the first positional argument

    def to(self, dtype: torch.dtype) -> ModuleCall:
        """The same call with floating tensors (input, rotary tables, masks) cast to ``dtype``."""
        cast = lambda t: _to_float_dtype(t, dtype)  # noqa: E731
        return ModuleCall(
            cast(self.x), _map_tensors(self.args, cast), _map_tensors(self.kwargs, cast), self.x_keyword
        )

    def run(self, module: nn.Module, x: torch.Tensor | None = None) -> torch.Tensor:
        x = self.x if x is None else x
        if self.x_keyword is None:
            return first_output(module(x, *self.args, **self.kwargs))
        return first_output(module(*self.args, **{**self.kwargs, self.x_keyword: x}))


def _main_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, str | None]:
    """The tensor a module transforms: its first positional argument, else ``hidden_states``."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0], None
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"], "hidden_states"
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            return value, key
    raise NotImplementedError(f"cannot find the input tensor of a module call (kwargs: {sorted(kwargs)})")


def _same_tensor_key(x: torch.Tensor) -> tuple[Any, ...]:
    """What identifies the data of ``x``: each hook sees its own ``x.detach()`` (a new tensor
    object, so ``id`` differs) of the one tensor q/k/v read. The cache entry keeps ``x``
    alive, so its memory cannot be another input's within the micro-batch."""
    return (x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), x.stride(), x.dtype)


@dataclass
class RecordedInputs:
    """What :class:`InputRecorder` kept for one block."""

    abs_sum: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> float64 [K], sum |x|
    count: dict[str, int] = field(default_factory=dict)  # name -> tokens in abs_sum
    rows: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> search rows [S, K]
    calls: dict[str, list[ModuleCall]] = field(default_factory=dict)  # name -> calls on search batches
    gram: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> float64 [K/G, G, G], sum x x^T
    gram_count: dict[str, int] = field(default_factory=dict)  # name -> tokens in gram
    # name -> float32 [K, K], sum x^T x over the tokens outside the held-out batches (compensated
    # rounding), of the inputs as recorded; after scale folds, the inputs are x / hessian_scale[name]
    # (applied where the matrix is used, not stored twice)
    hessian: dict[str, torch.Tensor] = field(default_factory=dict)
    hessian_scale: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> float32 [K]
    # name -> float32 [K, K], sum (x_ref - x)^T x over the same tokens as its hessian, x_ref the
    # input the full-precision model gives it (asymmetric calibration; shared as the hessian is)
    cross: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: list[torch.Tensor] = field(default_factory=list)  # block output per micro-batch
    # the block's output on the reference inputs per micro-batch (asymmetric calibration)
    reference_outputs: list[torch.Tensor] = field(default_factory=list)
    # micro-batch -> name -> the input the target stream gives ``name`` (``[n, K]``, as the forward
    # made it, before any scale fold): kept for true-sequential refits (``keep_targets``)
    target_inputs: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    # the hooked modules in the order the block's forward first reached them (its data flow,
    # which the order the modules were registered in need not follow: Phi-3's o_proj is first)
    call_order: list[str] = field(default_factory=list)

    def mean_abs(self, name: str) -> torch.Tensor:
        """AWQ's activation statistic: mean ``|x|`` per input channel over all tokens, fp32."""
        return (self.abs_sum[name] / self.count[name]).float()

    def mean_gram(self, name: str) -> torch.Tensor:
        """Per-group mean ``x x^T`` of ``name``'s input, float64 ``[K/G, G, G]``."""
        return self.gram[name] / self.gram_count[name]

    def is_token_wise(self, name: str) -> bool:
        """Whether ``name`` treats tokens independently (it was called with its input alone)."""
        return name not in self.calls

    def fold_input_scales(self, names: Sequence[str], s_cols: torch.Tensor) -> None:
        """After a scale fold the inputs of ``names`` are ``x / s_cols``: turn their Gram matrices
        into those of the scaled inputs, and multiply ``s_cols`` into their input scales (which
        their Hessians, recorded before the fold, are read with)."""
        scale = s_cols.to(torch.float32)
        for name in names:
            if name in self.gram:
                self.gram[name] = rescale_gram(self.gram[name], s_cols)
            self.hessian_scale[name] = (
                self.hessian_scale[name] * scale if name in self.hessian_scale else scale
            )


# Rows per bf16 product in input_hessian: each chunk's sum is rounded to bf16 once (relative
# error ~2^-9 per entry, independent between chunks), the chunks are summed in fp32.
HESSIAN_CHUNK_ROWS = 2048
# Rows of x^T x per product (the upper triangle is computed panel by panel): at width 14336,
# 2048 rows, 1 thread, 0.75 s against 1.58 s for the whole product and its widening.
HESSIAN_PANEL = 1024


def input_hessian(
    x2d: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
    upper: bool = False,
) -> torch.Tensor:
    """``x^T x`` (``[K, K]``, fp32) of rows ``x2d`` ``[n, K]``, with its matmuls in ``dtype``;
    added to ``out`` in place when given (and returned).

    The product is symmetric, so only its upper triangle is computed, a panel of
    :data:`HESSIAN_PANEL` rows at a time (each panel from its diagonal on: about half the
    multiplications and half the additions). With ``upper`` only the upper triangle of the sum
    is right (below the diagonal, the panels' square diagonal blocks are added whole and the
    rest is left as it was: a running sum completes it once, with
    :func:`~awq_plugin.numerics.dense.symmetrize_upper_`); otherwise it is completed from the
    upper one before returning.

    In bf16 (where the device has bf16 matmul units: a third of fp32's time on AVX-512 BF16 /
    AMX, and on the down projection of a large MLP the product costs about as much as the
    block's whole forward) the rows go in chunks of :data:`HESSIAN_CHUNK_ROWS`; compensated
    rounding's layer errors on held-out tokens stayed within 0.15% of the fp32 Hessian's on the
    default model's layer 5 (q, o and down_proj).
    """
    k = x2d.shape[1]
    total = torch.zeros(k, k, dtype=torch.float32, device=x2d.device) if out is None else out
    if dtype == torch.float32:
        x = x2d.float()
        for row in range(0, k, HESSIAN_PANEL):
            end = min(row + HESSIAN_PANEL, k)
            total[row:end, row:].addmm_(x[:, row:end].t(), x[:, row:])
    else:
        for start in range(0, x2d.shape[0], HESSIAN_CHUNK_ROWS):
            chunk = x2d[start : start + HESSIAN_CHUNK_ROWS].to(dtype)
            # A contiguous transposed operand: oneDNN's bf16 path took 1.8x longer on the strided one.
            transposed = chunk.t().contiguous()
            for row in range(0, k, HESSIAN_PANEL):  # each bf16 panel widened into the fp32 sum
                end = min(row + HESSIAN_PANEL, k)
                total[row:end, row:].add_(transposed[row:end] @ chunk[:, row:])
    if not upper:
        symmetrize_upper_(total, HESSIAN_PANEL)
    return total


def cross_product(
    reference: torch.Tensor,
    x2d: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(reference - x)^T x`` (``[K, K]``, fp32) of paired rows ``[n, K]``, with its matmuls in
    ``dtype`` (the difference itself taken in fp32, in chunks of :data:`HESSIAN_CHUNK_ROWS`
    rows); added to ``out`` in place when given (and returned). Not symmetric: computed whole."""
    k = x2d.shape[1]
    total = torch.zeros(k, k, dtype=torch.float32, device=x2d.device) if out is None else out
    for start in range(0, x2d.shape[0], HESSIAN_CHUNK_ROWS):
        x = x2d[start : start + HESSIAN_CHUNK_ROWS].float()
        delta = reference[start : start + HESSIAN_CHUNK_ROWS].float() - x
        if dtype == torch.float32:
            total.addmm_(delta.t(), x)
        else:
            total.add_(delta.to(dtype).t().contiguous() @ x.to(dtype))
    return total


class InputRecorder:
    """Record module inputs while a block runs over all its calibration micro-batches.

    ``stat_names``: modules whose mean ``|x|`` is accumulated over all tokens.
    ``call_names``: modules re-run by the scale search. A module called with its
    input alone (an MLP, a linear) keeps its input rows at ``plan.search_rows``;
    one called with more (attention: masks, rotary tables) keeps whole calls on
    ``plan.search_batches``.
    ``gram_names``: linears whose per-group input Gram matrices (group size
    ``group_size``) are accumulated over ``plan.clip_rows`` for the clip search.
    ``hessian_names``: linears whose whole ``x^T x`` (``[K, K]``, fp32) is accumulated
    over every token outside ``plan.holdout_batches``, for compensated rounding; each
    micro-batch's product is a ``hessian_dtype`` matmul (see :func:`input_hessian`).
    Modules reading the same tensor (q/k/v) share the work, and their ``x^T x`` one matrix.
    ``row_positions(name)``: for modules that see a subset of a micro-batch's
    tokens (MoE experts), the micro-batch rows of the current input, so the
    samples keep exactly the sampled tokens routed there; ``None`` = every row.
    ``stop_after``: each forward ends once these modules' inputs are recorded (true-sequential
    recording needs a run's inputs, not the rest of the block). ``reference_scales``: per
    module, the scale its reference inputs are divided by before pairing.
    ``keep_targets``: modules whose inputs in the target stream (the reference forward where
    one runs, else the block's own) are kept per micro-batch outside the held-out ones
    (``RecordedInputs.target_inputs``), to be paired later through ``run(paired=...)``.
    """

    def __init__(
        self,
        block: nn.Module,
        plan: SamplePlan,
        stat_names: Sequence[str],
        call_names: Sequence[str],
        gram_names: Sequence[str] = (),
        group_size: int = -1,
        row_positions: Callable[[str], torch.Tensor | None] | None = None,
        hessian_names: Sequence[str] = (),
        hessian_dtype: torch.dtype = torch.float32,
        cross_names: Sequence[str] | None = None,
        uncounted: Sequence[Any] = (),
        stop_after: Sequence[str] = (),
        reference_scales: Mapping[str, torch.Tensor] | None = None,
        keep_targets: Sequence[str] = (),
    ) -> None:
        self.block = block
        self.keep_targets = set(keep_targets)
        self._target_stream = True  # whether the forward running is the target stream
        self._reached: set[str] = set()  # modules in recorded.call_order
        # name -> s: the reference forward's input of ``name`` is compared as x_ref / s (a
        # reference run through weights from before a scale fold that divides its input by s)
        self.reference_scales = dict(reference_scales or {})
        # each forward ends once all of these modules' inputs are recorded (no outputs are kept)
        self.stop_after = set(stop_after)
        self._seen: set[str] = set()
        # modules that count the tokens routed through them (``token_counts``, MoE experts): the
        # reference forward's routing is not theirs to count
        self.uncounted = list(uncounted)
        self.hessian_dtype = hessian_dtype
        self.row_positions = row_positions
        self.plan = plan
        self.stat_names = set(stat_names)
        self.call_names = set(call_names)
        self.gram_names = set(gram_names)
        self.hessian_names = set(hessian_names)
        # with reference hidden states: the linears whose (x_ref - x)^T x is summed (all by default)
        self.cross_names = (
            self.hessian_names if cross_names is None else set(cross_names) & self.hessian_names
        )
        self.group_size = group_size
        self.names = sorted(
            self.stat_names | self.call_names | self.gram_names | self.hessian_names | self.keep_targets
        )
        self._rows: dict[str, list[torch.Tensor]] = {name: [] for name in self.names}
        # Per micro-batch work shared by modules that read the same tensor, keyed by its data
        # (_same_tensor_key). x itself is kept in the entry: freed memory could hold the next input.
        self._shared: dict[tuple[Any, ...], tuple[torch.Tensor, Any]] = {}
        self._batch = 0
        # name -> the linear whose X^T X matrix it uses (itself, or one that reads the same
        # input), and the micro-batch where an owner's matrix was started
        self._hessian_owner: dict[str, str] = {}
        self._hessian_born: dict[str, int] = {}
        self._hessian_inputs: dict[str, torch.Tensor] = {}  # owner -> its input in this micro-batch
        # asymmetric calibration: name -> its input in this micro-batch's reference forward
        self._reference_inputs: dict[str, torch.Tensor] | None = None
        self._in_reference = False
        self.recorded = RecordedInputs()

    def _shared_result(self, kind: str, x: torch.Tensor, compute: Any) -> Any:
        key = (kind, *_same_tensor_key(x))
        if key not in self._shared:
            self._shared[key] = (x, compute())
        return self._shared[key][1]

    def _record_hessian(self, name: str, x: torch.Tensor, x2d: torch.Tensor) -> None:
        """Add this micro-batch's ``x^T x`` to ``name``'s sum, in place and chunk by chunk (no
        [K, K] product beside the sum: 822 MB each for a 14336-wide input). Linears that read
        the same tensor from their first micro-batch on (q/k/v, gate/up) share one matrix (the
        same object in ``RecordedInputs.hessian``); one that later reads another input gets its
        own copy from then on."""
        rec, m = self.recorded, self._batch
        first = self._shared_owner(x, name)  # the first linear that read x in this micro-batch
        owner = self._hessian_owner.get(name)
        if owner is not None and owner != name and owner == first:
            return  # the matrix is shared with `first`, which added this product
        # the same input as `first` since the micro-batch where first's matrix began
        if (
            owner is None
            and first != name
            and self._hessian_owner.get(first) == first
            and self._hessian_born[first] == m
        ):
            rec.hessian[name] = rec.hessian[first]
            if first in rec.cross:
                rec.cross[name] = rec.cross[first]
            self._hessian_owner[name] = first
            return
        k = x2d.shape[1]
        if owner is None:
            rec.hessian[name] = torch.zeros(k, k, dtype=torch.float32, device=x2d.device)
            self._hessian_owner[name], self._hessian_born[name] = name, m
            if self._reference_inputs is not None and name in self.cross_names:
                rec.cross[name] = torch.zeros(k, k, dtype=torch.float32, device=x2d.device)
        elif owner != name:  # shared until now, another input from here on: its own copy
            own = rec.hessian[name].clone()
            if owner in self._hessian_inputs:  # without what its sharer added in this micro-batch
                own.sub_(input_hessian(self._hessian_inputs[owner], self.hessian_dtype, upper=True))
            rec.hessian[name] = own
            self._hessian_owner[name] = name
            rec.cross.pop(name, None)  # its cross term was its sharer's: asymmetric no more
        input_hessian(x2d, self.hessian_dtype, out=rec.hessian[name], upper=True)
        self._hessian_inputs[name] = x2d
        if name in rec.cross:
            reference = self._reference_inputs.get(name) if self._reference_inputs is not None else None
            if reference is None or reference.shape != x2d.shape:
                # no paired full-precision input (a linear the reference forward did not reach
                # with the same tokens): the symmetric objective for this linear
                logger.debug("%s: no paired reference input; symmetric calibration", name)
                matrix = rec.cross[name]
                for sharer in [n for n, c in rec.cross.items() if c is matrix]:
                    del rec.cross[sharer]
            else:
                cross_product(reference, x2d, self.hessian_dtype, out=rec.cross[name])

    def _pairs(self, name: str) -> bool:
        """Whether ``name``'s reference input is kept in this micro-batch: it has an ``x^T x``,
        the micro-batch is not held out, and it sees every token (not a routed expert)."""
        if name not in self.cross_names or self._batch in self.plan.holdout_batches:
            return False
        return self.row_positions is None or self.row_positions(name) is None

    def _as_reference(self, name: str, x_ref: torch.Tensor) -> torch.Tensor:
        """``x_ref`` as paired with ``name``'s input: divided by its reference scale, if any."""
        if name in self.reference_scales:
            return x_ref.float() / self.reference_scales[name]
        return x_ref

    def _shared_owner(self, x: torch.Tensor, name: str) -> str:
        return self._shared_result("owner", x, lambda: name)

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x, keyword = _main_input(args, kwargs)
            if (
                self._target_stream
                and name in self.keep_targets
                and self._batch not in self.plan.holdout_batches
            ):
                # a copy (the block's code may write into a tensor after a module read it), one
                # per tensor: linears reading the same input (gate/up) share it
                kept = self._shared_result("kept", x, lambda: x.detach().reshape(-1, x.shape[-1]).clone())
                self.recorded.target_inputs.setdefault(self._batch, {})[name] = kept
            if self._in_reference:  # the reference forward: keep the inputs to pair, nothing else
                if self._pairs(name):
                    self._reference_inputs[name] = self._as_reference(
                        name, x.detach().reshape(-1, x.shape[-1])
                    )
            else:
                if name not in self._reached:
                    self._reached.add(name)
                    self.recorded.call_order.append(name)
                # The forward may run its matmuls in bf16 under autocast; the statistics (Gram
                # products included) are always computed in fp32 / fp64.
                with torch.autocast(x.device.type, enabled=False):
                    self._record(name, x.detach(), keyword, args, kwargs)
            if self.stop_after:
                self._seen.add(name)
                if self.stop_after <= self._seen:
                    raise _StopForward

        return hook

    def _record(
        self, name: str, x: torch.Tensor, keyword: str | None, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        rec, m = self.recorded, self._batch
        x2d = x.reshape(-1, x.shape[-1])  # (B*T, K), or (n_routed, K) inside an expert
        positions = self.row_positions(name) if self.row_positions is not None else None
        if name in self.stat_names:
            # Summed in fp32 within the micro-batch (a few thousand rows: ~1e-6 relative; fp64
            # reductions cost 2-3x more), accumulated in fp64 across micro-batches.
            total = self._shared_result("abs", x, lambda: x2d.abs().sum(dim=0, dtype=torch.float32).double())
            rec.abs_sum[name] = rec.abs_sum[name] + total if name in rec.abs_sum else total.clone()
            rec.count[name] = rec.count.get(name, 0) + x2d.shape[0]
        if (name in self.gram_names or name in self.hessian_names) and m not in self.plan.holdout_batches:
            rows = x2d if self.plan.clip_rows is None else x2d[_local_rows(positions, self.plan.clip_rows[m])]
            if name in self.gram_names:
                gram = self._shared_result("gram", x, lambda: group_gram(rows, self.group_size).double())
                rec.gram[name] = rec.gram[name] + gram if name in rec.gram else gram.clone()
                rec.gram_count[name] = rec.gram_count.get(name, 0) + rows.shape[0]
            if name in self.hessian_names:  # every token outside the held-out batches, not the clip sample
                self._record_hessian(name, x, x2d)
        if name in self.call_names:
            if bool(kwargs) or len(args) > 1:  # token-mixing: keep whole calls
                if m in self.plan.search_batches:
                    rest = args[1:] if keyword is None else args
                    extra = {k: v for k, v in kwargs.items() if k != keyword}
                    rec.calls.setdefault(name, []).append(ModuleCall(x, rest, extra, keyword))
            else:
                self._rows[name].append(
                    self._shared_result(
                        "rows", x, lambda: x2d[_local_rows(positions, self.plan.search_rows[m])]
                    )
                )

    @contextmanager
    def _hooks(self) -> Iterator[None]:
        handles = [
            self.block.get_submodule(name).register_forward_pre_hook(self._hook(name), with_kwargs=True)
            for name in self.names
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def run(
        self,
        inputs: BlockInputs,
        reference: Sequence[torch.Tensor] | None = None,
        batches: Sequence[int] | None = None,
        paired: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
    ) -> RecordedInputs:
        """One pass over all micro-batches (or ``batches``); returns what was recorded (and the
        block outputs, unless ``stop_after`` cut the forwards short).

        ``reference``: the hidden states the full-precision model gives this block, per
        micro-batch (asymmetric calibration). Each micro-batch then runs on them first, and the
        linears with a recorded ``x^T x`` also accumulate ``(x_ref - x)^T x`` (``cross``) from
        their paired inputs; the block's outputs on them are ``reference_outputs``.
        ``paired``: instead of a reference forward, the reference inputs themselves, per
        micro-batch and module (``target_inputs`` kept by an earlier pass).
        """
        if reference is not None and len(reference) != len(inputs.hidden_states):
            raise ValueError(
                f"{len(reference)} reference micro-batches for {len(inputs.hidden_states)} input ones"
            )
        if reference is not None and paired is not None:
            raise ValueError("a reference stream or paired reference inputs, not both")
        with self._hooks():
            for m in range(len(inputs.hidden_states)) if batches is None else batches:
                self._batch = m
                self._shared = {}
                if paired is not None:
                    self._reference_inputs = {n: self._as_reference(n, x) for n, x in paired[m].items()}
                if reference is not None:
                    self._reference_inputs, self._in_reference = {}, True
                    counts = [list(module.token_counts) for module in self.uncounted]
                    try:
                        out = self._forward(reference[m], inputs.kwargs[m])
                    finally:
                        self._in_reference = False
                        for module, before in zip(self.uncounted, counts):
                            module.token_counts = before
                    if out is not None:
                        self.recorded.reference_outputs.append(out)
                self._target_stream = reference is None  # the reference forward was the target
                try:
                    out = self._forward(inputs.hidden_states[m], inputs.kwargs[m])
                finally:
                    self._target_stream = True
                if out is not None:
                    self.recorded.outputs.append(out)
                self._hessian_inputs = {}
                if reference is not None or paired is not None:
                    self._reference_inputs = {}
        self._shared = {}
        self._concatenate_rows()
        for matrix in {id(m): m for m in self.recorded.hessian.values()}.values():
            symmetrize_upper_(matrix, HESSIAN_PANEL)  # the sums above added upper triangles only
        return self.recorded

    def _forward(self, hidden: torch.Tensor, kwargs: Mapping[str, Any]) -> torch.Tensor | None:
        """The block's output on ``hidden``; ``None`` where the forward stopped once
        ``stop_after`` was recorded."""
        self._seen = set()
        try:
            return first_output(self.block(hidden, **kwargs))
        except _StopForward:
            return None

    def _concatenate_rows(self) -> None:
        # Modules that read the same tensor share one concatenated copy.
        shared: dict[tuple[int, ...], torch.Tensor] = {}
        for name, pieces in self._rows.items():
            if not pieces:
                continue
            key = tuple(id(p) for p in pieces)
            if key not in shared:
                shared[key] = torch.cat(pieces, dim=0)  # (S, K)
            self.recorded.rows[name] = shared[key]
        self._rows = {}
