"""The daemon's life: systemd notifications, SIGTERM drain, broker restarts, unusable models."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from devtools.harness import NODE, PREFIX, SMOLLM, Broker, Daemon, Probe, reply_text


@pytest.fixture
def node(broker: Broker, tmp_path: Path) -> Any:
    daemons: list[Daemon] = []

    def make(**env: str) -> Daemon:
        d = Daemon(tmp_path / f"daemon{len(daemons)}", broker, SMOLLM, **env)
        daemons.append(d)
        return d

    yield make
    for d in daemons:
        d.stop(signal.SIGKILL)


def _status(probe: Probe, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        topic, data, _ = probe.next_message(timeout=deadline - time.monotonic())
        if topic.endswith("/status"):
            return data
    raise TimeoutError("no status")


def test_notifies_systemd_ready_status_and_watchdog(node: Any) -> None:
    d = node(WATCHDOG_USEC="400000")  # 0.4 s: pings every 0.2 s
    d.start()
    assert d.notify is not None
    d.notify.wait_for("WATCHDOG=1", timeout=5)
    lines = d.notify.lines()
    assert any(line.startswith("STATUS=loading model") for line in lines)
    assert any(line.startswith("STATUS=serving") for line in lines)
    # READY=1 comes once the model is loaded and the broker connected, after the loading status.
    ready = lines.index("READY=1")
    assert ready > lines.index("STATUS=loading model")
    assert d.stop() == 0
    assert "STOPPING=1" in d.notify.lines()


def test_the_life_cycle_goes_through_its_phases_in_order(node: Any) -> None:
    d = node()
    d.start()
    assert d.stop() == 0
    phases = [(e["was"], e["phase"]) for e in d.log_events() if e.get("event") == "phase"]
    assert phases == [
        ("opening", "loading"),
        ("loading", "serving"),
        ("serving", "draining"),
        ("draining", "stopped"),
    ]


def test_a_stop_signal_never_waits_for_a_lock_the_main_thread_may_hold() -> None:
    # SIGTERM arrives while the main thread holds the stop event's lock (as inside wait()): a
    # handler that set the event itself would wait for that lock forever, in the main thread
    # (a daemon once ignored SIGTERM for 60 s so). The event must still be set.
    script = """
import os, signal, threading, time
from qwen_edge.node.service import _relay_signals
stop = threading.Event()
_relay_signals(stop)
with stop._cond:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.3)  # the handler runs here, in this thread, while the lock is held
assert stop.wait(5), "SIGTERM did not set the stop event"
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr


def test_watchdog_pings_stop_while_the_inference_loop_is_stuck(node: Any, broker: Broker) -> None:
    # One decode step over a ~1,500-token prompt takes seconds here, longer than the 1 s stall
    # limit: to the watchdog that is a stuck loop, as a hung llama_decode would be.
    d = node(
        WATCHDOG_USEC="400000",
        QWEN_EDGE_SERVICE__WATCHDOG_STALL="1",
        QWEN_EDGE_MODEL__N_BATCH="2048",
        QWEN_EDGE_MODEL__N_CTX="4096",
    )
    d.start()
    assert d.notify is not None
    d.notify.wait_for("WATCHDOG=1", timeout=5)
    dev = Probe(broker, "heavy")
    try:
        dev.subscribe(dev.reply_topic())
        rid = dev.request("word " * 1500, max_tokens=2)
        deadline = time.monotonic() + 30
        while not any("stuck" in line for line in d.notify.lines()):
            assert time.monotonic() < deadline, "the watchdog never noticed the stall"
            time.sleep(0.05)
        pings = d.notify.lines().count("WATCHDOG=1")
        time.sleep(0.8)
        assert d.notify.lines().count("WATCHDOG=1") == pings  # silent while stuck
        assert dev.collect(rid, timeout=120)[-1]["type"] == "done"
        time.sleep(0.6)
        assert d.notify.lines().count("WATCHDOG=1") > pings  # and pinging again after
    finally:
        dev.close()


