"""Wall-clock seconds per phase of a block step, for the block-cost benchmark.

Off unless a caller opens :func:`recording_phases`: then every ``with phase(name)`` run
inside it (in this thread or task) adds its seconds to the dict the caller holds. Closed,
``phase`` costs one context-variable read, so the step keeps its markers in production.

    with recording_phases() as seconds:
        awq_block_step(block, groups, inputs, quant_config)
    seconds  # {"verify folds": 1.2, "record forward": 40.1, ...}
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from time import perf_counter

import torch

_seconds: ContextVar[dict[str, float] | None] = ContextVar("awq_phase_seconds", default=None)


def _synchronize() -> None:
    """Wait for queued GPU work, so a phase is charged for its own kernels, not the next one's."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextmanager
def recording_phases() -> Iterator[dict[str, float]]:
    """Collect ``{phase name: seconds}`` from every :func:`phase` entered inside the block."""
    seconds: dict[str, float] = {}
    token = _seconds.set(seconds)
    try:
        yield seconds
    finally:
        _seconds.reset(token)


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Charge the enclosed work to ``name`` (summed over repeats) when phases are being recorded."""
    seconds = _seconds.get()
    if seconds is None:
        yield
        return
    _synchronize()
    start = perf_counter()
    try:
        yield
    finally:
        _synchronize()
        seconds[name] = seconds.get(name, 0.0) + perf_counter() - start
