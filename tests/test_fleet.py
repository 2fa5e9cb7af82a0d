"""Several nodes behind one broker: the request pool, pinning, failover, the fleet view.

End-to-end tests run real daemons (SmolLM2-135M, one thread each: three llama.cpp processes on
two cores) against a real mosquitto.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from devtools.harness import PREFIX, ROOT, SMOLLM, Broker, Daemon, Probe
from qwen_edge.node.failover import Failover
from qwen_edge.node.replies import ReplyStream
from qwen_edge.protocol import (
    MAX_CLAIMS,
    Claim,
    Claims,
    FinishReason,
    Stats,
    Status,
    encode,
    final_seq,
    parse_claims,
)
from qwen_edge.settings import ConfigError, Settings, load_settings
from qwen_edge.tools.fleet import NodeView, table
from qwen_edge.topics import (
    FleetTopics,
    InboundTopic,
    TopicKind,
    WatchedTopic,
    WatchKind,
    parse_node_topic,
)

POOL = "pool"
TRIO = ("node-a", "node-b", "node-c")
ENDS = ("done", "error")


# -- settings ----------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("QWEN_EDGE_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_fleet_settings_defaults_and_environment(clean_env: pytest.MonkeyPatch) -> None:
    s = load_settings()
    assert (s.fleet.enabled, s.fleet.group, s.fleet.stats_interval) == (True, "pool", 10.0)
    clean_env.setenv("QWEN_EDGE_FLEET__GROUP", "kitchen-pool")
    clean_env.setenv("QWEN_EDGE_FLEET__STATS_INTERVAL", "2.5")
    s = load_settings()
    assert (s.fleet.group, s.fleet.stats_interval) == ("kitchen-pool", 2.5)


def test_node_named_like_its_pool_is_refused(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("QWEN_EDGE_NODE_ID", "pool")
    with pytest.raises(ConfigError, match="node_id"):
        load_settings()
    clean_env.setenv("QWEN_EDGE_FLEET__ENABLED", "false")  # no pool topics: no ambiguity
    assert load_settings().node_id == "pool"


@pytest.mark.parametrize("group", ["a/b", "+", "#", ""])
def test_group_must_be_one_topic_level(clean_env: pytest.MonkeyPatch, group: str) -> None:
    clean_env.setenv("QWEN_EDGE_FLEET__GROUP", group)
    with pytest.raises(ConfigError, match="FLEET__GROUP"):
        load_settings()


# -- topics ------------------------------------------------------------------------------------

FT = FleetTopics.of("site/llm", "n1", POOL)


def test_pool_topics_have_the_shape_of_a_nodes() -> None:
    assert FT.shared_requests == "$share/pool/site/llm/pool/request/+"
    # No subscription carries other nodes' replies: a node's own probe echo, then claims.
    assert FT.subscriptions == (
        "$share/pool/site/llm/pool/request/+",
        "site/llm/pool/cancel/+",
        "site/llm/pool/reply/$probe/n1",
        "site/llm/pool/claims/+",
        "site/llm/+/status",
    )
    assert FT.pool.reply("dev1", "c1") == "site/llm/pool/reply/dev1/c1"
    assert FT.pool.error("dev1") == "site/llm/pool/error/dev1"
    assert FT.claims("n2") == "site/llm/pool/claims/n2"
    assert FT.own.stats == "site/llm/n1/stats"
    with pytest.raises(ValueError):
        FleetTopics.of("p", "pool", "pool")


def test_pool_topics_parse_apart_from_node_topics() -> None:
    # A shared subscription's message arrives under the plain topic, without "$share/pool/".
    assert FT.parse("site/llm/pool/request/dev1") == InboundTopic(TopicKind.REQUEST, "dev1", True)
    assert FT.parse("site/llm/pool/cancel/dev1") == InboundTopic(TopicKind.CANCEL, "dev1", True)
    assert FT.parse("site/llm/pool/reply/$probe/n1") == WatchedTopic(WatchKind.REPLY, "$probe")
    assert FT.parse("site/llm/pool/reply/dev1/in/box") == WatchedTopic(WatchKind.REPLY, "dev1")
    assert FT.parse("site/llm/pool/claims/n2") == WatchedTopic(WatchKind.CLAIMS, "n2")
    assert FT.parse("site/llm/n2/status") == WatchedTopic(WatchKind.STATUS, "n2")
    assert FT.own.parse("site/llm/n1/request/dev1") == InboundTopic(TopicKind.REQUEST, "dev1")
    for topic in (
        "site/llm/pool/reply/dev1",
        "site/llm/pool/reply//c1",
        "site/llm/pool/claims/",
        "site/llm/n1/request/dev1",  # the node's own: its main link handles those
        "site/llm/n2/reply/dev1/c1",
        "$share/pool/site/llm/pool/request/dev1",
        "other/pool/request/dev1",
        "site/llm/n2/status/x",
    ):
        assert FT.parse(topic) is None, topic
    assert parse_node_topic("site/llm", "site/llm/n2/stats") == WatchedTopic(WatchKind.STATS, "n2")


def test_claims_round_trip_and_anything_else_is_no_claims() -> None:
    claims = Claims("n2", "b00t", 2051, (Claim("t/1", "r1", b"\x00\xff"), Claim("t/2", "r2", None)))
    assert parse_claims(claims.encode()) == claims
    assert parse_claims(Claims("n2", "b00t", 9, ()).encode()) == Claims("n2", "b00t", 9, ())
    too_many = [{"topic": "t", "request_id": str(i)} for i in range(MAX_CLAIMS + 1)]
    for payload in (
        b"",  # a cleared retained message
        b"[]",
        b'{"node":"n2","boot":"b","final_seq":9}',
        b'{"node":"n2","boot":"b","final_seq":"9","replies":[]}',
        b'{"node":"n2","boot":"b","final_seq":9,"replies":[{"topic":"t","request_id":"r",'
        b'"correlation":"not base64!"}]}',
        encode({"node": "n2", "boot": "b", "final_seq": 9, "replies": too_many}),
        b"\xff",
    ):
        assert parse_claims(payload) is None, payload


def test_final_seq_sorts_after_every_message_a_reply_can_have() -> None:
    # start, a chunk per token, the held-back tail, done: numbered 0 .. limit + 2.
    limit = 5
    stream = ReplyStream(lambda t, p, c: None, "t", "r")
    stream.start("n", "m")
    for i in range(limit):
        stream.chunk(f"t{i}")
    stream.chunk("held-back tail")
    stream.done(FinishReason.LENGTH, 1, limit, 1.0, 1.0)
    assert stream.seq - 1 < final_seq(limit)


# -- failover, in process ----------------------------------------------------------------------

Sent = list[tuple[str, dict[str, Any], bytes | None]]


class _Pool:
    """Failovers of one pool with a recording broker: retained claims reach every member (as
    the pool link's `claims/+` does), node_lost errors are recorded, timers run by hand."""

    def __init__(self, *nodes: str, **kw: Any) -> None:
        self.sent: Sent = []
        self.retained: dict[str, bytes] = {}
        self.claims_sent = 0
        self.later: list[Callable[[], None]] = []
        self.fos: dict[str, Failover] = {}
        for node in nodes or ("a",):
            self.join(node, **kw)

    def join(self, node: str, **kw: Any) -> Failover:
        """A (new) process of `node`: subscribed, it gets every retained claims message."""
        fo = Failover(
            node,
            POOL,
            lambda t, p, c: self.sent.append((t, json.loads(p), c)),
            publish_retained=self._retain,
            claims_topic=partial(FleetTopics.of(PREFIX, node, POOL).claims),
            final_seq=final_seq(100),
            schedule=lambda delay, fn: self.later.append(fn),
            **kw,
        )
        self.fos[node] = fo
        for topic, payload in list(self.retained.items()):
            fo.on_claims(topic.rpartition("/")[2], payload)
        return fo

    @property
    def fo(self) -> Failover:
        return next(iter(self.fos.values()))

    def _retain(self, topic: str, payload: bytes) -> None:
        self.claims_sent += 1
        if payload:
            self.retained[topic] = payload
        else:
            self.retained.pop(topic, None)
        for fo in list(self.fos.values()):
            fo.on_claims(topic.rpartition("/")[2], payload)

    def status(self, node: str, state: str, reason: str | None = None, **kw: Any) -> None:
        """`node`'s status as every member sees it."""
        group = kw.pop("group", POOL)
        body = {"state": state, "node": node, "reason": reason, "group": group}
        for fo in self.fos.values():
            fo.on_status(node, encode({k: v for k, v in body.items() if v}), **kw)

    def grace_ends(self) -> None:
        while self.later:
            later, self.later = self.later, []
            for fn in later:
                fn()

    def ended(self) -> list[tuple[str, int]]:
        return [(e["request_id"], e["seq"]) for _, e, _ in self.sent]


def test_the_leader_ends_the_claimed_replies_of_a_lost_node() -> None:
    pool = _Pool("a", "b", "c")
    for node in "abc":
        pool.status(node, "online")
    b, c = pool.fos["b"], pool.fos["c"]
    b.claim("p/pool/reply/d1/c1", "r1", b"corr")  # open
    b.claim("p/pool/reply/d1/c2", "r2", None)()  # ended: released at once
    c.claim("p/pool/reply/d2/c1", "r3", None)  # another node's, open
    pool.grace_ends()  # the coalesced claims messages go out
    assert pool.fo.watched_replies == 2
    assert pool.fo.is_leader()

    del pool.fos["b"]  # crashed
    pool.status("b", "offline", "connection lost")
    assert pool.sent == []  # not before the grace period
    pool.grace_ends()

    assert len(pool.sent) == 1
    topic, error, correlation = pool.sent[0]
    assert topic == "p/pool/reply/d1/c1"
    assert correlation == b"corr"
    assert error["type"] == "error"
    assert error["code"] == "node_lost"
    # Past any seq the reply could reach: it sorts after whatever the client saw.
    assert (error["request_id"], error["seq"]) == ("r1", final_seq(100))
    assert "node b" in error["message"]
    assert "connection lost" in error["message"]
    assert pool.fo.watched_replies == 1  # c's reply stays claimed
    assert FleetTopics.of(PREFIX, "b", POOL).claims("b") not in pool.retained  # cleared
    pool.status("c", "offline", "connection lost")
    pool.grace_ends()
    assert pool.ended() == [("r1", final_seq(100)), ("r3", final_seq(100))]  # once each


def test_claims_are_sent_at_once_and_their_releases_coalesced() -> None:
    now = [0.0]
    pool = _Pool("a", clock=lambda: now[0])
    a = pool.fo
    first = a.claim("t/1", "r1", None)
    assert pool.claims_sent == 1  # before the scheduler can send `start`
    releases = [a.claim(f"t/{i}", f"r{i}", None) for i in range(2, 6)]
    assert pool.claims_sent == 5
    first()
    assert pool.claims_sent == 5  # a release within the interval: later
    now[0] = 0.2
    pool.grace_ends()
    assert pool.claims_sent == 6
    held = parse_claims(pool.retained[FleetTopics.of(PREFIX, "a", POOL).claims("a")])
    assert held is not None
    assert [c.request_id for c in held.replies] == ["r2", "r3", "r4", "r5"]
    for release in releases:
        release()
        release()  # a second call does nothing
    now[0] = 0.4
    pool.grace_ends()
    assert pool.claims_sent == 7  # four releases, one message
    held = parse_claims(pool.retained[FleetTopics.of(PREFIX, "a", POOL).claims("a")])
    assert held is not None and held.replies == () and a.held == 0


def test_a_duplicate_request_is_claimed_once_and_its_release_keeps_the_original() -> None:
    pool = _Pool("a")
    original = pool.fo.claim("t/1", "r1", None)
    pool.fo.claim("t/1", "r1", None)()  # the duplicate: refused, released at once
    pool.grace_ends()
    held = parse_claims(pool.retained[FleetTopics.of(PREFIX, "a", POOL).claims("a")])
    assert held is not None and [c.request_id for c in held.replies] == ["r1"]
    original()


def test_only_the_lowest_online_node_ends_them_and_a_new_leader_catches_up() -> None:
    pool = _Pool("b", "c")
    for node in "abc":
        pool.status(node, "online")
    assert not pool.fos["b"].is_leader()
    pool.fos["c"].claim("p/pool/reply/d/c", "r1", None)
    del pool.fos["c"]
    pool.status("c", "offline", "connection lost")
    pool.grace_ends()
    assert pool.sent == []  # "a" is the leader
    pool.status("a", "offline", "connection lost")  # ... and went with it
    pool.grace_ends()
    assert pool.ended() == [("r1", final_seq(100))]  # "b" ends c's orphan too


def test_a_broker_going_down_is_no_loss() -> None:
    # mosquitto publishes every Last Will as it shuts down; then our own link drops too.
    pool = _Pool("a", "b")
    pool.status("a", "online")
    pool.status("b", "online")
    pool.fos["b"].claim("p/pool/reply/d/c", "r1", None)
    pool.status("b", "offline", "connection lost")
    pool.fo.on_link_down()
    pool.grace_ends()
    # Back: the retained will is old news, then b reconnects and streams on.
    pool.status("b", "offline", "connection lost", retained=True)
    pool.grace_ends()
    pool.status("b", "online")
    pool.fo.check_losses()
    assert pool.sent == []
    assert pool.fo.watched_replies == 1


def test_a_node_back_before_the_grace_ends_still_lost_its_replies() -> None:
    pool = _Pool("a", "b")
    pool.status("a", "online")
    pool.status("b", "online")
    pool.fos["b"].claim("p/pool/reply/d/c", "old", None)
    pool.grace_ends()
    pool.status("b", "offline", "connection lost")
    pool.fos.pop("b")  # restarted at once: a new process, which finds its old claims
    new = pool.join("b")
    pool.status("b", "online")
    new.claim("p/pool/reply/d/c", "new", None)
    pool.grace_ends()
    # Ended by the new process itself (a lone node would do the same) and by the leader, with
    # the same seq: the client de-duplicates by (request_id, seq).
    assert set(pool.ended()) == {("old", final_seq(100))}
    assert pool.fo.watched_replies == 1  # the new process's reply


def test_a_lone_node_ends_the_replies_of_its_previous_process() -> None:
    pool = _Pool("a")
    pool.fo.claim("p/pool/reply/d/c", "r1", b"x")
    pool.fos.pop("a")  # crashed; nobody else in the pool
    assert pool.sent == []
    pool.join("a")  # restarted: its old claims are still retained
    assert pool.ended() == [("r1", final_seq(100))]
    held = parse_claims(pool.retained[FleetTopics.of(PREFIX, "a", POOL).claims("a")])
    assert held is not None and held.replies == ()


def test_a_node_whose_claims_were_cleared_while_running_says_them_again() -> None:
    # A node only cut off (its will published, the leader ended and cleared its claims) and
    # back: its claims must be there for the next loss.
    pool = _Pool("a", "b")
    pool.fos["b"].claim("p/pool/reply/d/c", "r1", None)
    topic = FleetTopics.of(PREFIX, "b", POOL).claims("b")
    pool._retain(topic, b"")
    held = parse_claims(pool.retained[topic])
    assert held is not None and [c.request_id for c in held.replies] == ["r1"]


def test_nodes_of_other_pools_and_unknown_nodes_are_left_alone() -> None:
    pool = _Pool("b", "z")
    pool.status("a", "online", group="elsewhere")  # not a member: not the leader
    assert pool.fos["b"].is_leader()
    pool.fos["z"].claim("p/pool/reply/d/c", "r1", None)  # node z: status never seen
    del pool.fos["z"]
    pool.status("y", "offline", "connection lost")
    pool.grace_ends()
    assert pool.sent == []
    assert pool.fos["b"].watched_replies == 1


def test_claims_on_another_nodes_topic_are_ignored() -> None:
    pool = _Pool("a")
    pool.status("b", "online")
    forged = Claims("c", "boot", 9, (Claim("t", "r", None),)).encode()
    pool.fo.on_claims("b", forged)
    assert pool.fo.watched_replies == 0


def test_fleet_table_shows_load_of_online_nodes_only() -> None:
    views = {
        "a": NodeView(
            "a",
            Status(state="online", model="m", slots=2),
            Stats(active_slots=1, queue_depth=3, tokens_per_s=41.25, uptime_s=3725),
        ),
        "b": NodeView("b", Status(state="offline", model="m"), Stats(active_slots=2)),
    }
    lines = table(views).splitlines()
    assert lines[0].split() == ["NODE", "STATE", "MODEL", "SLOTS", "QUEUE", "TOK/S", "UPTIME"]
    assert lines[1].split() == ["a", "online", "m", "1/2", "3", "41.2", "1h02m"]
    assert lines[2].split() == ["b", "offline", "m", "-/-", "-", "-", "-"]


# -- end to end --------------------------------------------------------------------------------


def _fleet_env(**extra: str) -> dict[str, str]:
    return {
        # One llama.cpp thread per daemon: three busy-waiting pairs on two cores crawl.
        "QWEN_EDGE_MODEL__THREADS": "1",
        "QWEN_EDGE_MODEL__N_CTX": "1024",
        "QWEN_EDGE_MODEL__SLOTS": "2",
        "QWEN_EDGE_FLEET__STATS_INTERVAL": "1",
        **extra,
    }


def _start_nodes(broker: Broker, root: Path, names: tuple[str, ...], **env: str) -> list[Daemon]:
    nodes = [
        Daemon(root / name, broker, SMOLLM, QWEN_EDGE_NODE_ID=name, **_fleet_env(**env))
        for name in names
    ]
    for d in nodes:  # load the models side by side
        d.start(wait_ready=False)
    for d in nodes:
        assert d.notify is not None
        try:
            d.notify.wait_for("READY=1", timeout=90)
        except TimeoutError:
            raise AssertionError(f"{d.workdir.name} not ready:\n{d.log()}") from None
    return nodes


@pytest.fixture(scope="module")
def fleet_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker(tmp_path_factory.mktemp("fleet-broker"))
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def trio(fleet_broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Daemon]]:
    nodes = _start_nodes(fleet_broker, tmp_path_factory.mktemp("trio"), TRIO)
    yield nodes
    for d in nodes:
        d.stop(signal.SIGKILL)


