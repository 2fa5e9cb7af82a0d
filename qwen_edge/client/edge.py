"""The front classes a device uses: `EdgeClient` (threads) and `AsyncEdgeClient` (asyncio), one
connection each, any number of requests."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import queue
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Self, Unpack

from pydantic import SecretStr

from ..protocol import RequestOptions, Status
from ..settings import MqttSettings, Settings
from .connection import Connection, Item, Sink
from .exchange import Exchange, Pins, Reply, request_body
from .functions import call_tool, callables, next_keywords, result_text
from .streams import AsyncStream, Stream

DEFAULT_GROUP: Final = "pool"


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
        self._core = Connection(mqtt, client_id, prefix, resend_after)
        self._pins = Pins(self._core, node, group)

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
        prompt: str | None,
        conversation_id: str,
        sink: Sink,
        on_restart: Callable[[], None] | None,
        options: dict[str, Any],
    ) -> Exchange:
        body = request_body(prompt, conversation_id, options)
        exchange = Exchange(self._core, self._pins, body, sink, on_restart)
        exchange.send()
        return exchange

    def stream(
        self,
        prompt: str | None,
        conversation_id: str = "default",
        max_tokens: int | None = None,
        *,
        timeout: float | None = 60.0,
        on_restart: Callable[[], None] | None = None,
        **options: Unpack[RequestOptions],
    ) -> Stream:
        """Send `prompt`; iterate the result for the reply's texts as they arrive. `options`:
        any request field (protocol.RequestOptions); one left None is not sent (the node's
        default applies); `tools` may be plain functions (their schema from type hints and
        docstring). `prompt` None only with `tool_results`. `timeout`: seconds without any
        message of the reply before TimeoutError."""
        inbox: queue.Queue[Item] = queue.Queue()
        exchange = self._exchange(
            prompt, conversation_id, inbox.put, on_restart, {"max_tokens": max_tokens, **options}
        )
        return Stream(exchange, inbox, timeout)

    def ask(
        self,
        prompt: str | None,
        conversation_id: str = "default",
        max_tokens: int | None = None,
        *,
        timeout: float | None = 60.0,
        **options: Unpack[RequestOptions],
    ) -> Reply:
        """Send `prompt` and wait for the whole reply (`tool_calls` holds the calls it made);
        same fields as stream()."""
        with self.stream(prompt, conversation_id, max_tokens, timeout=timeout, **options) as stream:
            for _ in stream:
                pass
            assert stream.reply is not None
            return stream.reply

    def run_tools(
        self,
        message: str,
        tools: Sequence[Callable[..., Any]],
        *,
        max_rounds: int = 4,
        **ask_keywords: Any,
    ) -> Reply:
        """Ask with `tools` (plain functions), call the functions the model calls and send
        their results, until the model answers in text; that reply is returned. After
        `max_rounds` rounds of calls the results go with tool_choice `none`, so the model
        answers then. A function that raises is not fatal: the model reads `error: ...`.
        `ask_keywords`: ask()'s (conversation_id, max_tokens, tool_choice for the first round,
        ...); every round is in the same conversation."""
        functions = callables(tools)
        if any(inspect.iscoroutinefunction(f) for f in functions.values()):
            raise TypeError("coroutine functions need AsyncEdgeClient.run_tools")
        reply = self.ask(message, tools=tools, **ask_keywords)
        rounds = 0
        while reply.tool_calls:
            rounds += 1
            results = [
                {
                    "tool_call_id": c.id,
                    "content": result_text(call_tool(functions, c.name, c.arguments)),
                }
                for c in reply.tool_calls
            ]
            keywords = next_keywords(ask_keywords, rounds, max_rounds)
            reply = self.ask(None, tools=tools, tool_results=results, **keywords)
        return reply


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
        prompt: str | None,
        conversation_id: str = "default",
        max_tokens: int | None = None,
        *,
        timeout: float | None = 60.0,
        on_restart: Callable[[], None] | None = None,
        **options: Unpack[RequestOptions],
    ) -> AsyncStream:
        """Like EdgeClient.stream(); call it inside the event loop."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[Item] = asyncio.Queue()

        def sink(item: Item) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(inbox.put_nowait, item)

        # AsyncEdgeClient is EdgeClient's asyncio face, in the same package: it shares its requests.
        exchange = self._client._exchange(  # noqa: SLF001
            prompt, conversation_id, sink, on_restart, {"max_tokens": max_tokens, **options}
        )
        return AsyncStream(exchange, inbox, timeout)

    async def ask(
        self,
        prompt: str | None,
        conversation_id: str = "default",
        max_tokens: int | None = None,
        *,
        timeout: float | None = 60.0,
        **options: Unpack[RequestOptions],
    ) -> Reply:
        stream = self.stream(prompt, conversation_id, max_tokens, timeout=timeout, **options)
        try:
            async for _ in stream:
                pass
        finally:
            await stream.aclose()
        assert stream.reply is not None
        return stream.reply

    async def run_tools(
        self,
        message: str,
        tools: Sequence[Callable[..., Any]],
        *,
        max_rounds: int = 4,
        **ask_keywords: Any,
    ) -> Reply:
        """EdgeClient.run_tools for asyncio: coroutine functions are awaited, plain ones
        called as they are."""
        functions = callables(tools)
        reply = await self.ask(message, tools=tools, **ask_keywords)
        rounds = 0
        while reply.tool_calls:
            rounds += 1
            results = []
            for call in reply.tool_calls:
                value = call_tool(functions, call.name, call.arguments)
                if inspect.isawaitable(value):
                    try:
                        value = await value
                    except Exception as exc:  # as call_tool does for plain functions
                        value = f"error: {type(exc).__name__}: {exc}"
                results.append({"tool_call_id": call.id, "content": result_text(value)})
            keywords = next_keywords(ask_keywords, rounds, max_rounds)
            reply = await self.ask(None, tools=tools, tool_results=results, **keywords)
        return reply
