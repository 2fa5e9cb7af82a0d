"""Several nodes behind one broker: the request pool, pinning, failover, the fleet view.

End-to-end tests run real daemons (SmolLM2-135M, one thread each: three llama.cpp processes on
two cores) against a real mosquitto.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest

from devtools.harness import PREFIX
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
from qwen_edge.settings import ConfigError, load_settings
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


# -- settings ----------------------------------------------------------------------------------


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
