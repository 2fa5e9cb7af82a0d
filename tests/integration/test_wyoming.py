"""Home Assistant's Assist over Wyoming, against the daemon with SmolLM2: driven by the `wyoming`
package's own client exactly as Home Assistant's wyoming integration drives it (describe -> info
within its one-second timeout; a connection per transcript, context {"conversation_id": ...},
then read until intent / handled / not-handled / error), discovered by zeroconf's browser, and
held to its bounds by raw TCP peers that misbehave.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from wyoming.asr import Transcript
from wyoming.client import AsyncTcpClient
from wyoming.handle import Handled, NotHandled
from wyoming.info import Describe, Info
from wyoming.intent import Intent

from devtools.harness import ROOT, SMOLLM, Broker, Daemon, free_port
from qwen_edge.node.assist import ANSWER, Entities, intent_schema
from qwen_edge.node.wyoming import SERVICE_TYPE, announced_address

TABLE = json.loads((ROOT / "scripts" / "assist-eval.json").read_text())
ENTITIES = TABLE["entities"]
NODE_ID = f"wy{os.getpid()}"  # a zeroconf name no other test run on this network uses


def start(tmp: Path, broker: Broker, **env: str) -> tuple[Daemon, int]:
    port = free_port()
    (tmp / "entities.json").write_text(json.dumps(ENTITIES))
    daemon = Daemon(
        tmp,
        broker,
        SMOLLM,
        QWEN_EDGE_NODE_ID=NODE_ID,
        QWEN_EDGE_WYOMING__ENABLED="true",
        QWEN_EDGE_WYOMING__HOST="127.0.0.1",
        QWEN_EDGE_WYOMING__PORT=str(port),
        QWEN_EDGE_WYOMING__ENTITIES=str(tmp / "entities.json"),
        **env,
    )
    daemon.start()
    return daemon, port


@pytest.fixture(scope="module")
def node(module_broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """(daemon, Wyoming port): announced over zeroconf on the interface that reaches mDNS."""
    try:
        address = announced_address("0.0.0.0")
    except OSError:
        address = "127.0.0.1"
    daemon, port = start(
        tmp_path_factory.mktemp("wyoming"),
        module_broker,
        QWEN_EDGE_WYOMING__ZEROCONF_HOST=address,
    )
    yield daemon, port
    daemon.stop()


@pytest.fixture(scope="module")
def strict(module_broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A node with tight bounds for Wyoming peers (the limits are the MQTT devices' own)."""
    daemon, port = start(
        tmp_path_factory.mktemp("strict"),
        module_broker,
        QWEN_EDGE_WYOMING__ZEROCONF="false",
        QWEN_EDGE_WYOMING__MAX_CONNECTIONS_PER_PEER="2",
        QWEN_EDGE_WYOMING__MAX_EVENT_BYTES="4096",
        QWEN_EDGE_WYOMING__IDLE_TIMEOUT="1",
        QWEN_EDGE_LIMITS__REQUESTS_PER_MINUTE="1",
        QWEN_EDGE_LIMITS__BURST="1",
    )
    yield daemon, port
    daemon.stop()


async def describe(port: int) -> Info:
    """As Home Assistant's load_wyoming_info: one second for the whole exchange."""
    async with AsyncTcpClient("127.0.0.1", port) as client, asyncio.timeout(1):
        await client.write_event(Describe().event())
        while (event := await client.read_event()) is not None:
            if Info.is_type(event.type):
                return Info.from_event(event)
    raise AssertionError("connection closed before info")


class SourceClient(AsyncTcpClient):
    """The wyoming client from another loopback address: another peer to the node."""

    def __init__(self, port: int, source: str) -> None:
        super().__init__("127.0.0.1", port)
        self.source = source

    async def connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(
            "127.0.0.1", self.port, local_addr=(self.source, 0)
        )


async def say(port: int, text: str, conversation_id: str = "", source: str = "") -> Any:
    """As Home Assistant's WyomingConversationEntity.async_process: the first event that ends
    its read loop, as the wyoming type it reads it with."""
    client = SourceClient(port, source) if source else AsyncTcpClient("127.0.0.1", port)
    async with client, asyncio.timeout(120):
        context = {"conversation_id": conversation_id or f"01J{time.monotonic_ns()}"}
        await client.write_event(Transcript(text, context=context, language="en").event())
        while (event := await client.read_event()) is not None:
            for kind in (Intent, Handled, NotHandled):
                if kind.is_type(event.type):
                    return kind.from_event(event)
            assert event.type not in ("error", "not-recognized"), event
    raise AssertionError("connection closed before an answer")


