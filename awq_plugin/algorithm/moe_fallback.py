"""The MoE fallback: experts the calibration set leaves (almost) unused are calibrated on every
token reaching their MoE block instead of on the few routed to them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from awq_plugin.algorithm.options import AwqOptions
from awq_plugin.calibration.capture import BlockInputs, InputRecorder, RecordedInputs
from awq_plugin.models.experts import RoutedExperts, experts_on_all_tokens
from awq_plugin.templates import BlockTemplate

logger = logging.getLogger(__name__)


def calibrate_underused_experts(
    experts: Mapping[str, RoutedExperts],
    groups: BlockTemplate,
    inputs: BlockInputs,
    record: Callable[..., InputRecorder],
    recorded: RecordedInputs,
    stat_names: Sequence[str],
    call_names: Sequence[str],
    gram_names: Sequence[str],
    options: AwqOptions,
    hessian_names: Sequence[str] = (),
) -> None:
    """The fallback for experts the calibration set leaves (almost) unused.

    An expert routed fewer than ``options.expert_min_tokens`` tokens in this
    block would get its activation statistics, search rows and clip statistics
    from a handful of tokens, or none (no statistics at all: a crash or NaN).
    Instead it is calibrated on every token that reaches its MoE block: one
    more pass over the block runs those experts on all tokens (the block's
    routing and outputs are unchanged) and their recordings replace the routed
    ones. A warning names each such expert.
    """
    chosen: dict[str, list[int]] = {}
    total = inputs.n_tokens
    for path, routed in experts.items():
        for e, count in enumerate(routed.token_counts):
            if count >= options.expert_min_tokens:
                continue
            chosen.setdefault(path, []).append(e)
            logger.warning(
                "layer %d: expert %d (%s) received %d of %d calibration tokens (fewer than expert_min_tokens=%d); "
                "calibrating it on all %d tokens that reach its MoE block instead",
                groups.index,
                e,
                groups.full_name(f"{path}.{e}"),
                count,
                total,
                options.expert_min_tokens,
                total,
            )
    if not chosen:
        return
    prefixes = tuple(f"{path}.{e}." for path, indices in chosen.items() for e in indices)

    def inside(names: Sequence[str]) -> list[str]:
        return [n for n in names if n.startswith(prefixes)]

    with experts_on_all_tokens(chosen, experts):
        again = record(
            stat_names=inside(stat_names),
            call_names=inside(call_names),
            gram_names=inside(gram_names),
            hessian_names=inside(hessian_names),
        ).run(inputs)
    for name in {*inside(stat_names), *inside(call_names), *inside(gram_names), *inside(hessian_names)}:
        for table in ("abs_sum", "count", "rows", "calls", "gram", "gram_count", "hessian", "hessian_scale"):
            old, new = getattr(recorded, table), getattr(again, table)
            old.pop(name, None)
            if name in new:
                old[name] = new[name]
