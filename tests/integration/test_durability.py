"""Nothing lost across faults: the daemon SIGKILLed mid-stream and restarted, duplicate request
ids, and a state store that cannot be used. Real broker, real daemon, SmolLM2."""

from __future__ import annotations

import json
import queue
import signal
import sqlite3
import time
from collections import Counter
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from devtools.harness import NODE, PREFIX, SMOLLM, Broker, Daemon, Probe, reply_text
from qwen_edge.node.statestore import StateStore

ONE_SLOT = {
    "QWEN_EDGE_MODEL__SLOTS": "1",
    "QWEN_EDGE_MODEL__THREADS": "1",
    "QWEN_EDGE_MODEL__KV_KEEP_MB": "0",
}


@pytest.fixture
def node(broker: Broker, tmp_path: Path) -> Any:
    """make(**env) -> a daemon (not started) whose state lives in tmp_path/state, like every
    other one made here: a restart is another Daemon on the same state directory."""
    daemons: list[Daemon] = []

    def make(**env: str) -> Daemon:
        env.setdefault("QWEN_EDGE_SERVICE__STATE_DIR", str(tmp_path / "state"))
        d = Daemon(tmp_path / f"daemon{len(daemons)}", broker, SMOLLM, **{**ONE_SLOT, **env})
        daemons.append(d)
        return d

    yield make
    for d in daemons:
        d.stop(signal.SIGKILL)


def _inbox_size(state_dir: Path) -> int:
    """Requests the daemon has accepted (and acknowledged) and not finished, read from its
    store as another process may (WAL)."""
    with closing(sqlite3.connect(state_dir / "history.db", timeout=5)) as db:
        return int(db.execute("SELECT count(*) FROM inbox").fetchone()[0])


def _events(daemons: list[Daemon], event: str, **match: Any) -> list[dict[str, Any]]:
    return [
        e
        for d in daemons
        for e in d.log_events()
        if e.get("event") == event and all(e.get(k) == v for k, v in match.items())
    ]


def _logged(daemons: list[Daemon], event: str, count: int, **match: Any) -> None:
    """Wait until `event` is logged `count` times (the log line follows the reply's last
    message), then check it stays at that."""
    deadline = time.monotonic() + 10
    while len(_events(daemons, event, **match)) < count:
        assert time.monotonic() < deadline, f"{event} {match}: {_events(daemons, event)}"
        time.sleep(0.05)
    assert len(_events(daemons, event, **match)) == count


def _drain(probe: Probe, seconds: float) -> list[tuple[str, dict[str, Any], Any]]:
    got = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            got.append(probe.next_message(timeout=max(deadline - time.monotonic(), 0.01)))
        except queue.Empty:
            break
    return got


