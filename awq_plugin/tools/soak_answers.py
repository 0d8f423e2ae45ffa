"""What a well-formed answer of ``vllm serve`` to a soak request is (OpenAI protocol, vLLM's fields).

Pure checks on parsed JSON and SSE lines; they raise :class:`MalformedResponse` naming the
first thing wrong. Used by :mod:`awq_plugin.tools.soak` on every answer it reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

SAMPLED_TOP_P = 0.95


class MalformedResponse(Exception):
    """A server answer that breaks the OpenAI protocol or contradicts the request."""


@dataclass(frozen=True)
class RequestSpec:
    """One request a client sends (plain data, drawn from the client's seeded stream)."""

    kind: str  # one of awq_plugin.tools.soak.KINDS
    prompt: tuple[int, ...]  # token ids (completions); empty for chat
    chat_text: str | None  # the user message (chat)
    max_tokens: int
    stream: bool
    ignore_eos: bool
    temperature: float  # 0: greedy; else sampled with top-p SAMPLED_TOP_P
    disconnect_after: int | None = None  # chunks with tokens to read before closing the connection
    greedy_index: int | None = None  # which greedy request this repeats


def request_body(spec: RequestSpec, model: str) -> tuple[str, dict[str, Any]]:
    """The endpoint path and JSON body of a request."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": spec.max_tokens,
        "temperature": spec.temperature,
        "ignore_eos": spec.ignore_eos,
        "return_token_ids": True,
    }
    if spec.temperature > 0:
        body["top_p"] = SAMPLED_TOP_P
    if spec.stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    if spec.chat_text is not None:
        return "/v1/chat/completions", body | {"messages": [{"role": "user", "content": spec.chat_text}]}
    return "/v1/completions", body | {"prompt": list(spec.prompt)}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise MalformedResponse(message)


def check_token_ids(value: Any, vocab_size: int, what: str) -> list[int]:
    _require(
        isinstance(value, list) and all(isinstance(t, int) and 0 <= t < vocab_size for t in value),
        f"{what} is not a list of token ids below {vocab_size}: {str(value)[:120]}",
    )
    return value


def check_finish(spec: RequestSpec, finish_reason: Any, tokens: int, usage: Any, prompt_tokens: int) -> None:
    """The end of an answer: finish reason, token count and usage agree with each other and the request."""
    _require(finish_reason in ("length", "stop"), f"finish_reason {finish_reason!r}")
    _require(tokens >= 1, "no token generated")
    if finish_reason == "length" or spec.ignore_eos:
        _require(
            finish_reason == "length" and tokens == spec.max_tokens,
            f"{tokens} tokens with finish_reason {finish_reason!r} for max_tokens {spec.max_tokens}"
            + (" and ignore_eos" if spec.ignore_eos else ""),
        )
    _require(tokens <= spec.max_tokens, f"{tokens} tokens > max_tokens {spec.max_tokens}")
    _require(isinstance(usage, dict), f"usage missing: {usage!r}")
    _require(
        usage.get("completion_tokens") == tokens,
        f"usage.completion_tokens {usage.get('completion_tokens')} != {tokens} tokens received",
    )
    _require(
        usage.get("prompt_tokens") == prompt_tokens,
        f"usage.prompt_tokens {usage.get('prompt_tokens')} != {prompt_tokens}",
    )
    _require(usage.get("total_tokens") == prompt_tokens + tokens, f"usage.total_tokens wrong: {usage}")


class StreamChecker:
    """Checks a streamed answer event by event; :meth:`finish` checks the whole.

    Completions and chat completions share the framing: ``data: {json}`` events of one id and
    object type, one choice with index 0 per event, token ids on every event that carries text,
    exactly one finish reason, then one usage event with no choices, then ``data: [DONE]``.
    """

    def __init__(self, spec: RequestSpec, vocab_size: int) -> None:
        self.spec = spec
        self.vocab_size = vocab_size
        self.chat = spec.chat_text is not None
        self.object = "chat.completion.chunk" if self.chat else "text_completion"
        self.id: str | None = None
        self.token_ids: list[int] = []
        self.prompt_token_ids: list[int] | None = None
        self.finish_reason: str | None = None
        self.usage: dict | None = None
        self.done = False
        self.role_seen = False

    def feed_line(self, line: str) -> int:
        """One SSE line; returns how many tokens it carried."""
        if not line.strip():
            return 0
        _require(not self.done, f"data after [DONE]: {line[:120]}")
        _require(line.startswith("data: "), f"not an SSE data line: {line[:120]}")
        payload = line[len("data: ") :]
        if payload == "[DONE]":
            self.done = True
            return 0
        try:
            event = json.loads(payload)
        except json.JSONDecodeError as exc:
            raise MalformedResponse(f"event is not JSON ({exc.msg}): {payload[:120]}") from None
        _require(isinstance(event, dict), f"event is not an object: {payload[:120]}")
        return self.feed_event(event)

    def feed_event(self, event: dict) -> int:
        _require(self.usage is None, "event after the usage event")
        _require(event.get("object") == self.object, f"object {event.get('object')!r} != {self.object!r}")
        self.id = self.id or event.get("id")
        _require(isinstance(self.id, str) and event.get("id") == self.id, "event ids differ within a stream")
        if self.chat and event.get("prompt_token_ids") is not None:
            _require(self.prompt_token_ids is None, "prompt_token_ids sent twice")
            self.prompt_token_ids = check_token_ids(event["prompt_token_ids"], self.vocab_size, "prompt")
        choices = event.get("choices")
        _require(isinstance(choices, list), "choices missing")
        if not choices:
            _require(self.finish_reason is not None, "usage event before the finish reason")
            self.usage = event.get("usage")
            _require(isinstance(self.usage, dict), "an event without choices carries no usage")
            return 0
        _require(len(choices) == 1 and choices[0].get("index") == 0, f"choices {str(choices)[:120]}")
        _require(self.finish_reason is None, "a choice after the finish reason")
        choice = choices[0]
        if self.chat:
            delta = choice.get("delta")
            _require(isinstance(delta, dict), "chat event without delta")
            if delta.get("role") is not None:
                _require(delta["role"] == "assistant" and not self.role_seen, f"role {delta['role']!r}")
                self.role_seen = True
            text = delta.get("content")
            _require(text is None or isinstance(text, str), "content is not a string")
        else:
            _require(isinstance(choice.get("text"), str), "text is not a string")
            if choice.get("prompt_token_ids") is not None:
                _require(self.prompt_token_ids is None, "prompt_token_ids sent twice")
                self.prompt_token_ids = check_token_ids(choice["prompt_token_ids"], self.vocab_size, "prompt")
                _require(
                    tuple(self.prompt_token_ids) == self.spec.prompt, "the prompt echoed is not the one sent"
                )
        new = check_token_ids(choice.get("token_ids") or [], self.vocab_size, "token_ids")
        self.token_ids += new
        self.finish_reason = choice.get("finish_reason")
        return len(new)

    def finish(self) -> None:
        _require(self.done, "stream ended before data: [DONE]")
        _require(self.prompt_token_ids is not None, "the prompt's token ids were not returned")
        if self.chat:
            _require(self.role_seen, "no assistant role in the chat stream")
        check_finish(
            self.spec, self.finish_reason, len(self.token_ids), self.usage, len(self.prompt_token_ids)
        )


def check_plain_completion(spec: RequestSpec, answer: Any, vocab_size: int) -> list[int]:
    """A non-streamed completion; returns its token ids."""
    _require(isinstance(answer, dict), "answer is not a JSON object")
    _require(answer.get("object") == "text_completion", f"object {answer.get('object')!r}")
    choices = answer.get("choices")
    _require(isinstance(choices, list) and len(choices) == 1, f"choices {str(choices)[:120]}")
    choice = choices[0]
    _require(choice.get("index") == 0 and isinstance(choice.get("text"), str), "choice index or text wrong")
    prompt = check_token_ids(choice.get("prompt_token_ids"), vocab_size, "prompt_token_ids")
    _require(tuple(prompt) == spec.prompt, "the prompt echoed is not the one sent")
    tokens = check_token_ids(choice.get("token_ids"), vocab_size, "token_ids")
    check_finish(spec, choice.get("finish_reason"), len(tokens), answer.get("usage"), len(spec.prompt))
    return tokens
