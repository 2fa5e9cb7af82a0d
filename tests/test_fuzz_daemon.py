"""Fuzzed payloads through the whole path: published to a real daemon over a real broker, each
request gets exactly the outcome the parser promises (a typed error, or start ... done), each bad
cancel a typed error, and the daemon stays up and logs no fault."""

from __future__ import annotations

import itertools
import queue
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devtools.harness import NODE, PREFIX, SMOLLM, Broker, Daemon, Probe
from qwen_edge.protocol import ChatRequest, ErrorCode, RequestError, parse_cancel, parse_request

from .test_protocol import (
    LIMIT,
    NUMERIC,
    VALID,
    dumps_any,
    json_values,
    request_like,
    weird_numbers,
)

CODES = {c.value for c in ErrorCode}
ids = itertools.count()

payloads = st.one_of(
    st.binary(max_size=300),
    st.tuples(json_values, st.booleans()).map(lambda v: dumps_any(*v)),
    st.tuples(request_like, st.booleans()).map(lambda v: dumps_any(*v)),
    # Valid requests with hostile text: NUL, BOM, controls, astral characters, lone surrogates.
    st.tuples(
        st.text(
            st.characters(codec="utf-8")
            | st.characters(categories=["Cs"])
            | st.sampled_from(["\0", "\ufeff", "\x1b", "\U0010ffff"]),
            max_size=40,
        ),
        st.booleans(),
    ).map(lambda v: dumps_any({"request_id": "r1", "message": v[0]}, v[1])),
    st.tuples(st.sampled_from(NUMERIC), weird_numbers).map(
        lambda v: VALID[:-1] + b',"' + v[0].encode() + b'":' + v[1] + b"}"
    ),
    st.integers(min_value=1, max_value=100_000).map(
        lambda n: b'{"request_id":"r1","message":"hi","system":' + b"[" * n + b"]" * n + b"}"
    ),
    st.integers(min_value=LIMIT - 64, max_value=LIMIT + 64).map(
        lambda n: b'{"request_id":"r1","message":"' + b"x" * (n - 31) + b'"}'
    ),
)  # fmt: skip