@pytest.fixture
def clients(fleet_broker: Broker) -> Iterator[Callable[..., Probe]]:
    made: list[Probe] = []

    def make(client_id: str, broker: Broker | None = None) -> Probe:
        p = Probe(broker or fleet_broker, client_id)
        p.subscribe(f"{PREFIX}/+/reply/{client_id}/#", f"{PREFIX}/+/error/{client_id}")
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def _ask(probe: Probe, message: str, to: str = POOL, **fields: Any) -> str:
    fields.setdefault("max_tokens", 16)
    fields.setdefault("temperature", 0)
    return probe.request(message, node=to, **fields)


# The seq of another node's node_lost: past any a reply can reach (max_tokens_limit 2048).
LOST_SEQ = final_seq(Settings().generation.max_tokens_limit)


def _check_stream(msgs: list[dict[str, Any]]) -> None:
    """Numbered from 0 without a gap up to its end; a node_lost after whatever was seen."""
    *body, last = msgs
    assert [m["seq"] for m in body] == list(range(len(body))), msgs
    assert last["type"] in ENDS
    assert all(m["type"] not in ENDS for m in body)
    expected = LOST_SEQ if last.get("code") == "node_lost" else len(body)
    assert last["seq"] == expected, msgs


def _drain(probe: Probe) -> list[tuple[str, dict[str, Any], Any]]:
    """Every message received and not yet read."""
    out = []
    while not probe.messages.empty():
        out.append(probe.messages.get_nowait())
    return out


