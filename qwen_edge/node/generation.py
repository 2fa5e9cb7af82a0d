"""One request's decoding in a slot: its prompt, sampler, text and counts, from start to end.

A Generation is made fresh when a slot takes a request and closed once, by the scheduler's one
release path, however the request ends (done, error, cancel, fault). What outlives the request,
the KV cells and whose they are, stays with the slot.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import structlog

from ..protocol import FinishReason
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

    def done(self, reason: FinishReason) -> None:
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
