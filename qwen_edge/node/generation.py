"""One request's decoding in a slot: its prompt, sampler, text and counts, from start to end.

A Generation is made fresh when a slot takes a request and closed once, by the scheduler's one
release path, however the request ends (done, error, cancel, fault). What outlives the request,
the KV cells and whose they are, stays with the slot.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from ..protocol import FinishReason
from ..toolcalls import CALL_OPEN, ToolCall, ToolGrammar, new_call_id, parse_calls
from .decoder import TokenSampler
from .text import StopStrings, TextAssembler

if TYPE_CHECKING:
    from .scheduler import Job

log = structlog.get_logger("qwen_edge.node.scheduler")


class Generation:
    """The per-request state of a slot. The scheduler reads and bumps the counters on the token
    path directly: attributes, not properties, as this runs once per token."""

    __slots__ = (
        "_ended_at",
        "_reply",
        "_stops",
        "_text",
        "dropped",
        "fed",
        "first_token_at",
        "generated",
        "grammar_debt",
        "grammar_seen",
        "job",
        "max_tokens",
        "next_token",
        "prompt",
        "reused",
        "sampler",
        "system",
    )

    def __init__(
        self,
        job: Job,
        prompt: list[int],
        sampler: TokenSampler,
        *,
        reused: int,  # leading prompt tokens whose KV the slot already holds
        max_tokens: int,
        system: str | None,  # the conversation's system prompt (None: the node's)
        dropped: int,  # old turns left out of the prompt to fit it
    ) -> None:
        self.job = job
        self.prompt = prompt
        self.sampler = sampler
        self.reused = reused
        self.fed = reused  # prompt tokens evaluated so far
        self.next_token = -1  # sampled, not yet evaluated; -1 while reading the prompt
        self.generated = 0
        self.max_tokens = max_tokens
        self.system = system
        self.dropped = dropped
        self.first_token_at: float | None = None
        # Grammar time (seconds) beyond the request's share of the loop's (scheduler._charge),
        # and the sampler's grammar time already settled.
        self.grammar_debt = 0.0
        self.grammar_seen = 0.0
        self._text = TextAssembler()
        stop = job.request.stop
        self._stops = StopStrings(stop) if stop else None  # None: no stop strings to look for
        self._reply: list[str] = []
        self._ended_at = 0.0

    def emit(self, piece: bytes) -> bool:
        """Count a generated token and publish whatever complete text it yields; True when a
        stop string ended the reply."""
        self.generated += 1
        text = self._text.push(piece)
        stops = self._stops
        if stops is not None and text:
            text = stops.push(text)
        if text:
            self._reply.append(text)
            self.job.stream.chunk(text)
        return stops is not None and stops.hit

    def finish(self) -> str:
        """Publish the text held back (an unfinished character, a possible stop string's start),
        stop the clock, and return the whole reply."""
        self._ended_at = time.monotonic()
        tail = self._text.flush()
        if self._stops is not None:
            tail = self._stops.flush(tail)
        if tail:
            self._reply.append(tail)
            self.job.stream.chunk(tail)
        return "".join(self._reply)

    def done(self, reason: FinishReason, tool_calls: list[dict[str, Any]] | None = None) -> None:
        """Send `done` with the usage and timings (call finish() first), and log the request."""
        job = self.job
        first = self.first_token_at
        ttft_ms = (first - job.received) * 1000 if first else None
        decode_s = self._ended_at - first if first else 0.0
        tokens_per_s = (self.generated - 1) / decode_s if self.generated > 1 and decode_s else None
        job.stream.done(
            reason,
            len(self.prompt),
            self.generated,
            ttft_ms,
            tokens_per_s,
            cached_tokens=self.reused,
            tool_calls=tool_calls,
        )
        log.info(
            "request_done",
            request_id=job.request.request_id,
            client_id=job.client_id,
            conversation_id=job.request.conversation_id,
            finish_reason=reason.value,
            prompt_tokens=len(self.prompt),
            reused_tokens=self.reused,
            completion_tokens=self.generated,
            ttft_ms=None if ttft_ms is None else round(ttft_ms, 1),
            tokens_per_s=None if tokens_per_s is None else round(tokens_per_s, 1),
        )

    def close(self) -> None:
        """Free the sampler; the one cleanup, whatever ended the request."""
        self.sampler.close()


class ToolGeneration(Generation):
    """A request whose reply may be tool calls (its grammar: toolcalls.wrap_grammar). The
    reply's first character decides: `<` opens a call, and from then on nothing is streamed
    (chunks never carry call markup; `done` carries the calls); anything else is text, which
    the grammar keeps free of call markup, streamed as usual. Under `required` or a named
    tool it can only be calls. Plain requests never pay for this: they get a Generation."""

    __slots__ = ("_calling",)

    def __init__(self, *args: Any, calls_only: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._calling: bool | None = True if calls_only else None  # None: undecided

    def emit(self, piece: bytes) -> bool:
        self.generated += 1
        text = self._text.push(piece)
        if not text:
            return False
        if self._calling is None:
            self._calling = text.startswith(CALL_OPEN[0])
        self._reply.append(text)
        if not self._calling:
            self.job.stream.chunk(text)
        return False

    def finish(self) -> str:
        self._ended_at = time.monotonic()
        tail = self._text.flush()
        if tail:
            self._reply.append(tail)
            if not self._calling:
                self.job.stream.chunk(tail)
        return "".join(self._reply)

    @classmethod
    def kind(cls, spec: object) -> Callable[..., Generation]:
        """What a request's Generation is, by what its grammar is made from (Job.spec): with
        tools a ToolGeneration, else the plain one."""
        if not isinstance(spec, ToolGrammar):
            return Generation
        return functools.partial(cls, calls_only=spec.calls_only)

    @property
    def calling(self) -> bool:
        """Whether the reply is calls (so far: nothing of it was streamed)."""
        return bool(self._calling)

    def calls(self, reply: str) -> list[ToolCall] | None:
        """The calls a finished reply made, each with a new id; None for a text reply or one
        cut short (max_tokens) before its calls were complete."""
        if not self._calling:
            return None
        parsed = parse_calls(reply)
        if parsed is None:
            return None
        return [ToolCall(new_call_id(), name, arguments) for name, arguments in parsed]