def as_reply(answer: Intent | Handled) -> dict[str, Any]:
    """The JSON object the model's reply was, rebuilt from what Home Assistant received."""
    if isinstance(answer, Handled):
        return {"intent": ANSWER, "text": answer.text}
    return {"intent": answer.name, **{e.name: e.value for e in answer.entities}}


def test_describe_gives_an_installed_intent_program_within_a_second(node: Any) -> None:
    _, port = node
    info = asyncio.run(describe(port))
    (program,) = info.intent
    assert program.installed and program.name == f"qwen-edge {NODE_ID}"
    assert program.attribution.name == "qwen-edge" and program.version
    (model,) = program.models
    assert model.installed and model.languages == ["en"] and "SmolLM2" in model.name
    # What Home Assistant's WyomingService makes of it: a conversation agent named so.
    assert not info.asr and not info.tts and not info.handle and info.satellite is None


def test_command_gets_an_intent_home_assistant_can_run(node: Any) -> None:
    _, port = node
    answer = asyncio.run(say(port, "turn on the kitchen light"))
    assert isinstance(answer, Intent), answer
    assert answer.name == "HassTurnOn"
    assert {e.name: e.value for e in answer.entities} == {"name": "kitchen light"}
    assert answer.text and "{{ slots." in answer.text  # a template over the slots, as data


def test_question_gets_handled_with_a_spoken_answer(node: Any) -> None:
    _, port = node
    answer = asyncio.run(say(port, "who wrote hamlet"))
    assert isinstance(answer, Handled) and answer.text


def test_every_reply_is_an_intent_or_answer_of_the_schema(node: Any) -> None:
    """Format validity is 100 % by construction: the table's commands and questions and more,
    every answer Intent or Handled, its slots valid against the schema (names and areas only
    from the names file); never not-handled for an unreadable reply."""
    _, port = node
    schema = intent_schema(Entities(tuple(ENTITIES["names"]), tuple(ENTITIES["areas"])))
    extra = [
        "turn on the garden sprinkler",  # not a configured name: must not appear as one
        "set the basement to 18 degrees",
        "add a very long list of things like apples pears plums cherries and more to the list",
        "please explain quantum physics in great detail with many examples",
        "ääh, mach das Licht an",
        "{{ 7 * 7 }} turn on",
        "what is 2 plus 2",
        "lock the front door",
        "good night",
        "set a timer",
    ]
    texts = [case["say"] for case in TABLE["cases"]] + extra

    async def all_of_them() -> list[Any]:
        return [await say(port, text) for text in texts]

    answers = asyncio.run(all_of_them())
    for text, answer in zip(texts, answers, strict=True):
        assert isinstance(answer, Intent | Handled), (text, answer)
        jsonschema.validate(as_reply(answer), schema)
    assert len(answers) >= 50


def test_context_is_kept_per_conversation_id(node: Any) -> None:
    daemon, port = node
    conversation = "01JCONVERSATIONKEPT00000001"

    async def twice() -> None:
        await say(port, "turn on the porch light", conversation)
        await say(port, "and now turn it off", conversation)

    asyncio.run(twice())

    def done_events() -> list[dict[str, Any]]:
        return [
            e
            for e in daemon.log_events()
            if e.get("event") == "request_done" and e.get("conversation_id") == conversation
        ]

    # The answer is sent before the inference thread logs the request's end: wait for the line.
    deadline = time.monotonic() + 30
    while len(done := done_events()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(done) == 2
    assert done[0]["client_id"] == "wyoming-127.0.0.1"
    # The second prompt holds the first turn: its tokens are the first's and more.
    assert done[1]["prompt_tokens"] > done[0]["prompt_tokens"] + done[0]["completion_tokens"]


def test_zeroconf_browser_finds_the_service(node: Any) -> None:
    from zeroconf import ServiceBrowser, ServiceListener, Zeroconf

    _, port = node
    address = announced_address("0.0.0.0")
    found: dict[str, Any] = {}
    seen = threading.Event()

    class Listener(ServiceListener):
        def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
            if name == f"qwen-edge-{NODE_ID}.{SERVICE_TYPE}":
                info = zc.get_service_info(type_, name, timeout=3000)
                if info is not None:
                    found.update(port=info.port, addresses=info.parsed_addresses())
                    seen.set()

        def update_service(self, zc: Zeroconf, type_: str, name: str) -> None:
            self.add_service(zc, type_, name)

        def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
            pass

    browser_zc = Zeroconf(interfaces=[address])
    try:
        browser = ServiceBrowser(browser_zc, SERVICE_TYPE, Listener())
        assert seen.wait(20), "no _wyoming._tcp record of this node"
        browser.cancel()
    finally:
        browser_zc.close()
    assert found == {"port": port, "addresses": [address]}


# -- peers that misbehave ----------------------------------------------------------------------


def raw(port: int, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))


