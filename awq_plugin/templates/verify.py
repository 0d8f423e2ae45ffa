"""Prove a template's folds on the live block: a random scale folded in must not change the output.

A scaling group claims that ``prev_op``'s output reaches ``layers`` only
through steps that commute with a positive per-channel scale. Names and shapes
cannot show that (a Llama template renamed for BitNet resolves, yet BitNet
normalises between ``v_proj`` and ``o_proj``). So each group is checked on the
block itself, in float32: fold a random scale ``s`` (``prev_op`` / s,
``layers`` * s, exactly as :func:`awq_plugin.templates.folds.apply_group_scales`
will) into a copy of the block and compare the block's output with the
unchanged block's. A correct fold differs by float32 rounding only (relative
error ~1e-6); a wrong one by O(1).

A group whose layers never influence the output on the given tokens (an expert
no token was routed to) cannot be proven or refuted here; it is reported as
unobserved, not refused.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from awq_plugin.calibration.capture import BlockInputs, forward_block
from awq_plugin.errors import CalibrationError, TemplateError
from awq_plugin.templates.folds import apply_group_scales, scale_linear_inputs
from awq_plugin.templates.schema import BlockTemplate, ScalingGroup

logger = logging.getLogger(__name__)

# Relative output error (||out - ref|| / ||ref||, float32) below which a fold counts as exact.
# Correct folds measure 1e-7..1e-6 on the shipped families (softmax and norm statistics
# included); a fold through a norm, a non-linearity or a mismatched channel order is >= 1e-2.
FOLD_TOLERANCE = 1e-4
SCALE_SPREAD = 1.0  # log-normal sigma of the random test scales (spread about e^+-2)


@dataclass(frozen=True)
class FoldCheck:
    """The measured effect of folding a random scale into one group of one block."""

    block: int
    group: str  # ScalingGroup.name: "prev_op -> layers"
    error: float  # relative block-output change of the full fold (0 for an exact fold)
    observed: bool  # False: the layers did not influence the output on these tokens

    @property
    def exact(self) -> bool:
        return self.error <= FOLD_TOLERANCE


def relative_error(outputs: Sequence[torch.Tensor], references: Sequence[torch.Tensor]) -> float:
    """``||out - ref|| / ||ref||`` over all micro-batches, in float64 sums."""
    num = sum(float((o.double() - r.double()).pow(2).sum()) for o, r in zip(outputs, references))
    den = sum(float(r.double().pow(2).sum()) for r in references)
    return (num / max(den, 1e-30)) ** 0.5


def float32_copy(block: nn.Module) -> nn.Module:
    """A float32 copy of ``block`` (the original keeps its weights and dtype)."""
    return copy.deepcopy(block).float()


def random_scales(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` positive scales, log-normally spread (float32)."""
    return torch.exp(SCALE_SPREAD * torch.randn(n, generator=generator))


@torch.no_grad()
def measure_group_fold(
    block: nn.Module,
    group: ScalingGroup,
    inputs: BlockInputs,
    references: Sequence[torch.Tensor],
    generator: torch.Generator,
) -> tuple[float, bool]:
    """(relative output change of the full fold, whether the layers influence the output).

    ``block`` is float32 and unchanged on return; ``references`` are its outputs on ``inputs``.
    """
    s = random_scales(group.n_scales, generator)
    folded = copy.deepcopy(block)
    apply_group_scales(folded, group, s)
    error = relative_error(forward_block(folded, inputs), references)
    # The layers' half alone must change the output; if it does not, nothing was observed.
    half = copy.deepcopy(block)
    scale_linear_inputs([half.get_submodule(n) for n in group.layers], group.expand_scales(s))
    observed = relative_error(forward_block(half, inputs), references) > FOLD_TOLERANCE
    return error, observed


@torch.no_grad()
def check_block_folds(
    block: nn.Module,
    template: BlockTemplate,
    inputs: BlockInputs,
    seed: int = 0,
    max_batches: int | None = None,
) -> list[FoldCheck]:
    """Measure every group of ``template`` on ``block`` (not modified); return one check per group.

    ``max_batches`` limits the micro-batches run (None: all); one is enough to
    tell an exact fold from a wrong one.
    """
    block32, inputs32, references = _float32_references(block, template, inputs, max_batches)
    generator = torch.Generator().manual_seed(seed + template.index)
    checks = []
    for group in template.groups:
        error, observed = measure_group_fold(block32, group, inputs32, references, generator)
        checks.append(FoldCheck(template.index, group.name, error, observed))
    return checks


