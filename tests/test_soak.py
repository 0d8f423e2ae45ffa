"""The server soak (``awq-plugin bench soak``) in its bounded CI mode, and its pure parts.

One ``vllm serve --quantization awq`` of the quantized default model (eager mode: fast start)
takes 64 concurrent clients for 30 s; the tests then read the report that
:func:`awq_plugin.tools.soak.run_soak` returns, the same one the full run prints. The parsers and
statistics of the soak are also tested without a server, on hand-made answers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import pytest
from kernel_oracle import auto_kernel_here

from awq_plugin.tools import soak, soak_answers, soak_memory
from awq_plugin.tools.server import VllmServer

# 30 s of load; shorter answers than the full run's (up to 32 tokens, not 128) so that the
# requests in flight at the end drain in seconds on 2 shared cores.
CI_SETTINGS = soak.SoakSettings(
    duration_s=30.0,
    clients=64,
    max_requests=5000,
    prompt_tokens=(4, 512),
    output_tokens=(1, 32),
    greedy_tokens=16,
)
START_TIMEOUT_S = 420  # typical start-up is 30-60 s; the first run also builds the CPU kernel


# ---------------------------------------------------------------------------------------------
# Pure parts: answer checks, statistics
# ---------------------------------------------------------------------------------------------

SPEC = soak_answers.RequestSpec(
    kind="stream",
    prompt=(5, 6, 7),
    chat_text=None,
    max_tokens=3,
    stream=True,
    ignore_eos=True,
    temperature=0.8,
)


def completion_events(tokens: list[list[int]], finish: str = "length") -> list[str]:
    """The SSE lines vLLM sends for a streamed completion of SPEC's prompt."""
    lines = []
    for i, ids in enumerate(tokens):
        choice = {"index": 0, "text": "x" * len(ids), "token_ids": ids, "finish_reason": None}
        if i == 0:
            choice["prompt_token_ids"] = list(SPEC.prompt)
        if i == len(tokens) - 1:
            choice["finish_reason"] = finish
        lines.append("data: " + json.dumps({"id": "c1", "object": "text_completion", "choices": [choice]}))
        lines.append("")
    n = sum(len(ids) for ids in tokens)
    usage = {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}
    lines.append(
        "data: " + json.dumps({"id": "c1", "object": "text_completion", "choices": [], "usage": usage})
    )
    return [*lines, "data: [DONE]"]


def feed(lines: list[str], spec: soak_answers.RequestSpec = SPEC) -> soak_answers.StreamChecker:
    checker = soak_answers.StreamChecker(spec, vocab_size=100)
    for line in lines:
        checker.feed_line(line)
    checker.finish()
    return checker


def test_a_well_formed_stream_passes_and_yields_its_tokens() -> None:
    checker = feed(completion_events([[1], [2, 3]]))
    assert checker.token_ids == [1, 2, 3] and checker.finish_reason == "length"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda lines: lines[:-1], r"before data: \[DONE\]"),
        (lambda lines: [*lines, "data: {}"], "after"),
        (lambda lines: [lines[0].replace('"token_ids": [1]', '"token_ids": [100]'), *lines[1:]], "below 100"),
        (lambda lines: [lines[0].replace("[5, 6, 7]", "[5, 6, 8]"), *lines[1:]], "not the one sent"),
        (lambda lines: [lines[0].replace('"c1"', '"c2"'), *lines[1:]], "ids differ"),
        (lambda lines: [lines[0].replace("data: ", "data:"), *lines[1:]], "not an SSE data line"),
        (lambda lines: [lines[0][:-3], *lines[1:]], "not JSON"),
        (
            lambda lines: [
                line.replace('"completion_tokens": 3', '"completion_tokens": 2') for line in lines
            ],
            "usage",
        ),
    ],
    ids=["no-done", "after-done", "token-id", "prompt", "id", "framing", "json", "usage"],
)
def test_a_malformed_stream_is_named(mutate, message: str) -> None:
    with pytest.raises(soak_answers.MalformedResponse, match=message):
        feed(mutate(completion_events([[1], [2, 3]])))


def test_ignore_eos_requires_exactly_max_tokens() -> None:
    with pytest.raises(soak_answers.MalformedResponse, match="ignore_eos"):
        feed(completion_events([[1, 2]], finish="stop"))
    feed(
        completion_events([[1, 2]], finish="stop"),
        spec=soak_answers.RequestSpec(**{**SPEC.__dict__, "ignore_eos": False}),
    )


