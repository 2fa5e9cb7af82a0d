"""Per-client limits: the limiter's logic with a fake clock, then the real daemon refusing a flood,
an oversized payload and one conversation too many, while other clients are served."""

from __future__ import annotations

import json
import queue
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devtools.harness import NODE, PREFIX, SMOLLM, Broker, Daemon, Probe
from qwen_edge.node.limits import Admission, ClientLimits, Refusal
from qwen_edge.protocol import ErrorCode
from qwen_edge.settings import LimitSettings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(
    rpm: float = 60, burst: int = 3, conversations: int = 2, **kw: Any
) -> tuple[ClientLimits, Clock]:
    clock = Clock()
    settings = LimitSettings(
        requests_per_minute=rpm, burst=burst, max_conversations_per_client=conversations
    )
    return ClientLimits(settings, clock=clock, **kw), clock


def ok(verdict: Admission | Refusal) -> bool:
    return isinstance(verdict, Admission)


# -- the limiter -------------------------------------------------------------------------------


def test_burst_passes_then_the_rate_applies_with_a_retry_hint() -> None:
    limits, clock = limiter(rpm=6, burst=3, conversations=0)
    assert all(ok(limits.admit("a", f"r{i}", "c")) for i in range(3))
    refusal = limits.admit("a", "r3", "c")
    assert isinstance(refusal, Refusal) and refusal.code is ErrorCode.RATE_LIMITED
    assert refusal.retry_after == pytest.approx(10.0, abs=0.2)  # one token per 10 s
    assert "6 requests per minute" in refusal.message
    clock.now += refusal.retry_after
    assert ok(limits.admit("a", "r4", "c"))  # the hint was enough
    assert not ok(limits.admit("a", "r5", "c"))


def test_one_clients_flood_does_not_touch_anothers_bucket() -> None:
    limits, _ = limiter(rpm=1, burst=2, conversations=0)
    refused = [limits.admit("flood", f"r{i}", "c") for i in range(100)]
    assert sum(ok(r) for r in refused) == 2
    assert ok(limits.admit("calm", "r0", "c"))
    assert ok(limits.admit("calm", "r1", "c"))


def test_tokens_refill_at_the_rate_up_to_the_burst() -> None:
    limits, clock = limiter(rpm=60, burst=2, conversations=0)
    clock.now += 3600  # a long idle time earns no more than the burst
    assert ok(limits.admit("a", "r0", "c"))
    assert ok(limits.admit("a", "r1", "c"))
    assert not ok(limits.admit("a", "r2", "c"))
    clock.now += 1.0
    assert ok(limits.admit("a", "r3", "c"))


def test_zero_rate_means_no_rate_limit() -> None:
    limits, _ = limiter(rpm=0, burst=1, conversations=0)
    assert all(ok(limits.admit("a", f"r{i}", "c")) for i in range(1000))
    assert limits.tracked_clients == 0


def test_open_conversations_are_capped_and_freed_when_replies_end() -> None:
    limits, _ = limiter(rpm=0, conversations=2)
    r1 = limits.admit("a", "r1", "c1")
    assert isinstance(r1, Admission) and ok(limits.admit("a", "r2", "c2"))
    refusal = limits.admit("a", "r3", "c3")
    assert isinstance(refusal, Refusal) and refusal.code is ErrorCode.TOO_MANY_CONVERSATIONS
    assert refusal.retry_after is None
    r4 = limits.admit("a", "r4", "c1")  # the same conversation again is not a new one
    assert isinstance(r4, Admission)
    assert ok(limits.admit("b", "r1", "c9"))  # per client
    r1.release()
    assert not ok(limits.admit("a", "r5", "c3"))  # r4 still holds c1
    r4.release()
    assert ok(limits.admit("a", "r5", "c3"))
    r4.release()  # twice: harmless, frees nothing more
    assert not ok(limits.admit("a", "r6", "c4"))


def test_a_redelivered_request_in_flight_costs_nothing() -> None:
    limits, _ = limiter(rpm=60, burst=1, conversations=1)
    assert ok(limits.admit("a", "r1", "c1"))
    # QoS 1 may deliver r1 again while it runs: neither rate- nor conversation-limited (the
    # scheduler drops it as a duplicate).
    assert ok(limits.admit("a", "r1", "c1"))
    assert not ok(limits.admit("a", "r2", "c1"))  # but the bucket is empty for new ones


