"""The one rule for comparing greedy runs: equal, or first different at a near tie."""

from __future__ import annotations

import math

from awq_plugin.tools.near_tie import NEAR_TIE_NATS, first_divergence, greedy_divergence


def test_first_divergence_counts_a_length_difference() -> None:
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2


def test_equal_runs_have_no_divergence() -> None:
    assert greedy_divergence([4, 5], [1.0, 1.0], [4, 5]) is None


def test_only_the_first_difference_is_judged_by_the_references_margin_there() -> None:
    margins = [2.0, 0.05, 3.0]
    tie = greedy_divergence([1, 2, 3], margins, [1, 7, 8])  # later differences follow from the first
    assert tie is not None and tie.step == 1 and tie.near_tie and tie.margin == 0.05
    assert (tie.expected, tie.got) == (2, 7)
    decisive = greedy_divergence([1, 2, 3], margins, [9, 2, 3])
    assert decisive is not None and not decisive.near_tie and "not a rounding near tie" in decisive.describe()
    assert greedy_divergence([1, 2, 3], margins, [1, 7, 8], threshold=0.01).near_tie is False
    assert NEAR_TIE_NATS == 0.1


def test_a_length_difference_is_never_a_near_tie() -> None:
    divergence = greedy_divergence([1, 2], [0.0, 0.0], [1, 2, 3])
    assert divergence is not None and divergence.step == 2 and divergence.got == 3
    assert divergence.expected is None and math.isinf(divergence.margin) and not divergence.near_tie