@pytest.fixture(scope="module")
def fuzz_daemon(
    module_broker: Broker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    # Replies of at most 2 tokens: a valid fuzzed request must not keep the model busy.
    d = Daemon(
        tmp_path_factory.mktemp("fuzz-daemon"),
        module_broker,
        SMOLLM,
        QWEN_EDGE_MODEL__THREADS="1",
        QWEN_EDGE_MODEL__N_CTX="1024",
        QWEN_EDGE_GENERATION__MAX_TOKENS_LIMIT="2",
    )
    d.start()
    yield d
    d.stop()


class Listener:
    """Every reply and error message the daemon sends, by the client id in its topic."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self.by_client: dict[str, list[dict[str, Any]]] = {}
        probe.subscribe(f"{PREFIX}/{NODE}/reply/#", f"{PREFIX}/{NODE}/error/#")

    def _drain(self, timeout: float) -> None:
        try:
            topic, data, _ = self.probe.messages.get(timeout=timeout)
        except queue.Empty:
            return
        # {prefix}/{node}/{reply|error}/{client}[/...]
        client = topic.split("/")[3]
        self.by_client.setdefault(client, []).append(data | {"_topic": topic})

    def until_final(
        self, client: str, timeout: float = 60.0, topic_part: str = "/"
    ) -> list[dict[str, Any]]:
        """Messages for `client` once one of them is final (and its topic has `topic_part`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.by_client.get(client, [])
            if any(m.get("type") in ("done", "error") and topic_part in m["_topic"] for m in got):
                return got
            self._drain(0.05)
        raise TimeoutError(f"no final message for {client}: {self.by_client.get(client)}")

    def settle(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._drain(0.05)


@pytest.fixture(scope="module")
def listener(module_broker: Broker, fuzz_daemon: Daemon) -> Iterator[Listener]:
    probe = Probe(module_broker, "fuzzer")
    yield Listener(probe)
    probe.close()


def check_shape(messages: list[dict[str, Any]]) -> None:
    """Every message is a protocol message; seq counts 0, 1, 2, ...; one final, at the end."""
    assert [m.get("seq") for m in messages] == list(range(len(messages))), messages
    body = ["start"] + ["chunk"] * (len(messages) - 2) if len(messages) > 1 else []
    assert [m["type"] for m in messages[:-1]] == body
    final = messages[-1]
    assert final["type"] in ("done", "error")
    if final["type"] == "error":
        assert final["code"] in CODES
        assert isinstance(final["message"], str)
        assert final["message"]


FUZZ_E2E = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.mark.slow
@FUZZ_E2E
@given(raw=payloads)
def test_every_fuzzed_request_gets_the_outcome_the_parser_promises(
    raw: bytes, listener: Listener, fuzz_daemon: Daemon
) -> None:
    client = f"fz{next(ids)}"
    listener.probe.publish(f"{PREFIX}/{NODE}/request/{client}", raw)
    messages = listener.until_final(client)
    check_shape(messages)
    final = messages[-1]
    expected = parse_request(raw, LIMIT)
    if isinstance(expected, ChatRequest):
        assert final["request_id"] == expected.request_id
        assert final["_topic"] == f"{PREFIX}/{NODE}/reply/{client}/{expected.conversation_id}"
        assert messages[0]["type"] == "start"
        assert final["type"] == "done" or final["code"] == "context_overflow", final
    else:
        assert isinstance(expected, RequestError)
        assert len(messages) == 1
        assert final["type"] == "error"
        assert final["code"] == expected.code.value
        assert final["request_id"] == expected.request_id
        if expected.request_id is None or expected.conversation_id is None:
            assert final["_topic"] == f"{PREFIX}/{NODE}/error/{client}"
        else:
            assert final["_topic"].endswith(f"/reply/{client}/{expected.conversation_id}")
    assert fuzz_daemon.proc is not None and fuzz_daemon.proc.poll() is None


@pytest.mark.slow
@FUZZ_E2E
@given(raw=payloads | st.sampled_from([b'{"request_id":"nothing-in-flight"}', b"{}", b"\xff"]))
def test_every_fuzzed_cancel_is_ignored_or_gets_a_typed_error(
    raw: bytes, listener: Listener, fuzz_daemon: Daemon
) -> None:
    client = f"fc{next(ids)}"
    listener.probe.publish(f"{PREFIX}/{NODE}/cancel/{client}", raw)
    # A request after it on the same connection: once its reply ends, the cancel was handled.
    listener.probe.publish(
        f"{PREFIX}/{NODE}/request/{client}", b'{"request_id":"after","message":"hi"}'
    )
    messages = listener.until_final(client, topic_part="/reply/")
    errors = [m for m in messages if m["_topic"] == f"{PREFIX}/{NODE}/error/{client}"]
    replies = [m for m in messages if m not in errors]
    check_shape(replies)
    assert replies[-1]["type"] == "done"
    expected = parse_cancel(raw, LIMIT)
    if isinstance(expected, RequestError):
        assert len(errors) == 1
        assert errors[0]["code"] == expected.code.value
        assert errors[0]["request_id"] is None
        assert errors[0]["seq"] == 0
    else:
        assert errors == []  # a cancel of nothing in flight is ignored silently


@pytest.mark.slow
def test_daemon_survived_the_fuzzing_without_a_fault(
    listener: Listener, fuzz_daemon: Daemon
) -> None:
    """Runs after the two above (file order): nothing came late, nothing broke."""
    listener.settle(1.0)
    for messages in listener.by_client.values():
        replies = [m for m in messages if "/reply/" in m["_topic"]]
        errors = [m for m in messages if "/error/" in m["_topic"]]
        finals = [m for m in replies if m.get("type") in ("done", "error")]
        assert len(finals) == (1 if replies else 0), messages  # one end per reply, no second
        assert len(errors) <= 1, messages
    events = fuzz_daemon.log_events()
    # Some fuzzed requests were valid, hostile text and all, and reached the model.
    assert sum(1 for e in events if e.get("event") == "request_done") >= 5
    faults = [e for e in events if e.get("level") in ("error", "critical", "exception")]
    assert faults == []
    assert fuzz_daemon.proc is not None and fuzz_daemon.proc.poll() is None