def _float32_references(
    block: nn.Module, template: BlockTemplate, inputs: BlockInputs, max_batches: int | None
) -> tuple[nn.Module, BlockInputs, list[torch.Tensor]]:
    """A float32 copy of the block, its inputs (the first ``max_batches`` micro-batches) and its
    outputs on them, which every fold is compared against (they must be finite)."""
    block32 = float32_copy(block)
    inputs32 = BlockInputs(inputs.hidden_states[:max_batches], inputs.kwargs[:max_batches]).to(torch.float32)
    references = forward_block(block32, inputs32)
    if not all(torch.isfinite(r).all() for r in references):  # nothing to compare a fold against
        raise CalibrationError(
            f"calibration activations became NaN or Inf at the output of layer {template.index}"
        )
    return block32, inputs32, references


@torch.no_grad()
def verify_block_folds_at_once(
    block: nn.Module,
    template: BlockTemplate,
    inputs: BlockInputs,
    source: str = "architecture template",
    seed: int = 0,
    max_batches: int | None = None,
) -> None:
    """:func:`verify_block_folds`' verdict in two forwards instead of one plus two per group.

    Every group's random scale (the same draws as :func:`check_block_folds`) is folded into
    one float32 copy of the block; if its output stays within :data:`FOLD_TOLERANCE` of the
    unchanged block's, every fold is exact: a wrong fold moves the output by O(1), and
    independent log-normal scales do not cancel such moves. Otherwise the groups are checked
    one by one (:func:`verify_block_folds`), which names the first wrong group and raises.
    Unlike :func:`check_block_folds`, it does not tell which groups the tokens observed.

    With ``max_batches=1`` the two forwards first run on one sequence of the first
    micro-batch (a quarter of the cost at the default micro-batch of 4): a fold is a property
    of the block's data flow, which one sequence exercises as well as four, and a pass there
    is a pass on a real input whatever the cut did. Anything else (a failure, an error from a
    keyword the cut got wrong) re-runs the check on the whole micro-batch. Blocks with routed
    experts skip the shortcut: fewer tokens reach fewer experts.
    """
    if max_batches == 1 and not template.experts:
        one = inputs.first_sequence()
        if one is not None:
            try:
                if _folds_hold_at_once(block, template, one, seed, None):
                    return
            except Exception:  # any failure of the shortcut leaves the verdict to the full check
                logger.debug("layer %d: the one-sequence fold check could not run", template.index)
    if _folds_hold_at_once(block, template, inputs, seed, max_batches):
        return
    verify_block_folds(block, template, inputs, source, seed, max_batches)


def _folds_hold_at_once(
    block: nn.Module, template: BlockTemplate, inputs: BlockInputs, seed: int, max_batches: int | None
) -> bool:
    """Every group's random scale folded into one float32 copy: does the output stay put?"""
    folded, inputs32, references = _float32_references(block, template, inputs, max_batches)
    generator = torch.Generator().manual_seed(seed + template.index)
    for group in template.groups:
        apply_group_scales(folded, group, random_scales(group.n_scales, generator))
    return relative_error(forward_block(folded, inputs32), references) <= FOLD_TOLERANCE


def verify_block_folds(
    block: nn.Module,
    template: BlockTemplate,
    inputs: BlockInputs,
    source: str = "architecture template",
    seed: int = 0,
    max_batches: int | None = None,
) -> list[FoldCheck]:
    """:func:`check_block_folds`, raising :class:`TemplateError` on the first fold that changes the output.

    The error names the template, the block, the group (its ``prev_op`` and
    ``layers``) and the measured error against the tolerance.
    """
    checks = check_block_folds(block, template, inputs, seed, max_batches)
    for check in checks:
        if not check.exact:
            raise TemplateError(
                f"{source}: scaling group '{check.group}' of decoder layer "
                f"{check.block} does not fold: a random per-channel scale folded into its prev_op and "
                f"undone in its layers changes the layer's output by {check.error:.3g} (relative; exact "
                f"folds stay below {FOLD_TOLERANCE:g}). The prev_op's output does not reach those layers "
                "through scale-commuting steps only; fix the group or move its layers to 'unscaled'"
            )
    return checks
