"""Build the CPU kernel on first use, cached per source, flags, torch and CPU.

Nothing here runs at import time: :func:`load_extension` compiles
``awq_gemm.cpp`` with ``torch.utils.cpp_extension.load`` the first time it is
called, into ``$AWQ_PLUGIN_CACHE/kernels`` (default ``~/.cache/awq_plugin/kernels``)
under a directory named by a hash of everything that changes the binary. A
file lock serialises concurrent builds (two test workers, or a server's
processes) so that nobody loads a half-written ``.so``.

The build uses the torch that is already imported; it never installs
anything, so it cannot pull a different (CUDA) torch.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import platform
from collections.abc import Collection, Iterator
from pathlib import Path
from types import ModuleType

import torch

from awq_plugin.cpuinfo import cpu_flags
from awq_plugin.fsutil import cache_base

SOURCE = Path(__file__).with_name("awq_gemm.cpp")
EXTENSION_NAME = "awq_plugin_cpu_kernels"
AVX2_SOURCE = Path(__file__).with_name("awq_gemm_avx2.cpp")
AVX2_EXTENSION_NAME = "awq_plugin_cpu_avx2_kernels"
PORTABLE_SOURCE = Path(__file__).with_name("awq_gemm_portable.cpp")
PORTABLE_EXTENSION_NAME = "awq_plugin_cpu_portable_kernels"
SEARCH_SOURCE = Path(__file__).with_name("search_ops.cpp")
SEARCH_EXTENSION_NAME = "awq_plugin_cpu_search_ops"
TORCH_BATON = "lock"  # the file torch.utils.cpp_extension waits on while another build runs

# The instruction sets the AVX-512 path needs (names as in /proc/cpuinfo).
AVX512_VNNI_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")


def has_avx512_vnni(flags: frozenset[str] | None = None) -> bool:
    """Whether the CPU runs the AVX-512 VNNI kernel."""
    flags = cpu_flags() if flags is None else flags
    return all(f in flags for f in AVX512_VNNI_FLAGS)


# The instruction sets the AMX path needs on top of those (int8 tiles).
AMX_INT8_FLAGS = ("amx_tile", "amx_int8")


def has_amx_int8(flags: Collection[str] | None = None) -> bool:
    """Whether the CPU has the AVX-512 VNNI kernel and the int8 AMX tiles of its batch path."""
    flags = cpu_flags() if flags is None else frozenset(flags)
    return has_avx512_vnni(flags) and all(f in flags for f in AMX_INT8_FLAGS)


def compile_flags(flags: frozenset[str] | None = None) -> list[str]:
    """Compiler flags for this CPU.

    ``-march=native`` would tie the cache to the build host anyway; the
    explicit ``-m`` flags make the chosen instruction set visible and part of
    the cache key. Without AVX-512 VNNI the portable path is compiled (and the
    auto backend chooses the reference instead, see ``kernels.choose_backend``).
    """
    flags = cpu_flags() if flags is None else flags
    out = ["-O3", "-fopenmp", "-DNDEBUG"]
    if platform.machine() in ("x86_64", "AMD64"):
        if has_avx512_vnni(flags):
            out += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma", "-mf16c"]
            if "avx512_bf16" in flags:
                out.append("-mavx512bf16")
            if has_amx_int8(flags):  # the kernel's AMX path (tdpbssd); chosen at run time by M
                out += ["-mamx-tile", "-mamx-int8"]
        elif "avx2" in flags:
            out += ["-mavx2", "-mfma", "-mf16c"]
    return out


def cache_root() -> Path:
    """Where built kernels live: ``kernels/`` under the cache base (``$AWQ_PLUGIN_CACHE``)."""
    return cache_base() / "kernels"


def avx2_compile_flags() -> list[str]:
    """Compiler flags for ``awq_gemm_avx2.cpp``: AVX2, FMA and F16C only, also on AVX-512 hosts.

    Never ``-mavx512*``: the kernel tested and benchmarked on an AVX-512 machine is
    then the very code an AVX2-only CPU runs. Its AVX-VNNI inner product gets
    ``avxvnni`` from a function attribute and runs only where the CPU has it.
    """
    return ["-O3", "-fopenmp", "-DNDEBUG", "-mavx2", "-mfma", "-mf16c"]


def portable_compile_flags() -> list[str]:
    """Compiler flags for ``awq_gemm_portable.cpp``: whatever vector unit this CPU has.

    ``-march=native`` (``-mcpu=native`` on ARM, where GCC spells it so) lets the
    compiler lower the kernel's generic vectors to NEON, AVX2 or AVX-512 as the
    host allows; the CPU's flags are part of the cache key (:func:`build_key`).
    """
    out = ["-O3", "-fopenmp", "-DNDEBUG"]
    if platform.machine() in ("aarch64", "arm64", "ppc64le"):
        out.append("-mcpu=native")
    else:
        out.append("-march=native")
    return out


def build_key(cflags: list[str], source: Path = SOURCE) -> str:
    """Hash of everything that changes the binary or its build command: source (bytes and path),
    the headers beside it (``awq_common.h``, which every kernel includes), flags, torch (version
    and location), Python, CPU.

    The paths matter: torch writes them into ``build.ninja``, so two checkouts (or two
    virtualenvs) sharing one cache directory would make ninja rebuild on every alternate load.
    """
    h = hashlib.sha256()
    h.update(source.read_bytes())
    h.update(str(source.resolve()).encode())
    for header in sorted(source.parent.glob("*.h")):  # an edited header must rebuild too
        h.update(header.name.encode())
        h.update(header.read_bytes())
    h.update(str(Path(torch.__file__).resolve().parent).encode())
    h.update(" ".join(cflags).encode())
    h.update(torch.__version__.encode())
    h.update(platform.python_version().encode())
    h.update(platform.machine().encode())
    if any(f.endswith("=native") for f in cflags):  # the binary is this CPU's
        h.update(" ".join(sorted(cpu_flags())).encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@functools.cache
def load_extension(verbose: bool = False) -> ModuleType:
    """Compile (first call per cache key) and import the CPU kernel extension.

    Raises whatever the compiler raises; callers that want a fallback catch it
    (see ``kernels.cpu_kernel_available``).
    """
    return _build(EXTENSION_NAME, SOURCE, compile_flags(), verbose)


@functools.cache
def load_avx2_extension(verbose: bool = False) -> ModuleType:
    """Compile (first call per cache key) and import the AVX2 / AVX-VNNI kernel (x86 only)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        raise RuntimeError(f"the AVX2 kernel needs an x86-64 CPU; this is {platform.machine()}")
    return _build(AVX2_EXTENSION_NAME, AVX2_SOURCE, avx2_compile_flags(), verbose)


