"""The Wyoming service: Home Assistant's Assist (its wyoming integration) as one more client.

Home Assistant opens a connection for each sentence, sends `describe` (expecting `info` within a
second) or a `transcript`, and reads back `intent`, `handled`, `not-handled` or `error`
(homeassistant/components/wyoming/conversation.py). A transcript becomes a request for the same
scheduler, under the same per-client limits as an MQTT device's, with the client id
`wyoming-{peer address}` and the conversation id Home Assistant passes in its context; its reply
is grammar-constrained to assist.intent_schema.

Runs on a thread of its own ("wyoming") with an asyncio loop: never on paho's thread or the
inference thread, which hands replies over with call_soon_threadsafe. A peer is held to the same
bounds as a device: the size of every event (the wyoming package itself would read any length a
header names), connections at once (all, and per address), a timeout for an idle or slow peer
and one for the model's reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import socket
import threading
import uuid
from typing import Any, Final

import structlog
from wyoming.asr import Transcript
from wyoming.error import Error
from wyoming.event import Event, async_write_event
from wyoming.handle import Handled, NotHandled
from wyoming.info import Attribution, Describe, Info, IntentModel, IntentProgram
from wyoming.intent import Entity, Intent
from wyoming.ping import Ping, Pong

from ..protocol import (
    ID_PATTERN,
    NODE_BUILT,
    ChatRequest,
    ChunkMessage,
    DoneMessage,
    ErrorCode,
    ErrorMessage,
    FinishReason,
    parse_reply,
)
from ..settings import WyomingSettings
from .assist import Entities, ReplyError, SpokenAnswer, intent_schema, read_reply, system_prompt
from .intake import Taker
from .limits import ClientLimits, Refusal
from .replies import ReplyStream
from .scheduler import Job

log = structlog.get_logger("qwen_edge.node.wyoming")

SERVICE_TYPE: Final = "_wyoming._tcp.local."
MAX_TRANSCRIPT_CHARS: Final = 1000  # a spoken sentence; longer is no speech
MAX_TYPE_CHARS: Final = 64
WRITE_TIMEOUT: Final = 10.0  # seconds a peer may take to read an answer
ATTRIBUTION: Final = Attribution(name="qwen-edge", url="https://pypi.org/project/qwen-edge/")
_ID = re.compile(ID_PATTERN)
_NOT_ID = re.compile(r"[^A-Za-z0-9_.:-]")

# What Assist says when the node cannot answer (the technical reason goes to the log).
SPOKEN_REFUSAL: Final = {
    ErrorCode.BUSY: "Sorry, I am busy right now. Please try again in a moment.",
    ErrorCode.RATE_LIMITED: "Sorry, too many requests. Please wait a little.",
    ErrorCode.TOO_MANY_CONVERSATIONS: "Sorry, I am still answering you. One moment.",
    ErrorCode.SHUTTING_DOWN: "Sorry, I am restarting. Please try again shortly.",
    ErrorCode.CONTEXT_OVERFLOW: "Sorry, that was too long for me.",
}
SPOKEN_FAILURE: Final = "Sorry, something went wrong with the language model."


class EventError(ValueError):
    """A peer sent something that is not a Wyoming event within the bounds."""


async def read_event(reader: asyncio.StreamReader, max_bytes: int) -> Event | None:
    """One event, none of whose parts may together exceed `max_bytes`; None at a clean end.
    The reader's own limit (start_server's `limit`) bounds the header line."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise EventError("connection closed in the middle of an event") from None
        return None
    except asyncio.LimitOverrunError:
        raise EventError(f"event header longer than {max_bytes} bytes") from None
    header = _json_object(line, "event header")
    kind = header.get("type")
    if not isinstance(kind, str) or not 0 < len(kind) <= MAX_TYPE_CHARS:
        raise EventError(f"event type must be a string of 1 to {MAX_TYPE_CHARS} characters")
    data = header.get("data") or {}
    if not isinstance(data, dict):
        raise EventError("event data must be an object")
    data_length = _length(header, "data_length")
    payload_length = _length(header, "payload_length")
    if len(line) + data_length + payload_length > max_bytes:
        raise EventError(f"event larger than {max_bytes} bytes")
    try:
        if data_length:
            data.update(_json_object(await reader.readexactly(data_length), "event data"))
        payload = await reader.readexactly(payload_length) if payload_length else None
    except asyncio.IncompleteReadError:
        raise EventError("connection closed in the middle of an event") from None
    return Event(type=kind, data=data, payload=payload)