def test_pooled_requests_spread_over_the_nodes_and_reply_on_the_pool(
    trio: list[Daemon], clients: Callable[..., Probe], fleet_broker: Broker
) -> None:
    devs = [clients(f"spread{i}") for i in range(3)]
    watcher = clients("stats-watcher")
    watcher.subscribe(f"{PREFIX}/+/stats")
    sent = [
        (dev, _ask(dev, f"Count to {i}.", conversation_id="c1")) for i, dev in enumerate(devs * 3)
    ]
    served: Counter[str] = Counter()
    for dev, rid in sent:
        msgs = dev.collect(rid, timeout=120)
        _check_stream(msgs)
        assert msgs[-1]["type"] == "done", msgs[-1]
        served[msgs[0]["node"]] += 1
    assert set(served) == set(TRIO), served  # mosquitto takes turns: three each
    for dev in devs:  # one subscription for the whole pool: every message on its reply topic
        assert {t for t, _ in dev.raw} == {f"{PREFIX}/{POOL}/reply/{dev.client_id}/c1"}
    # Stats every second: a node decoding reports a decode rate and counts finished replies.
    time.sleep(1.5)
    stats = [d for t, d, _ in _drain(watcher) if t.endswith("/stats")]
    assert any(s["tokens_per_s"] > 0 for s in stats), stats
    assert {s["node"] for s in stats} >= set(TRIO)