@functools.cache
def load_portable_extension(verbose: bool = False) -> ModuleType:
    """Compile (first call per cache key) and import the generic C++ kernel (any CPU)."""
    return _build(PORTABLE_EXTENSION_NAME, PORTABLE_SOURCE, portable_compile_flags(), verbose)


def search_compile_flags() -> list[str]:
    """Compiler flags for ``search_ops.cpp``: the portable kernel's, and no contraction of a
    multiply and an add into one rounding (its results must equal PyTorch's step by step)."""
    return [*portable_compile_flags(), "-ffp-contract=off"]


@functools.cache
def load_search_extension(verbose: bool = False) -> ModuleType:
    """Compile (first call per cache key) and import the quantizer's fused search steps (any CPU)."""
    return _build(SEARCH_EXTENSION_NAME, SEARCH_SOURCE, search_compile_flags(), verbose)


def _build(name: str, source: Path, cflags: list[str], verbose: bool) -> ModuleType:
    from torch.utils import cpp_extension

    build_dir = cache_root() / build_key(cflags, source)
    build_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(build_dir / "build.lock"):
        # torch's own build baton is a plain file that a killed build leaves
        # behind, after which every later load waits on it forever. Our flock
        # (released by the kernel when its holder dies) already serialises
        # builds, so a baton found while we hold it is stale.
        (build_dir / TORCH_BATON).unlink(missing_ok=True)
        return cpp_extension.load(
            name=name,
            sources=[str(source)],
            extra_cflags=cflags,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            verbose=verbose,
        )