def test_memory_drift_compares_the_window_after_warmup_with_the_last_one() -> None:
    # 100 s at 1 Hz: 1000 MiB during warm-up growth, then flat at 2000 with a late +40.
    samples = [
        (float(t), (1000 + 10 * t if t < 20 else 2000 + (40 if t >= 80 else 0)) * soak_memory.MIB)
        for t in range(101)
    ]
    drift = soak_memory.memory_drift(samples, duration_s=100, warmup_s=20, window_s=20)
    assert drift.baseline_bytes == 2000 * soak_memory.MIB
    assert drift.final_bytes == 2040 * soak_memory.MIB
    assert drift.drift_fraction == pytest.approx(0.02)
    with pytest.raises(ValueError, match="do not fit"):
        soak_memory.memory_drift(samples, duration_s=30, warmup_s=20, window_s=10)


def test_percentile_interpolates() -> None:
    assert soak.percentile([], 50) is None
    assert soak.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert soak.percentile([0.0, 10.0], 99) == pytest.approx(9.9)


def test_requests_held_reads_running_and_waiting_from_metrics() -> None:
    text = (
        '# HELP vllm:num_requests_running ...\nvllm:num_requests_running{engine="0",model_name="m"} 2.0\n'
        'vllm:num_requests_waiting{engine="0",model_name="m"} 1.0\n'
        'vllm:num_requests_waiting_by_reason{engine="0",reason="capacity"} 1.0\n'
    )
    assert soak.requests_held(text) == 3.0
    assert soak.requests_held("nothing here") is None


def test_the_soak_refuses_a_server_off_loopback() -> None:
    soak.check_loopback("http://127.0.0.1:8000")
    with pytest.raises(ValueError, match="loopback"):
        soak.check_loopback("http://10.0.0.5:8000")


# ---------------------------------------------------------------------------------------------
# The bounded soak against the real server
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def soak_model_dir(default_model_rtn_g64: Path) -> Path:
    """The default model quantized by plain rounding (uint4, group 64), as the full soak serves it."""
    return default_model_rtn_g64


class SoakRun(NamedTuple):
    report: dict
    server_log: str


@pytest.fixture(scope="module")
def soak_run(vllm_launch: None, soak_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> SoakRun:
    """Serve, soak for 30 s with 64 clients, stop the server; the report and the server's log."""
    pool = soak.PromptPool.from_model(soak_model_dir)
    log = tmp_path_factory.mktemp("soak-server") / "vllm-serve.log"
    args = soak.server_args(CI_SETTINGS.clients, eager=True)
    with VllmServer(soak_model_dir, log, args, startup_timeout=START_TIMEOUT_S) as server:
        report = soak.run_soak(server.base_url, server.model, server.process.pid, pool, CI_SETTINGS)
        return SoakRun(report, server.log_text())


@pytest.fixture(scope="module")
def soak_report(soak_run: SoakRun) -> dict:
    return soak_run.report


@pytest.mark.full  # 64 clients for 30 s on a server of its own: make test-all
def test_soak_completes_requests_without_errors(soak_run: SoakRun) -> None:
    requests = soak_run.report["requests"]
    assert requests["errors"] == 0, soak_run.report["error_samples"]
    assert requests["completed"] >= 64, requests  # at least one round of every client
    by_kind = dict(requests["by_kind"])
    assert by_kind.pop("disconnect")["disconnected"] > 0, "no client disconnected mid-stream"
    assert all(counts["ok"] > 0 for counts in by_kind.values()), by_kind
    assert f"awq-plugin: AwqPluginLinearMethod using kernel '{auto_kernel_here()}'" in soak_run.server_log


@pytest.mark.full  # 64 clients for 30 s on a server of its own: make test-all
def test_server_stays_up_and_releases_every_request(soak_report: dict) -> None:
    assert soak_report["server_alive"]
    assert soak_report["idle_after_load_s"] is not None, "requests still held after the load ended"


@pytest.mark.full  # 64 clients for 30 s on a server of its own: make test-all
def test_greedy_repeats_under_load_equal_the_single_request_or_a_near_tie(soak_report: dict) -> None:
    greedy = soak_report["greedy"]
    assert greedy["repeats"] >= 8, greedy
    assert not greedy["mismatches"], greedy["mismatches"]


@pytest.mark.full  # 64 clients for 30 s on a server of its own: make test-all
def test_server_memory_stays_flat_after_warmup(soak_report: dict) -> None:
    memory = soak_report["memory"]
    assert memory["drift_fraction"] < CI_SETTINGS.max_drift_fraction, memory


@pytest.mark.full  # 64 clients for 30 s on a server of its own: make test-all
def test_report_prints_as_json_and_draws(soak_report: dict, tmp_path: Path) -> None:
    summary = json.loads(soak.summary_json(soak_report))
    assert summary["passed"], summary["properties"]
    assert {"p50", "p99"} <= summary["latency_ms"].keys() and summary["ttft_ms"]["p50"] is not None
    png = tmp_path / "soak.png"
    soak.plot(soak_report, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