def test_sigkill_mid_stream_queued_requests_are_served_and_history_survives(
    node: Any, broker: Broker, tmp_path: Path
) -> None:
    first = node()
    first.start()
    dev = Probe(broker, "crashy", persistent=True)
    try:
        dev.subscribe(f"{PREFIX}/{NODE}/reply/crashy/#")
        greedy = {"temperature": 0}
        turn1 = dev.collect(
            dev.request("Name a colour.", conversation_id="keep", max_tokens=8, **greedy),
            timeout=120,
        )
        assert turn1[-1]["type"] == "done"

        # One slot: a long reply streams, three requests wait behind it.
        long_id = dev.request("Tell me a long story about a dragon.", max_tokens=1500, **greedy)
        follow_up = dev.request("And another one?", conversation_id="keep", max_tokens=6, **greedy)
        others = [dev.request(f"Say {w}.", conversation_id=w, max_tokens=4) for w in ("a", "b")]
        dev.until(long_id, 3, timeout=120)  # streaming; kept in the probe for below
        deadline = time.monotonic() + 30
        while _inbox_size(tmp_path / "state") < 4:  # all four accepted and acknowledged
            assert time.monotonic() < deadline, "the daemon never accepted the queued requests"
            time.sleep(0.05)
        first.stop(signal.SIGKILL)
        while_down = dev.request("Are you back?", conversation_id="late", max_tokens=4)

        second = node()
        second.start()
        served = {rid: dev.collect(rid, timeout=180) for rid in [follow_up, *others, while_down]}
        assert all(msgs[-1]["type"] == "done" for msgs in served.values()), served
        assert all([m["seq"] for m in msgs] == list(range(len(msgs))) for msgs in served.values())

        # The interrupted reply: what it sent before the kill, and nothing after, from either
        # process: no second start, no done, no error.
        late = [d for _, d, _ in _drain(dev, 3) if d.get("request_id") == long_id]
        interrupted = dev._stash.pop(long_id, []) + late  # until() kept what it read
        seqs = [m["seq"] for m in interrupted]
        assert sorted(seqs) == list(range(len(seqs)))  # one stream, no repeats
        assert {m["type"] for m in interrupted} <= {"start", "chunk"}
        assert _events([second], "request_interrupted", request_id=long_id)
        assert _events([first, second], "request_done", request_id=long_id) == []
        assert _inbox_size(tmp_path / "state") == 0

        # History survived: the follow-up's prompt held turn 1. The same two turns in a fresh
        # conversation without a restart give the same prompt.
        base1 = dev.collect(
            dev.request("Name a colour.", conversation_id="base", max_tokens=8, **greedy)
        )
        assert reply_text(base1) == reply_text(turn1)
        base2 = dev.collect(
            dev.request("And another one?", conversation_id="base", max_tokens=6, **greedy)
        )
        fresh = dev.collect(
            dev.request("And another one?", conversation_id="new", max_tokens=6, **greedy)
        )
        after_restart = served[follow_up][-1]["usage"]["prompt_tokens"]
        assert after_restart == base2[-1]["usage"]["prompt_tokens"]
        assert after_restart > fresh[-1]["usage"]["prompt_tokens"] + 4
    finally:
        dev.close()


def test_a_request_delivered_but_not_acknowledged_is_delivered_again(
    node: Any, broker: Broker
) -> None:
    first = node()
    first.start()
    dev = Probe(broker, "frozen", persistent=True)
    try:
        dev.subscribe(dev.reply_topic())
        assert first.proc is not None
        first.proc.send_signal(signal.SIGSTOP)  # the broker delivers; nobody reads or acks
        rid = dev.request("Hello", max_tokens=3)
        time.sleep(0.5)
        first.stop(signal.SIGKILL)
        second = node()
        second.start()
        assert dev.collect(rid, timeout=120)[-1]["type"] == "done"
        _logged([second], "request_done", 1, request_id=rid)
    finally:
        dev.close()


def test_a_request_kept_and_also_delivered_again_is_generated_once(
    node: Any, broker: Broker, tmp_path: Path
) -> None:
    """As if the node had committed a request and died before its PUBACK went out: the
    request is in its inbox, and the broker delivers it again."""
    first = node()
    first.start()
    topic = f"{PREFIX}/{NODE}/request/twin"
    body = json.dumps({"request_id": "both", "message": "Hi", "max_tokens": 3}).encode()
    dev = Probe(broker, "twin", persistent=True)
    try:
        dev.subscribe(dev.reply_topic())
        first.stop(signal.SIGKILL)
        store = StateStore(tmp_path / "state")
        assert store.accept(topic, body, None, None) is not None
        store.close()
        dev.publish(topic, body)
        second = node()
        second.start()
        msgs = dev.collect("both", timeout=120)
        assert msgs[-1]["type"] == "done"
        _logged([second], "request_done", 1, request_id="both")
        _drain(dev, 2)
        duplicates = [
            e["event"]
            for e in second.log_events()
            if e.get("event") in ("duplicate_ignored", "duplicate_replayed")
        ]
        assert len(duplicates) == 1, duplicates  # the second copy was seen, and not run
        copies = Counter(p for _, p in dev.raw if b'"both"' in p)
        assert len(copies) == len(msgs)  # one reply, perhaps sent twice (the replay)
        assert set(copies.values()) <= {1, 2}
    finally:
        dev.close()


