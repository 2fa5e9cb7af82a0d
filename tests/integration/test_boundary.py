"""Where the node meets the broker: limits a duplicate cannot undo, retained requests never
served, requests that arrive while the model loads checked and bounded, `online` only when a
request sent on it is served, and back within seconds of the broker's return. Real mosquitto,
real daemon, SmolLM2 (issue 11)."""

from __future__ import annotations

import json
import queue
import shutil
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from devtools.harness import NODE, PREFIX, SMOLLM, Broker, Daemon, Probe

QUIET = {"QWEN_EDGE_MODEL__THREADS": "1", "QWEN_EDGE_MODEL__SLOTS": "1"}
LONG = {"message": "Write a very long story about the sea.", "max_tokens": 1000}


def _events(daemon: Daemon, event: str) -> list[dict[str, Any]]:
    return [e for e in daemon.log_events() if e.get("event") == event]


def _wait_logged(daemon: Daemon, event: str, count: int = 1, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while len(_events(daemon, event)) < count:
        assert time.monotonic() < deadline, f"no {event} in the log:\n{daemon.log()}"
        time.sleep(0.05)


def _quiet_for(probe: Probe, seconds: float) -> list[dict[str, Any]]:
    """Everything the probe receives within `seconds`."""
    got = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            got.append(probe.next_message(timeout=left)[1])
        except queue.Empty:
            break
    return got


def _end(probe: Probe, rid: str, timeout: float = 60.0) -> dict[str, Any]:
    return probe.collect(rid, timeout=timeout)[-1]


# -- limits: a duplicate frees nothing it did not take -------------------------------------------


def test_a_duplicate_of_a_request_in_flight_does_not_reopen_the_conversation_cap(
    broker: Broker, tmp_path: Path
) -> None:
    node = Daemon(
        tmp_path / "node",
        broker,
        SMOLLM,
        QWEN_EDGE_LIMITS__MAX_CONVERSATIONS_PER_CLIENT="1",
        QWEN_EDGE_FLEET__ENABLED="false",
        **QUIET,
    )
    node.start()
    try:
        dev = Probe(broker, "capped")
        dev.subscribe(f"{PREFIX}/{NODE}/reply/capped/#")
        a = dev.request(conversation_id="c1", **LONG)
        dev.until(a, 1)  # generating
        dev.request(request_id=a, conversation_id="c1", **LONG)  # the same request again
        _wait_logged(node, "duplicate_ignored")
        b = dev.request("Hi", conversation_id="c2", max_tokens=2)
        refused = _end(dev, b)
        assert (refused["type"], refused.get("code")) == ("error", "too_many_conversations")
        dev.publish(f"{PREFIX}/{NODE}/cancel/capped", json.dumps({"request_id": a}))
        assert _end(dev, a)["finish_reason"] == "cancelled"
        c = dev.request("Hi", conversation_id="c2", max_tokens=2)  # c1 ended: room again
        assert _end(dev, c)["type"] == "done"
        dev.close()
    finally:
        node.stop()


# -- retained requests and cancels are never acted on -------------------------------------------


def _publish_retained(broker: Broker, topic: str, body: dict[str, Any]) -> None:
    """Like a device that sets the retain flag (by mistake, or to have it run at every
    restart of the node)."""
    sender = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    sender.connect("127.0.0.1", broker.port)
    sender.loop_start()
    sender.publish(topic, json.dumps(body), qos=1, retain=True).wait_for_publish(5)
    sender.disconnect()
    sender.loop_stop()


def test_a_retained_request_is_not_served_on_delivery_nor_after_a_restart(
    broker: Broker, tmp_path: Path
) -> None:
    env = {"QWEN_EDGE_SERVICE__STATE_DIR": str(tmp_path / "state"), **QUIET}
    node = Daemon(tmp_path / "node", broker, SMOLLM, **env)
    node.start()
    dev = Probe(broker, "keeper")
    dev.subscribe(f"{PREFIX}/+/reply/keeper/#", f"{PREFIX}/+/error/keeper")
    live = {"request_id": "live", "message": "Hi", "max_tokens": 2}
    pooled = {"request_id": "pooled", "message": "Hi", "max_tokens": 2}
    _publish_retained(broker, f"{PREFIX}/{NODE}/request/keeper", live)
    _publish_retained(broker, f"{PREFIX}/pool/request/keeper", pooled)
    _wait_logged(node, "retained_dropped", 2)
    assert _quiet_for(dev, 2.0) == []
    node.stop()
    # The node comes back (its outcome records long gone, say): the broker hands the retained
    # request to its new subscription, flagged retained.
    again = Daemon(tmp_path / "again", broker, SMOLLM, **env)
    again.start()
    try:
        _wait_logged(again, "retained_dropped")
        assert _quiet_for(dev, 2.0) == []
        rid = dev.request("Hi", max_tokens=2)  # the node serves what is sent to it
        assert _end(dev, rid)["type"] == "done"
        served = {e.get("request_id") for d in (node, again) for e in d.log_events()}
        assert not served & {"live", "pooled"}
    finally:
        again.stop()
        dev.close()


# -- requests that arrive while the model loads ----------------------------------------------


def _slow_loading_model(tmp_path: Path) -> tuple[Path, str]:
    """SmolLM2 followed by 4 GiB of zeros (sparse: no disk), with its SHA-256: the node reads the
    whole file before loading, seconds of CPU (more on a busy machine) during which requests
    arrive. llama.cpp and the GGUF check ignore bytes after the last tensor."""
    import hashlib

    path = tmp_path / "slow.gguf"
    shutil.copyfile(SMOLLM, path)
    digest = hashlib.sha256(path.read_bytes())
    pad = 4 << 30
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size + pad)
    zeros = bytes(1 << 20)
    for _ in range(pad >> 20):
        digest.update(zeros)
    return path, digest.hexdigest()


