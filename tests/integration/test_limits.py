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

from devtools.harness import NODE, PREFIX, SMOLLM, Broker, Daemon, Probe
from qwen_edge.settings import LimitSettings

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
    example = (Path(__file__).resolve().parents[2] / "deploy" / "config.example.toml").read_text()
    for key in LimitSettings.model_fields:
        assert f"\n{key} = " in example, key
