"""Shared fixtures: the default model and tiny random checkpoints, built once per session."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

# Keep vLLM's KV cache small and its logs quiet in every process the tests start.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]

# `make test` runs two pytest-xdist workers on the machine's two cores: each computes on one
# thread, and so do the CLI runs it starts (two threads per worker would oversubscribe the cores;
# small ops then spend their time in OpenMP hand-offs). Tests that need more threads set them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# Marks that follow the fixtures, and a check that they are right
# ---------------------------------------------------------------------------------------------
#
# ``vllm``: the test starts a vLLM process (a server or an offline engine), itself or through
# a fixture. It is never written by hand: every way to start vLLM goes through the
# ``vllm_launch`` fixture (directly, or through a fixture that depends on it, such as a shared
# server), and collection marks each test whose fixture closure holds it. While the suite runs,
# every subprocess the test process starts is looked at: a test that starts vLLM without the
# mark fails, so a missing dependency cannot hide.
#
# ``full``: runs only in ``make test-all`` (long kills, soak, tensor parallel, full
# calibration, second and third variants of a route ``make test`` already covers). Written
# at the test, with the reason beside it.

VLLM_FIXTURE = "vllm_launch"
# Programs that start vLLM: the CLI, and the scripts that build an offline ``vllm.LLM``.
VLLM_PROGRAMS = frozenset(
    {"vllm", "vllm_generate.py", "vllm_generate_models.py", "quantize_on_start_generate.py"}
)
_launched_vllm: set[str] = set()  # node ids of the tests that started vLLM
_current_test: list[str] = [""]


@pytest.fixture(scope="session")
def vllm_launch() -> None:
    """Depend on this fixture (directly or through another) to start vLLM in a test.

    It does nothing itself: depending on it is what marks the test ``vllm`` (see above), so
    ``make test`` / ``-m "not vllm"`` select by what a test really does.
    """
    return None


MARKS = {
    "vllm": "starts vLLM (set from the vllm_launch fixture, never by hand)",
    "full": "runs only in make test-all (long kills, soak, tensor parallel, full calibration)",
    "gpu": "needs a CUDA device (skipped on machines without one)",
}


def pytest_configure(config: pytest.Config) -> None:
    for name, meaning in MARKS.items():
        config.addinivalue_line("markers", f"{name}: {meaning}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if VLLM_FIXTURE in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.vllm)


def starts_vllm(args: str | Sequence[str]) -> bool:
    """Whether a subprocess command line runs vLLM (its program or its script argument)."""
    argv = [args] if isinstance(args, str | os.PathLike) else list(args)
    return any(Path(str(a)).name in VLLM_PROGRAMS for a in argv[:2])


_popen_init = subprocess.Popen.__init__


def _recording_popen_init(self, args, *rest, **kwargs):
    if starts_vllm(args):
        _launched_vllm.add(_current_test[0])
    _popen_init(self, args, *rest, **kwargs)


# subprocess has no hook to observe the processes a test starts; wrapping Popen (which
# subprocess.run uses too) is the one place every launch passes through.
subprocess.Popen.__init__ = _recording_popen_init


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    _current_test[0] = item.nodeid
    yield
    _current_test[0] = ""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    yield
    if item.nodeid in _launched_vllm and item.get_closest_marker("vllm") is None:
        pytest.fail(
            f"{item.nodeid} started vLLM without depending on the '{VLLM_FIXTURE}' fixture, so it "
            "is not marked 'vllm' and 'make test' cannot select it correctly",
            pytrace=False,
        )


@pytest.fixture(scope="session", autouse=True)
def private_model_cache(tmp_path_factory: pytest.TempPathFactory):
    """Models quantized on load or on start during the tests go to a temporary cache, not the
    user's; the CPU kernel builds stay shared (a link to the user's kernels/), so a session does
    not rebuild them. Subprocesses (vllm serve, the CLI) inherit the variable."""
    from awq_plugin.fsutil import CACHE_ENV, cache_base

    if CACHE_ENV in os.environ:  # the caller chose a cache: use it as it is
        yield
        return
    kernels = cache_base() / "kernels"
    kernels.mkdir(parents=True, exist_ok=True)
    base = tmp_path_factory.mktemp("awq-plugin-cache")
    (base / "kernels").symlink_to(kernels, target_is_directory=True)
    os.environ[CACHE_ENV] = str(base)
    yield
    os.environ.pop(CACHE_ENV, None)


@pytest.fixture(scope="session")
def default_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded SmolLM2-135M-Instruct, written as an fp16 transformers folder."""
    from awq_plugin.tools.default_model import write_default_model

    return write_default_model(tmp_path_factory.mktemp("models") / "smollm2-135m")


