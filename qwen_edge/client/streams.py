"""A reply's texts as they arrive: `Stream` for threads, `AsyncStream` for asyncio, over one
`Exchange` each."""

from __future__ import annotations

import asyncio
import queue
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Self

from .connection import Item
from .exchange import Exchange, Reply


class _StreamState:
    """What both kinds of stream tell about their reply."""

    def __init__(self, exchange: Exchange, timeout: float | None) -> None:
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

    def __init__(self, exchange: Exchange, inbox: queue.Queue[Item], timeout: float | None) -> None:
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
        self, exchange: Exchange, inbox: asyncio.Queue[Item], timeout: float | None
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
