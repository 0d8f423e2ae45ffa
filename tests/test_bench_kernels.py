"""``bench kernels``: how much it cycles (the cache must not hold the weights) and what it records
about the machine; a tiny run end to end. No speed is asserted (the benchmark measures speed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from awq_plugin.cpuinfo import last_level_cache_bytes
from awq_plugin.tools import bench_kernels


def _cache(root: Path, cpu: int, index: int, level: int, kind: str, size: str, shared: str) -> None:
    folder = root / f"cpu{cpu}" / "cache" / f"index{index}"
    folder.mkdir(parents=True)
    for name, value in (("level", level), ("type", kind), ("size", size), ("shared_cpu_list", shared)):
        (folder / name).write_text(f"{value}\n")


def test_last_level_cache_counts_each_instance_once(tmp_path: Path) -> None:
    for cpu in range(4):  # two L3 slices of 32 MiB, each shared by two CPUs (an EPYC's CCXs)
        _cache(tmp_path, cpu, 0, 1, "Data", "32K", str(cpu))
        _cache(tmp_path, cpu, 1, 1, "Instruction", "32K", str(cpu))
        _cache(tmp_path, cpu, 2, 2, "Unified", "1024K", str(cpu))
        _cache(tmp_path, cpu, 3, 3, "Unified", "32768K", "0-1" if cpu < 2 else "2-3")
    assert last_level_cache_bytes(tmp_path) == 64 * 2**20
    assert last_level_cache_bytes(tmp_path / "absent") is None


@pytest.mark.parametrize(
    ("llc_mib", "quick", "expected"),
    [(32, False, 544), (480, False, 960), (0, False, 544), (480, True, 32)],  # 0: sysfs silent
)
def test_default_cycle_is_twice_the_last_level_cache(llc_mib: int, quick: bool, expected: int) -> None:
    assert bench_kernels.default_cycle_mib(quick, llc_mib * 2**20) == expected


def test_a_tiny_run_records_the_machine_and_compares_with_dense(tmp_path: Path) -> None:
    out = tmp_path / "kernels.json"
    argv = ["--shapes", "256x128", "--ms", "1,3", "--threads", "1", "--impls", "ours,dense_bf16"]
    argv += ["--cycle-mib", "1", "--budget", "0.01", "--quick", "--json", str(out)]
    assert bench_kernels.main(argv) == 0
    rows = json.loads(out.read_text())
    (machine,) = [r for r in rows if r["impl"] == "machine"]
    assert machine["cycle_mib"] == 1 and machine["model_name"]
    assert set(machine["flags"]) <= set(bench_kernels.MATRIX_FLAGS)
    timed = [r for r in rows if "M" in r]
    assert {(r["impl"], r["M"]) for r in timed} == {(i, m) for i in ("ours", "dense_bf16") for m in (1, 3)}
    for r in timed:
        assert r["ms"] > 0
        if r["impl"] == "ours":
            assert r["speedup_vs_dense"] > 0


def test_dense_without_amx_runs_in_a_child_capped_below_amx(monkeypatch: pytest.MonkeyPatch) -> None:
    # oneDNN reads its ISA cap once per process: the rows must come from a child started with it.
    seen: dict = {}

    def fake_run(argv: list[str], env: dict, **kwargs) -> object:
        seen.update(argv=argv, env=env)
        rows = [
            {"impl": "dense_bf16", "K": 64, "N": 32, "M": 1, "threads": 1, "ms": 2.0, "speedup_vs_dense": 1.0}
        ]
        rows.append({"impl": "bandwidth", "threads": 1, "gbps": 9.0})
        return type("Done", (), {"stdout": json.dumps(rows)})()

    monkeypatch.setattr(bench_kernels.subprocess, "run", fake_run)
    monkeypatch.setattr(bench_kernels, "cpu_description", lambda: {"flags": ["amx_bf16", "avx512_bf16"]})
    rows = bench_kernels.noamx_rows([(64, 32)], [1], [1], 8, 0.01, None)
    assert seen["env"]["ONEDNN_MAX_CPU_ISA"] == "AVX512_CORE_BF16"
    assert seen["argv"][seen["argv"].index("--impls") + 1] == "dense_bf16"
    assert rows == [{"impl": "dense_bf16_noamx", "K": 64, "N": 32, "M": 1, "threads": 1, "ms": 2.0}]
    # Without AMX, dense_bf16 is already without it: no child, no rows.
    monkeypatch.setattr(bench_kernels, "cpu_description", lambda: {"flags": ["avx512_bf16"]})
    assert bench_kernels.noamx_rows([(64, 32)], [1], [1], 8, 0.01, None) == []
