"""AWQ on one decoder block: search scales and clips, apply them, return them as data.

Per block (the order of llm-awq / AutoAWQ): one full-precision pass records the
activation statistics (all tokens) and seeded samples of the layer inputs;
every scaling group's scale is searched on the unmodified block; all scales
are folded in (exact in full precision); then the clip search runs per linear
on the rescaled inputs and the weights are clamped. :func:`apply_awq_block`
re-applies a saved :class:`BlockAwqResult` to a fresh full-precision block and
produces the same bits.

Everything runs in fp32 on the block's device (a block stored in fp16/bf16 is
upcast for the duration and cast back at the end), except the forward passes
that score scale candidates, which run a copy of the inspected module in
``AwqOptions.search_dtype``. It is deterministic: the samples come from a
seeded generator and all reductions run in a fixed order.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn

from awq_plugin.algorithm.clip import search_clip_max, search_clip_range
from awq_plugin.algorithm.compensate import NotPositiveDefinite, compensated_rounding_shared
from awq_plugin.algorithm.forward_dtype import resolve_search_dtype, warn_float32_fallback
from awq_plugin.algorithm.linears import (
    QuantConfigLike,
    fake_quantized,
    make_fake_quantizer,
    quantized_linear_names,
)
from awq_plugin.algorithm.moe_fallback import calibrate_underused_experts
from awq_plugin.algorithm.norm_fit import NormRefit
from awq_plugin.algorithm.options import SEARCH_DTYPE_NAMES, AwqOptions
from awq_plugin.algorithm.phases import phase
from awq_plugin.algorithm.results import BlockAwqResult, GroupScaleResult
from awq_plugin.algorithm.search import (
    ScaleSearchResult,
    replaced_weights,
    search_best_scale,
    token_loss_weights,
    weighted_output_mse,
)
from awq_plugin.calibration.capture import (
    BlockInputs,
    InputRecorder,
    RecordedInputs,
    SamplePlan,
    first_output,
    forward_block,
    plan_samples,
)
from awq_plugin.errors import CheckpointError, TemplateError
from awq_plugin.models.experts import RoutedExperts, routed_experts_in, row_positions_lookup
from awq_plugin.numerics.dense import copy_transposed
from awq_plugin.numerics.quant_ref import compute_scales_zeros, resolve_group_size
from awq_plugin.templates import BlockTemplate, ScalingGroup
from awq_plugin.templates.folds import apply_group_scales, clamp_weight
from awq_plugin.templates.verify import verify_block_folds_at_once

logger = logging.getLogger(__name__)

SEARCH_CHUNK_ROWS = 8192  # token rows per forward of a token-wise module in the search (memory bound)
# AwqOptions.search_dtype names of fixed dtypes ("auto" depends on the device: forward_dtype)
SEARCH_DTYPES = {name: getattr(torch, name) for name in SEARCH_DTYPE_NAMES if name != "auto"}


@contextmanager
def computing_in_float32(block: nn.Module) -> Iterator[None]:
    """Upcast the block to fp32 for the duration; cast it back to its own dtype afterwards."""
    dtypes = {p.dtype for p in block.parameters() if p.is_floating_point()}
    if len(dtypes) > 1:
        raise ValueError(
            f"block mixes parameter dtypes {sorted(map(str, dtypes))}; cast it to one dtype first"
        )
    dtype = dtypes.pop() if dtypes else torch.float32
    block.float()
    try:
        yield
    finally:
        block.to(dtype)


class BlockForwards:
    """The block step's forwards in ``dtype``: matmuls in ``dtype`` under autocast, the rest fp32.

    In float32 this is the block as it is (bit for bit the plain fp32 path). Otherwise
    :meth:`autocast` runs the linears, attention products and what follows them inside a
    branch in ``dtype`` (fp32 accumulation), while the hidden states, the residual stream and
    the norms stay fp32, so rounding touches each branch's output, never the accumulated stream.
    The weights are the block's own fp32 ones (fake-quantized, scaled or clipped as the block
    holds them at that moment). Autocast casts a float32 weight on every call, so the passes
    over all micro-batches (:meth:`lowered`) first give the linears ``names`` a copy in
    ``dtype``: the same products, one cast per pass instead of one per micro-batch, for half
    the block's float32 weights in memory while the pass runs.
    """

    def __init__(
        self, block: nn.Module, inputs: BlockInputs, dtype: torch.dtype, names: Sequence[str] = ()
    ) -> None:
        self.block = block
        self.inputs = inputs
        self.dtype = dtype
        self.names = list(names)

    def autocast(self) -> AbstractContextManager[object]:
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(_device_of(self.block).type, dtype=self.dtype)

    @contextmanager
    def lowered(self) -> Iterator[None]:
        """Autocast, with the linears ``names`` holding ``dtype`` copies of their weights as they
        stand now (the float32 ones come back on exit)."""
        if self.dtype == torch.float32:
            yield
            return
        linears = [self.block.get_submodule(n) for n in self.names]
        with self.autocast(), replaced_weights(linears, [lin.weight.data.to(self.dtype) for lin in linears]):
            yield

    def forward(self, batches: Sequence[int] | None = None, lower: bool = False) -> list[torch.Tensor]:
        """The block's outputs (all micro-batches, or ``batches``), computed so, in fp32; with
        ``lower``, under :meth:`lowered` (worth its copy of the weights on many micro-batches)."""
        with self.lowered() if lower else self.autocast():
            return [out.float() for out in forward_block(self.block, self.inputs, batches)]


def _record_forward(
    recorder: Callable[[], InputRecorder],
    forwards: BlockForwards,
    experts: Mapping[str, RoutedExperts],
    index: int,
    reference: Sequence[torch.Tensor] | None = None,
) -> tuple[RecordedInputs, BlockForwards]:
    """The recording pass in the forwards' dtype; a block whose own code cannot run under that
    autocast (it writes a lower-precision result into a float32 tensor, say) runs every forward
    in float32 instead, with a warning. Returns what was recorded and the forwards used."""
    try:
        with forwards.lowered():
            recorded = recorder().run(forwards.inputs, reference)
    except RuntimeError as exc:
        if forwards.dtype == torch.float32:
            raise
        warn_float32_fallback(index, forwards.dtype, exc, "its search forwards")
        forwards = BlockForwards(forwards.block, forwards.inputs, torch.float32, forwards.names)
        for routed in experts.values():
            routed.reset_token_counts()
        recorded = recorder().run(forwards.inputs, reference)
    recorded.outputs = [out.float() for out in recorded.outputs]
    recorded.reference_outputs = [out.float() for out in recorded.reference_outputs]
    return recorded, forwards


def _search_loss(
    module: nn.Module,
    name: str,
    recorded: RecordedInputs,
    forwards: BlockForwards,
    outlier_ratio: float | None,
) -> Callable[[], float]:
    """``loss()``: MSE of ``module`` (run as ``forwards`` runs the block) on the search sample
    against its output now."""
    if not recorded.is_token_wise(name):
        calls = recorded.calls[name]

        def run() -> list[torch.Tensor]:
            with forwards.autocast():
                return [call.run(module) for call in calls]

    else:
        if name not in recorded.rows:
            raise RuntimeError(f"module '{name}' was never called during the block forward")
        chunks = recorded.rows[name].split(SEARCH_CHUNK_ROWS)  # (S_c, K) each

        def run() -> list[torch.Tensor]:
            with forwards.autocast():
                return [first_output(module(c.unsqueeze(0))) for c in chunks]  # (1, S_c, H) each

    targets = run()
    weights = token_loss_weights(targets, outlier_ratio)
    return lambda: weighted_output_mse(run(), targets, weights)


def _device_of(block: nn.Module) -> torch.device:
    first = next(block.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _relative_name(name: str, parent: str) -> str:
    """``mlp.up_proj`` relative to ``mlp`` is ``up_proj``; a module relative to itself is ``""``;
    anything relative to the block (``""``) is its own name."""
    if not parent:
        return name
    return "" if name == parent else name[len(parent) + 1 :]


def _check_result_matches(groups: BlockTemplate, result: BlockAwqResult) -> None:
    expected = [(g.prev_op, g.layers) for g in groups.groups]
    got = [(g.prev_op, tuple(g.layers)) for g in result.groups]
    if expected != got:
        raise TemplateError(
            f"AWQ result for layer {result.layer_index} has groups {got}, but the template gives {expected} "
            f"for {groups.prefix}; re-run AWQ or use the template the results were made with"
        )
    unknown = sorted(set(result.clip_max) - set(groups.linears))
    if unknown:
        raise TemplateError(f"AWQ result for layer {result.layer_index} clips unknown linears {unknown}")


def awq_block_step(
    block: nn.Module,
    groups: BlockTemplate,
    inputs: BlockInputs,
    quant_config: QuantConfigLike,
    options: AwqOptions | None = None,
) -> tuple[BlockAwqResult, BlockInputs]:
    """Run AWQ on one block (scales and clips applied in place) and compute the next block's inputs.

    Returns the result as data and the next block's inputs (hidden states per
    ``options.propagate``; the kwargs are this block's, to be replaced by the
    next layer's own).
    """
    options = options or AwqOptions()
    # A template is a claim about data flow: prove every fold on this block before searching.
    with phase("verify folds"):
        verify_block_folds_at_once(block, groups, inputs, "template", max_batches=1)
    with torch.no_grad(), computing_in_float32(block):
        inputs = inputs.to(torch.float32)
        # The forwards (recording, candidates, block errors) run their matmuls in the search dtype;
        # statistics, losses and every weight the search writes are fp32.
        names = quantized_linear_names(block, groups, quant_config)
        forwards = BlockForwards(
            block, inputs, resolve_search_dtype(options.search_dtype, _device_of(block)), names
        )
        clip_names = (
            [n for n in names if n not in groups.clip_skip or options.clip_qk] if options.clip else []
        )
        plan = plan_samples(
            inputs.tokens_per_batch(), options.search_tokens, options.clip_tokens, options.seed
        )
        inspect_names = [g.layers[0] if g.module2inspect is None else g.module2inspect for g in groups.groups]
        experts = routed_experts_in(block, groups.experts)
        # Asymmetric calibration: the block's error is measured against the full-precision
        # model's own outputs, and compensation fits them (from the reference stream's inputs,
        # paired token by token). Block 0's two streams are one.
        # (Routing differs between the streams: experts get no paired inputs, and the reference
        # forward's routed tokens are not counted.)
        two_streams = options.fit_to == "model" and options.propagate == "quantized"
        reference = inputs.reference if two_streams else None
        for routed in experts.values():
            routed.reset_token_counts()
        record = functools.partial(
            InputRecorder,
            block,
            plan,
            group_size=quant_config.group_size,
            row_positions=row_positions_lookup(experts) if experts else None,
            hessian_dtype=forwards.dtype,
            uncounted=list(experts.values()),
        )
        stat_names = [g.inp for g in groups.groups]
        # Compensation fits the calibration tokens closely; it is kept only where micro-batches it
        # did not see say it helps. A calibration too small to hold any out keeps nearest rounding
        # (on tiny random models fit on 4 sequences it cost closeness to full precision).
        compensate = options.rounding == "compensated" and bool(plan.holdout_batches)
        if options.rounding == "compensated" and not compensate:
            logger.info(
                "layer %d: no held-out micro-batch to judge compensation by: nearest rounding", groups.index
            )
        hessian_names = list(names) if compensate else []
        # True-sequential: the linears after the first scaling group are recorded again before
        # their walk (with those before them rounded), not in this pass.
        refit_runs = _refit_runs(groups, names, experts) if compensate and options.sequential else []
        deferred = set(itertools.chain.from_iterable(refit_runs))
        hessian_names = [n for n in hessian_names if n not in deferred]
        # Only the linears of the first scaling group (those reading the block's input through its
        # first norm) fit the reference outputs: the inputs of the later ones were recorded with
        # the full-precision linears before them, so a drift those already correct would be
        # corrected twice. Measured on the default model: adding gate/up (fed by the residual
        # stream too) cost 4 points of the gap, adding every linear lost to nearest rounding.
        cross_names = [n for n in groups.groups[0].layers if n in names] if groups.groups else []
        recorder = functools.partial(
            record,
            stat_names=stat_names,
            call_names=inspect_names,
            gram_names=clip_names,
            hessian_names=hessian_names,
            cross_names=cross_names,
            # the target stream's inputs of the refit linears, paired when their runs are recorded
            keep_targets=sorted(deferred),
        )
        with phase("record forward"):
            recorded, forwards = _record_forward(recorder, forwards, experts, groups.index, reference)
        reference_outputs = None
        if reference is not None:
            reference_outputs = recorded.reference_outputs
        elif two_streams:
            reference_outputs = recorded.outputs  # one stream so far (block 0)
        if experts:
            with forwards.autocast():
                calibrate_underused_experts(
                    experts,
                    groups,
                    inputs,
                    record,
                    recorded,
                    stat_names,
                    inspect_names,
                    clip_names,
                    options,
                    hessian_names,
                )
        # For the rounding fallback; taken after the recording pass (which changes no weight), so
        # that its bf16 copies of the weights never sit beside this one.
        original = {k: v.clone() for k, v in block.state_dict().items()}
        # The block's variants are compared on micro-batches no search saw (plan.holdout_batches).
        judge = _HeldOutJudge(
            forwards,
            recorded.outputs if reference_outputs is None else reference_outputs,
            plan.decision_batches,
            names,
            quant_config,
            options,
        )
        if reference is not None:  # the targets are the model's outputs: free the block's own
            recorded.outputs = []
        with phase("rounding error forward"):
            mse_rtn = judge.error()

        searches = []
        for group, target in zip(groups.groups, inspect_names):
            with phase(f"search {target}"):
                searches.append(
                    _search_group(block, forwards, group, target, names, recorded, quant_config, options)
                )
        with phase("apply scales"):
            _apply_scales(block, groups, searches)
            for group, found in zip(groups.groups, searches):
                recorded.fold_input_scales(group.layers, group.expand_scales(found.scales))
        with phase("clip search"):
            clip_min, clip_max = _search_clips(
                block, clip_names, recorded, quant_config, options, forwards.dtype
            )
            _apply_clips(block, clip_min, clip_max)
        with phase("AWQ error forward"):
            mse_awq = judge.error()
        # A third candidate, the scales without the clips, was measured and dropped: on the
        # default model it won one block's held-out error (the attention-sink tokens own that
        # block's error) and cost 3.4 points of the gap end to end (57.8% against 61.2%).
        choice = _choose(mse_rtn, mse_awq)
        if choice == "rounding":  # NaN included: never ship a block worse than rounding
            searches, clip_min, clip_max = _fall_back_to_rounding(
                block, groups, original, searches, mse_rtn, mse_awq
            )
            mse_awq = mse_rtn
        rounding = "nearest"
        if hessian_names or refit_runs:
            # the inputs' scales, unless the block went back to rounding (its weights unscaled)
            input_scales = {} if choice == "rounding" else recorded.hessian_scale

            def restore() -> None:  # the weights as they stood before compensation, bit for bit
                block.load_state_dict(original)
                _apply_scales(block, groups, searches)
                _apply_clips(block, clip_min, clip_max)

            with phase("compensated rounding"):
                rounding, mse_awq = _compensate(
                    block,
                    names,
                    recorded.hessian,
                    recorded.cross,
                    input_scales,
                    judge,
                    quant_config,
                    mse_awq,
                    restore,
                    act_order=options.act_order,
                    refine_passes=options.refine_passes,
                    norms=NormRefit(groups, searches, original) if options.fit_norms else None,
                    refit=_Refitter(
                        refit_runs,
                        block,
                        inputs,
                        recorded.target_inputs,
                        plan,
                        experts,
                        quant_config,
                        forwards,
                        recorded.call_order,
                    )
                    if refit_runs
                    else None,
                )
            logger.info("layer %d: %s rounding kept", groups.index, rounding)
        next_hidden = recorded.outputs
        if options.propagate == "quantized":
            with phase("next inputs"), fake_quantized(block, names, quant_config, forwards.dtype):
                next_hidden = forwards.forward(lower=True)

    result = BlockAwqResult(
        layer_index=groups.index,
        groups=[
            GroupScaleResult(
                prev_op=g.prev_op,
                layers=g.layers,
                scales=found.scales,
                alpha=found.alpha,
                loss_rtn=found.loss_rtn,
                loss_awq=found.loss_awq,
            )
            for g, found in zip(groups.groups, searches)
        ],
        clip_max=clip_max,
        mse_rtn=mse_rtn,
        mse_awq=mse_awq,
        clip_min=clip_min,
        choice=choice,
        rounding=rounding,
        held_out=bool(plan.holdout_batches),
        search_dtype=str(forwards.dtype).removeprefix("torch."),
    )
    logger.info(
        "layer %d: held-out block output error vs fp %.4g (RTN) -> %.4g (%s); alphas %s",
        groups.index,
        mse_rtn,
        mse_awq,
        choice,
        [g.alpha for g in result.groups],
    )
    return result, inputs.with_hidden_states(next_hidden, reference_outputs)


def _compensate(
    block: nn.Module,
    names: Sequence[str],
    hessians: dict[str, torch.Tensor],
    crosses: dict[str, torch.Tensor],
    input_scales: Mapping[str, torch.Tensor],
    judge: _HeldOutJudge,
    quant_config: QuantConfigLike,
    nearest_error: float,
    restore: Callable[[], None],
    act_order: bool | str = False,
    refine_passes: int = 0,
    norms: NormRefit | None = None,
    refit: _Refitter | None = None,
) -> tuple[str, float]:
    """Round ``names`` with error compensation (their weights end on their grids), keep it if the
    held-out block error beats nearest rounding's (``nearest_error``), else put the weights back
    with ``restore`` (from the block's original weights and the search's results: no copy of the
    block's weights is held for it). Returns the rounding kept and its error. ``hessians`` (the
    recorder's) loses each ``X^T X`` as the last run reading it factors it in place.

    ``refit`` (true-sequential): its runs of linears, left out of ``hessians``, are walked in
    their place in ``names``'s order, on inputs recorded again just before their walk.

    ``norms``: after each run whose producer is a norm is walked, the norm is refit to the run's
    rounded linears (:mod:`~awq_plugin.algorithm.norm_fit`); judged with the walk, undone with it.

    ``act_order="auto"``: the block is walked in index order, then in activation order, and
    keeps whichever of the two (or nearest rounding) has the lowest held-out error. The first
    walk factors copies of the ``X^T X`` matrices (the second consumes them), and its result is
    held as integer levels on its grids (one byte per weight) until the second is judged."""
    deferred = set() if refit is None else refit.names
    runs = _shared_inputs([n for n in names if n not in deferred], hessians, input_scales)
    if refit is not None:  # in the forward's order: a run is refit after the ones before it are walked
        reached = {name: i for i, name in enumerate(refit.call_order)}
        position = {name: reached.get(name, len(reached) + i) for i, name in enumerate(names)}
        runs = sorted([*runs, *refit.runs], key=lambda run: min(position[n] for n in run))
    orders = [False, True] if act_order == "auto" else [bool(act_order)]
    best, best_error, best_levels, best_norms = "nearest", nearest_error, None, None
    for attempt, ordered in enumerate(orders):
        last = attempt == len(orders) - 1
        if attempt:
            restore()
        grids = {} if last else _grids_of(block, runs, quant_config)
        walked = _walk(
            block,
            runs,
            hessians,
            crosses,
            input_scales,
            quant_config,
            ordered,
            consume=last,
            refit=refit,
            norms=norms,
            refine_passes=refine_passes,
        )
        error = judge.error()
        label = "compensated, activation order" if ordered else "compensated"
        logger.info("held-out block error with %s rounding: %.4g", label, error)
        if error < best_error:
            best, best_error = label, error
            best_levels = None if last else _levels_of(block, {n: grids[n] for n in walked})
            best_norms = None if last or norms is None else norms.snapshot(block)
        del grids
    if best == label:  # the weights as the last walk left them
        return best, best_error
    restore()
    if best_levels is not None:
        _put_levels(block, best_levels)
        if best_norms is not None:
            NormRefit.put(block, best_norms)
    else:
        logger.info("held-out block error: nearest rounding kept (%.4g)", nearest_error)
    return best, best_error


def _walk(
    block: nn.Module,
    runs: Sequence[Sequence[str]],
    hessians: dict[str, torch.Tensor],
    crosses: dict[str, torch.Tensor],
    input_scales: Mapping[str, torch.Tensor],
    quant_config: QuantConfigLike,
    act_order: bool,
    consume: bool,
    refit: _Refitter | None = None,
    norms: NormRefit | None = None,
    refine_passes: int = 0,
) -> list[str]:
    """One compensation walk per run of linears that share an input, in place on the block's
    weights; returns the linears rounded (a run whose ``X^T X`` will not factor keeps its
    weights). ``consume``: the last run reading each ``X^T X`` factors it in place and the
    recorder's entries for it go. The runs of ``refit`` record their inputs first."""
    walked: list[str] = []
    last_use = {id(hessians[run[0]]): i for i, run in enumerate(runs) if run[0] in hessians}

    def settings(consumed: bool) -> tuple[object, ...]:  # _walk_run's arguments after the input scale
        return quant_config, act_order, consumed, norms, refine_passes

    for i, together in enumerate(runs):
        if refit is not None and together[0] in refit.names:
            before = list(itertools.chain.from_iterable(runs[:i]))
            # the inputs as they are now, the block scaled: no input scale to apply
            for part, hessian, cross in refit.record(
                together, before, input_scales.get(together[0]), consume
            ):
                if _walk_run(block, part, hessian, cross, None, *settings(True)):
                    walked.extend(part)
                del hessian, cross
            continue
        hessian = hessians[together[0]]
        cross = crosses.get(together[0])  # (X_ref - X)^T X: asymmetric calibration
        # The last run to read an X^T X factors it in place (one [K, K] less at the peak), and
        # the recorder's entries for it (and its cross term's) go, so that it is freed after the walk.
        consumed = consume and last_use[id(hessian)] == i
        if consumed:
            for name in [n for n, h in hessians.items() if h is hessian]:
                del hessians[name]
                crosses.pop(name, None)
        input_scale = input_scales.get(together[0])
        if _walk_run(block, together, hessian, cross, input_scale, *settings(consumed)):
            walked.extend(together)
        del hessian, cross
    return walked


def _walk_run(
    block: nn.Module,
    names: Sequence[str],
    hessian: torch.Tensor,
    cross: torch.Tensor | None,
    input_scale: torch.Tensor | None,
    quant_config: QuantConfigLike,
    act_order: bool,
    consumed: bool,
    norms: NormRefit | None = None,
    refine_passes: int = 0,
) -> bool:
    """One walk over the linears ``names`` (one input), in place; False where ``X^T X`` will not
    factor (their weights are left as they are, to be rounded to nearest). With ``norms``, a run
    fed by a norm has the norm refit to it afterwards."""
    weights = [block.get_submodule(name).weight for name in names]
    group = None if norms is None else norms.group_of(names)
    # the walk factors a consumed X^T X in place; the refit needs it after the walk
    kept = hessian.detach().float().clone() if group is not None and consumed else hessian
    try:
        rounded = compensated_rounding_shared(
            weights,
            hessian,
            quant_config.bits,
            quant_config.group_size,
            quant_config.zero_point,
            input_scale=input_scale,
            act_order=act_order,
            consume_hessian=consumed,
            cross=cross,
            refine_passes=refine_passes,
        )
    except NotPositiveDefinite as error:
        logger.warning("%s: %s; rounded to nearest", ", ".join(names), error)
        return False
    for weight, result in zip(weights, rounded):
        copy_transposed(weight.data, result.mT)  # result is a transposed view
    del rounded
    if group is not None:
        norms.apply(block, group, kept, cross, input_scale)
    return True


class _Refitter:
    """True-sequential recording: a run of linears' ``x^T x`` and ``(x_ref - x)^T x`` recorded
    again just before its walk, with the linears walked before it rounded. ``x`` comes from the
    block's inputs through the block as it stands (each forward stops once the run's inputs are
    recorded; held-out micro-batches are skipped); ``x_ref`` is the target stream's input the
    recording pass kept (``targets``: micro-batch -> linear -> rows, from the full-precision
    block before the scale folds, so each is divided by its linear's input scale). A run's
    kept inputs are dropped once it is recorded.

    ``runs``: the linears recorded so, each run one scaling group's linears that see every
    token (routed experts keep the recording pass's matrices: their tokens differ between
    the streams). ``call_order``: the block's linears in the order its forward reaches them
    (the recording pass's), which the walks follow."""

    def __init__(
        self,
        runs: Sequence[Sequence[str]],
        block: nn.Module,
        inputs: BlockInputs,
        targets: dict[int, dict[str, torch.Tensor]],
        plan: SamplePlan,
        experts: Mapping[str, RoutedExperts],
        quant_config: QuantConfigLike,
        forwards: BlockForwards,
        call_order: Sequence[str] = (),
    ) -> None:
        self.runs = [list(run) for run in runs]
        self.names = set(itertools.chain.from_iterable(self.runs))
        self.block, self.inputs, self.targets = block, inputs, targets
        self.call_order = list(call_order)
        self.plan, self.experts, self.quant_config, self.forwards = plan, experts, quant_config, forwards
        self.batches = [m for m in range(len(inputs.hidden_states)) if m not in plan.holdout_batches]

    def record(
        self, run: Sequence[str], before: Sequence[str], scale: torch.Tensor | None, consume: bool = True
    ) -> list[tuple[list[str], torch.Tensor, torch.Tensor | None]]:
        """``run``'s inputs with ``before`` fake-quantized (those walked are on their grids
        already), as walks: ``(linears, x^T x, cross term)`` per distinct input. ``consume``:
        the run's kept target inputs go (no later walk records it again)."""
        recorder = InputRecorder(
            self.block,
            self.plan,
            stat_names=(),
            call_names=(),
            hessian_names=run,
            hessian_dtype=self.forwards.dtype,
            stop_after=run,
            reference_scales={} if scale is None else dict.fromkeys(run, scale),
        )
        counts = {path: list(routed.token_counts) for path, routed in self.experts.items()}
        try:
            with (
                phase("sequential recording"),
                fake_quantized(self.block, before, self.quant_config, self.forwards.dtype),
                self.forwards.autocast(),
            ):
                take = dict.pop if consume else dict.get
                kept = {m: self.targets.get(m, {}) for m in self.batches}
                # a linear without a kept input (not reached) gets no cross term: the symmetric fit
                paired = {m: {n: x for n in run if (x := take(kept[m], n, None)) is not None} for m in kept}
                got = recorder.run(self.inputs, batches=self.batches, paired=paired)
                del paired
        finally:  # the experts count the calibration's routing, not these forwards'
            for path, before_counts in counts.items():
                self.experts[path].token_counts = before_counts
        walks: dict[int, tuple[list[str], torch.Tensor, torch.Tensor | None]] = {}
        for name in run:
            if name not in got.hessian:
                logger.info("%s: not reached by the block's forward, rounded to nearest", name)
                continue
            matrix = got.hessian[name]
            walks.setdefault(id(matrix), ([], matrix, got.cross.get(name)))[0].append(name)
        return list(walks.values())


def _refit_runs(
    groups: BlockTemplate, names: Sequence[str], experts: Mapping[str, RoutedExperts]
) -> list[list[str]]:
    """The runs true-sequential recording refits: per scaling group after the first, its
    quantized linears outside routed experts."""
    inside = tuple(f"{path}." for path in experts)
    quantized = set(names)
    first = set(groups.groups[0].layers) if groups.groups else set()
    runs = []
    for group in groups.groups[1:]:
        run = [n for n in group.layers if n in quantized and n not in first and not n.startswith(inside)]
        if run:
            runs.append(run)
    return runs


def _grids_of(
    block: nn.Module, runs: Sequence[Sequence[str]], quant_config: QuantConfigLike
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each walked linear's group scales and zero points as the walk will take them (from its
    weights before the walk): ``(scales, zeros)``, ``[N, K/G]`` each."""
    grids = {}
    for name in itertools.chain.from_iterable(runs):
        w = block.get_submodule(name).weight.detach()
        g = resolve_group_size(quant_config.group_size, w.shape[1])
        grids[name] = compute_scales_zeros(w.float(), quant_config.bits, g, quant_config.zero_point)
    return grids


def _levels_of(
    block: nn.Module, grids: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The walked weights as uint8 levels on ``grids`` (every walked weight is ``(q - z) * s``);
    linears left out of ``grids`` get their searched weights back from the block's restore."""
    levels = {}
    for name, (scales, zeros) in grids.items():
        w = block.get_submodule(name).weight.detach()
        n, k = w.shape
        grouped = w.float().view(n, scales.shape[1], -1)
        q = torch.div(grouped, scales[..., None]).round_().add_(zeros[..., None])
        levels[name] = (q.to(torch.uint8).view(n, k), scales, zeros)
    return levels


def _put_levels(
    block: nn.Module, levels: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
) -> None:
    """The weights :func:`_levels_of` took, back bit for bit: ``(q - z) * s`` as the walk wrote them."""
    for name, (q, scales, zeros) in levels.items():
        weight = block.get_submodule(name).weight
        n, k = weight.shape
        value = q.view(n, scales.shape[1], -1).float().sub_(zeros[..., None]).mul_(scales[..., None])
        weight.data.copy_(value.view(n, k))


def _shared_inputs(
    names: Sequence[str], hessians: Mapping[str, torch.Tensor], input_scales: Mapping[str, torch.Tensor]
) -> list[list[str]]:
    """``names`` in runs that share one ``X^T X`` (the recorder's same matrix) and equal input
    scales: each run is rounded in one walk. Linears without recorded inputs (their weight
    read directly, never called as a module) are left out, and logged."""
    runs: list[list[str]] = []
    for name in names:
        if name not in hessians:
            logger.info("%s: no recorded inputs, rounded to nearest", name)
            continue
        scale = input_scales.get(name)
        for run in runs:  # the same matrix object; scales may be equal values in two tensors
            if hessians[run[0]] is hessians[name] and _same_scale(input_scales.get(run[0]), scale):
                run.append(name)
                break
        else:
            runs.append([name])
    return runs


def _same_scale(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


class _HeldOutJudge:
    """The block's output error against ``outputs`` (its full-precision output, or the
    full-precision model's with asymmetric calibration) on ``batches`` (the held-out
    micro-batches where there are any), with the quantized linears fake-quantized as they stand."""

    def __init__(
        self,
        forwards: BlockForwards,
        outputs: Sequence[torch.Tensor],
        batches: Sequence[int],
        names: Sequence[str],
        quant_config: QuantConfigLike,
        options: AwqOptions,
    ) -> None:
        self.forwards, self.batches, self.names, self.quant_config = forwards, batches, names, quant_config
        self.targets = [outputs[m] for m in batches]
        self.weights = token_loss_weights(self.targets, options.outlier_token_ratio)

    def error(self) -> float:
        with fake_quantized(self.forwards.block, self.names, self.quant_config, self.forwards.dtype):
            return weighted_output_mse(self.forwards.forward(self.batches), self.targets, self.weights)


#: The block variants the step chooses between, in order of preference on a tie.
CHOICES = ("awq", "rounding")


def _choose(mse_rtn: float, mse_awq: float) -> str:
    """The variant with the lowest held-out error (NaN never wins; all NaN: rounding)."""
    best, best_error = "rounding", math.inf
    for name, error in zip(CHOICES, (mse_awq, mse_rtn)):
        if error < best_error:  # False for NaN
            best, best_error = name, error
    return best


def _fall_back_to_rounding(
    block: nn.Module,
    groups: BlockTemplate,
    original: Mapping[str, torch.Tensor],
    searches: Sequence[ScaleSearchResult],
    mse_rtn: float,
    mse_awq: float,
) -> tuple[list[ScaleSearchResult], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Restore the block's weights and record s = 1, no clips: plain rounding for this block.

    The unit scales are folded as :func:`apply_awq_block` will fold them, so saved results
    re-apply to the same bits.
    """
    logger.warning(
        "layer %d: AWQ's held-out block output error %.4g is above plain rounding's %.4g; "
        "falling back to plain rounding (no scales, no clipping) for this block",
        groups.index,
        mse_awq,
        mse_rtn,
    )
    block.load_state_dict(original)
    rounding = [
        dataclasses.replace(found, scales=torch.ones_like(found.scales), alpha=None, loss_awq=found.loss_rtn)
        for found in searches
    ]
    _apply_scales(block, groups, rounding)
    return rounding, {}, {}


def _apply_scales(block: nn.Module, groups: BlockTemplate, searches: Sequence[ScaleSearchResult]) -> None:
    """Fold each group's searched scales into its previous op and its linears."""
    for group, found in zip(groups.groups, searches):
        apply_group_scales(block, group, found.scales)


def _apply_clips(
    block: nn.Module, clip_min: Mapping[str, torch.Tensor], clip_max: Mapping[str, torch.Tensor]
) -> None:
    """Clamp each linear with a searched clip to its range."""
    for name, bound in clip_max.items():
        clamp_weight(block.get_submodule(name), bound, clip_min.get(name))


def _search_group(
    block: nn.Module,
    forwards: BlockForwards,
    group: ScalingGroup,
    target: str,
    quantized: Sequence[str],
    recorded: RecordedInputs,
    quant_config: QuantConfigLike,
    options: AwqOptions,
) -> ScaleSearchResult:
    names = [n for n in group.layers if n in quantized]
    probe = block.get_submodule(target)
    return search_best_scale(
        group,
        weights=[block.get_submodule(n).weight.data for n in names],
        probes=[probe.get_submodule(_relative_name(n, target)) for n in names],
        x_mean=group.reduce_columns(recorded.mean_abs(group.inp)),
        loss_fn=_search_loss(probe, target, recorded, forwards, options.outlier_token_ratio),
        fake_quantize=make_fake_quantizer(quant_config),
        n_grid=options.n_grid,
        duo_scaling=options.duo_scaling,
        group_size=quant_config.group_size,
    )


def _search_clips(
    block: nn.Module,
    names: Sequence[str],
    recorded: RecordedInputs,
    quant_config: QuantConfigLike,
    options: AwqOptions,
    forward_dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Clip bounds per linear: (lower bounds, only for the asymmetric search; upper bounds).

    The Gram products run in ``forward_dtype`` when it is lower than fp32 (the block's forwards
    then run their matmuls in it too: the device has the units); the error sums stay fp32."""
    products = None if forward_dtype == torch.float32 else forward_dtype
    quantize = make_fake_quantizer(quant_config)
    clip_min: dict[str, torch.Tensor] = {}
    clip_max: dict[str, torch.Tensor] = {}
    for name in names:
        if recorded.gram_count.get(name, 0) == 0:
            # No clip-sample token reached this linear (an expert outside the clip sample):
            # nothing to measure the error on, so its range is left as it is.
            logger.info("linear %s saw no clip-search tokens; not clipped", name)
            continue
        # Grams are accumulated in float64 over all tokens; fp32 is ample to rank clip candidates.
        weight, gram = block.get_submodule(name).weight, recorded.mean_gram(name).float()
        if options.clip_asymmetric and quant_config.zero_point:
            clip_min[name], clip_max[name] = search_clip_range(
                weight, gram, quantize, options.clip_grid, options.max_shrink, products
            )
        else:
            clip_max[name] = search_clip_max(
                weight, gram, quantize, options.clip_grid, options.max_shrink, products
            )
    return clip_min, clip_max


def run_awq_block(
    block: nn.Module,
    groups: BlockTemplate,
    inputs: BlockInputs,
    quant_config: QuantConfigLike,
    options: AwqOptions | None = None,
) -> BlockAwqResult:
    """Search and apply AWQ scales and clips on one block; return them as data.

    ``groups`` is the resolved template of this block
    (``resolve_template(model).block(i)``). The block ends up scaled and
    clipped in place (not quantized). See :func:`awq_block_step` for the
    variant that also returns the next block's inputs.
    """
    return awq_block_step(block, groups, inputs, quant_config, options)[0]


def apply_awq_block(block: nn.Module, groups: BlockTemplate, result: BlockAwqResult) -> None:
    """Re-apply saved scales and clips to a fresh full-precision block (same bits as the search run)."""
    _check_result_matches(groups, result)
    if result.rounding != "nearest":
        raise CheckpointError(
            f"layer {result.layer_index} was rounded with {result.rounding} rounding, which its scales and "
            "clips alone do not reproduce: read its integers from the checkpoint instead"
        )
    with torch.no_grad(), computing_in_float32(block):
        for group, found in zip(groups.groups, result.groups):
            apply_group_scales(block, group, found.scales.float())
        for name, bound in result.clip_max.items():
            clamp_weight(block.get_submodule(name), bound, result.clip_min.get(name))