def test_follow_up_pinned_to_the_serving_node_sees_the_history(
    trio: list[Daemon], clients: Callable[..., Probe]
) -> None:
    dev = clients("pinner")
    first = dev.collect(_ask(dev, "My name is Ada.", conversation_id="pin"), timeout=120)
    assert first[-1]["type"] == "done"
    home = first[0]["node"]
    first_prompt = first[-1]["usage"]["prompt_tokens"]

    # Pinned: sent to the node named in `start`; the reply comes on that node's topic.
    rid = _ask(dev, "What is my name?", to=home, conversation_id="pin")
    pinned = dev.collect(rid, timeout=120)
    assert pinned[0]["node"] == home
    assert pinned[-1]["type"] == "done"
    assert pinned[-1]["usage"]["prompt_tokens"] > first_prompt + 5  # the first turn is in it
    assert pinned[-1]["usage"]["cached_tokens"] > 0

    # Not pinned: the pool may pick another node, which has no history of "pin".
    for _ in range(len(TRIO)):
        again = dev.collect(_ask(dev, "What is my name?", conversation_id="pin"), timeout=120)
        if again[0]["node"] != home:
            assert again[-1]["usage"]["prompt_tokens"] < pinned[-1]["usage"]["prompt_tokens"]
            break
    else:
        pytest.fail("round-robin never left the home node")