def test_a_request_id_is_generated_once_whatever_the_duplicates(node: Any, broker: Broker) -> None:
    first = node()
    first.start()
    dev = Probe(broker, "twice", persistent=True)
    try:
        dev.subscribe(f"{PREFIX}/{NODE}/reply/twice/#")
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = f"{PREFIX}/{NODE}/reply/twice/inbox"
        props.CorrelationData = b"\x00job-7"
        body = json.dumps({"request_id": "dup-1", "message": "Count to five.", "max_tokens": 24})

        def send() -> None:
            dev.publish(f"{PREFIX}/{NODE}/request/twice", body, props)

        send()
        send()  # while it runs: ignored, its stream answers both
        original = dev.collect("dup-1", timeout=120)
        assert original[-1]["type"] == "done"
        send()  # after done: the same reply again
        send()
        time.sleep(0.5)
        first.stop(signal.SIGKILL)
        second = node()
        second.start()
        send()  # after a restart too
        deadline = time.monotonic() + 30
        expected = len(original) * 4  # the original and three replays
        while sum(1 for t, _ in dev.raw if t.endswith("/inbox")) < expected:
            assert time.monotonic() < deadline, "a duplicate was not answered"
            time.sleep(0.05)
        _drain(dev, 1)

        copies = Counter(payload for topic, payload in dev.raw if topic.endswith("/inbox"))
        assert len(copies) == len(original)  # the same messages...
        assert set(copies.values()) == {4}  # ...each exactly four times, nothing else
        assert not [t for t, _ in dev.raw if t.endswith("/default")]  # only the response topic
        daemons = [first, second]
        _logged(daemons, "duplicate_replayed", 3, request_id="dup-1")
        _logged(daemons, "request_done", 1, request_id="dup-1")
        _logged(daemons, "duplicate_ignored", 1, request_id="dup-1")
    finally:
        dev.close()


def test_a_new_request_id_is_a_new_generation(node: Any, broker: Broker) -> None:
    d = node()
    d.start()
    dev = Probe(broker, "fresh")
    try:
        dev.subscribe(dev.reply_topic())
        a = dev.collect(dev.request("Hi", request_id="one", max_tokens=3))
        b = dev.collect(dev.request("Hi", request_id="two", max_tokens=3))
        assert a[-1]["type"] == b[-1]["type"] == "done"
        _logged([d], "request_done", 2)
    finally:
        dev.close()


@pytest.mark.parametrize("fault", ["garbage", "unwritable"])
def test_unusable_store_never_stops_the_node(
    node: Any, broker: Broker, tmp_path: Path, fault: str
) -> None:
    state = tmp_path / "state"
    if fault == "garbage":
        state.mkdir()
        (state / "history.db").write_bytes(b"\x00garbage" * 1000)
    else:
        state.write_text("a file where the state directory should be")
    d = node()
    d.start()
    dev = Probe(broker, "anyway")
    try:
        dev.subscribe(dev.reply_topic())
        assert dev.collect(dev.request("Hi", max_tokens=3))[-1]["type"] == "done"
        problems = [e for e in d.log_events() if e.get("level") in ("warning", "error")]
        if fault == "garbage":
            assert [e["event"] for e in problems] == ["state_store_moved_aside"]
            assert len(list(state.glob("history.db.corrupt-*"))) == 1
            assert _inbox_size(state) == 0  # the fresh store is in use
        else:
            assert [e["event"] for e in problems] == ["state_store_in_memory"]
        assert d.stop() == 0
    finally:
        dev.close()
