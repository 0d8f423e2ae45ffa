"""``bench block-cost``: its forward-equivalent arithmetic and its JSON, on a tiny block.

No timing is asserted (speed is measured by the benchmark, never by a test): the figures must
only be consistent with each other.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from awq_plugin.tools import bench_block_cost as bench

CPUINFO = """processor\t: 0
model name\t: Some CPU 9000
flags\t\t: fpu sse avx512f avx512_bf16

processor\t: 1
model name\t: Other
flags\t\t: fpu
"""


def test_forward_equivalents_divide_by_the_floor() -> None:
    assert bench.forward_equivalents(12.0, 4.0) == 3.0
    assert math.isnan(bench.forward_equivalents(12.0, 0.0))


def test_cpu_description_reads_the_first_processor() -> None:
    cpu = bench.cpu_description(CPUINFO)
    assert cpu["model_name"] == "Some CPU 9000"
    assert cpu["flags"] == ["avx512_bf16", "avx512f", "fpu", "sse"]
    assert cpu["avx512_bf16"] and not cpu["amx_bf16"]


def test_summary_charges_phases_against_the_chosen_floor() -> None:
    phases = {"record forward": 3.0, "search mlp": 4.0, "search mlp/forwards": 3.5}
    run = bench.summarize_run(2, {"bfloat16": 2.0, "float32": 5.0}, 8.0, phases, "bfloat16")
    assert run["fe"] == 4.0 and run["fp32_over_bf16_forward"] == 2.5
    assert [p["fe"] for p in run["phases"]] == [1.5, 2.0, 1.75]
    assert run["unaccounted_seconds"] == 1.0  # sub-phases ("a/b") are not counted twice
    other = bench.summarize_run(1, {"bfloat16": 3.0, "float32": 9.0}, 12.0, phases, "bfloat16")
    speedup = bench.thread_speedup([run, other])
    assert speedup == {"threads": [1, 2], "awq": 1.5, "floor": {"bfloat16": 1.5, "float32": 1.8}}
    assert bench.thread_speedup([run]) is None


@pytest.mark.parametrize(("search_dtype", "guard_windows"), [("float32", 0), ("bfloat16", 2)])
def test_tiny_block_run_writes_consistent_json_and_a_png(
    tmp_path: Path, search_dtype: str, guard_windows: int
) -> None:
    out, png = tmp_path / "cost.json", tmp_path / "cost.png"
    options = {"n_grid": 4, "clip_grid": 4, "search_dtype": search_dtype}
    argv = ["--hidden", "64", "--intermediate", "128", "--heads", "4", "--kv-heads", "2", "--vocab", "64"]
    argv += ["--n-samples", "4", "--seq-len", "16", "--scheme", "uint4_wo_32", "--threads", "1"]
    argv += ["--guard-windows", str(guard_windows)]
    argv += ["--options", json.dumps(options), "--json", str(out), "--png", str(png)]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["calibration"] == {"n_samples": 4, "seq_len": 16, "tokens": 64}
    assert result["options"]["search_dtype"] == search_dtype and result["speedup"] is None
    (run,) = result["runs"]
    assert run["threads"] == 1
    assert run["fe"] == pytest.approx(run["awq_seconds"] / run["floor_seconds"]["bfloat16"], rel=1e-2)
    names = [p["phase"] for p in run["phases"]]
    for expected in ("verify folds", "record forward", "search self_attn", "search mlp", "clip search"):
        assert expected in names
    assert ("guard windows" in names) == bool(guard_windows) and result["guard_windows"] == guard_windows
    assert run["unaccounted_seconds"] >= -1e-3  # the phases do not overlap
    assert run["mse_awq"] <= run["mse_rtn"]
    assert png.stat().st_size > 0


def test_fitting_the_model_times_a_block_with_both_streams(tmp_path: Path, monkeypatch) -> None:
    """With ``fit_to="model"`` the bench's block gets a full-precision stream beside its inputs,
    as every block after the first does, so its reference forward is in the time."""
    from awq_plugin.calibration.capture import InputRecorder

    real, seen = InputRecorder.run, []

    def spy(self, inputs, reference=None):
        seen.append(
            reference is not None and not all(r.equal(h) for r, h in zip(reference, inputs.hidden_states))
        )
        return real(self, inputs, reference)

    monkeypatch.setattr(InputRecorder, "run", spy)
    options = {"n_grid": 4, "clip_grid": 4, "search_dtype": "float32", "fit_to": "model"}
    argv = ["--hidden", "64", "--intermediate", "128", "--heads", "4", "--kv-heads", "2", "--vocab", "64"]
    argv += ["--n-samples", "4", "--seq-len", "16", "--scheme", "uint4_wo_32", "--threads", "1"]
    argv += [
        "--options",
        json.dumps(options),
        "--json",
        str(tmp_path / "c.json"),
        "--png",
        str(tmp_path / "c.png"),
    ]
    assert bench.main(argv) == 0
    assert seen == [True]
