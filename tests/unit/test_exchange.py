"""The client library's per-request state machine (qwen_edge/client/exchange.py) and its
connection's routing of errors, in process: no broker, no node."""

from __future__ import annotations

import json
from typing import Any

from devtools.harness import (
    NODE,
    PREFIX,
)
from qwen_edge.client import EdgeError
from qwen_edge.client.connection import Arrived, Connection
from qwen_edge.client.exchange import Exchange, Pins
from qwen_edge.protocol import ErrorMessage, parse_reply
from qwen_edge.settings import MqttSettings

POOL = "pool"


# -- the exchange's logic, in process ------------------------------------------------------------


class _NoCore:
    resend_after = 60.0

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    def register(self, *a: Any) -> None: ...

    def unregister(self, *a: Any) -> None: ...

    def send_request(self, target: str, request_id: str, payload: bytes) -> None:
        self.sent.append((target, request_id))

    def send_cancel(self, *a: Any) -> None: ...

    def status(self, node: str) -> None:
        return None


def _exchange(node: str | None = NODE) -> tuple[Exchange, _NoCore, list[int]]:
    core = _NoCore()
    pins = Pins(core, node, "pool")  # type: ignore[arg-type]
    restarts: list[int] = []
    ex = Exchange(
        core,  # type: ignore[arg-type]
        pins,
        {"conversation_id": "c", "message": "m"},
        lambda i: None,
        lambda: restarts.append(1),
    )
    ex.send()
    return ex, core, restarts


def _msg(ex: Exchange, seq: int, kind: str, **fields: Any) -> Arrived:
    payload = json.dumps({"type": kind, "request_id": ex.request_id, "seq": seq, **fields})
    message = parse_reply(payload.encode())
    assert message is not None
    return Arrived(payload.encode(), message)


def _texts(ex: Exchange) -> list[str]:
    out = []
    while ex.ready:
        out.append(ex.hand_out())
    return out


def test_messages_out_of_order_wait_for_the_gap_and_copies_are_dropped() -> None:
    ex, _, _ = _exchange()
    for item in (
        _msg(ex, 0, "start", node=NODE, model="m"),
        _msg(ex, 2, "chunk", text="好"),
        _msg(ex, 2, "chunk", text="好"),
    ):
        ex.feed(item)
    assert _texts(ex) == []
    ex.feed(_msg(ex, 3, "done", finish_reason="stop", usage={}))
    assert ex.reply is None  # seq 1 is missing: a resend's replay will bring it
    ex.feed(_msg(ex, 1, "chunk", text="你"))
    assert _texts(ex) == ["你", "好"]
    assert ex.reply is not None and ex.reply.text == "你好"


def test_a_regenerated_reply_starts_over_only_where_it_differs() -> None:
    ex, _, restarts = _exchange()
    ex.feed(_msg(ex, 0, "start", node=NODE, model="m"))
    ex.feed(_msg(ex, 1, "chunk", text="A"))
    ex.feed(_msg(ex, 2, "chunk", text="B"))
    assert _texts(ex) == ["A", "B"]
    # The node crashed; the resend is generated again: same up to seq 1, then not.
    ex.feed(_msg(ex, 0, "start", node=NODE, model="m"))
    ex.feed(_msg(ex, 1, "chunk", text="A"))
    assert restarts == []
    ex.feed(_msg(ex, 2, "chunk", text="C"))
    assert restarts == [1]
    assert _texts(ex) == ["A", "C"]  # from the beginning, for a caller that cleared its screen
    ex.feed(_msg(ex, 3, "done", finish_reason="stop", usage={}))
    assert ex.reply is not None and ex.reply.text == "AC"


def test_a_refused_resend_does_not_end_the_reply_it_asked_about() -> None:
    ex, _, restarts = _exchange()
    ex.feed(_msg(ex, 0, "start", node=NODE, model="m"))
    ex.feed(_msg(ex, 0, "error", code="rate_limited", message="slow down", retry_after=3.0))
    assert ex.failure is None and restarts == []
    ex.feed(_msg(ex, 1, "done", finish_reason="stop", usage={}))
    assert ex.reply is not None


def test_node_lost_is_retried_once_as_a_new_request_then_raised() -> None:
    for second_end in ("done", "node_lost"):
        ex, core, restarts = _exchange(node=None)
        first_id = ex.request_id
        ex.feed(_msg(ex, 0, "start", node="node-a", model="m"))
        ex.feed(_msg(ex, 1, "chunk", text="x"))
        assert _texts(ex) == ["x"]
        ex.feed(_msg(ex, 2, "error", code="node_lost", message="gone"))
        assert ex.failure is None and restarts == [1]
        assert ex.request_id != first_id
        assert core.sent == [(POOL, first_id), (POOL, ex.request_id)]
        ex.feed(_msg(ex, 0, "start", node="node-b", model="m"))
        ex.feed(_msg(ex, 1, "chunk", text="y"))
        if second_end == "done":
            ex.feed(_msg(ex, 2, "done", finish_reason="stop", usage={}))
            assert _texts(ex) == ["y"]
            assert ex.reply is not None and (ex.reply.text, ex.reply.node) == ("y", "node-b")
        else:
            ex.feed(_msg(ex, 2, "error", code="node_lost", message="gone too"))
            assert isinstance(ex.failure, EdgeError) and ex.failure.code == "node_lost"


def test_node_lost_after_a_gap_ends_the_reply_at_once() -> None:
    # Another node numbers node_lost past any seq the lost reply could reach (docs: Fleet);
    # the messages in between never come, so the client must not wait for them.
    ex, _, _ = _exchange()
    ex.feed(_msg(ex, 0, "start", node=NODE, model="m"))
    ex.feed(_msg(ex, 1, "chunk", text="x"))
    ex.feed(_msg(ex, 2051, "error", code="node_lost", message="gone"))
    assert isinstance(ex.failure, EdgeError) and ex.failure.code == "node_lost"
    ex.feed(_msg(ex, 2, "chunk", text="late"))  # a straggler after the end: ignored
    assert _texts(ex) == ["x"]


def test_a_too_large_error_is_matched_to_its_request_by_size_not_by_text() -> None:
    conn = Connection(MqttSettings(protocol="3.1.1"), "dev1", PREFIX, resend_after=10)
    hit: list[str] = []
    conn.register("big", lambda i: hit.append("big"), NODE, 70_000)
    conn.register("small", lambda i: hit.append("small"), NODE, 100)
    error = ErrorMessage(
        request_id=None,
        seq=0,
        code="too_large",
        message="zu groß (wording may change)",
        size=70_000,
    )
    sinks = conn._unnamed_error_sinks(f"{PREFIX}/{NODE}/error/dev1", error)
    for sink in sinks:
        sink(Arrived(error.encode(), error))
    assert hit == ["big"]
