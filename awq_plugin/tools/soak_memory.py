"""Resident memory of a server's whole process tree, sampled over time, and its drift.

vLLM serves from several processes (API server, engine core, worker): the soak sums the RSS
of the server's process and all its descendants (shared pages are counted once per process,
which inflates the level, not the drift).
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

MIB = 1024 * 1024


def process_tree_rss(pid: int) -> dict[int, int]:
    """Resident bytes of ``pid`` and each of its descendants (processes that vanish are skipped)."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    rss = {}
    for proc in processes:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            rss[proc.pid] = proc.memory_info().rss
    return rss


class RssSampler:
    """Samples the server tree's total RSS every ``interval_s`` in a background thread."""

    def __init__(self, pid: int, interval_s: float, t0: float) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.t0 = t0
        self.samples: list[tuple[float, int]] = []  # (seconds since t0, bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            tree = process_tree_rss(self.pid)
            if tree:
                self.samples.append((time.monotonic() - self.t0, sum(tree.values())))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True)
class MemoryDrift:
    """RSS after warm-up against RSS at the end of the load (means over equal windows)."""

    baseline_bytes: float  # mean over [warmup_s, warmup_s + window_s)
    final_bytes: float  # mean over [duration_s - window_s, duration_s]
    baseline_window_s: tuple[float, float]
    final_window_s: tuple[float, float]

    @property
    def drift_bytes(self) -> float:
        return self.final_bytes - self.baseline_bytes

    @property
    def drift_fraction(self) -> float:
        return self.drift_bytes / self.baseline_bytes


def memory_drift(
    samples: Sequence[tuple[float, int]], duration_s: float, warmup_s: float, window_s: float
) -> MemoryDrift:
    """Compare the mean RSS right after warm-up with the mean over the last ``window_s`` of the load."""
    baseline_window = (warmup_s, warmup_s + window_s)
    final_window = (duration_s - window_s, duration_s)
    if baseline_window[1] > final_window[0]:
        raise ValueError(
            f"warm-up {warmup_s:.0f} s and two windows of {window_s:.0f} s do not fit in {duration_s:.0f} s"
        )

    def mean_in(lo: float, hi: float) -> float:
        values = [rss for t, rss in samples if lo <= t <= hi]
        if not values:
            raise ValueError(f"no RSS sample between {lo:.1f} s and {hi:.1f} s")
        return statistics.fmean(values)

    return MemoryDrift(mean_in(*baseline_window), mean_in(*final_window), baseline_window, final_window)


def processes_alive(pids: Sequence[int]) -> bool:
    import psutil

    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    return all(alive(pid) for pid in pids)