@pytest.mark.smoke
def test_sigterm_ends_in_flight_reply_publishes_offline_and_exits_zero(
    node: Any, broker: Broker
) -> None:
    d = node(QWEN_EDGE_SERVICE__DRAIN_TIMEOUT="1")
    d.start()
    dev = Probe(broker, "term", persistent=True)
    try:
        dev.subscribe(dev.reply_topic(), f"{PREFIX}/{NODE}/status")
        assert _status(dev)["state"] == "online"
        rid = dev.request("Write a long essay about mountains.", max_tokens=1500)
        read = dev.until(rid, 1)
        assert d.stop(signal.SIGTERM, timeout=30) == 0
        msgs = dev.collect(rid, timeout=10, before=read)
        assert msgs[-1]["type"] == "done"
        assert msgs[-1]["finish_reason"] == "cancelled"  # drain (1 s) ran out
        assert [m["seq"] for m in msgs] == list(range(len(msgs)))
        assert _status(dev)["state"] == "offline"
    finally:
        dev.close()


def test_broker_killed_and_restarted_mid_stream_reply_completes(node: Any, broker: Broker) -> None:
    d = node()
    d.start()
    dev = Probe(broker, "flaky", persistent=True)
    try:
        dev.subscribe(dev.reply_topic())
        # Greedy SmolLM2 answers this one at length (it repeats itself): a long stream.
        rid = dev.request("What is the capital of France?", max_tokens=200, temperature=0)
        read = dev.until(rid, 3)
        broker.stop(signal.SIGTERM)  # mosquitto saves sessions on SIGTERM
        time.sleep(1.0)
        broker.start()
        msgs = dev.collect(rid, timeout=90, before=read)
        assert msgs[-1]["type"] == "done"
        # De-duplicated by seq, nothing is missing: every seq from 0 to done arrived.
        assert [m["seq"] for m in msgs] == list(range(len(msgs)))
        # And the node serves new requests after the restart.
        again = dev.collect(dev.request("Hi", max_tokens=3), timeout=60)
        assert again[-1]["type"] == "done"
    finally:
        dev.close()


def test_requests_sent_while_daemon_restarts_are_served(node: Any, broker: Broker) -> None:
    d = node()
    d.start()
    d.stop()
    dev = Probe(broker, "patient", persistent=True)
    try:
        dev.subscribe(dev.reply_topic())
        rid = dev.request("Hello while you were away", max_tokens=4)
        d2 = node()
        d2.start()
        assert dev.collect(rid, timeout=60)[-1]["type"] == "done"
    finally:
        dev.close()


def test_status_goes_starting_online_offline(node: Any, broker: Broker) -> None:
    watcher = Probe(broker, "statuswatch")
    try:
        watcher.subscribe(f"{PREFIX}/{NODE}/status")
        d = node()
        d.start()
        states = [_status(watcher)["state"], _status(watcher)["state"]]
        assert states == ["starting", "online"]
        assert d.stop() == 0
        final = _status(watcher)
        assert final["state"] == "offline"
        assert final["reason"] == "stopped"
    finally:
        watcher.close()


def test_last_will_marks_node_offline_when_killed(node: Any, broker: Broker) -> None:
    d = node(QWEN_EDGE_MQTT__KEEPALIVE="5")
    d.start()
    watcher = Probe(broker, "watcher")
    try:
        watcher.subscribe(f"{PREFIX}/{NODE}/status")
        assert _status(watcher)["state"] == "online"
        d.stop(signal.SIGKILL)
        status = _status(watcher, timeout=15)
        assert status["state"] == "offline"
        assert status["model"] == "SmolLM2-135M-Instruct.Q4_1"
    finally:
        watcher.close()


def test_waits_for_the_broker_before_ready(tmp_path: Path) -> None:
    broker = Broker(tmp_path / "late")  # not started yet
    d = Daemon(tmp_path / "d", broker, SMOLLM, QWEN_EDGE_MQTT__RECONNECT_MAX_DELAY="1")
    d.start(wait_ready=False)
    try:
        assert d.notify is not None
        time.sleep(2)
        assert "READY=1" not in d.notify.lines()
        broker.start()
        d.notify.wait_for("READY=1", timeout=20)
        dev = Probe(broker, "late")
        dev.subscribe(dev.reply_topic())
        assert dev.collect(dev.request("Hi", max_tokens=3))[-1]["type"] == "done"
        dev.close()
    finally:
        d.stop()
        broker.stop()