def test_a_duplicate_frees_nothing_it_did_not_take() -> None:
    limits, _ = limiter(rpm=0, conversations=1)
    original = limits.admit("a", "r1", "c1")
    duplicate = limits.admit("a", "r1", "c1")
    assert isinstance(original, Admission) and isinstance(duplicate, Admission)
    assert original.counted and not duplicate.counted
    duplicate.release()  # the duplicate is dropped: the original still runs
    refusal = limits.admit("a", "r2", "c2")
    assert isinstance(refusal, Refusal) and refusal.code is ErrorCode.TOO_MANY_CONVERSATIONS
    original.release()
    assert ok(limits.admit("a", "r2", "c2"))


def test_a_request_kept_while_loading_is_charged_once() -> None:
    limits, _ = limiter(rpm=6, burst=1, conversations=0)
    assert limits.charge("a") is None  # on arrival, while the model loads
    assert ok(limits.admit("a", "r1", "c1", charge=False))  # served later: no second token
    refused = limits.charge("a")
    assert refused is not None and refused.code is ErrorCode.RATE_LIMITED


def test_bucket_table_stays_bounded_under_a_flood_of_client_ids() -> None:
    limits, _ = limiter(rpm=60, burst=1, conversations=0, max_clients=100)
    for i in range(10_000):
        admission = limits.admit(f"fake-{i}", "r", "c")
        assert isinstance(admission, Admission)
        admission.release()
    assert limits.tracked_clients == 100


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["admit", "release"]),
            st.sampled_from(["a", "b"]),
            st.sampled_from(["r1", "r2", "r3", "r4"]),
            st.sampled_from(["c1", "c2", "c3"]),
            st.floats(0, 30),
        ),
        max_size=60,
    )
)
def test_open_conversations_never_exceed_the_cap_and_all_release(
    steps: list[tuple[str, str, str, str, float]],
) -> None:
    limits, clock = limiter(rpm=30, burst=2, conversations=2)
    # What the service does: each admission is released once, duplicates' right away.
    admitted: dict[tuple[str, str], tuple[str, Admission]] = {}
    for action, client, rid, conversation, wait in steps:
        clock.now += wait
        if action == "admit":
            verdict = limits.admit(client, rid, conversation)
            if isinstance(verdict, Admission):
                if (client, rid) in admitted:
                    verdict.release()
                else:
                    admitted[(client, rid)] = (conversation, verdict)
        elif (client, rid) in admitted:
            admitted.pop((client, rid))[1].release()
        for who in ("a", "b"):
            assert len({c for (k, _), (c, _) in admitted.items() if k == who}) <= 2
    for _, admission in admitted.values():
        admission.release()
    assert limits._inflight == {}


# -- the real daemon ---------------------------------------------------------------------------

LIMITS = {
    "QWEN_EDGE_LIMITS__REQUESTS_PER_MINUTE": "6",
    "QWEN_EDGE_LIMITS__BURST": "5",
    "QWEN_EDGE_LIMITS__MAX_CONVERSATIONS_PER_CLIENT": "2",
    "QWEN_EDGE_MODEL__THREADS": "1",
    "QWEN_EDGE_FLEET__ENABLED": "false",
}


@pytest.fixture(scope="module")
def limited_daemon(
    module_broker: Broker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("limited"), module_broker, SMOLLM, **LIMITS)
    d.start()
    yield d
    d.stop()


def ends(probe: Probe, rids: list[str], timeout: float = 120) -> dict[str, dict[str, Any]]:
    """The final message of each request."""
    final: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(final) < len(rids):
        _, data, _ = probe.messages.get(timeout=max(deadline - time.monotonic(), 0.01))
        if data.get("request_id") in rids and data.get("type") in ("done", "error"):
            final[data["request_id"]] = data
    return final


def test_flood_from_one_client_is_rate_limited_while_another_is_served(
    limited_daemon: Daemon, probe_factory: Any
) -> None:
    flood = probe_factory(f"flood-{uuid.uuid4().hex[:4]}")
    calm = probe_factory(f"calm-{uuid.uuid4().hex[:4]}")
    flood.subscribe(f"{PREFIX}/{NODE}/reply/{flood.client_id}/#")
    calm.subscribe(f"{PREFIX}/{NODE}/reply/{calm.client_id}/#")
    sent = [flood.request("Hi", max_tokens=2, conversation_id="f") for _ in range(40)]
    calm_rid = calm.request("Say hello.", max_tokens=4)
    assert calm.collect(calm_rid)[-1]["type"] == "done"
    final = ends(flood, sent)
    limited = [m for m in final.values() if m.get("code") == "rate_limited"]
    served = [m for m in final.values() if m["type"] == "done"]
    assert len(served) + len(limited) == 40, final
    assert 5 <= len(served) <= 6  # the burst (and a token refilled meanwhile, at most)
    for m in limited:
        assert m["seq"] == 0 and 0 < m["retry_after"] <= 10.1
        assert "requests per minute" in m["message"]
    # Costs the daemon nothing else: one log line for the whole streak, no request work.
    events = [e for e in limited_daemon.log_events() if e.get("client_id") == flood.client_id]
    assert [e["event"] for e in events].count("client_rate_limited") == 1


