"""Process memory as the benchmarks and the quantizer's report measure it (Linux /proc)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from awq_plugin import procmem

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")


def _run(script: str, cwd: Path) -> list[int]:
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return [int(v) for v in proc.stdout.split()]


def test_child_peak_is_its_own_not_its_parents(tmp_path: Path) -> None:
    """Why we read VmHWM: a child's ru_maxrss starts at its parent's RSS at the fork."""
    script = (
        "import resource, subprocess, sys\n"
        "ballast = bytearray(400 * 2**20)\n"  # a large parent (bytearray zero-fills: resident)
        "child = 'from awq_plugin.procmem import peak_rss_bytes; print(peak_rss_bytes())'\n"
        "print(subprocess.run([sys.executable, '-c', child], capture_output=True, text=True).stdout)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n"
    )
    own, rusage = _run(script, tmp_path)
    assert own < 150 * 2**20 < 400 * 2**20 < rusage


def test_release_freed_memory_returns_fragmented_heap_pages(tmp_path: Path) -> None:
    """Freed small allocations between live ones stay resident until trimmed."""
    script = (
        "from awq_plugin.procmem import current_rss_bytes, release_freed_memory\n"
        "chunks = [bytearray(64 * 1024) for _ in range(4000)]\n"  # 250 MiB in heap-sized pieces
        "del chunks[::2]\n"  # half freed, each freed piece between two live ones
        "before = current_rss_bytes()\n"
        "assert release_freed_memory()\n"
        "print(before, current_rss_bytes())\n"
    )
    before, after = _run(script, tmp_path)
    assert before - after > 80 * 2**20


def test_current_and_peak_of_this_process() -> None:
    assert 0 < procmem.current_rss_bytes() <= procmem.peak_rss_bytes()
    assert procmem.current_rss_bytes(2**22 + 12345) == 0  # no such process