def test_pooled_cancel_reaches_the_node_holding_the_request(
    trio: list[Daemon], clients: Callable[..., Probe]
) -> None:
    dev = clients("canceller")
    rid = _ask(dev, "Write a very long story about the sea.", max_tokens=400, temperature=0.8)
    read = dev.until(rid, 2, timeout=120)
    dev.publish(f"{PREFIX}/{POOL}/cancel/{dev.client_id}", json.dumps({"request_id": rid}))
    msgs = dev.collect(rid, timeout=60, before=read)
    _check_stream(msgs)
    assert msgs[-1]["finish_reason"] == "cancelled"
    # A bad pooled cancel reaches every node; exactly one (the leader) answers it.
    dev.publish(f"{PREFIX}/{POOL}/cancel/{dev.client_id}", "not json")
    time.sleep(1.0)
    errors = [t for t, _, _ in _drain(dev) if t == f"{PREFIX}/{POOL}/error/{dev.client_id}"]
    assert len(errors) == 1


def test_pooled_response_topic_must_lie_in_the_pool_namespace(
    trio: list[Daemon], clients: Callable[..., Probe]
) -> None:
    dev = clients("responder")
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = f"{PREFIX}/{POOL}/reply/responder/inbox/1"
    props.CorrelationData = b"job-7"
    body = {"request_id": "ok1", "message": "Hi", "max_tokens": 3}
    dev.publish(f"{PREFIX}/{POOL}/request/responder", json.dumps(body), props)
    msgs = dev.collect("ok1", timeout=120)
    assert msgs[-1]["type"] == "done"
    assert {t for t, _ in dev.raw} == {f"{PREFIX}/{POOL}/reply/responder/inbox/1"}
    props.ResponseTopic = f"{PREFIX}/node-a/reply/responder/inbox"  # a node's, not the pool's
    dev.publish(
        f"{PREFIX}/{POOL}/request/responder", json.dumps({**body, "request_id": "no1"}), props
    )
    refused = dev.collect("no1", timeout=60)
    assert len(refused) == 1
    assert refused[0]["code"] == "forbidden"
    assert f"{PREFIX}/{POOL}/reply/responder/" in refused[0]["message"]