def _serve(env: dict[str, str], state_dir: Path) -> subprocess.CompletedProcess[str]:
    import os

    full = {k: v for k, v in os.environ.items() if not k.startswith("QWEN_EDGE_")}
    full.update(env, QWEN_EDGE_SERVICE__STATE_DIR=str(state_dir))
    return subprocess.run(
        [sys.executable, "-m", "qwen_edge", "serve"],
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("content", [None, b"", b"not a gguf file at all", b"GGUF\x09\x00\x00\x00"])
def test_unusable_model_file_exits_3_with_one_clear_line(
    tmp_path: Path, content: bytes | None
) -> None:
    model = tmp_path / "model.gguf"
    if content is not None:
        model.write_bytes(content)
    result = _serve(
        {
            "QWEN_EDGE_MODEL__PATH": str(model),
            "QWEN_EDGE_MQTT__PORT": "1",
            "QWEN_EDGE_SERVICE__LOG_FORMAT": "json",
        },
        tmp_path / "state",
    )
    assert result.returncode == 3
    assert "Traceback" not in result.stderr
    errors = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    errors = [e for e in errors if e["level"] == "error"]
    assert len(errors) == 1
    assert str(model) in errors[0]["error"]


def _model_errors(result: subprocess.CompletedProcess[str]) -> list[str]:
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    return [e["error"] for e in events if e["level"] == "error"]


@pytest.mark.parametrize("keep", [1 << 20, -4096], ids=["first-megabyte", "all-but-4-KiB"])
def test_truncated_gguf_is_refused_before_loading(tmp_path: Path, keep: int) -> None:
    model = tmp_path / "truncated.gguf"
    model.write_bytes(SMOLLM.read_bytes()[:keep])
    result = _serve(
        {
            "QWEN_EDGE_MODEL__PATH": str(model),
            "QWEN_EDGE_MQTT__PORT": "1",
            "QWEN_EDGE_SERVICE__LOG_FORMAT": "json",
        },
        tmp_path / "state",
    )
    assert result.returncode == 3
    assert "Traceback" not in result.stderr
    (error,) = _model_errors(result)
    assert error.startswith(f"model file {model}: damaged or truncated GGUF")
    assert "model_loaded" not in result.stderr


def test_model_sha256_setting_is_checked_before_loading(tmp_path: Path) -> None:
    env = {
        "QWEN_EDGE_MODEL__PATH": str(SMOLLM),
        "QWEN_EDGE_MQTT__PORT": "1",
        "QWEN_EDGE_SERVICE__LOG_FORMAT": "json",
        "QWEN_EDGE_MODEL__SHA256": "0" * 64,
    }
    result = _serve(env, tmp_path / "state")
    assert result.returncode == 3
    (error,) = _model_errors(result)
    assert error.startswith(f"model file {SMOLLM}: SHA-256 is ")
    assert error.endswith(f"expected {'0' * 64} (corrupt, or a different file)")

    env["QWEN_EDGE_MODEL__SHA256"] = "not-a-hash"
    bad_setting = _serve(env, tmp_path / "state")
    assert bad_setting.returncode == 2
    assert "QWEN_EDGE_MODEL__SHA256" in bad_setting.stderr


def test_model_sha256_that_matches_lets_the_daemon_start(node: Any) -> None:
    digest = hashlib.sha256(SMOLLM.read_bytes()).hexdigest()
    d = node(QWEN_EDGE_MODEL__SHA256=digest.upper())
    d.start()
    verified = [e for e in d.log_events() if e.get("event") == "model_verified"]
    assert verified and verified[0]["sha256"] is True
    assert d.stop() == 0


@pytest.mark.smoke
def test_chinese_reply_parts_are_whole_characters(broker: Broker, tmp_path: Path) -> None:
    """SmolLM2's byte-level BPE splits CJK characters across tokens; chunks must not."""
    d = Daemon(tmp_path / "zh", broker, SMOLLM)
    d.start()
    dev = Probe(broker, "zh")
    try:
        dev.subscribe(dev.reply_topic())
        rid = dev.request("请用中文回答：天空是什么颜色？", max_tokens=60, temperature=0.9, seed=7)
        msgs = dev.collect(rid)
        text = reply_text(msgs)
        assert msgs[-1]["type"] == "done"
        assert "\ufffd" not in text
        raw_chunks = [json.loads(p)["text"] for t, p in dev.raw if b'"chunk"' in p]
        for chunk in raw_chunks:
            chunk.encode("utf-8")  # a lone surrogate or split character would fail here
        assert any("\u4e00" <= ch <= "\u9fff" for ch in text), text
    finally:
        dev.close()
        d.stop()