def read_all(sock: socket.socket) -> bytes:
    """What the node sends until it closes the connection."""
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def error_of(received: bytes) -> dict[str, Any]:
    header = json.loads(received.split(b"\n", 1)[0])
    assert header["type"] == "error"
    return dict(json.loads(received.split(b"\n", 1)[1][: header["data_length"]]))


@pytest.mark.parametrize(
    ("sent", "why"),
    [
        (b"x" * 5000 + b"\n", "header longer"),
        (b'{"type": "transcript", "data_length": 100000000}\n', "larger than 4096"),
        (b'{"type": "describe", "payload_length": 99999}\n', "larger than 4096"),
        (b"not json\n", "not JSON"),
        (b"[" * 3000 + b"\n", "not JSON"),
        (b'{"type": 5}\n', "event type"),
        (b'{"type": "transcript", "data_length": -1}\n', "data_length"),
    ],
)
def test_a_bad_event_gets_an_error_and_the_connection_closes(
    strict: Any, sent: bytes, why: str
) -> None:
    _, port = strict
    with raw(port) as sock:
        sock.sendall(sent)
        error = error_of(read_all(sock))
    assert error["code"] == "bad_event" and why in error["text"]
    assert asyncio.run(describe(port)).intent  # and the node goes on


def test_an_idle_or_slow_peer_is_closed(strict: Any) -> None:
    daemon, port = strict
    with raw(port) as idle, raw(port) as slow:
        slow.sendall(b'{"type": "desc')  # and never the rest
        began = time.monotonic()
        assert read_all(idle) == b"" and read_all(slow) == b""
        assert time.monotonic() - began < 5
    assert any(e.get("event") == "wyoming_idle_closed" for e in daemon.log_events())


def test_connections_per_peer_are_bounded_and_describe_still_answers(strict: Any) -> None:
    _, port = strict
    with raw(port) as first, raw(port) as second:
        first.sendall(b'{"type": "describe"}\n')  # both held open, serving
        second.sendall(b'{"type": "describe"}\n')
        first.recv(1)
        second.recv(1)
        with raw(port) as third:
            assert error_of(read_all(third))["code"] == "busy"
        # Another address is another peer, still served within Home Assistant's second.
        began = time.monotonic()
        with raw(port, source="127.0.0.2") as other:
            other.sendall(b'{"type": "describe"}\n')
            assert json.loads(other.recv(65536).split(b"\n")[0])["type"] == "info"
        assert time.monotonic() - began < 1


def test_transcripts_are_rate_limited_as_a_device_is(strict: Any) -> None:
    """Burst 1, 1 per minute: the second transcript of a peer is not handled, with a reason
    Assist says; another peer (its own client id) is served."""
    _, port = strict

    async def three() -> list[Any]:
        first = await say(port, "turn on the tv", source="127.0.0.3")
        second = await say(port, "turn off the tv", source="127.0.0.3")
        other = await say(port, "turn off the tv", source="127.0.0.4")
        return [first, second, other]

    first, second, other = asyncio.run(three())
    assert isinstance(first, Intent | Handled)
    assert isinstance(second, NotHandled) and "too many requests" in (second.text or "")
    assert isinstance(other, Intent | Handled)


def test_an_oversized_transcript_is_not_handled(node: Any) -> None:
    _, port = node
    answer = asyncio.run(say(port, "turn on the light " * 100))
    assert isinstance(answer, NotHandled)
