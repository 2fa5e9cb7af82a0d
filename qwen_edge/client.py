"""`qwen_edge.client`: the wire protocol (docs/protocol.md) done once, for devices.

`EdgeClient` (threads) and `AsyncEdgeClient` (asyncio) share one core: a paho client whose network
thread only parses each reply message and hands it to the request it belongs to. Everything a
request needs to end well (ordering by seq, de-duplication, resending with the same id, pinning a
conversation to its node, the one retry after `node_lost`) lives in `_Exchange`, which runs in
the caller's thread or task. Imports neither llama.cpp nor systemd: a device needs neither.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import re
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Self

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import SecretStr

from . import mqttclient
from .protocol import (
    CancelRequest,
    ChunkMessage,
    DoneMessage,
    ErrorCode,
    ErrorMessage,
    NodeState,
    ReplyMessage,
    StartMessage,
    Status,
    Topics,
    WatchKind,
    encode,
    node_filters,
    parse_node_topic,
    parse_reply,
)
from .settings import MqttSettings, Settings

# Status: what node_status() returns (protocol.Status, a node's retained status).
__all__ = [
    "AsyncEdgeClient",
    "AsyncStream",
    "EdgeClient",
    "EdgeError",
    "Reply",
    "Status",
    "Stream",
]

DEFAULT_GROUP: Final = "pool"
# How long the broker keeps this client's session (subscriptions, reply messages queued for it)
# while its link is down, e.g. across a broker restart. Dropped at once by close().
SESSION_EXPIRY_S: Final = 600
SESSION: Final = mqttclient.Session(expiry_s=SESSION_EXPIRY_S)


class EdgeError(Exception):
    """A reply that ended with an `error` message: `code` is the protocol's error code
    (docs/protocol.md, Errors), `retry_after` the seconds to wait for `rate_limited`."""

    def __init__(self, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Reply:
    """A whole reply: its text, why it ended, its token counts, and who served it."""

    text: str
    finish_reason: str  # stop, length or cancelled
    usage: dict[str, int]  # prompt_tokens, completion_tokens, cached_tokens
    node: str
    request_id: str
    model: str = ""
    timings: dict[str, float | None] = field(default_factory=dict)  # ttft_ms, tokens_per_s


# -- what the network thread hands to a waiting request ------------------------------------------


@dataclass(frozen=True, slots=True)
class _Arrived:
    payload: bytes
    message: ReplyMessage


class _Event(Enum):
    """A change of the link that the waiting requests act on."""

    RECONNECTED = "reconnected"
    CLOSED = "closed"


_Item = _Arrived | _Event
Sink = Callable[[_Item], None]

_TOO_LARGE_BYTES: Final = re.compile(r"payload is (\d+) bytes")


class _Core:
    """One paho client: connects, subscribes, publishes, and routes reply messages by request id
    (or the MQTT 5 correlation data, which the node copies from the request)."""

    def __init__(
        self,
        mqtt: MqttSettings,
        client_id: str,
        prefix: str,
        resend_after: float,
    ) -> None:
        self.mqtt = mqtt
        self.client_id = client_id
        self.prefix = prefix
        self.resend_after = resend_after
        self.v5 = mqtt.protocol == "5"
        # MQTT 5: replies come to an inbox of this client object, not to every process that uses
        # the same client id (a kiosk and a terminal on one account see only their own).
        self.inbox = f"inbox-{uuid.uuid4().hex[:12]}"
        self._routes: dict[str, tuple[Sink, str, int]] = {}  # request id -> sink, target, bytes
        self._lock = threading.Lock()
        self._statuses: dict[str, Status] = {}
        self._first: queue.Queue[str | None] = queue.Queue()  # None, or why the broker refused
        self._subscribe_mid: int | None = None
        self._connected_once = False
        self.connected = threading.Event()
        # A broker that binds a device account to the client id of its name (docs/security.md)
        # refuses any other; an anonymous one lets several programs share a client_id. On 3.1.1
        # the session is not kept: replies missed across a broker restart come back by
        # resending (a replay).
        self._client = mqttclient.new_client(
            mqtt, mqttclient.client_id_for(mqtt, client_id), session=SESSION
        )
        self._client.reconnect_delay_set(min_delay=1, max_delay=10)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    # -- life cycle -----------------------------------------------------------------------------

    def connect(self, timeout: float) -> None:
        """Connect and subscribe; OSError (ConnectionError when refused) if that fails."""
        # Clean start the first time only: reconnects resume the session.
        mqttclient.connect(self._client, self.mqtt, session=SESSION)
        self._client.loop_start()
        try:
            refused = self._first.get(timeout=timeout)
        except queue.Empty:
            refused = f"no answer within {timeout:g} s"
        if refused is not None:
            self._client.disconnect()
            self._client.loop_stop()
            raise ConnectionError(f"the broker refused the connection: {refused}")

    def close(self) -> None:
        # Nothing is waiting for this session any more.
        mqttclient.disconnect(self._client, self.mqtt, end_session=True)
        self._client.loop_stop()
        with self._lock:
            sinks = [sink for sink, _, _ in self._routes.values()]
            self._routes.clear()
        for sink in sinks:
            sink(_Event.CLOSED)

    # -- requests -------------------------------------------------------------------------------

    def register(self, request_id: str, sink: Sink, target: str, size: int) -> None:
        with self._lock:
            self._routes[request_id] = (sink, target, size)

    def unregister(self, request_id: str) -> None:
        with self._lock:
            self._routes.pop(request_id, None)

    def topics(self, target: str) -> Topics:
        return Topics(self.prefix, target)

    def send_request(self, target: str, request_id: str, payload: bytes) -> None:
        properties = None
        if self.v5:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.ResponseTopic = self.topics(target).reply_namespace(self.client_id) + (
                self.inbox
            )
            properties.CorrelationData = request_id.encode()
        # QoS 1; paho queues it while the link is down and sends it on reconnect.
        self._client.publish(
            self.topics(target).request(self.client_id), payload, qos=1, properties=properties
        )

    def send_cancel(self, target: str, request_id: str) -> None:
        self._client.publish(
            self.topics(target).cancel(self.client_id),
            CancelRequest(request_id=request_id).encode(),
            qos=1,
        )

    def status(self, node: str) -> Status | None:
        return self._statuses.get(node)

    # -- paho callbacks (network thread): parse, hand over, never block ----------------------------

    def _subscriptions(self) -> list[tuple[str, int]]:
        every = self.topics("+")
        replies = every.reply(self.client_id, self.inbox if self.v5 else "#")
        return [(replies, 1), (every.error(self.client_id), 1), (node_filters(self.prefix)[0], 1)]

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:  # e.g. a wrong password
            if not self._connected_once:
                self._first.put(str(reason))
            return
        _, self._subscribe_mid = client.subscribe(self._subscriptions())
        self.connected.set()
        if self._connected_once:
            # Whatever was missed while away: every waiting request is sent again, same id.
            with self._lock:
                sinks = [sink for sink, _, _ in self._routes.values()]
            for sink in sinks:
                sink(_Event.RECONNECTED)

    def _on_disconnect(self, *args: Any) -> None:
        self.connected.clear()

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        if mid == self._subscribe_mid and not self._connected_once:
            self._connected_once = True
            refused = [str(rc) for rc in reason_codes if rc.is_failure]
            self._first.put(f"subscription refused: {refused[0]}" if refused else None)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        # An exception escaping a paho callback would stop its network thread; a message that
        # cannot be routed is not ours.
        with contextlib.suppress(Exception):
            self._route(msg)

    def _route(self, msg: paho.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        watched = parse_node_topic(self.prefix, msg.topic)
        if watched is not None:
            if watched.kind is WatchKind.STATUS:
                self._on_status(watched.name, payload)
            return
        message = parse_reply(payload)
        if message is None:
            return
        correlation = getattr(msg.properties, "CorrelationData", None) if msg.properties else None
        request_id = correlation.decode("utf-8", "replace") if correlation else message.request_id
        with self._lock:
            if request_id is not None:
                route = self._routes.get(request_id)
                sinks = [route[0]] if route is not None else []
            else:
                sinks = self._unnamed_error_sinks(msg.topic, message)
        for sink in sinks:
            sink(_Arrived(payload, message))

    def _unnamed_error_sinks(self, topic: str, message: ReplyMessage) -> list[Sink]:
        """Whose request an error without request id answers. The node names none only when it
        could not read it: the client's ids are always valid, so that is `too_large`, whose
        message states the size. (Asking the node to name the id would be better.)"""
        if not isinstance(message, ErrorMessage) or message.code != ErrorCode.TOO_LARGE:
            return []
        head, tail = f"{self.prefix}/", f"/error/{self.client_id}"
        if not (topic.startswith(head) and topic.endswith(tail)):
            return []
        target = topic[len(head) : -len(tail)]
        found = _TOO_LARGE_BYTES.search(message.message)
        size = int(found.group(1)) if found else -1
        return [
            sink
            for sink, sent_to, sent_size in self._routes.values()
            if sent_to == target and sent_size == size
        ]

    def _on_status(self, node: str, payload: bytes) -> None:
        status = Status.parse(payload)
        if status is not None:
            self._statuses[node] = status
        elif not payload:  # cleared: nothing known of the node any more
            self._statuses.pop(node, None)


# -- one request, from its first send to its end ------------------------------------------------

# Refusals that say nothing about a request the node already holds: answering a resend, they
# only mean "not now" (limits are checked before duplicates), and the reply goes on.
_REFUSALS: Final = frozenset(
    {
        ErrorCode.BUSY,
        ErrorCode.RATE_LIMITED,
        ErrorCode.SHUTTING_DOWN,
        ErrorCode.TOO_MANY_CONVERSATIONS,
    }
)


class _Pins:
    """Which node a pooled conversation's follow-ups go to: the one named in its first `start`,
    while that node is not offline (its history is there)."""

    def __init__(self, core: _Core, node: str | None, group: str) -> None:
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


class _Exchange:
    """Sends a request, resends it, and turns its messages into texts and an end.

    Fed by the caller's thread or task only: its state needs no lock."""

    def __init__(
        self,
        core: _Core,
        pins: _Pins,
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

    def feed(self, item: _Item) -> None:
        if self.ended:
            return
        if item is _Event.RECONNECTED:
            self.resend()
            return
        if item is _Event.CLOSED:
            self._fail(ConnectionError("the client was closed"))
            return
        assert isinstance(item, _Arrived)
        message = item.message
        if message.request_id not in (self.request_id, None):
            return  # an earlier generation's, after a node_lost retry
        self._last_heard = time.monotonic()
        seen = self._seen.get(message.seq)
        if seen is not None:
            if seen[0] == item.payload:
                return  # QoS 1 redelivery or a replay: the very same message
            if isinstance(message, ErrorMessage) and message.code in _REFUSALS:
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


class _StreamState:
    """What both kinds of stream tell about their reply."""

    def __init__(self, exchange: _Exchange, timeout: float | None) -> None:
        self._exchange = exchange
        self._timeout = timeout
        # A stream dropped before its end cancels the request on the node.
        self._finalizer = weakref.finalize(self, exchange.abandon)

    @property
    def request_id(self) -> str:
        return self._exchange.request_id

    @property
    def node(self) -> str | None:
        """The node serving the reply, once its `start` arrived."""
        start = self._exchange.start
        return start.node if start is not None else None

    @property
    def reply(self) -> Reply | None:
        """The whole reply, once it ended with `done`."""
        return self._exchange.reply

    @property
    def restarts(self) -> int:
        return self._exchange.restarts

    def cancel(self) -> None:
        """Ask the node to stop; the reply then ends with finish_reason `cancelled`."""
        self._exchange.cancel()

    def _next_ready(self) -> str | None:
        """A text to hand out, or None to wait; raises at the end."""
        ex = self._exchange
        if ex.ready:
            return ex.hand_out()
        if ex.failure is not None:
            raise ex.failure
        return None


class Stream(_StreamState):
    """The chunk texts of one reply as they arrive; iterate it. Raises EdgeError if the reply
    ends with an error, TimeoutError after `timeout` seconds without a message of it; `reply`
    holds the whole Reply once it ended. A stream left before its end cancels the request.

    If the reply has to start over after texts were handed out (its pooled node was lost and
    the pool asked again, or a crashed node generated it anew), `on_restart` is called and the
    texts of the new reply follow from its beginning; `restarts` counts these."""

    def __init__(
        self, exchange: _Exchange, inbox: queue.Queue[_Item], timeout: float | None
    ) -> None:
        super().__init__(exchange, timeout)
        self._inbox = inbox

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        ex = self._exchange
        while True:
            text = self._next_ready()
            if text is not None:
                return text
            if ex.reply is not None:
                raise StopIteration
            try:
                item = self._inbox.get(timeout=ex.wait(self._timeout))
            except queue.Empty:
                continue
            ex.feed(item)

    def close(self) -> None:
        """Stop reading; a reply still running is cancelled."""
        self._finalizer()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncStream(_StreamState):
    """Stream for asyncio: `async for text in stream`."""

    def __init__(
        self, exchange: _Exchange, inbox: asyncio.Queue[_Item], timeout: float | None
    ) -> None:
        super().__init__(exchange, timeout)
        self._inbox = inbox

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        ex = self._exchange
        while True:
            text = self._next_ready()
            if text is not None:
                return text
            if ex.reply is not None:
                raise StopAsyncIteration
            try:
                item = await asyncio.wait_for(self._inbox.get(), ex.wait(self._timeout))
            except TimeoutError:
                continue
            ex.feed(item)

    async def aclose(self) -> None:
        """Stop reading; a reply still running is cancelled."""
        self._finalizer()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


# The request fields stream() and ask() take besides the message and the conversation.
_FIELDS: Final = frozenset(
    {
        "max_tokens",
        "system",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "reset",
        "format",
        "stop",
        "chunk_ms",
    }
)


def _body(
    prompt: str,
    conversation_id: str,
    options: dict[str, Any],
) -> dict[str, Any]:
    unknown = set(options) - _FIELDS
    if unknown:
        raise TypeError(f"unknown request field(s): {', '.join(sorted(unknown))}")
    body: dict[str, Any] = {"request_id": "", "conversation_id": conversation_id, "message": prompt}
    for key, value in options.items():
        if value is not None and not (key == "reset" and value is False):
            body[key] = list(value) if key == "stop" else value
    return body


class EdgeClient:
    """A device's connection to qwen-edge nodes: one MQTT client, any number of requests from
    any threads. `node=None` asks the pool `group` and keeps each conversation on the node that
    served its first message (docs/client.md)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        client_id: str,
        node: str | None = None,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | Path | None = None,
        prefix: str = "qwen-edge",
        group: str = DEFAULT_GROUP,
        protocol: Literal["5", "3.1.1"] = "5",
        certfile: str | Path | None = None,
        keyfile: str | Path | None = None,
        keepalive: int = 30,
        resend_after: float = 10.0,
        connect_timeout: float = 10.0,
    ) -> None:
        """`resend_after`: seconds without a message of a reply after which its request is sent
        again (same id); `protocol` "3.1.1" works without response topics."""
        mqtt = MqttSettings(
            host=host,
            port=port,
            username=username,
            password=SecretStr(password) if password is not None else None,
            ca_file=Path(ca_file) if ca_file is not None else None,
            certfile=Path(certfile) if certfile is not None else None,
            keyfile=Path(keyfile) if keyfile is not None else None,
            protocol=protocol,
            keepalive=keepalive,
        )
        self._setup(
            mqtt,
            client_id=client_id,
            node=node,
            prefix=prefix,
            group=group,
            resend_after=resend_after,
            connect_timeout=connect_timeout,
        )

    @classmethod
    def from_settings(
        cls, settings: Settings, *, client_id: str, node: str | None, resend_after: float = 10.0
    ) -> Self:
        """A client with the broker, TLS, credentials and protocol of qwen-edge settings."""
        client = cls.__new__(cls)
        cls._setup(
            client,
            settings.mqtt,
            client_id=client_id,
            node=node,
            prefix=settings.topic_prefix,
            group=settings.fleet.group,
            resend_after=resend_after,
            connect_timeout=10.0,
        )
        return client

    def _setup(
        self,
        mqtt: MqttSettings,
        *,
        client_id: str,
        node: str | None,
        prefix: str,
        group: str,
        resend_after: float,
        connect_timeout: float,
    ) -> None:
        self.client_id = client_id
        self.node = node
        self.group = group
        self.prefix = prefix
        self._connect_timeout = connect_timeout
        self._core = _Core(mqtt, client_id, prefix, resend_after)
        self._pins = _Pins(self._core, node, group)

    # -- connection -----------------------------------------------------------------------------

    def connect(self) -> None:
        """Connect to the broker; OSError if it cannot be reached or refuses."""
        self._core.connect(self._connect_timeout)

    def close(self) -> None:
        self._core.close()

    def __enter__(self) -> Self:
        self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def node_status(self, node: str | None = None) -> Status | None:
        """The last retained status of `node` (default: the client's node), or None."""
        name = node or self.node
        return self._core.status(name) if name is not None else None

    def pinned_node(self, conversation_id: str) -> str | None:
        """The node a pooled conversation's follow-ups go to."""
        return self._pins.pinned(conversation_id)

    # -- requests -------------------------------------------------------------------------------

    def _exchange(
        self,
        prompt: str,
        conversation_id: str,
        sink: Sink,
        on_restart: Callable[[], None] | None,
        options: dict[str, Any],
    ) -> _Exchange:
        body = _body(prompt, conversation_id, options)
        exchange = _Exchange(self._core, self._pins, body, sink, on_restart)
        exchange.send()
        return exchange

    def stream(
        self,
        prompt: str,
        conversation_id: str = "default",
        max_tokens: int | None = None,
        *,
        system: str | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        reset: bool = False,
        format: str | dict[str, Any] | None = None,
        stop: Sequence[str] | None = None,
        chunk_ms: int | None = None,
        timeout: float | None = 60.0,
        on_restart: Callable[[], None] | None = None,
    ) -> Stream:
        """Send `prompt`; iterate the result for the reply's texts as they arrive. Fields left
        None are not sent (the node's defaults apply). `timeout`: seconds without any message
        of the reply before TimeoutError."""
        inbox: queue.Queue[_Item] = queue.Queue()
        options = {
            "max_tokens": max_tokens,
            "system": system,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "seed": seed,
            "reset": reset,
            "format": format,
            "stop": stop,
            "chunk_ms": chunk_ms,
        }
        exchange = self._exchange(prompt, conversation_id, inbox.put, on_restart, options)
        return Stream(exchange, inbox, timeout)

    def ask(
        self,
        prompt: str,
        conversation_id: str = "default",
        max_tokens: int | None = None,
        *,
        timeout: float | None = 60.0,
        **fields: Any,
    ) -> Reply:
        """Send `prompt` and wait for the whole reply; same fields as stream()."""
        with self.stream(prompt, conversation_id, max_tokens, timeout=timeout, **fields) as stream:
            for _ in stream:
                pass
            assert stream.reply is not None
            return stream.reply


class AsyncEdgeClient:
    """EdgeClient for asyncio: `async with`, `async for text in c.stream(...)`, `await c.ask()`.
    The same core: paho's network thread hands messages over with call_soon_threadsafe."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883, **kwargs: Any) -> None:
        self._client = EdgeClient(host, port, **kwargs)

    @property
    def client_id(self) -> str:
        return self._client.client_id

    def pinned_node(self, conversation_id: str) -> str | None:
        return self._client.pinned_node(conversation_id)

    def node_status(self, node: str | None = None) -> Status | None:
        return self._client.node_status(node)

    async def connect(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._client.connect)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._client.close)

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def stream(
        self,
        prompt: str,
        conversation_id: str = "default",
        max_tokens: int | None = None,
        *,
        timeout: float | None = 60.0,
        on_restart: Callable[[], None] | None = None,
        **fields: Any,
    ) -> AsyncStream:
        """Like EdgeClient.stream(); call it inside the event loop."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[_Item] = asyncio.Queue()

        def sink(item: _Item) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(inbox.put_nowait, item)

        options = {"max_tokens": max_tokens, "reset": False, **fields}
        # AsyncEdgeClient is EdgeClient's asyncio face, in the same module: it shares its requests.
        exchange = self._client._exchange(  # noqa: SLF001
            prompt, conversation_id, sink, on_restart, options
        )
        return AsyncStream(exchange, inbox, timeout)

    async def ask(
        self,
        prompt: str,
        conversation_id: str = "default",
        max_tokens: int | None = None,
        *,
        timeout: float | None = 60.0,
        **fields: Any,
    ) -> Reply:
        stream = self.stream(prompt, conversation_id, max_tokens, timeout=timeout, **fields)
        try:
            async for _ in stream:
                pass
        finally:
            await stream.aclose()
        assert stream.reply is not None
        return stream.reply