def test_requests_arriving_while_the_model_loads_are_checked_and_bounded(
    broker: Broker, tmp_path: Path
) -> None:
    model, sha256 = _slow_loading_model(tmp_path)
    node = Daemon(
        tmp_path / "node",
        broker,
        model,
        QWEN_EDGE_MODEL__SHA256=sha256,
        QWEN_EDGE_MODEL__QUEUE_SIZE="3",  # with one slot: 4 kept at most while loading
        QWEN_EDGE_LIMITS__REQUESTS_PER_MINUTE="6",
        QWEN_EDGE_LIMITS__BURST="5",
        QWEN_EDGE_FLEET__ENABLED="false",
        **QUIET,
    )
    node.start(wait_ready=False)
    try:
        deadline = time.monotonic() + 30
        while not any(e.get("event") == "broker_connected" for e in node.log_events()):
            assert time.monotonic() < deadline, node.log()
            time.sleep(0.02)
        devs = [Probe(broker, f"flood{i}") for i in range(3)]
        sent: dict[str, list[str]] = {}
        for dev in devs:
            dev.subscribe(f"{PREFIX}/{NODE}/reply/{dev.client_id}/#")
            dev.subscribe(f"{PREFIX}/{NODE}/error/{dev.client_id}")
            big = json.dumps({"request_id": "big", "message": "x" * 70_000})
            dev.publish(f"{PREFIX}/{NODE}/request/{dev.client_id}", big)
            sent[dev.client_id] = [dev.request("Hi", max_tokens=2) for _ in range(8)]
        # While it loads, each flood gets its answer: too_large; rate_limited beyond the burst
        # of 5; busy beyond the 4 requests kept for the model (the first 4 of flood0).
        expected = 3 + 3 * 3 + (3 * 5 - 4)
        codes: Counter[str] = Counter()
        deadline = time.monotonic() + 30
        while sum(codes.values()) < expected and time.monotonic() < deadline:
            for dev in devs:
                try:
                    _, data, _ = dev.next_message(timeout=0.05)
                except queue.Empty:
                    continue
                if data["type"] == "error":
                    codes[data["code"]] += 1
        # Answered while loading, in the node's own order of events (this process may read its
        # messages late on a busy machine): every refusal for the full keep logged before the
        # model was loaded.
        events = [e.get("event") for e in node.log_events()]
        loaded_at = events.index("model_loaded") if "model_loaded" in events else len(events)
        refused_before = events[:loaded_at].count("request_refused")
        assert refused_before == 11, f"answered only once the model was loaded: {events}"
        assert codes == {"too_large": 3, "rate_limited": 9, "busy": 11}
        node.notify.wait_for("READY=1")  # type: ignore[union-attr]
        for rid in sent["flood0"][:4]:
            assert _end(devs[0], rid)["type"] == "done"
        for dev in devs:
            dev.close()
    finally:
        node.stop()


# -- online only when true ---------------------------------------------------------------------


def test_a_pooled_request_sent_on_the_first_online_is_served(
    broker: Broker, tmp_path: Path
) -> None:
    """What docs/protocol.md tells a device: watch the status, send to the pool once the node
    is online. On a one-node pool, the first pooled request must reach it, every time."""
    for attempt in range(5):
        node = Daemon(tmp_path / f"node{attempt}", broker, SMOLLM, **QUIET)
        dev = Probe(broker, f"eager{attempt}")
        dev.subscribe(f"{PREFIX}/pool/reply/{dev.client_id}/#", f"{PREFIX}/{NODE}/status")
        node.start(wait_ready=False)
        try:
            assert node.proc is not None
            while True:
                _, status, _ = dev.next_message(timeout=60)
                if status.get("pid") == node.proc.pid and status["state"] == "online":
                    break
            assert status["group"] == "pool"
            rid = uuid.uuid4().hex[:8]
            body = {"request_id": rid, "message": "Hi", "max_tokens": 2}
            dev.publish(f"{PREFIX}/pool/request/{dev.client_id}", json.dumps(body))
            assert _end(dev, rid, timeout=20)["type"] == "done", f"attempt {attempt}"
            assert len(_events(node, "pool_joined")) == 1  # mosquitto passes the pool probe
        finally:
            node.stop()
            dev.close()


# -- back fast ---------------------------------------------------------------------------------


class DefaultBackoffDaemon(Daemon):
    """The daemon with the shipped reconnect back-off (conftest shortens it for other tests)."""

    def env(self) -> dict[str, str]:
        env = super().env()
        env.pop("QWEN_EDGE_MQTT__RECONNECT_MAX_DELAY")
        return env


def test_the_node_is_back_within_seconds_of_the_brokers_return(
    broker: Broker, tmp_path: Path
) -> None:
    node = DefaultBackoffDaemon(tmp_path / "node", broker, SMOLLM, **QUIET)
    node.start()
    try:
        broker.stop()  # mosquitto publishes the node's will (offline) as it goes down
        time.sleep(16)  # long enough for an uncapped back-off to grow past 15 s
        broker.start()
        back = time.monotonic()
        watcher = Probe(broker, "watcher")
        watcher.subscribe(f"{PREFIX}/{NODE}/status")
        while True:
            _, status, _ = watcher.next_message(timeout=30)
            if status["state"] == "online":
                break
        assert time.monotonic() - back < 6.5
        watcher.close()
        _wait_logged(node, "broker_back")
        lost, returned = _events(node, "broker_lost"), _events(node, "broker_back")
        assert len(lost) == 1 and len(returned) == 1, node.log()
        assert 15 < returned[0]["after_s"] < 25
    finally:
        node.stop()
    assert len(_events(node, "broker_lost")) == 1  # a stop is no outage