@pytest.fixture(scope="session")
def default_model_rtn_g64(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    """The default model as an AWQ-format checkpoint by plain rounding, uint4, group 64 (hidden
    576 is not a multiple of 128): written once, served by every test that only needs *a* real
    quantized model (the endpoint, kernel-path and soak servers)."""
    from awq_plugin.tools.bench_serve import rtn_quantize

    return rtn_quantize(default_model_dir, tmp_path_factory.mktemp("served") / "smollm2-awq-g64", 64)


@pytest.fixture(scope="session")
def tiny_llama_fp(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    """A 2-layer random Llama (hidden 256) with the default model's tokenizer, in fp16."""
    from awq_plugin.tools import synthetic

    model = synthetic.make_model(synthetic.make_config("tiny-llama"), seed=0, weight_std=1.0)
    return synthetic.write_model(tmp_path_factory.mktemp("tiny") / "tiny-llama-fp", model, default_model_dir)


@pytest.fixture(scope="session")
def tiny_llama_awq(tmp_path_factory: pytest.TempPathFactory, tiny_llama_fp: Path) -> Path:
    """``tiny_llama_fp`` quantized by plain rounding (uint4, group 64) and written by our writer."""
    from awq_plugin.config import AwqQuantConfig
    from awq_plugin.format.packing import write_packed_model
    from awq_plugin.runtime.modeling import load_fp_model

    model = load_fp_model(tiny_llama_fp, dtype=torch.float32)
    out = tmp_path_factory.mktemp("tiny") / "tiny-llama-awq"
    return write_packed_model(model, out, AwqQuantConfig(bits=4, group_size=64), source_dir=tiny_llama_fp)


@pytest.fixture(scope="session")
def tiny_llama_awq_sym(tmp_path_factory: pytest.TempPathFactory, tiny_llama_fp: Path) -> Path:
    """``tiny_llama_fp`` rounded to symmetric int4, group 64 (every zero point 8): the form
    GPTQ's v1 layout and stock vLLM's GPTQ path take."""
    from awq_plugin.config import AwqQuantConfig
    from awq_plugin.format.packing import write_packed_model
    from awq_plugin.runtime.modeling import load_fp_model

    model = load_fp_model(tiny_llama_fp, dtype=torch.float32)
    out = tmp_path_factory.mktemp("tiny") / "tiny-llama-awq-sym"
    return write_packed_model(
        model, out, AwqQuantConfig(bits=4, group_size=64, zero_point=False), source_dir=tiny_llama_fp
    )


@pytest.fixture(scope="session")
def tiny_llama_compensated(tmp_path_factory: pytest.TempPathFactory, tiny_llama_fp: Path) -> Path:
    """``tiny_llama_fp`` through AWQ with compensated rounding (uint4, group 64; 32 x 64 tokens,
    half of them held out for the per-block choices), written by the pipeline."""
    from awq_plugin.algorithm.awq import AwqOptions
    from awq_plugin.config import AwqQuantConfig
    from awq_plugin.pipeline.quantize import quantize_checkpoint

    # test_awq_algorithm's fast options; 128 of the 32 x 64 tokens searched, as many held out
    options = AwqOptions(
        n_grid=10,
        clip_grid=10,
        search_tokens=128,
        clip_tokens=256,
        micro_batch_size=4,
        rounding="compensated",
        # the one-recording walk: on this random toy the re-recorded runs lose to nearest rounding
        # in every block, and this fixture must hold compensated integers (the stock-vLLM tests)
        sequential=False,
    )
    out = tmp_path_factory.mktemp("tiny") / "tiny-llama-compensated"
    quantize_checkpoint(
        tiny_llama_fp,
        out,
        AwqQuantConfig(bits=4, group_size=64),
        n_samples=32,
        seq_len=64,
        options=options,
        guard="warn",  # a random model: every variant is as bad as the next on real text
        progress=False,
    )
    return out
