"""qwen_edge.client against a real mosquitto and real daemons (SmolLM2-135M): streaming, errors,
resending with the same id, de-duplication, a broker restart, the pool (pinning, node_lost),
asyncio, and an install without the node's compiled parts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from devtools.harness import (
    BROKER_CONF,
    NODE,
    PREFIX,
    ROOT,
    SMOLLM,
    Broker,
    Daemon,
    Probe,
    reply_text,
)
from qwen_edge.client import AsyncEdgeClient, EdgeClient, EdgeError, Reply

POOL = "pool"


def _client(broker: Broker, node: str | None = NODE, **kw: Any) -> EdgeClient:
    kw.setdefault("client_id", f"dev-{uuid.uuid4().hex[:6]}")
    return EdgeClient(host="127.0.0.1", port=broker.port, node=node, prefix=PREFIX, **kw)


def _log_events(d: Daemon, event: str) -> list[dict[str, Any]]:
    return [e for e in d.log_events() if e.get("event") == event]


# -- one node ------------------------------------------------------------------------------------


def test_stream_yields_chunks_and_ask_returns_the_reply(
    daemon: Daemon, module_broker: Broker
) -> None:
    with _client(module_broker) as c:
        stream = c.stream("Say hello in three words.", conversation_id="c1", max_tokens=16)
        texts = list(stream)
        assert texts and all(texts)
        first = stream.reply
        assert first is not None
        assert first.text == "".join(texts)
        assert first.node == NODE
        assert first.finish_reason in ("stop", "length")
        assert first.usage["completion_tokens"] >= len(texts) - 1

        reply = c.ask("And in one word?", conversation_id="c1", timeout=60, temperature=0)
        assert isinstance(reply, Reply)
        assert reply.text and reply.node == NODE
        assert reply.request_id != first.request_id
        assert reply.usage["prompt_tokens"] > first.usage["prompt_tokens"]  # the first turn
        assert reply.usage["cached_tokens"] > 0


def test_chinese_goes_out_as_utf8_and_comes_back_whole(
    daemon: Daemon, module_broker: Broker, probe_factory: Any
) -> None:
    with _client(module_broker) as c:
        spy = probe_factory(c.client_id)
        spy.subscribe(f"{PREFIX}/{NODE}/request/{c.client_id}")
        reply = c.ask("你好！请用中文回答：一加一等于几？", max_tokens=24, temperature=0)
    _, sent, props = spy.next_message()
    assert sent["message"] == "你好！请用中文回答：一加一等于几？"
    assert "你好".encode() in spy.raw[0][1]  # compact UTF-8, not \\u escapes
    assert props.ResponseTopic.startswith(f"{PREFIX}/{NODE}/reply/{c.client_id}/")
    assert props.CorrelationData == sent["request_id"].encode()
    assert reply.finish_reason in ("stop", "length") and reply.text


def test_a_bad_request_raises_edge_error_with_its_code(
    daemon: Daemon, module_broker: Broker
) -> None:
    with _client(module_broker) as c:
        with pytest.raises(EdgeError) as caught:
            c.ask("Hi", temperature=9)
        assert caught.value.code == "bad_request"
        assert "temperature" in caught.value.message
        assert caught.value.retry_after is None
        with pytest.raises(TypeError, match="colour"):
            c.ask("Hi", colour="red")


def test_new_fields_are_sent_only_when_given(
    daemon: Daemon, module_broker: Broker, probe_factory: Any
) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    with _client(module_broker) as c:
        spy = probe_factory(c.client_id)
        spy.subscribe(f"{PREFIX}/{NODE}/request/{c.client_id}")
        c.ask("Hi", max_tokens=4, format=schema, stop=("\n",), chunk_ms=100, seed=7)
        c.ask("Hi", max_tokens=4)
    first, second = spy.next_message()[1], spy.next_message()[1]
    assert (first["format"], first["stop"], first["chunk_ms"], first["seed"]) == (
        schema,
        ["\n"],
        100,
        7,
    )
    assert set(second) == {"request_id", "conversation_id", "message", "max_tokens"}


def test_a_duplicate_of_every_chunk_is_dropped(
    daemon: Daemon, module_broker: Broker, probe_factory: Any
) -> None:
    """What a broker redelivering QoS 1 messages looks like to the client: each chunk twice,
    same seq, same bytes, on its reply topic with its correlation data."""
    with _client(module_broker) as c:
        echo = probe_factory(c.client_id)
        copied: set[int] = set()

        def redeliver(client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
            echo.raw.append((msg.topic, msg.payload))
            message = json.loads(msg.payload)
            if message["type"] == "chunk" and message["seq"] not in copied:
                copied.add(message["seq"])
                props = Properties(PacketTypes.PUBLISH)
                props.CorrelationData = msg.properties.CorrelationData
                client.publish(msg.topic, msg.payload, qos=1, properties=props)

        echo.client.on_message = redeliver
        echo.subscribe(f"{PREFIX}/{NODE}/reply/{c.client_id}/#")
        reply = c.ask("Count from one to twenty.", max_tokens=48, temperature=0)
    originals = {json.loads(p)["seq"]: json.loads(p) for _, p in echo.raw}
    assert len(copied) >= 5
    assert len(echo.raw) > len(originals)  # the copies came back to the echo too: delivered
    assert reply.text == reply_text([originals[s] for s in sorted(originals)])


def test_a_reply_missed_is_asked_for_again_with_the_same_id_and_replayed(
    daemon: Daemon, module_broker: Broker, probe_factory: Any
) -> None:
    with _client(module_broker, resend_after=2.0) as c:
        spy = probe_factory(c.client_id)
        spy.subscribe(f"{PREFIX}/{NODE}/request/{c.client_id}")
        watcher = probe_factory(c.client_id)
        watcher.subscribe(f"{PREFIX}/{NODE}/reply/{c.client_id}/#")
        deaf = threading.Event()
        deaf.set()
        core = c._core._client
        hear = core.on_message

        def lossy(client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
            if deaf.is_set() and not msg.topic.endswith("/status"):
                if json.loads(msg.payload)["type"] == "done":
                    deaf.clear()  # the whole first delivery is lost, the replay is not
                return
            hear(client, userdata, msg)

        core.on_message = lossy
        began = time.monotonic()
        reply = c.ask("Name three fruits.", max_tokens=24, temperature=0, timeout=30)
        took = time.monotonic() - began

    deadline = time.monotonic() + 10  # the spy's copy of the resend may still be on its way
    while len(spy.raw) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    sent = [json.loads(p) for _, p in spy.raw]
    assert len(sent) >= 2 and all(s == sent[0] for s in sent), sent  # same id, same request
    assert sent[0]["request_id"] == reply.request_id
    assert took >= 2.0  # it waited resend_after before asking again
    first = watcher.collect(reply.request_id)
    assert reply.text == reply_text(first)
    replayed = _log_events(daemon, "duplicate_replayed")
    assert any(e["request_id"] == reply.request_id for e in replayed)


def test_no_message_for_timeout_seconds_is_a_timeout(module_broker: Broker) -> None:
    with _client(module_broker, node="nobody-here", resend_after=0.3) as c:
        began = time.monotonic()
        with pytest.raises(TimeoutError):
            c.ask("Hi", timeout=1.2)
        assert 1.1 < time.monotonic() - began < 5


@pytest.fixture(scope="module")
def limited(module_broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(
        tmp_path_factory.mktemp("limited"),
        module_broker,
        SMOLLM,
        QWEN_EDGE_NODE_ID="limited",
        QWEN_EDGE_LIMITS__REQUESTS_PER_MINUTE="6",
        QWEN_EDGE_LIMITS__BURST="1",
    )
    d.start()
    yield d
    d.stop()


def test_rate_limited_says_when_to_retry(limited: Daemon, module_broker: Broker) -> None:
    with _client(module_broker, node="limited") as c:
        assert c.ask("Hi", max_tokens=2).finish_reason in ("stop", "length")
        with pytest.raises(EdgeError) as caught:
            c.ask("Hi again", max_tokens=2)
    assert caught.value.code == "rate_limited"
    assert caught.value.retry_after is not None and 0 < caught.value.retry_after <= 10.1


def test_async_client_streams_asks_and_raises(daemon: Daemon, module_broker: Broker) -> None:
    async def main() -> tuple[list[str], Any, Reply, EdgeError]:
        async with AsyncEdgeClient(
            "127.0.0.1", module_broker.port, client_id="async-dev", node=NODE
        ) as c:
            stream = c.stream("Say hello.", conversation_id="a", max_tokens=12)
            texts = [t async for t in stream]
            reply = await c.ask("Again, shorter.", conversation_id="a", max_tokens=8)
            try:
                await c.ask("Hi", top_p=0)
            except EdgeError as exc:
                return texts, stream.reply, reply, exc
            raise AssertionError("top_p=0 was accepted")

    texts, streamed, reply, error = asyncio.run(main())
    assert texts and streamed.text == "".join(texts)
    assert reply.text and reply.node == NODE and reply.usage["cached_tokens"] > 0
    assert error.code == "bad_request" and "top_p" in error.message


def test_chat_command_respects_the_mqtt_protocol_setting(
    daemon: Daemon, module_broker: Broker, probe_factory: Any
) -> None:
    watcher = probe_factory("old")
    watcher.subscribe(f"{PREFIX}/{NODE}/request/old", f"{PREFIX}/{NODE}/reply/old/#")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QWEN_EDGE_")}
    env.update(
        QWEN_EDGE_MQTT__PORT=str(module_broker.port),
        QWEN_EDGE_NODE_ID=NODE,
        QWEN_EDGE_MQTT__PROTOCOL="3.1.1",
    )
    run = [sys.executable, "-m", "qwen_edge", "chat", "--max-tokens", "8", "--client-id", "old"]
    result = subprocess.run(
        [*run, "Say hi."], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "[stop" in result.stderr or "[length" in result.stderr
    # MQTT 3.1.1 has no response topic: the request carries none, the reply comes on the
    # conversation's default topic.
    topic, request, props = watcher.next_message()
    assert topic == f"{PREFIX}/{NODE}/request/old" and request["message"] == "Say hi."
    assert not hasattr(props, "ResponseTopic")
    topic, start, _ = watcher.next_message()
    assert topic == f"{PREFIX}/{NODE}/reply/old/default" and start["type"] == "start"


# -- across a broker restart ---------------------------------------------------------------------


@pytest.mark.slow
def test_a_broker_restart_mid_reply_still_ends_with_the_whole_reply(
    broker: Broker, tmp_path: Path, probe_factory: Any
) -> None:
    d = Daemon(tmp_path / "node", broker, SMOLLM, QWEN_EDGE_MODEL__THREADS="1")
    d.start()
    try:
        with _client(broker, resend_after=3.0) as c:
            stream = c.stream(
                "Write a long story about a lighthouse keeper.", max_tokens=300, timeout=60
            )
            texts = [next(stream) for _ in range(3)]
            broker.stop()
            time.sleep(0.5)
            broker.start()
            texts += list(stream)
            reply = stream.reply
        assert reply is not None and reply.finish_reason in ("stop", "length")
        assert reply.usage["completion_tokens"] > 30  # it was streaming across the restart
        assert "".join(texts) == reply.text
        # The node's own record of the reply, replayed to another client: the very same text.
        check = Probe(broker, c.client_id)
        try:
            check.subscribe(f"{PREFIX}/{NODE}/reply/{c.client_id}/#")
            check.request("again", request_id=reply.request_id)
            got = {m["seq"]: m for m in check.collect(reply.request_id)}
            deadline = time.monotonic() + 20
            while len(got) <= max(got) and time.monotonic() < deadline:
                # The node's link may send the replay out of order after the broker restart.
                with contextlib.suppress(queue.Empty):
                    _, m, _ = check.messages.get(timeout=1)
                    got.setdefault(m["seq"], m)
            assert reply_text([got[s] for s in sorted(got)]) == reply.text, sorted(got)
        finally:
            check.close()
    finally:
        d.stop(signal.SIGKILL)


# -- the pool ------------------------------------------------------------------------------------


def _duo(broker: Broker, root: Path) -> list[Daemon]:
    env = {
        "QWEN_EDGE_MODEL__THREADS": "1",
        "QWEN_EDGE_MODEL__N_CTX": "1024",
        "QWEN_EDGE_FLEET__STATS_INTERVAL": "1",
    }
    nodes = [
        Daemon(root / n, broker, SMOLLM, QWEN_EDGE_NODE_ID=n, **env) for n in ("node-a", "node-b")
    ]
    for d in nodes:
        d.start(wait_ready=False)
    for d in nodes:
        assert d.notify is not None
        d.notify.wait_for("READY=1", timeout=90)
    return nodes


@pytest.fixture
def duo(broker: Broker, tmp_path: Path) -> Iterator[list[Daemon]]:
    nodes = _duo(broker, tmp_path)
    yield nodes
    for d in nodes:
        d.stop(signal.SIGKILL)


def test_pool_follow_ups_go_to_the_node_that_answered_first(
    duo: list[Daemon], broker: Broker, probe_factory: Any
) -> None:
    with _client(broker, node=None) as c:
        spy = probe_factory(c.client_id, broker)
        spy.subscribe(f"{PREFIX}/+/request/{c.client_id}")
        first = c.ask("My name is Ada.", conversation_id="pin", max_tokens=8, temperature=0)
        assert c.pinned_node("pin") == first.node
        replies = [
            c.ask("What is my name?", conversation_id="pin", max_tokens=8, temperature=0)
            for _ in range(3)
        ]
        other = c.ask("Hello.", conversation_id="other", max_tokens=4)
        fresh = c.ask("Start over.", conversation_id="pin", max_tokens=4, reset=True)
    topics = [t for t, _ in spy.raw]
    assert topics[0] == f"{PREFIX}/{POOL}/request/{c.client_id}"
    assert topics[1:4] == [f"{PREFIX}/{first.node}/request/{c.client_id}"] * 3
    assert topics[4:6] == [f"{PREFIX}/{POOL}/request/{c.client_id}"] * 2  # new, and reset
    assert all(r.node == first.node for r in replies)
    assert all(r.usage["prompt_tokens"] > first.usage["prompt_tokens"] for r in replies)
    assert {other.node, first.node} == {"node-a", "node-b"}  # the pool took turns
    assert c.pinned_node("pin") == fresh.node
    # `qwen-edge chat --node pool` asks the pool through the same client.
    env = {k: v for k, v in os.environ.items() if not k.startswith("QWEN_EDGE_")}
    env.update(QWEN_EDGE_MQTT__PORT=str(broker.port), QWEN_EDGE_NODE_ID="node-a")
    chat = subprocess.run(
        [sys.executable, "-m", "qwen_edge", "chat", "--node", POOL, "--max-tokens", "4", "Hi"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert chat.returncode == 0, chat.stderr
    assert re.search(r"\[(stop|length), node node-[ab]", chat.stderr), chat.stderr


@pytest.mark.slow
def test_node_lost_mid_reply_is_asked_again_once_on_the_pool(
    duo: list[Daemon], broker: Broker, probe_factory: Any
) -> None:
    restarts: list[int] = []
    with _client(broker, node=None) as c:
        watcher = probe_factory(c.client_id, broker)
        watcher.subscribe(f"{PREFIX}/+/reply/{c.client_id}/#")
        stream = c.stream(
            "Write a very long story about the sea.",
            max_tokens=200,
            temperature=0.8,
            timeout=60,
            on_restart=lambda: restarts.append(1),
        )
        before = [next(stream) for _ in range(3)]
        lost_id, victim = stream.request_id, stream.node
        assert victim in ("node-a", "node-b")
        next(d for d in duo if d.workdir.name == victim).stop(signal.SIGKILL)
        after = list(stream)
        reply = stream.reply
    assert reply is not None and reply.node != victim
    assert reply.request_id != lost_id  # a new request: the lost one's seqs must not mix
    assert restarts == [1] and stream.restarts == 1
    assert "".join(after) == reply.text and before
    seen = {json.loads(p)["request_id"]: json.loads(p) for _, p in watcher.raw}
    assert seen[lost_id]["code"] == "node_lost"  # what the survivor said about the lost one
    assert c.pinned_node("default") == reply.node


# -- a device's install --------------------------------------------------------------------------


@pytest.mark.slow
def test_client_installs_and_chats_without_the_node_extra(
    daemon: Daemon, module_broker: Broker, tmp_path: Path
) -> None:
    """`pip install qwen-edge` (no [node]): wheels only, no llama.cpp, no systemd; the client
    and `qwen-edge chat` work."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src)
    shutil.copytree(
        ROOT / "qwen_edge", src / "qwen_edge", ignore=shutil.ignore_patterns("__pycache__")
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    install = subprocess.run(
        [
            py,
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "-q",
            "--only-binary",
            ":all:",
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert install.returncode == 0, install.stderr
    probe = (
        "import sys, qwen_edge.client, qwen_edge.cli, qwen_edge.tools.chat\n"
        "import importlib.util as u\n"
        "print(u.find_spec('llama_cpp') is None, u.find_spec('systemd') is None,"
        " [m for m in sys.modules if m.startswith(('llama_cpp', 'systemd'))])\n"
    )
    # Not from the checkout, whose systemd/ folder would pass for a namespace package.
    found = subprocess.run(
        [py, "-c", probe], capture_output=True, text=True, check=False, cwd=tmp_path
    )
    assert found.returncode == 0, found.stderr
    assert found.stdout.split() == ["True", "True", "[]"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("QWEN_EDGE_")}
    env.update(QWEN_EDGE_MQTT__PORT=str(module_broker.port), QWEN_EDGE_NODE_ID=NODE)
    chat = subprocess.run(
        [str(venv / "bin" / "qwen-edge"), "chat", "--max-tokens", "8", "Say hi."],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip()


def test_chat_connects_with_the_configured_mqtt_version(tmp_path: Path) -> None:
    conf = tmp_path / "notice.conf"
    conf.write_text(BROKER_CONF.read_text() + "log_type notice\n")  # logs each connect
    b = Broker(tmp_path / "broker", conf)
    b.start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("QWEN_EDGE_")}
        env.update(QWEN_EDGE_MQTT__PORT=str(b.port), QWEN_EDGE_NODE_ID="nobody")
        for version in ("3.1.1", "5"):
            subprocess.run(
                [sys.executable, "-m", "qwen_edge", "chat", "--timeout", "0.5", "Hi"],
                env={**env, "QWEN_EDGE_MQTT__PROTOCOL": version},
                capture_output=True,
                timeout=60,
                check=False,
            )
        log = (b.workdir / "mosquitto.log").read_text(errors="replace")
    finally:
        b.stop()
    # mosquitto names the protocol of each connection: p2 is MQTT 3.1.1, p5 is MQTT 5.
    versions = re.findall(r"New client connected from \S+ as chat-\S+ \((p\d)", log)
    assert versions == ["p2", "p5"], log


def test_with_an_account_the_mqtt_client_id_is_its_name(tmp_path: Path) -> None:
    """A broker that binds a device account to the client id of its name refuses any other."""
    conf = tmp_path / "notice.conf"
    conf.write_text(BROKER_CONF.read_text() + "log_type notice\n")
    b = Broker(tmp_path / "broker", conf)
    b.start()
    try:
        with _client(b, client_id="devX", username="devX", password="pw"):
            pass
        with _client(b, client_id="devY"):
            pass
        log = (b.workdir / "mosquitto.log").read_text(errors="replace")
    finally:
        b.stop()
    assert re.search(r"as devX \(p5, c1, k30, u'devX'\)", log), log
    assert re.search(r"as devY-[0-9a-f]{8} \(p5", log), log  # anonymous: one per program