def test_oversize_payload_is_too_large_and_spends_no_token(
    limited_daemon: Daemon, probe_factory: Any
) -> None:
    probe = probe_factory(f"big-{uuid.uuid4().hex[:4]}")
    probe.subscribe(f"{PREFIX}/{NODE}/reply/{probe.client_id}/#")
    probe.subscribe(f"{PREFIX}/{NODE}/error/{probe.client_id}")
    big = json.dumps({"request_id": "big", "message": "x" * 70_000})
    for _ in range(10):  # twice the burst
        probe.publish(f"{PREFIX}/{NODE}/request/{probe.client_id}", big)
    for _ in range(10):
        topic, data, _ = probe.next_message(timeout=30)
        assert topic == f"{PREFIX}/{NODE}/error/{probe.client_id}"
        assert (data["code"], data["request_id"]) == ("too_large", None)
    rid = probe.request("Hi", max_tokens=2)
    assert probe.collect(rid)[-1]["type"] == "done"


def test_invalid_requests_spend_tokens_like_any_other(
    limited_daemon: Daemon, probe_factory: Any
) -> None:
    """Issue 18: requests ending in bad_request were charged nothing, so a device could make
    the node parse (and compile schemas) without limit."""
    probe = probe_factory(f"bad-{uuid.uuid4().hex[:4]}")
    probe.subscribe(f"{PREFIX}/{NODE}/reply/{probe.client_id}/#")
    bad = [probe.request("Hi", temperature=9) for _ in range(5)]  # the burst
    refused = ends(probe, bad)
    assert {m["code"] for m in refused.values()} == {"bad_request"}
    rid = probe.request("Hi", max_tokens=2)
    end = ends(probe, [rid])[rid]
    assert end["code"] == "rate_limited" and end["retry_after"] > 0
    late = probe.request("Hi", temperature=9)  # invalid and past the rate: told the rate
    assert ends(probe, [late])[late]["code"] == "rate_limited"


def test_one_conversation_too_many_is_refused_until_one_ends(
    limited_daemon: Daemon, probe_factory: Any
) -> None:
    probe = probe_factory(f"convs-{uuid.uuid4().hex[:4]}")
    probe.subscribe(f"{PREFIX}/{NODE}/reply/{probe.client_id}/#")
    long = {"message": "Write a very long story about the sea.", "max_tokens": 1000}
    r1 = probe.request(conversation_id="c1", **long)
    r2 = probe.request(conversation_id="c2", **long)
    r3 = probe.request("Hi", conversation_id="c3", max_tokens=2)
    refused = ends(probe, [r3])[r3]
    assert (refused["type"], refused["code"], refused["seq"]) == (
        "error",
        "too_many_conversations",
        0,
    )
    assert "retry_after" not in refused
    r4 = probe.request(conversation_id="c1", **long)  # c1 is open already: not a new one
    for rid in (r1, r4):
        probe.publish(f"{PREFIX}/{NODE}/cancel/{probe.client_id}", json.dumps({"request_id": rid}))
    assert {m["finish_reason"] for m in ends(probe, [r1, r4]).values()} == {"cancelled"}
    r5 = probe.request("Hi", conversation_id="c3", max_tokens=2)  # c1 closed: room again
    assert ends(probe, [r5])[r5]["type"] == "done"
    probe.publish(f"{PREFIX}/{NODE}/cancel/{probe.client_id}", json.dumps({"request_id": r2}))
    assert ends(probe, [r2])[r2]["type"] == "done"
    # Every request got exactly one end: nothing else ends afterwards.
    late = []
    while True:
        try:
            late.append(probe.next_message(timeout=1.0)[1])
        except queue.Empty:
            break
    assert not [m for m in late if m.get("type") in ("done", "error")], late


def test_settings_of_the_limits_are_documented_in_the_example() -> None:
    example = (Path(__file__).parent.parent / "deploy" / "config.example.toml").read_text()
    for key in LimitSettings.model_fields:
        assert f"\n{key} = " in example, key
