"""One request, from its first send to its end: ordering by seq, de-duplication, resending with
the same id, pinning a pooled conversation to its node, the one retry after `node_lost`. Runs in
the caller's thread or task, fed by the connection's sink: its state needs no lock."""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from ..protocol import (
    REQUEST_OPTIONS,
    ChunkMessage,
    DoneMessage,
    ErrorCode,
    ErrorMessage,
    NodeState,
    ReplyMessage,
    StartMessage,
    encode,
)
from .connection import Arrived, Connection, Item, LinkEvent, Sink
from .functions import tool_dicts


class EdgeError(Exception):
    """A reply that ended with an `error` message: `code` is the protocol's error code
    (docs/protocol.md, Errors), `retry_after` the seconds to wait for `rate_limited`."""

    def __init__(self, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call the model made: answer it with {"tool_call_id": id, "content": ...} in the
    next request's tool_results (EdgeClient.run_tools does)."""

    id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Reply:
    """A whole reply: its text (or the tool calls it made), why it ended, its token counts,
    and who served it."""

    text: str
    finish_reason: str  # stop, length, cancelled or tool_calls
    usage: dict[str, int]  # prompt_tokens, completion_tokens, cached_tokens
    node: str
    request_id: str
    model: str = ""
    timings: dict[str, float | None] = field(default_factory=dict)  # ttft_ms, tokens_per_s
    tool_calls: tuple[ToolCall, ...] = ()  # finish_reason tool_calls: the calls, in order


# -- one request, from its first send to its end ------------------------------------------------

# Refusals that say nothing about a request the node already holds: answering a resend, they
# only mean "not now" (limits are checked before duplicates), and the reply goes on.
REFUSALS: Final = frozenset(
    {
        ErrorCode.BUSY,
        ErrorCode.RATE_LIMITED,
        ErrorCode.SHUTTING_DOWN,
        ErrorCode.TOO_MANY_CONVERSATIONS,
    }
)


class Pins:
    """Which node a pooled conversation's follow-ups go to: the one named in its first `start`,
    while that node is not offline (its history is there)."""

    def __init__(self, core: Connection, node: str | None, group: str) -> None:
        self._core = core
        self.node = node  # None: the client asks the pool
        self.group = group
        self._pins: dict[str, str] = {}  # conversation id -> the node that holds its history

    def pinned(self, conversation_id: str) -> str | None:
        return self._pins.get(conversation_id)

    def target_for(self, conversation_id: str, reset: bool) -> str:
        if self.node is not None:
            return self.node
        pinned = self._pins.get(conversation_id)
        if reset or pinned is None:
            return self.group  # a fresh conversation may go to any node
        status = self._core.status(pinned)
        if status is not None and status.state == NodeState.OFFLINE:
            # Its history is out of reach; waiting in its session would be worse than
            # starting afresh on a node that is there.
            self._pins.pop(conversation_id, None)
            return self.group
        return pinned

    def pin(self, conversation_id: str, node: str) -> None:
        self._pins[conversation_id] = node

    def unpin(self, conversation_id: str) -> None:
        self._pins.pop(conversation_id, None)


class Exchange:
    """Sends a request, resends it, and turns its messages into texts and an end.

    Fed by the caller's thread or task only: its state needs no lock."""

    def __init__(
        self,
        core: Connection,
        pins: Pins,
        body: dict[str, Any],
        sink: Sink,
        on_restart: Callable[[], None] | None,
    ) -> None:
        self._pins = pins
        self._core = core
        self._body = body
        self._sink = sink
        self._on_restart = on_restart
        self.conversation_id: str = body["conversation_id"]
        self.pooled = pins.node is None
        self.target = pins.target_for(self.conversation_id, bool(body.get("reset")))
        self.retried_lost = False
        self.restarts = 0
        self.ready: deque[str] = deque()  # chunk texts in order, not yet handed out
        self.reply: Reply | None = None
        self.failure: BaseException | None = None
        self._new_generation()

    def _new_generation(self) -> None:
        self.request_id = uuid.uuid4().hex
        self._body["request_id"] = self.request_id
        self._payload = encode(self._body)
        self._seen: dict[int, tuple[bytes, ReplyMessage]] = {}
        self._next = 0  # the next seq to take
        self._handed = 0  # chunk texts the caller has had
        self.start: StartMessage | None = None
        self._texts: list[str] = []
        self._last_heard = self._last_sent = time.monotonic()

    @property
    def ended(self) -> bool:
        return self.reply is not None or self.failure is not None

    def send(self) -> None:
        self._core.register(self.request_id, self._sink, self.target, len(self._payload))
        self._publish(self.target)

    def _publish(self, target: str) -> None:
        self._last_sent = time.monotonic()
        self._core.send_request(target, self.request_id, self._payload)

    def resend(self) -> None:
        """The same request id again: a finished reply is replayed byte for byte, one in flight
        goes on, one that was lost (crash, broker) is generated afresh. A pooled request that a
        node took goes to that node: through the pool it could reach a second node."""
        pooled_to = self.start.node if self.pooled and self.start is not None else None
        self._publish(pooled_to or self.target)

    def wait(self, timeout: float | None) -> float:
        """Seconds to wait for the next message; resends after `resend_after` seconds of
        silence; TimeoutError after `timeout` seconds without any message of the reply."""
        now = time.monotonic()
        if timeout is not None and now - self._last_heard >= timeout:
            self.abandon()
            raise TimeoutError(f"no message of request {self.request_id} for {timeout:g} s")
        resend_at = max(self._last_heard, self._last_sent) + self._core.resend_after
        if now >= resend_at:
            self.resend()
            resend_at = now + self._core.resend_after
        if timeout is not None:
            resend_at = min(resend_at, self._last_heard + timeout)
        return max(0.0, resend_at - now)

    # -- messages -------------------------------------------------------------------------------

    def feed(self, item: Item) -> None:
        if self.ended:
            return
        if item is LinkEvent.RECONNECTED:
            self.resend()
            return
        if item is LinkEvent.CLOSED:
            self._fail(ConnectionError("the client was closed"))
            return
        assert isinstance(item, Arrived)
        message = item.message
        if message.request_id not in (self.request_id, None):
            return  # an earlier generation's, after a node_lost retry
        self._last_heard = time.monotonic()
        seen = self._seen.get(message.seq)
        if seen is not None:
            if seen[0] == item.payload:
                return  # QoS 1 redelivery or a replay: the very same message
            if isinstance(message, ErrorMessage) and message.code in REFUSALS:
                return  # a resend refused; the reply it asked about is still coming
            self._diverged(message.seq)
        self._seen[message.seq] = (item.payload, message)
        generation = self.request_id
        while not self.ended and self._next in self._seen:
            seq = self._next
            self._next += 1  # before taking it: a node_lost retry starts over from seq 0
            self._take(self._seen[seq][1])
        if (
            isinstance(message, ErrorMessage)
            and not self.ended
            and self.request_id == generation  # not already taken and retried
            and message.seq >= self._next
        ):
            # An error is final whatever gap precedes it: another node's node_lost is numbered
            # past any seq the lost reply reached, and the messages between never come.
            self._next = message.seq + 1
            self._take(message)

    def _diverged(self, seq: int) -> None:
        """A different message under a seq already seen: the node lost the reply (a crash) and
        generated the request again after a resend. The two agree before `seq`; from there on
        only the new one counts."""
        for stale in [s for s in self._seen if s >= seq]:
            del self._seen[stale]
        if seq >= self._next:
            return  # not taken yet: nothing to undo
        self._next = seq
        self._texts = [
            m.text for _, (_, m) in sorted(self._seen.items()) if isinstance(m, ChunkMessage)
        ]
        if self.start is not None and self.start.seq >= seq:
            self.start = None
        if self._handed > len(self._texts):  # the caller has had text that no longer holds
            self._restarted()
        self.ready = deque(self._texts[self._handed :])

    def _restarted(self) -> None:
        self.restarts += 1
        self._handed = 0
        if self._on_restart is not None:
            self._on_restart()

    def _take(self, message: ReplyMessage) -> None:
        if isinstance(message, StartMessage):
            self.start = message
            if self.pooled:
                self._pins.pin(self.conversation_id, message.node)
        elif isinstance(message, ChunkMessage):
            self._texts.append(message.text)
            self.ready.append(message.text)
        elif isinstance(message, DoneMessage):
            self.reply = Reply(
                text="".join(self._texts),
                finish_reason=message.finish_reason,
                usage=dict(message.usage),
                node=self.start.node if self.start is not None else "",
                request_id=self.request_id,
                model=self.start.model if self.start is not None else "",
                timings=dict(message.timings),
                tool_calls=tuple(
                    ToolCall(str(c["id"]), str(c["name"]), dict(c["arguments"]))
                    for c in message.tool_calls or ()
                ),
            )
            self._core.unregister(self.request_id)
        elif message.code == ErrorCode.NODE_LOST and self.pooled and not self.retried_lost:
            self._retry_on_pool()
        else:
            self._fail(EdgeError(message.code, message.message, message.retry_after))

    def _retry_on_pool(self) -> None:
        """Once: the node serving this pooled request went away; ask the pool again, as a new
        request (the lost reply's seqs would otherwise mix with the new one's)."""
        self.retried_lost = True
        self._pins.unpin(self.conversation_id)
        self._core.unregister(self.request_id)
        if self._handed:
            self._restarted()
        self.ready.clear()
        self.target = self._pins.group
        self._new_generation()
        self.send()

    def _fail(self, error: BaseException) -> None:
        self.failure = error
        self._core.unregister(self.request_id)

    def hand_out(self) -> str:
        self._handed += 1
        return self.ready.popleft()

    def abandon(self) -> None:
        """The caller stopped reading before the end: stop the node generating for nobody."""
        if not self.ended:
            self.cancel()
            self._fail(EdgeError("cancelled", "the caller stopped reading the reply"))

    def cancel(self) -> None:
        self._core.send_cancel(self.target, self.request_id)


def request_body(
    prompt: str | None,
    conversation_id: str,
    options: dict[str, Any],
) -> dict[str, Any]:
    """A request's JSON body: the envelope and every option that is set (protocol.REQUEST_OPTIONS,
    the fields ChatRequest declares); None is not sent, the node's default applies. `prompt`
    None: no message (a request with tool_results); `tools` may hold plain functions."""
    unknown = set(options) - REQUEST_OPTIONS
    if unknown:
        raise TypeError(f"unknown request field(s): {', '.join(sorted(unknown))}")
    body: dict[str, Any] = {"request_id": "", "conversation_id": conversation_id}
    if prompt is not None:
        body["message"] = prompt
    for key, value in options.items():
        if value is None or (key == "reset" and value is False):
            continue
        if key == "tools":
            body[key] = tool_dicts(value)
        elif key in ("stop", "tool_results"):
            body[key] = list(value)
        else:
            body[key] = value
    return body