def test_fleet_command_lists_every_node_with_its_stats(
    trio: list[Daemon], fleet_broker: Broker
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QWEN_EDGE_")}
    env["QWEN_EDGE_MQTT__PORT"] = str(fleet_broker.port)
    run = [sys.executable, "-m", "qwen_edge", "fleet", "--wait", "0.5"]
    began = time.monotonic()
    result = subprocess.run(
        [*run, "--json"], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - began < 10
    nodes = {n["node"]: n for n in json.loads(result.stdout)}
    assert set(nodes) >= set(TRIO)
    for name in TRIO:
        n = nodes[name]
        assert (n["state"], n["group"], n["slots"]) == ("online", POOL, 2)
        assert n["model"] == "SmolLM2-135M-Instruct.Q4_1"
        assert isinstance(n["active_slots"], int)
        assert isinstance(n["queue_depth"], int)
        assert isinstance(n["tokens_per_s"], float)
        assert n["uptime_s"] > 0
        assert n["stats_ts"] > time.time() - 30
    text = subprocess.run(run, env=env, capture_output=True, text=True, timeout=30, check=True)
    assert text.stdout.splitlines()[0].split()[:2] == ["NODE", "STATE"]
    assert all(name in text.stdout for name in TRIO)


def _collect_all(sent: list[tuple[Probe, str]], timeout: float) -> dict[str, list[dict[str, Any]]]:
    """Every reply to its end, or fail naming the ones that never ended."""
    replies: dict[str, list[dict[str, Any]]] = {}
    deadline = time.monotonic() + timeout
    for dev, rid in sent:
        try:
            replies[rid] = dev.collect(rid, timeout=max(deadline - time.monotonic(), 0.1))
        except TimeoutError as exc:
            raise AssertionError(f"request {rid} of {dev.client_id} silently lost: {exc}") from None
    return replies


def _stashed(dev: Probe, rid: str, kind: str, node: str | None = None) -> bool:
    return any(
        m.get("type") == kind and node in (None, m.get("node")) for m in dev._stash.get(rid, [])
    )


def _read_until(dev: Probe, done: Callable[[], bool], timeout: float = 120.0) -> None:
    """Read messages into the probe's stash (dev.collect() reads them later) until done()."""
    deadline = time.monotonic() + timeout
    while not done():
        _, data, _ = dev.next_message(timeout=max(deadline - time.monotonic(), 0.01))
        dev._stash.setdefault(data.get("request_id"), []).append(data)


def _wait_for_starts(sent: list[tuple[Probe, str]]) -> None:
    """Until every request has its `start`: a node accepted each, none is still on its way to
    one (a request delivered to a node in the instant it dies is lost: docs/protocol.md)."""
    for dev, rid in sent:
        _read_until(dev, partial(_stashed, dev, rid, "start"))


def _wait_for_chunk(dev: Probe, rids: list[str], node: str) -> None:
    """Until `node` has streamed a chunk of one of `rids`: it has work in flight."""

    def streaming() -> bool:
        mine = [r for r in rids if _stashed(dev, r, "start", node)]
        return any(_stashed(dev, r, "chunk") for r in mine)

    _read_until(dev, streaming)


@pytest.mark.slow
def test_node_killed_midway_no_pooled_request_is_silently_lost(
    broker: Broker, tmp_path: Path, clients: Callable[..., Probe]
) -> None:
    nodes = _start_nodes(broker, tmp_path, TRIO)
    victim = nodes[0]  # node-a: the failover leader goes, node-b must take over
    try:
        devs = [clients(f"dev{i}", broker) for i in range(5)]
        sent = []
        for i in range(30):
            dev = devs[i % len(devs)]
            sent.append((dev, _ask(dev, f"Tell me a fact about the number {i}.")))
        _wait_for_starts(sent)
        _wait_for_chunk(devs[0], [r for d, r in sent if d is devs[0]], "node-a")
        assert victim.stop(signal.SIGKILL) == -signal.SIGKILL
        replies = _collect_all(sent, timeout=180)

        served = Counter(r[0]["node"] for r in replies.values() if r[0]["type"] == "start")
        assert set(served) == set(TRIO), served
        outcomes = Counter(r[-1].get("code", r[-1]["type"]) for r in replies.values())
        assert set(outcomes) <= {"done", "node_lost"}, outcomes
        assert outcomes["node_lost"] >= 1, outcomes  # node-a held some when it died
        for msgs in replies.values():
            _check_stream(msgs)  # node_lost sorts after the last message seen
            if msgs[-1]["type"] == "error":
                assert msgs[0]["node"] == "node-a"
                assert "node-a" in msgs[-1]["message"]

        # The pool goes on without it: its session is gone, nothing is routed to it.
        after = [(dev, _ask(dev, "Say yes.", max_tokens=4)) for dev in devs * 2]
        late = _collect_all(after, timeout=120)
        assert all(r[-1]["type"] == "done" for r in late.values())
        assert {r[0]["node"] for r in late.values()} == {"node-b", "node-c"}
    finally:
        for d in nodes:
            d.stop(signal.SIGKILL)


def test_a_node_receives_nothing_of_another_nodes_reply(tmp_path: Path) -> None:
    """What a node receives does not grow with its pool's tokens: while one node streams a
    long pooled reply, mosquitto sends its chunks to the client and to no node. Counted by the
    broker itself ($SYS): every PUBLISH it sent, against the chunks the client got."""
    broker = Broker(tmp_path / "broker", extra_conf="sys_interval 1")
    broker.start()
    nodes = [
        Daemon(
            tmp_path / name,
            broker,
            Path("fake://20ms"),  # no model: a token every 20 ms
            QWEN_EDGE_NODE_ID=name,
            QWEN_EDGE_FLEET__STATS_INTERVAL="0",
        )
        for name in ("node-a", "node-b")
    ]
    events: queue.Queue[tuple[float, str, bytes]] = queue.Queue()
    dev = paho.Client(CallbackAPIVersion.VERSION2, client_id="counter", protocol=paho.MQTTv5)
    dev.on_message = lambda c, u, m: events.put((time.monotonic(), m.topic, m.payload))
    try:
        for d in nodes:
            d.start()
        dev.connect("127.0.0.1", broker.port)
        dev.loop_start()
        dev.subscribe(f"{PREFIX}/{POOL}/reply/counter/#", qos=1)
        dev.subscribe("$SYS/broker/publish/messages/sent")
        time.sleep(1.0)
        body = {"request_id": "long", "message": "Go on.", "max_tokens": 500}
        dev.publish(f"{PREFIX}/{POOL}/request/counter", json.dumps(body), qos=1)
        samples: list[tuple[float, int]] = []  # (arrival, PUBLISH packets sent so far)
        chunks: list[float] = []  # arrival of each chunk
        final: float | None = None
        while final is None or samples[-1][0] < final:
            at, topic, payload = events.get(timeout=60)
            if topic.startswith("$SYS"):
                samples.append((at, int(payload)))
            elif (message := json.loads(payload))["type"] == "chunk":
                chunks.append(at)
            elif message["type"] in ENDS:
                assert message["type"] == "done", message["message"]
                final = at
        # Between the first and the last count taken while the reply streamed.
        assert chunks, "no chunk: the reply ended at once"
        inside = [s for s in samples if chunks[0] < s[0] < final]
        assert len(inside) >= 2, (samples, chunks[0], final)
        (t0, sent0), (t1, sent1) = inside[0], inside[-1]
        got = sum(1 for at in chunks if t0 < at <= t1)
        others = len(inside) - 1  # the $SYS counts themselves, sent to this client
        # Before: every chunk went to both nodes' pool links too, three times the client's.
        assert sent1 - sent0 - others <= got + 5, (sent1 - sent0, got)
    finally:
        dev.disconnect()
        dev.loop_stop()
        for d in nodes:
            d.stop()
        broker.stop()


def test_node_stopped_midway_drains_and_the_pool_goes_on(
    broker: Broker, tmp_path: Path, clients: Callable[..., Probe]
) -> None:
    nodes = _start_nodes(
        broker, tmp_path, ("node-a", "node-b"), QWEN_EDGE_SERVICE__DRAIN_TIMEOUT="2"
    )
    try:
        devs = [clients(f"term{i}", broker) for i in range(3)]
        sent = [(devs[i % 3], _ask(devs[i % 3], f"Name a colour, {i}.")) for i in range(12)]
        _wait_for_starts(sent)
        _wait_for_chunk(devs[0], [r for d, r in sent if d is devs[0]], "node-a")
        assert nodes[0].stop(signal.SIGTERM, timeout=60) == 0
        replies = _collect_all(sent, timeout=120)
        for msgs in replies.values():
            _check_stream(msgs)
        ends = Counter(
            (r[0]["node"], r[-1].get("code") or r[-1]["finish_reason"]) for r in replies.values()
        )
        # In flight: finished or cut at the drain timeout; still queued: shutting_down.
        assert {reason for _, reason in ends} <= {"stop", "length", "cancelled", "shutting_down"}
        assert all(node == "node-a" for node, reason in ends if reason == "shutting_down")
        after = [(dev, _ask(dev, "Say yes.", max_tokens=4)) for dev in devs]
        late = _collect_all(after, timeout=60)
        assert {r[0]["node"] for r in late.values()} == {"node-b"}
        assert all(r[-1]["type"] == "done" for r in late.values())
    finally:
        for d in nodes:
            d.stop(signal.SIGKILL)


class _Device:
    """A device with a broker account (Probe connects anonymously)."""

    def __init__(self, broker: Broker, user: str) -> None:
        self.user = user
        self.messages: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self._acks: queue.Queue[int] = queue.Queue()
        self._stash: dict[Any, list[tuple[str, dict[str, Any]]]] = {}
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=user, protocol=paho.MQTTv5)
        self.client.username_pw_set(user, "secret")
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, json.loads(m.payload)))
        self.client.on_subscribe = lambda *a: self._acks.put(1)
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        self.client.subscribe([(f"{PREFIX}/+/reply/{user}/#", 1), (f"{PREFIX}/+/error/{user}", 1)])
        self._acks.get(timeout=5)

    def ask(self, to: str, as_client: str | None = None, **body: Any) -> str:
        rid = uuid.uuid4().hex[:12]
        payload = json.dumps({"request_id": rid, "message": "Say yes.", "max_tokens": 4, **body})
        topic = f"{PREFIX}/{to}/request/{as_client or self.user}"
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)
        return rid

    def end(self, rid: str, timeout: float = 120) -> tuple[str, list[dict[str, Any]]]:
        """The topic and messages of one reply, up to its end; keeps those of other replies."""
        got: list[tuple[str, dict[str, Any]]] = []
        deadline = time.monotonic() + timeout
        while not got or got[-1][1]["type"] not in ENDS:
            if self._stash.get(rid):
                got.append(self._stash[rid].pop(0))
                continue
            topic, data = self.messages.get(timeout=max(deadline - time.monotonic(), 0.01))
            self._stash.setdefault(data.get("request_id"), []).append((topic, data))
        return got[-1][0], [data for _, data in got]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.skipif(shutil.which("mosquitto_ctrl") is None, reason="needs mosquitto_ctrl")
