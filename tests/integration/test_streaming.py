"""Protocol v1 end to end: a real mosquitto, the daemon process, SmolLM2-135M-Instruct."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from devtools.harness import NODE, PREFIX, SMOLLM, Daemon, Probe, reply_text

pytestmark = pytest.mark.usefixtures("daemon")


def _props(response_topic: str, correlation: bytes) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = response_topic
    props.CorrelationData = correlation
    return props


@pytest.mark.smoke
def test_reply_stream_has_start_chunks_done_with_contiguous_seq(probe_factory: Any) -> None:
    dev = probe_factory("dev1")
    dev.subscribe(dev.reply_topic())
    rid = dev.request("Name three colours.", max_tokens=24, temperature=0)
    msgs = dev.collect(rid)

    assert [m["seq"] for m in msgs] == list(range(len(msgs)))
    start, *chunks, done = msgs
    assert start == {
        "type": "start",
        "request_id": rid,
        "seq": 0,
        "node": NODE,
        "model": "SmolLM2-135M-Instruct.Q4_1",
    }
    assert chunks and all(m["type"] == "chunk" and m["text"] for m in chunks)
    assert done["type"] == "done"
    assert done["finish_reason"] in ("stop", "length")
    assert done["usage"]["prompt_tokens"] > 0
    assert 0 < done["usage"]["completion_tokens"] <= 24
    assert done["timings"]["ttft_ms"] > 0
    assert all(m["request_id"] == rid for m in msgs)


def test_max_tokens_ends_with_length(probe_factory: Any) -> None:
    dev = probe_factory("dev1")
    dev.subscribe(dev.reply_topic())
    rid = dev.request("Write a long story about a dragon.", max_tokens=5, temperature=0)
    done = dev.collect(rid)[-1]
    assert done["finish_reason"] == "length"
    assert done["usage"]["completion_tokens"] == 5


def test_chunks_arrive_before_the_reply_is_done(probe_factory: Any) -> None:
    dev = probe_factory("dev1")
    dev.subscribe(dev.reply_topic())
    rid = dev.request("Count from one to twenty in words.", max_tokens=60, temperature=0)
    arrivals: list[tuple[float, str]] = []
    while True:
        _, data, _ = dev.next_message(timeout=60)
        if data.get("request_id") != rid:
            continue
        arrivals.append((time.monotonic(), data["type"]))
        if data["type"] in ("done", "error"):
            break
    first_chunk = next(t for t, kind in arrivals if kind == "chunk")
    assert arrivals[-1][0] - first_chunk > 0.05, "chunks were not streamed, they came in one burst"


@pytest.mark.smoke
def test_greedy_reply_equals_llama_cpp_python_create_chat_completion(
    probe_factory: Any,
) -> None:
    from llama_cpp import Llama

    messages = [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    dev = probe_factory("parity")
    dev.subscribe(dev.reply_topic("p1"))
    rid = dev.request(
        messages[1]["content"],
        system=messages[0]["content"],
        conversation_id="p1",
        max_tokens=48,
        temperature=0,
    )
    ours = dev.collect(rid)

    from llama_cpp import GGML_TYPE_Q8_0

    # The daemon's defaults: flash attention, q8_0 KV cache.
    llm = Llama(
        model_path=str(SMOLLM),
        n_ctx=2048,
        flash_attn=True,
        type_k=GGML_TYPE_Q8_0,
        type_v=GGML_TYPE_Q8_0,
        verbose=False,
    )
    ref = llm.create_chat_completion(messages=messages, temperature=0, max_tokens=48)  # type: ignore[arg-type]
    assert reply_text(ours) == ref["choices"][0]["message"]["content"]
    assert ours[-1]["usage"]["prompt_tokens"] == ref["usage"]["prompt_tokens"]


@pytest.mark.smoke
def test_follow_up_turn_sees_history(probe_factory: Any) -> None:
    dev = probe_factory("memo")
    dev.subscribe(dev.reply_topic("c1"))
    first = dev.collect(
        dev.request("My name is Ada.", conversation_id="c1", temperature=0, max_tokens=16)
    )
    second = dev.collect(
        dev.request("What is my name?", conversation_id="c1", temperature=0, max_tokens=16)
    )
    # The second prompt holds the first turn: it is longer than the first prompt by at least
    # the first reply and the new question.
    p1 = first[-1]["usage"]["prompt_tokens"]
    p2 = second[-1]["usage"]["prompt_tokens"]
    assert p2 > p1 + first[-1]["usage"]["completion_tokens"]

    fresh = dev.collect(
        dev.request(
            "What is my name?", conversation_id="c1", reset=True, temperature=0, max_tokens=16
        )
    )
    assert fresh[-1]["usage"]["prompt_tokens"] < p2


def test_conversations_of_different_clients_are_separate(probe_factory: Any) -> None:
    alice, mallory = probe_factory("alice"), probe_factory("mallory")
    alice.subscribe(alice.reply_topic("shared"))
    mallory.subscribe(mallory.reply_topic("shared"))
    a1 = alice.collect(
        alice.request("Remember: the code is 4711.", conversation_id="shared", max_tokens=8)
    )
    m1 = mallory.collect(
        mallory.request("Remember: the code is 4711.", conversation_id="shared", max_tokens=8)
    )
    # Same conversation id, same message: mallory's prompt has no history from alice.
    assert m1[-1]["usage"]["prompt_tokens"] == a1[-1]["usage"]["prompt_tokens"]
    # And alice's stream never showed up on mallory's topic.
    while not mallory.messages.empty():
        _topic, data, _ = mallory.messages.get_nowait()
        assert data.get("request_id") != a1[0]["request_id"]


@pytest.mark.smoke
def test_cancel_stops_generation_with_done_cancelled(probe_factory: Any) -> None:
    dev = probe_factory("canceller")
    dev.subscribe(dev.reply_topic())
    rid = dev.request("Write a very long essay about the sea.", max_tokens=2000, temperature=0.7)
    read: list[dict[str, Any]] = []  # handed to collect(), which otherwise waits for them
    while sum(m["type"] == "chunk" for m in read) < 3:
        _, data, _ = dev.next_message(timeout=60)
        if data.get("request_id") == rid:
            read.append(data)
    dev.publish(f"{PREFIX}/{NODE}/cancel/canceller", json.dumps({"request_id": rid}))
    msgs = dev.collect(rid, before=read)
    assert msgs[-1]["type"] == "done"
    assert msgs[-1]["finish_reason"] == "cancelled"
    assert msgs[-1]["usage"]["completion_tokens"] < 2000


def test_another_client_cannot_cancel(probe_factory: Any) -> None:
    dev, other = probe_factory("owner"), probe_factory("intruder")
    dev.subscribe(dev.reply_topic())
    rid = dev.request("Tell me about rivers.", max_tokens=40, temperature=0)
    other.publish(f"{PREFIX}/{NODE}/cancel/intruder", json.dumps({"request_id": rid}))
    assert dev.collect(rid)[-1]["finish_reason"] in ("stop", "length")


@pytest.mark.smoke
@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"{not json", "bad_request"),
        (b"\xff\xfe\x00garbage", "bad_request"),
        (b"[1, 2, 3]", "bad_request"),
        (b'{"message": "hi"}', "bad_request"),
        (b'{"request_id": "has space", "message": "hi"}', "bad_request"),
        (b"[" * 30_000 + b"]" * 30_000, "bad_request"),
        (b"[" * 50_000 + b"]" * 50_000, "too_large"),
    ],
)
def test_unreadable_requests_get_an_error_on_the_error_topic(
    probe_factory: Any, payload: bytes, code: str
) -> None:
    dev = probe_factory("badclient")
    dev.subscribe(f"{PREFIX}/{NODE}/error/badclient")
    dev.publish(f"{PREFIX}/{NODE}/request/badclient", payload)
    topic, data, _ = dev.next_message(timeout=10)
    assert topic == f"{PREFIX}/{NODE}/error/badclient"
    assert data["type"] == "error"
    assert data["code"] == code
    assert data["request_id"] is None
    assert data["message"]


@pytest.mark.smoke
@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"message": ""}, "bad_request"),
        ({"message": "hi", "temperature": "hot"}, "bad_request"),
        ({"message": "hi", "max_tokens": 0}, "bad_request"),
        ({"message": "hi", "top_p": 1.5}, "bad_request"),
        ({"message": "x" * 70_000}, "too_large"),
        ({"message": "word " * 6_000}, "context_overflow"),
    ],
)
def test_invalid_requests_with_readable_ids_get_an_error_on_the_reply_topic(
    probe_factory: Any, fields: dict[str, Any], code: str
) -> None:
    dev = probe_factory("badfields")
    dev.subscribe(dev.reply_topic("conv-9"))
    rid = uuid.uuid4().hex[:8]
    payload = json.dumps({"request_id": rid, "conversation_id": "conv-9", **fields})
    if code == "too_large":
        dev.subscribe(f"{PREFIX}/{NODE}/error/badfields")
    dev.publish(f"{PREFIX}/{NODE}/request/badfields", payload)
    if code == "too_large":  # the daemon does not read an oversized payload at all
        _, data, _ = dev.next_message(timeout=10)
        assert data["code"] == "too_large"
        return
    msgs = dev.collect(rid, timeout=30)
    assert msgs[-1]["type"] == "error"
    assert msgs[-1]["code"] == code
    assert msgs[-1]["seq"] == len(msgs) - 1


@pytest.mark.smoke
def test_daemon_keeps_serving_after_bad_input(probe_factory: Any, daemon: Daemon) -> None:
    dev = probe_factory("resilient")
    dev.subscribe(dev.reply_topic())
    for junk in (b"", b"null", b"\x00" * 100, "\ud800".encode("utf-8", "surrogatepass")):
        dev.publish(f"{PREFIX}/{NODE}/request/resilient", junk)
    msgs = dev.collect(dev.request("Hi!", max_tokens=4))
    assert msgs[-1]["type"] == "done"
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_response_topic_inside_namespace_is_honoured_with_correlation(probe_factory: Any) -> None:
    dev = probe_factory("rt")
    target = f"{PREFIX}/{NODE}/reply/rt/custom/inbox"
    dev.subscribe(target)
    rid = uuid.uuid4().hex[:8]
    dev.publish(
        f"{PREFIX}/{NODE}/request/rt",
        json.dumps({"request_id": rid, "message": "Hi", "max_tokens": 4}),
        _props(target, b"corr-42"),
    )
    seen = []
    while True:
        topic, data, props = dev.next_message(timeout=30)
        assert topic == target
        assert props.CorrelationData == b"corr-42"
        seen.append(data)
        if data["type"] in ("done", "error"):
            break
    assert seen[-1]["type"] == "done"


def test_response_topic_outside_namespace_is_refused(probe_factory: Any) -> None:
    dev, victim = probe_factory("attacker"), probe_factory("victim")
    victim.subscribe(f"{PREFIX}/#")
    dev.subscribe(dev.reply_topic())
    rid = uuid.uuid4().hex[:8]
    dev.publish(
        f"{PREFIX}/{NODE}/request/attacker",
        json.dumps({"request_id": rid, "message": "Hi", "max_tokens": 4}),
        _props(f"{PREFIX}/{NODE}/reply/victim/default", b"x"),
    )
    msgs = dev.collect(rid, timeout=10)
    assert msgs[-1]["type"] == "error"
    assert msgs[-1]["code"] == "forbidden"
    time.sleep(0.3)
    topics = [t for t, _ in victim.raw]
    assert not any(t.startswith(f"{PREFIX}/{NODE}/reply/victim") for t in topics)


def test_status_is_retained_online(probe_factory: Any) -> None:
    dev = probe_factory("watcher")
    dev.subscribe(f"{PREFIX}/{NODE}/status")
    _topic, data, _ = dev.next_message(timeout=5)
    assert data["state"] == "online"
    assert data["model"] == "SmolLM2-135M-Instruct.Q4_1"
    assert data["version"]


def test_concurrent_requests_all_complete(probe_factory: Any) -> None:
    devs = [probe_factory(f"k{i}") for i in range(4)]
    for d in devs:
        d.subscribe(d.reply_topic())
    rids = [d.request("Say hello.", max_tokens=12, temperature=0) for d in devs]
    results = [d.collect(r) for d, r in zip(devs, rids, strict=True)]
    assert all(r[-1]["type"] == "done" for r in results)
    # Same prompt, greedy: every stream has the same text whatever slot served it.
    assert len({reply_text(r) for r in results}) == 1


def test_busy_when_slots_and_queue_are_full(module_broker: Any, tmp_path: Any) -> None:
    d = Daemon(
        tmp_path / "busy",
        module_broker,
        SMOLLM,
        QWEN_EDGE_NODE_ID="busynode",
        QWEN_EDGE_MODEL__SLOTS="1",
        QWEN_EDGE_MODEL__QUEUE_SIZE="1",
    )
    d.start()
    dev = Probe(module_broker, "flood")
    try:
        dev.subscribe(f"{PREFIX}/busynode/reply/flood/#")
        rids = [
            dev.request(
                "Write a long poem.", node="busynode", max_tokens=48, conversation_id=f"c{i}"
            )
            for i in range(4)
        ]
        ends = {}
        # Generous: on a loaded 2-core machine this model may decode at 2 tokens/s.
        deadline = time.monotonic() + 300
        while len(ends) < 4 and time.monotonic() < deadline:
            _, data, _ = dev.next_message(timeout=60)
            if data.get("type") in ("done", "error"):
                ends[data["request_id"]] = data
        codes = [ends[r].get("code", ends[r]["type"]) for r in rids]
        assert codes.count("done") == 2  # one in the slot, one waiting
        assert codes.count("busy") == 2
    finally:
        dev.close()
        d.stop()


def test_chat_command_streams_one_reply_to_the_terminal(module_broker: Any) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("QWEN_EDGE_")}
    env.update(QWEN_EDGE_MQTT__PORT=str(module_broker.port), QWEN_EDGE_NODE_ID=NODE)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwen_edge",
            "chat",
            "--max-tokens",
            "8",
            "--temperature",
            "0",
            "--client-id",
            "terminal",
            "Say hi.",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "[stop" in result.stderr or "[length" in result.stderr
