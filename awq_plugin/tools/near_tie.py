"""Greedy token sequences compared up to rounding: equal, or first different at a near tie.

Two runs of the same model that round differently (another kernel, another batch size, another
accumulation order) may pick different greedy tokens, but only at a step where the reference's
top-1 and top-2 log-probabilities are closer than the rounding can move them. After the first
different token the two runs continue from different text, so only the first divergence says
anything about the arithmetic. The tests and the server soak (``awq-plugin bench soak``) share
this one rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# bf16 keeps 8 significant bits (relative rounding 2^-9 per value). Logits of the tiny test
# models reach |z| ~ 10, so a single rounding moves a logit by ~0.02 and a few layers of them by
# ~0.05-0.1. Two runs that differ only in bf16 rounding may therefore pick different tokens
# only where the reference's top-2 log-probability margin is below this many nats.
NEAR_TIE_NATS = 0.1


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first step at which ``a`` and ``b`` differ (a length difference counts), or None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@dataclass(frozen=True)
class Divergence:
    """Where a greedy sequence first left its reference, and whether that was a near tie."""

    step: int
    expected: int | None  # the reference's token there (None: the reference had ended)
    got: int | None  # the other run's token there (None: the other run had ended)
    margin: float  # the reference's top-1 minus top-2 log-probability at ``step`` (inf if unknown)
    threshold: float

    @property
    def near_tie(self) -> bool:
        return self.margin < self.threshold

    def describe(self) -> str:
        kind = "a near tie" if self.near_tie else "not a rounding near tie"
        return (
            f"diverges at step {self.step} ({self.expected} vs {self.got}) where the reference's top-2 "
            f"margin is {self.margin:.3f} nats (threshold {self.threshold}): {kind}"
        )


def greedy_divergence(
    reference: Sequence[int],
    reference_margins: Sequence[float],
    other: Sequence[int],
    threshold: float = NEAR_TIE_NATS,
) -> Divergence | None:
    """None if ``other`` equals ``reference``; else its first :class:`Divergence`.

    ``reference_margins[i]`` is the reference's top-2 log-probability margin at step ``i``. A
    length difference is never a near tie (its margin is infinite): greedy runs of a fixed
    number of tokens must have equal lengths.
    """
    at = first_divergence(reference, other)
    if at is None:
        return None
    in_both = at < min(len(reference), len(other))
    margin = reference_margins[at] if in_both and at < len(reference_margins) else float("inf")
    return Divergence(
        step=at,
        expected=reference[at] if at < len(reference) else None,
        got=other[at] if at < len(other) else None,
        margin=margin,
        threshold=threshold,
    )