def test_fleet_on_the_production_broker_lets_devices_and_nodes_do_their_jobs(
    tmp_path: Path,
) -> None:
    """The broker scripts/broker-setup makes (dynamic security: every account bound to its topics,
    devices to their client ids) with a pool of two nodes: pooled, pinned, failover, fleet view."""
    broker = Broker(tmp_path / "broker")
    setup = ROOT / "scripts" / "broker-setup"
    made = subprocess.run(
        [
            *(str(setup), "--dir", str(broker.workdir), "--port", str(broker.port)),
            *("--group", POOL, "--daemon", "qwen-edge", "--passwords", "-"),
            *("--device", "dev1", "--device", "dev2"),
        ],
        input="qwen-edge:secret\ndev1:secret\ndev2:secret\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    broker.conf = broker.workdir / "mosquitto.conf"
    broker.start()
    account = {"QWEN_EDGE_MQTT__USERNAME": "qwen-edge", "QWEN_EDGE_MQTT__PASSWORD": "secret"}
    nodes = _start_nodes(broker, tmp_path, ("node-a", "node-b"), **account)
    dev1, dev2 = _Device(broker, "dev1"), _Device(broker, "dev2")
    try:
        # Pooled (the daemons read it through $share), then pinned to the node that served it.
        topic, msgs = dev1.end(dev1.ask(POOL, conversation_id="c"))
        assert (topic, msgs[-1]["type"]) == (f"{PREFIX}/{POOL}/reply/dev1/c", "done")
        home = msgs[0]["node"]
        topic, msgs = dev1.end(dev1.ask(home, conversation_id="c"))
        assert (topic, msgs[-1]["type"]) == (f"{PREFIX}/{home}/reply/dev1/c", "done")
        # A device cannot ask in another device's name: the broker drops it.
        dev2.ask(POOL, as_client="dev1")
        with pytest.raises(queue.Empty):
            dev1.messages.get(timeout=2)

        # Failover under the ACL: a node writes its claims, reads the others', writes node_lost.
        long = [dev1.ask(POOL, max_tokens=40, message="Write a long story.") for _ in range(6)]
        victim = "node-b"
        deadline = time.monotonic() + 60
        while not all(  # every request accepted somewhere (see _wait_for_starts)
            any(m["type"] == "start" for _, m in dev1._stash.get(rid, [])) for rid in long
        ):
            topic, data = dev1.messages.get(timeout=max(deadline - time.monotonic(), 0.01))
            dev1._stash.setdefault(data["request_id"], []).append((topic, data))  # end() reads
        next(d for d in nodes if d.workdir.name == victim).stop(signal.SIGKILL)
        ends = [dev1.end(rid)[1][-1] for rid in long]
        lost = [e for e in ends if e.get("code") == "node_lost"]
        assert lost, ends
        assert all(victim in e["message"] for e in lost)

        # The fleet view with a device's account.
        env = {k: v for k, v in os.environ.items() if not k.startswith("QWEN_EDGE_")}
        env.update(
            QWEN_EDGE_MQTT__PORT=str(broker.port),
            QWEN_EDGE_MQTT__USERNAME="dev2",
            QWEN_EDGE_MQTT__PASSWORD="secret",
        )
        out = subprocess.run(
            [sys.executable, "-m", "qwen_edge", "fleet", "--json", "--wait", "0.5"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        states = {n["node"]: n["state"] for n in json.loads(out.stdout)}
        assert states == {"node-a": "online", victim: "offline"}
    finally:
        dev1.close()
        dev2.close()
        for d in nodes:
            d.stop(signal.SIGKILL)
        broker.stop()


@pytest.mark.slow
def test_broker_restart_is_no_node_loss(broker: Broker, tmp_path: Path) -> None:
    # mosquitto publishes every Last Will as it shuts down: the nodes must not take them for
    # losses, since every node streams on once the broker is back.
    nodes = _start_nodes(broker, tmp_path, ("node-a", "node-b"))
    dev = Probe(broker, "restart", persistent=True)
    try:
        dev.subscribe(f"{PREFIX}/+/reply/restart/#")
        sent = [
            _ask(dev, "What is the capital of France?", max_tokens=120, conversation_id=f"c{i}")
            for i in range(4)
        ]
        _wait_for_starts([(dev, rid) for rid in sent])
        _read_until(dev, lambda: any(_stashed(dev, r, "chunk") for r in sent))
        broker.stop(signal.SIGTERM)
        time.sleep(1.0)
        broker.start()
        replies = _collect_all([(dev, rid) for rid in sent], timeout=120)
        for msgs in replies.values():
            _check_stream(msgs)
            assert msgs[-1]["type"] == "done", msgs[-1]
        assert {r[0]["node"] for r in replies.values()} == {"node-a", "node-b"}
        time.sleep(3)  # past the failover's grace period: still nothing more
        assert not [d for _, d, _ in _drain(dev) if d.get("type") == "error"]
    finally:
        dev.close()
        for d in nodes:
            d.stop(signal.SIGKILL)
