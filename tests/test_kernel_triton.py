"""Correctness of the Triton AWQ kernel against ``awq_plugin.numerics.quant_ref.linear_ref``.

There is no GPU here, so the kernel is checked in two ways that need none:

- **interpreter**: the kernel runs on CPU tensors under ``TRITON_INTERPRET=1``;
- **compile-only**: the real compiler lowers it to CUDA (sm_80, sm_90) and ROCm (gfx942)
  binaries, for every autotune config, which catches what the interpreter tolerates
  (bad layouts, shared memory overflow, a 16-bit dot that misses the tensor cores).

``TRITON_INTERPRET`` is read when a kernel is decorated, i.e. when triton_awq is imported,
and must not leak into other test modules that share this pytest process. So this file
never imports Triton itself: it runs itself as a script in subprocesses (``python
test_kernel_triton.py interpret|compile OUT [case ids]``), two interpreter workers in
parallel (this machine has two cores) and one compile worker, and the tests assert on
the JSON those write. The one test that runs the compiled kernel needs a CUDA device.

Error bound (per output element). With ``S = sum_k |x_k w_k| + |b|``, u32 = 2^-24:
- products: when a K tile lies inside one group the kernel multiplies the integers
  ``q - z`` (exact) and scales after the dot, so every product is exact in fp32; when a
  tile spans groups it rounds ``(q - z) * s`` to the activation dtype first, adding up
  to ``eps(dtype) / 2 * S``;
- accumulation: the kernel and the reference each sum K fp32 terms (then scale and add
  bias): together at most ``(2K + 8) * u32 * S``;
- output: both results are rounded to the activation dtype; two roundings of nearby
  values differ by at most ``eps(dtype) * |y|`` plus their distance before rounding,
  and the smallest subnormal near zero.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from awq_plugin.numerics import pack, quant_ref

U32 = 2.0**-24  # unit roundoff of fp32
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Case:
    """One interpreter run: shapes, quantization scheme, activation dtype and launch options."""

    m: int
    k: int
    n: int
    group_size: int  # -1 = per-channel
    dtype: str  # key of DTYPES
    zero_point: bool  # False = symmetric (every zero is 8)
    bias: bool
    split_k: int
    block_k: int = 32  # 64 with group size 32 reaches the path that dequantizes before the dot
    layout: str = "2d"  # "2d" contiguous, "3d_strided" [B, T, K] with K stride 2, "transposed"

    @property
    def id(self) -> str:
        g = "pc" if self.group_size == -1 else f"g{self.group_size}"
        return (
            f"m{self.m}-k{self.k}-n{self.n}-{g}-{self.dtype}-{'zp' if self.zero_point else 'sym'}"
            f"-{'bias' if self.bias else 'nobias'}-sk{self.split_k}-bk{self.block_k}-{self.layout}"
        )


def _build_cases() -> list[Case]:
    # Every (M, dtype, scheme) combination; shapes, bias and split-K are drawn for each
    # from a fixed-seed generator, so they meet in many combinations with few cases.
    rng = random.Random(20240611)
    kg = [(96, 32), (192, 64), (320, 32), (320, 64), (320, -1), (96, -1)]
    cases = []
    for m in (1, 2, 7, 16, 33):
        for dtype in DTYPES:
            for zero_point in (True, False):
                k, g = rng.choice(kg)
                n = rng.choice([24, 40, 72])
                cases.append(Case(m, k, n, g, dtype, zero_point, rng.random() < 0.5, rng.choice([1, 2, 3])))
    # Group size 32 under 64-wide K tiles: several groups per tile (dequantize-then-dot).
    for dtype in DTYPES:
        cases.append(Case(7, 192, 72, 32, dtype, True, True, 1, block_k=64))
        cases.append(Case(33, 320, 40, 32, dtype, False, False, 2, block_k=64))
    cases += [
        Case(5, 96, 72, -1, "fp16", True, True, 2, block_k=64),  # per-channel, K tail masked
        Case(3, 96, 24, 32, "fp32", True, True, 4),  # more splits than K tiles: one is empty
        Case(129, 192, 40, 64, "bf16", True, True, 1),  # several M tiles, M tail
        Case(6, 192, 40, 64, "fp16", True, True, 2, layout="3d_strided"),
        Case(7, 320, 24, 64, "bf16", False, False, 1, layout="transposed"),
    ]
    return cases


CASES = _build_cases()


def _make_inputs(case: Case) -> dict[str, Any]:
    """Deterministic weights and activations for a case (seeded by its id)."""
    gen = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    dtype = DTYPES[case.dtype]
    w = torch.randn(case.n, case.k, generator=gen)  # (N, K)
    gq = quant_ref.quantize(w, bits=4, group_size=case.group_size, zero_point=case.zero_point)
    packed = pack.pack(gq)
    if case.layout == "3d_strided":
        assert case.m % 2 == 0
        # (2, M/2, 2K) -> every other column: a (2, M/2, K) view with K stride 2.
        x = torch.randn(2, case.m // 2, 2 * case.k, generator=gen).to(dtype)[..., ::2]
    elif case.layout == "transposed":
        x = torch.randn(case.k, case.m, generator=gen).to(dtype).t()  # (M, K), M stride 1
    else:
        x = torch.randn(case.m, case.k, generator=gen).to(dtype)
    bias = torch.randn(case.n, generator=gen).to(dtype) if case.bias else None
    return {"x": x, "gq": gq, "packed": packed, "bias": bias}


def error_bound(
    x: torch.Tensor,
    gq: quant_ref.GroupQuantized,
    bias: torch.Tensor | None,
    y_ref: torch.Tensor,
    weight_rounded: bool,
) -> torch.Tensor:
    """Largest admissible |y_kernel - y_ref| per output element (see the module docstring)."""
    k = x.shape[-1]
    w = quant_ref.dequantize(gq.q, gq.scales, gq.zeros, gq.group_size, torch.float64)  # (N, K)
    s = x.double().abs().reshape(-1, k) @ w.abs().t()  # (M, N)
    if bias is not None:
        s = s + bias.double().abs()
    s = s.reshape(y_ref.shape)
    info = torch.finfo(x.dtype)
    bound = (2 * k + 8) * U32 * s  # fp32 accumulation, kernel and reference
    if weight_rounded:
        bound = bound + info.eps / 2 * s
    bound = bound + info.eps * y_ref.double().abs() + info.smallest_normal * info.eps  # output rounding
    return bound * (1 + 1e-6)  # slack for the bound's own fp64 rounding


def _run_case(case: Case) -> dict[str, Any]:
    from awq_plugin.kernels.triton_awq import TileConfig, awq_gemm_triton

    inp = _make_inputs(case)
    x, gq, packed, bias = inp["x"], inp["gq"], inp["packed"], inp["bias"]
    t0 = time.perf_counter()
    y = awq_gemm_triton(
        x,
        packed.qweight,
        packed.qzeros,
        packed.scales,
        case.group_size,
        bias,
        split_k=case.split_k,
        config=TileConfig(block_m=16, block_n=64, block_k=case.block_k),
    )
    seconds = time.perf_counter() - t0
    y_ref = quant_ref.linear_ref(x, gq.q, gq.scales, gq.zeros, gq.group_size, bias)
    g = case.k if case.group_size == -1 else case.group_size
    weight_rounded = not (g == case.k or g % case.block_k == 0)
    bound = error_bound(x, gq, bias, y_ref, weight_rounded)
    err = (y.double() - y_ref.double()).abs()
    return {
        "shape": list(y.shape),
        "dtype": str(y.dtype),
        "expected_shape": list(y_ref.shape),
        "expected_dtype": str(y_ref.dtype),
        "max_ratio": float((err / bound).max()),
        "max_err": float(err.max()),
        "mean_bound_rel": float((bound / y_ref.double().abs().clamp(min=1e-3)).mean()),
        "finite": bool(torch.isfinite(y).all()),
        "seconds": seconds,
    }


def _interpreter_checks() -> dict[str, str]:
    """Edge behaviour under the interpreter: '' when it holds, else what went wrong."""
    from awq_plugin.kernels.triton_awq import awq_gemm_triton

    case = Case(4, 96, 24, 32, "fp16", True, False, 1)
    inp = _make_inputs(case)
    p = inp["packed"]
    out: dict[str, str] = {}
    y = awq_gemm_triton(inp["x"][:0], p.qweight, p.qzeros, p.scales, 32)
    out["empty_m"] = "" if tuple(y.shape) == (0, 24) and y.dtype == torch.float16 else f"got {tuple(y.shape)}"
    bad_calls = {
        "wrong_group_size": lambda: awq_gemm_triton(inp["x"], p.qweight, p.qzeros, p.scales, 64),
        "group_size_not_dividing_k": lambda: awq_gemm_triton(inp["x"], p.qweight, p.qzeros, p.scales, 40),
        "wrong_k": lambda: awq_gemm_triton(inp["x"][:, :64], p.qweight, p.qzeros, p.scales, 32),
        "wrong_bias": lambda: awq_gemm_triton(inp["x"], p.qweight, p.qzeros, p.scales, 32, inp["x"][0]),
        "int_activations": lambda: awq_gemm_triton(inp["x"].int(), p.qweight, p.qzeros, p.scales, 32),
        "bad_split_k": lambda: awq_gemm_triton(inp["x"], p.qweight, p.qzeros, p.scales, 32, split_k=0),
    }
    for name, call in bad_calls.items():
        try:
            call()
            out[name] = "no error raised"
        except (ValueError, TypeError):
            out[name] = ""
    return out


def _compile_checks() -> dict[str, str]:
    """Lower the kernel with the real compiler (no GPU needed) and check the result."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    from awq_plugin.kernels import triton_awq

    kernel = triton_awq._awq_gemm_kernel
    out: dict[str, str] = {}

    def compile_one(target: GPUTarget, xdt: str, meta: dict[str, Any], warps: int, stages: int) -> Any:
        ydt = xdt if meta["SPLIT_K"] == 1 else "fp32"
        sig = {name: "i32" for name in kernel.arg_names}
        sig.update(x_ptr=f"*{xdt}", qweight_ptr="*i32", qzeros_ptr="*i32", scales_ptr="*fp16")
        sig.update(bias_ptr=f"*{xdt}", y_ptr=f"*{ydt}")
        sig.update({name: "constexpr" for name in meta})
        constexprs = {(kernel.arg_names.index(name),): value for name, value in meta.items()}
        src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
        return triton.compile(src, target=target, options={"num_warps": warps, "num_stages": stages})

    base = {"HAS_BIAS": True, "DOT_PRECISION": "ieee", "GROUP_M": 8}
    variants = {  # (activation dtype, kernel meta)
        "fp16_g128": (
            "fp16",
            {"GROUP_SIZE": 128, "SINGLE_GROUP": False, "SPLIT_K": 1, "DOT_DTYPE": tl.float16},
        ),
        "bf16_g32_split4": (
            "bf16",
            {"GROUP_SIZE": 32, "SINGLE_GROUP": False, "SPLIT_K": 4, "DOT_DTYPE": tl.bfloat16},
        ),
        "fp32_perchannel": (
            "fp32",
            {"GROUP_SIZE": 4096, "SINGLE_GROUP": True, "SPLIT_K": 1, "DOT_DTYPE": tl.float32},
        ),
    }
    # Every shipped autotune config, on the first GPU generation it targets (sm_80).
    sm80 = GPUTarget("cuda", 80, 32)
    for cfg in triton_awq._autotune_configs():
        tiles = {k: cfg.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
        name = "sm80_fp16_" + "x".join(str(v) for v in tiles.values())
        xdt, meta = variants["fp16_g128"]
        try:
            binary = compile_one(sm80, xdt, {**base, **meta, **tiles}, cfg.num_warps, cfg.num_stages)
            problems = []
            if "mma.sync" not in binary.asm["ptx"]:
                problems.append("fp16 dot did not use mma.sync")
            if binary.metadata.shared > 99 * 1024:  # the smallest sm_8x opt-in limit (sm_86/89)
                problems.append(f"{binary.metadata.shared} B of shared memory")
            out[name] = "; ".join(problems)
        except Exception as exc:  # report, do not stop the other configs
            out[name] = f"{type(exc).__name__}: {str(exc)[:500]}"
    # Each code path (scale after the dot, dequantize before it, split-K atomics, fp32)
    # on Hopper and on AMD CDNA3.
    tiles = {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 64}
    for target_name, target in (
        ("sm90", GPUTarget("cuda", 90, 32)),
        ("gfx942", GPUTarget("hip", "gfx942", 64)),
    ):
        for variant, (xdt, meta) in variants.items():
            try:
                compile_one(target, xdt, {**base, **meta, **tiles}, 4, 2)
                out[f"{target_name}_{variant}"] = ""
            except Exception as exc:
                out[f"{target_name}_{variant}"] = f"{type(exc).__name__}: {str(exc)[:500]}"

    # Without the interpreter, CPU tensors must be refused with a clear message.
    case = Case(2, 96, 24, 32, "fp16", True, False, 1)
    inp = _make_inputs(case)
    p = inp["packed"]
    try:
        triton_awq.awq_gemm_triton(inp["x"], p.qweight, p.qzeros, p.scales, 32)
        out["cpu_tensors_refused"] = "no error raised"
    except RuntimeError as exc:
        out["cpu_tensors_refused"] = "" if "TRITON_INTERPRET" in str(exc) else f"unclear message: {exc}"
    return out


def _worker_main(argv: list[str]) -> int:
    """Subprocess entry: ``interpret OUT [--checks] [ids...]`` or ``compile OUT``; writes JSON to OUT."""
    mode, out_path, *ids = argv
    if mode == "interpret":
        by_id = {c.id: c for c in CASES}
        result: dict[str, Any] = {"cases": {i: _run_case(by_id[i]) for i in ids if i != "--checks"}}
        result["checks"] = _interpreter_checks() if "--checks" in ids else {}
    elif mode == "compile":
        result = {"checks": _compile_checks()}
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    Path(out_path).write_text(json.dumps(result))
    return 0


# --------------------------------------------------------------------------- pytest side

WORKER_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the interpreter (two halves in parallel) and compile workers; merge their JSON."""
    tmp = tmp_path_factory.mktemp("triton_workers")
    # A private compile cache: every run compiles from scratch, as on a clean CI machine.
    base_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    base_env["TRITON_CACHE_DIR"] = str(tmp / "triton_cache")
    interp_env = {**base_env, "TRITON_INTERPRET": "1"}
    ids = [c.id for c in CASES]
    jobs = {
        "interp0": (["interpret", ["--checks", *ids[0::2]]], interp_env),
        "interp1": (["interpret", ids[1::2]], interp_env),
        "compile": (["compile", []], base_env),
    }
    procs = {}
    for name, ((mode, job_ids), env) in jobs.items():
        out = tmp / f"{name}.json"
        cmd = [sys.executable, __file__, mode, str(out), *job_ids]
        procs[name] = (
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
            out,
        )
    merged: dict[str, Any] = {"cases": {}, "checks": {}, "errors": {}}
    for name, (proc, out) in procs.items():
        try:
            _, stderr = proc.communicate(timeout=WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
        if proc.returncode != 0 or not out.exists():
            merged["errors"][name] = f"exit code {proc.returncode}:\n{stderr[-4000:]}"
            continue
        data = json.loads(out.read_text())
        merged["cases"].update(data.get("cases", {}))
        merged["checks"].update(data.get("checks", {}))
    return merged


def _worker_error(results: dict[str, Any], worker: str) -> None:
    if worker in results["errors"]:
        pytest.fail(f"worker {worker} failed: {results['errors'][worker]}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_interpreter_matches_reference(case: Case, worker_results: dict[str, Any]) -> None:
    if case.id not in worker_results["cases"]:
        for worker in ("interp0", "interp1"):
            _worker_error(worker_results, worker)
        pytest.fail(f"no result for {case.id}")
    r = worker_results["cases"][case.id]
    assert r["shape"] == r["expected_shape"] and r["dtype"] == r["expected_dtype"], r
    assert r["finite"], r
    assert r["max_ratio"] <= 1.0, f"error exceeds the bound by {r['max_ratio']:.3g}x: {r}"


def test_interpreter_edge_cases(worker_results: dict[str, Any]) -> None:
    _worker_error(worker_results, "interp0")
    checks = worker_results["checks"]
    names = ("empty_m", "wrong_group_size", "group_size_not_dividing_k", "wrong_k", "wrong_bias")
    for name in (*names, "int_activations", "bad_split_k"):
        assert checks.get(name) == "", f"{name}: {checks.get(name, 'not run')}"


def test_compiles_for_cuda_and_rocm(worker_results: dict[str, Any]) -> None:
    _worker_error(worker_results, "compile")
    checks = {k: v for k, v in worker_results["checks"].items() if k.startswith(("sm80", "sm90", "gfx942"))}
    assert len(checks) >= 12 + 6, sorted(checks)
    failed = {k: v for k, v in checks.items() if v}
    assert not failed, failed


def test_cpu_tensors_refused_without_interpreter(worker_results: dict[str, Any]) -> None:
    _worker_error(worker_results, "compile")
    assert worker_results["checks"].get("cpu_tensors_refused") == "", worker_results["checks"].get(
        "cpu_tensors_refused"
    )


def test_without_triton_import_works_and_call_explains(monkeypatch: pytest.MonkeyPatch) -> None:
    """Importing the module must not need Triton; calling it must say what is missing."""
    import importlib.util

    import awq_plugin.kernels

    # None in sys.modules makes `import triton` raise ImportError, as if it were absent.
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    path = Path(awq_plugin.kernels.__file__).with_name("triton_awq.py")
    spec = importlib.util.spec_from_file_location("_triton_awq_without_triton", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    assert module.is_available() is False
    x = torch.zeros(1, 8)
    with pytest.raises(RuntimeError, match="triton"):
        module.awq_gemm_triton(x, torch.zeros(8, 1, dtype=torch.int32), None, None, 8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_kernel_on_gpu() -> None:
    """The compiled, autotuned kernel on realistic shapes (split-K by heuristic and forced)."""
    from awq_plugin.kernels.triton_awq import awq_gemm_triton, is_available

    assert is_available()
    torch.manual_seed(0)
    shapes = ((4096, 4096, 128), (576, 1536, 64), (1536, 576, -1), (4096, 1032, 32))
    for (k, n, g), dtype in itertools.product(shapes, (torch.float16, torch.bfloat16)):
        w = torch.randn(n, k)
        for zero_point in (True, False):
            gq = quant_ref.quantize(w, bits=4, group_size=g, zero_point=zero_point)
            p = pack.pack(gq)
            qweight, qzeros, scales = (t.cuda() for t in (p.qweight, p.qzeros, p.scales))
            for m in (1, 16, 129, 512):
                for split_k in (None, 4):
                    x = torch.randn(m, k).to(dtype)
                    bias = torch.randn(n).to(dtype)
                    y = awq_gemm_triton(
                        x.cuda(), qweight, qzeros, scales, g, bias.cuda(), split_k=split_k
                    ).cpu()
                    y_ref = quant_ref.linear_ref(x, gq.q, gq.scales, gq.zeros, gq.group_size, bias)
                    # The autotuner keeps K tiles inside one group for these group sizes.
                    bound = error_bound(x, gq, bias, y_ref, weight_rounded=False)
                    ratio = float(((y.double() - y_ref.double()).abs() / bound).max())
                    assert ratio <= 1.0, (k, n, g, dtype, zero_point, m, split_k, ratio)


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