def _length(header: dict[str, Any], key: str) -> int:
    value = header.get(key) or 0
    if type(value) is not int or value < 0:
        raise EventError(f"{key} must be a whole number of bytes")
    return value


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        raise EventError(f"{what} is not JSON") from None
    if not isinstance(value, dict):
        raise EventError(f"{what} must be a JSON object")
    return value


def client_id_for(host: str) -> str:
    """The limits' and conversations' client id of a peer address (IPv6 scope ids and all)."""
    return ("wyoming-" + _NOT_ID.sub("_", host))[:64]


def conversation_id_for(context: Any) -> str:
    """Home Assistant's conversation id (a ULID) from a transcript's context, as a conversation
    id; another id is hashed into one; none: a conversation of its own."""
    given = context.get("conversation_id") if isinstance(context, dict) else None
    if not isinstance(given, str) or not given:
        return "w-" + uuid.uuid4().hex[:20]
    if _ID.fullmatch(given):
        return given
    return "w-" + hashlib.sha256(given.encode("utf-8", "replace")).hexdigest()[:20]


class WyomingServer:
    """Listens on [wyoming] host:port and announces itself over zeroconf."""

    def __init__(
        self,
        settings: WyomingSettings,
        scheduler: Taker,
        limits: ClientLimits,
        entities: Entities,
        *,
        node_id: str,
        model_name: str,
        version: str,
    ) -> None:
        self._s = settings
        self._scheduler = scheduler
        self._limits = limits
        self._schema = intent_schema(entities)
        self._system = system_prompt(entities)
        self._node_id = node_id
        self._info = _info(settings, node_id, model_name, version)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._started = threading.Event()
        self._failure: OSError | None = None
        self._open: dict[str, int] = {}  # peer address -> connections open
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = settings.port  # the bound port (settings.port 0: the one the system chose)

    # -- the main thread -----------------------------------------------------------------------

    def start(self) -> None:
        """Listening when this returns; raises OSError when the address cannot be bound."""
        self._thread = threading.Thread(target=self._run, name="wyoming")
        self._thread.start()
        self._started.wait()
        if self._failure is not None:
            self._thread.join()
            raise self._failure

    def stop(self) -> None:
        """Close the listener and every connection (their jobs are cancelled); join the thread."""
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop has ended already
                loop.call_soon_threadsafe(stopping.set)
        if self._thread is not None:
            self._thread.join()

    # -- the wyoming thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        finally:
            self._started.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        # The grammar of the reply, built once now: later requests find it in the cache.
        self._request("warm-up", "w-warm-up", "turn on the light")
        try:
            server = await asyncio.start_server(
                self._connection, self._s.host, self._s.port, limit=self._s.max_event_bytes
            )
        except OSError as exc:
            self._failure = exc
            return
        self.port = server.sockets[0].getsockname()[1]
        log.info("wyoming_listening", host=self._s.host, port=self.port)
        self._started.set()
        announcer = _Announcer(self._s, self._node_id, self.port) if self._s.zeroconf else None
        if announcer is not None:
            announcing = asyncio.create_task(announcer.register())
        await self._stopping.wait()
        server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await server.wait_closed()
        if announcer is not None:
            announcing.cancel()
            await announcer.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        host = str(peer[0]) if peer else "?"
        task = asyncio.current_task()
        assert task is not None
        if sum(self._open.values()) >= self._s.max_connections or (
            self._open.get(host, 0) >= self._s.max_connections_per_peer
        ):
            log.warning("wyoming_refused", peer=host, reason="too many connections")
            await self._close(writer, Error("too many connections", code="busy").event())
            return
        self._open[host] = self._open.get(host, 0) + 1
        self._tasks.add(task)
        try:
            await self._serve(reader, writer, host)
        finally:
            self._tasks.discard(task)
            left = self._open.pop(host) - 1
            if left:
                self._open[host] = left

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str
    ) -> None:
        """A peer's events, one at a time, each read within the idle timeout."""
        last: Event | None = None
        try:
            while True:
                async with asyncio.timeout(self._s.idle_timeout):
                    event = await read_event(reader, self._s.max_event_bytes)
                if event is None:
                    break
                answer = await self._answer(event, host)
                if answer is not None:
                    async with asyncio.timeout(WRITE_TIMEOUT):
                        await async_write_event(answer, writer)
        except EventError as exc:
            log.warning("wyoming_bad_event", peer=host, error=str(exc))
            last = Error(str(exc), code="bad_event").event()
        except TimeoutError:
            log.info("wyoming_idle_closed", peer=host)
        except (ConnectionError, OSError):
            pass  # the peer went away
        await self._close(writer, last)

    @staticmethod
    async def _close(writer: asyncio.StreamWriter, last: Event | None) -> None:
        with contextlib.suppress(ConnectionError, OSError, TimeoutError):
            if last is not None:
                async with asyncio.timeout(WRITE_TIMEOUT):
                    await async_write_event(last, writer)
            writer.close()
            async with asyncio.timeout(WRITE_TIMEOUT):
                await writer.wait_closed()

    async def _answer(self, event: Event, host: str) -> Event | None:
        if Describe.is_type(event.type):
            return self._info
        if Ping.is_type(event.type):
            return Pong(text=event.data.get("text")).event()
        if Transcript.is_type(event.type):
            return await self._transcript(event, host)
        return None  # not ours (audio, satellite events): ignored, as Wyoming services do

    # -- a transcript --------------------------------------------------------------------------

    async def _transcript(self, event: Event, host: str) -> Event:
        text, context = event.data.get("text"), event.data.get("context")
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_TRANSCRIPT_CHARS:
            return NotHandled("Sorry, I did not catch that.").event()
        client_id = client_id_for(host)
        conversation_id = conversation_id_for(context)
        request = self._request("w-" + uuid.uuid4().hex[:20], conversation_id, text.strip())
        reply = await self._ask(client_id, request)
        back = {"conversation_id": conversation_id}
        if isinstance(reply, NotHandled):
            reply.context = back
            return reply.event()
        text_out, cut = reply
        try:
            answer = read_reply(text_out, cut=cut)
        except ReplyError as exc:
            log.warning("wyoming_reply_unreadable", client_id=client_id, error=str(exc))
            return NotHandled(SPOKEN_FAILURE, context=back).event()
        log.info("wyoming_answered", client_id=client_id, intent=getattr(answer, "name", "answer"))
        if isinstance(answer, SpokenAnswer):
            return Handled(answer.text, context=back).event()
        entities = [Entity(name, value) for name, value in answer.slots.items()]
        return Intent(answer.name, entities, text=answer.speech, context=back).event()

    def _request(self, request_id: str, conversation_id: str, text: str) -> ChatRequest:
        # The intent schema is the operator's (built from the names file), far past a
        # device's schema bounds (thousands of enum values): node-built, unbounded.
        return ChatRequest.model_validate(
            {
                "request_id": request_id,
                "conversation_id": conversation_id,
                "message": text,
                "system": self._system,
                "format": self._schema,
                "temperature": 0.0,  # the most likely intent, the same every time
                "max_tokens": self._s.max_tokens,
            },
            context={NODE_BUILT: True},
        )

    async def _ask(self, client_id: str, request: ChatRequest) -> tuple[str, bool] | NotHandled:
        """The model's whole reply, and whether its token limit cut it; through the scheduler
        under the client's limits."""
        loop = asyncio.get_running_loop()
        replies: asyncio.Queue[bytes] = asyncio.Queue()

        def publish(topic: str, payload: bytes, correlation: bytes | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: the node is stopping
                loop.call_soon_threadsafe(replies.put_nowait, payload)

        request_id = request.request_id
        admission = self._limits.admit(client_id, request_id, request.conversation_id)
        if isinstance(admission, Refusal):
            return _refused(client_id, admission.code, admission.message)
        stream = ReplyStream(publish, "wyoming", request_id, on_end=admission.release)
        refused = self._scheduler.submit(Job(client_id, request, stream, bounded=False))
        if refused is not None:
            admission.release()
            return _refused(client_id, refused, refused.value)
        try:
            async with asyncio.timeout(self._s.reply_timeout):
                return await _collect(replies, client_id)
        except TimeoutError:
            log.warning("wyoming_reply_timeout", client_id=client_id, request_id=request_id)
            return NotHandled("Sorry, that took too long.")
        finally:
            self._scheduler.cancel(client_id, request_id)  # a no-op once it has ended


async def _collect(replies: asyncio.Queue[bytes], client_id: str) -> tuple[str, bool] | NotHandled:
    text: list[str] = []
    while True:
        message = parse_reply(await replies.get())
        if isinstance(message, ChunkMessage):
            text.append(message.text)
        elif isinstance(message, DoneMessage):
            cut = message.finish_reason != FinishReason.STOP.value
            if cut:
                log.warning("wyoming_reply_cut", client_id=client_id, reason=message.finish_reason)
            return "".join(text), cut
        elif isinstance(message, ErrorMessage):
            try:
                code = ErrorCode(message.code)
            except ValueError:
                code = ErrorCode.INTERNAL
            return _refused(client_id, code, message.message)


def _refused(client_id: str, code: ErrorCode, why: str) -> NotHandled:
    log.info("wyoming_not_handled", client_id=client_id, code=code.value, error=why)
    return NotHandled(SPOKEN_REFUSAL.get(code, SPOKEN_FAILURE))


def _info(settings: WyomingSettings, node_id: str, model_name: str, version: str) -> Event:
    model = IntentModel(
        name=model_name,
        attribution=ATTRIBUTION,
        installed=True,
        description=f"{model_name}, grammar-constrained to Home Assistant's intents",
        version=None,
        languages=list(settings.languages),
    )
    program = IntentProgram(
        name=f"qwen-edge {node_id}",
        attribution=ATTRIBUTION,
        installed=True,
        description="A local language model as Home Assistant's conversation agent",
        version=version,
        models=[model],
    )
    return Info(intent=[program]).event()


class _Announcer:
    """The zeroconf record Home Assistant discovers the service by (`_wyoming._tcp`)."""

    def __init__(self, settings: WyomingSettings, node_id: str, port: int) -> None:
        self._host = settings.zeroconf_host or announced_address(settings.host)
        self._name = f"qwen-edge-{node_id}"
        self._port = port
        self._zeroconf: Any = None
        self._info: Any = None

    async def register(self) -> None:
        from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

        try:
            self._zeroconf = AsyncZeroconf(interfaces=[self._host])
            self._info = AsyncServiceInfo(
                SERVICE_TYPE,
                f"{self._name}.{SERVICE_TYPE}",
                addresses=[socket.inet_aton(self._host)],
                port=self._port,
            )
            await self._zeroconf.async_register_service(self._info)
        except Exception as exc:  # no multicast there, a name in use, ...: MQTT goes on
            log.error("zeroconf_failed", address=self._host, error=str(exc))
            return
        log.info("zeroconf_announced", name=self._name, address=self._host, port=self._port)

    async def close(self) -> None:
        if self._zeroconf is None:
            return
        with contextlib.suppress(Exception):  # going away anyway; the record expires
            if self._info is not None:
                await self._zeroconf.async_unregister_service(self._info)
        await self._zeroconf.async_close()


def announced_address(listen_host: str) -> str:
    """The IPv4 address to announce: the one listened on, else the one of the interface that
    reaches the mDNS multicast group (as the wyoming package's own announcer finds it)."""
    if listen_host not in ("", "0.0.0.0", "::"):
        return listen_host
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("224.0.0.251", 5353))
        return str(probe.getsockname()[0])
