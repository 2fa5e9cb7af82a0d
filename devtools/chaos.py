"""Chaos and soak runs of qwen-edge against a real mosquitto and the real daemon.

  scripts/chaos                  50 conversations while the broker is killed and restarted 10 times
  scripts/chaos --soak 10        10 minutes of continuous requests: the daemon's RSS must stay flat
  scripts/chaos --json out.json  the figures also as JSON

The devices are what docs/protocol.md ("Delivery across restarts") asks of a client: MQTT 5,
persistent sessions, QoS 1, de-duplication by (request_id, seq), and a resend of the request (same
request_id) when nothing arrives for it within --resend-after seconds. Every request must end with
a complete `done` (every seq from 0 present) or an explicit `error`; one that does not is `lost`.
Same (request_id, seq) with other content, or messages after the final one, mean the daemon
generated a reply twice: a de-duplicating client would mix two replies (`duplicates_after_dedup`).

The broker and the daemon are started exactly as the test suite starts them (devtools/harness.py:
tests/broker/plain.conf, persistence on, set_tcp_nodelay). Exit status 1 when anything was lost
or inconsistent, or (soak) the RSS grew by more than --rss-limit per cent after the warm-up.

scripts/chaos runs main(); tests/test_chaos.py imports the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .harness import NODE, PREFIX, SMOLLM, Broker, Daemon

PROMPTS = [
    "Name a fruit.",
    "Say hello.",
    "Count to five.",
    "What colour is the sky?",
    "Give me a word that rhymes with cat.",
    "Name a planet.",
    "What is two plus two?",
    "Tell me a very short joke.",
    "Name an animal that swims.",
    "Describe the sea in a few words.",
]
FOLLOW_UPS = ["And another one?", "Why?", "Say it again, shorter.", "Thanks. One more?"]


def log(msg: str) -> None:
    print(f"chaos: {msg}", file=sys.stderr, flush=True)


# -- a request as a device sees it --------------------------------------------------------------


@dataclass
class Request:
    """One request and every reply message received for it, de-duplicated by seq."""

    request_id: str
    topic: str
    body: bytes
    last_activity: float
    resends: int = 0
    received: dict[int, bytes] = field(default_factory=dict)  # seq -> first payload
    final: dict[str, Any] | None = None
    final_seq: int | None = None
    copies: int = 0  # (request_id, seq) seen again with the same payload: QoS 1 redelivery
    conflicting: int = 0  # seen again with another payload: a second generation
    after_final: int = 0  # seq beyond the final message: a second, longer generation
    malformed: int = 0  # a message that breaks the protocol's shape
    complete: threading.Event = field(default_factory=threading.Event)

    def missing(self) -> list[int]:
        if self.final_seq is None:
            return []
        return [s for s in range(self.final_seq + 1) if s not in self.received]

    def on_message(self, seq: int, data: dict[str, Any], payload: bytes) -> None:
        self.last_activity = time.monotonic()
        first = self.received.get(seq)
        if first is not None:
            if first == payload:
                self.copies += 1
            else:
                self.conflicting += 1
            return
        if self.final_seq is not None and seq > self.final_seq:
            self.after_final += 1
            return
        kind = data.get("type")
        if kind not in (("start", "error") if seq == 0 else ("chunk", "done", "error")):
            self.malformed += 1
        self.received[seq] = payload
        if kind in ("done", "error"):
            if self.final is not None:  # two finals at different seqs
                self.after_final += 1
                return
            self.final, self.final_seq = data, seq
        if self.final_seq is not None and not self.missing():
            self.complete.set()

    @property
    def outcome(self) -> str:
        """completed | errored | gaps | lost"""
        if self.final is None:
            return "lost"
        if self.missing():
            return "gaps"
        return "completed" if self.final["type"] == "done" else "errored"


@dataclass
class Tally:
    """Everything the devices saw that belongs to no request they sent."""

    unknown: int = 0  # a reply message for a request_id nobody sent
    unreadable: int = 0  # not JSON, or no seq
    error_topic: list[dict[str, Any]] = field(default_factory=list)


class Device:
    """One device connection: MQTT 5, persistent session, QoS 1, resubscribes on every connect."""

    def __init__(self, port: int, client_id: str) -> None:
        self.client_id = client_id
        self.requests: dict[str, Request] = {}
        self.tally = Tally()
        self._lock = threading.Lock()
        self.reply_filter = f"{PREFIX}/{NODE}/reply/{client_id}/#"
        self.error_topic = f"{PREFIX}/{NODE}/error/{client_id}"
        self.subscribed = threading.Event()
        self.connects = 0
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"chaos-{client_id}", protocol=paho.MQTTv5
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 2)
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        self.client.connect_async("127.0.0.1", port, clean_start=False, properties=props)
        self.client.loop_start()

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        if rc.is_failure:
            return
        self.connects += 1
        # Also when the broker kept the session: a session lost in a SIGKILL has no subscriptions.
        client.subscribe([(self.reply_filter, 1), (self.error_topic, 1)])

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        try:
            data = json.loads(payload)
            seq = data["seq"]
        except (ValueError, KeyError, TypeError):
            with self._lock:
                self.tally.unreadable += 1
            return
        with self._lock:
            if msg.topic == self.error_topic:
                self.tally.error_topic.append(data)
            request = self.requests.get(data.get("request_id"))
            if request is None:
                self.tally.unknown += 1
                return
            request.on_message(seq, data, payload)

    def send(self, request_id: str, conversation_id: str, **fields: Any) -> Request:
        body = json.dumps(
            {"request_id": request_id, "conversation_id": conversation_id, **fields}
        ).encode()
        request = Request(
            request_id, f"{PREFIX}/{NODE}/request/{self.client_id}", body, time.monotonic()
        )
        with self._lock:
            self.requests[request_id] = request
        self.publish(request)
        return request

    def publish(self, request: Request) -> None:
        # Queued by paho while the broker is away, sent when it reconnects.
        self.client.publish(request.topic, request.body, qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# -- traffic --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Traffic:
    turns: int
    max_tokens: int
    temperature: float
    resend_after: float
    max_resends: int
    think: float  # longest pause between two turns (seconds)


def converse(
    device: Device,
    conversation_id: str,
    rng: random.Random,
    traffic: Traffic,
    keep_going: Callable[[int], bool],
) -> None:
    """A conversation: turns one after the other, each sent again (same request_id) when
    nothing arrived for it for `resend_after` seconds. keep_going(turns done) says whether to
    start another turn."""
    turn = 0
    while keep_going(turn):
        message = rng.choice(PROMPTS if turn == 0 else FOLLOW_UPS)
        request = device.send(
            f"{conversation_id}-t{turn}",
            conversation_id,
            message=message,
            max_tokens=traffic.max_tokens,
            temperature=traffic.temperature,
            seed=rng.getrandbits(32),
        )
        while not request.complete.wait(0.2):
            if request.final is not None and request.final["type"] == "error":
                break  # an error with a gap before it: no use in waiting
            if time.monotonic() - request.last_activity < traffic.resend_after:
                continue
            if request.resends >= traffic.max_resends:
                break
            request.resends += 1
            request.last_activity = time.monotonic()
            device.publish(request)
        turn += 1
        time.sleep(rng.uniform(0, traffic.think))


def run_conversations(
    devices: list[Device],
    count: int,
    seed: int,
    traffic: Traffic,
    keep_going: Callable[[int], bool],
    *,
    prefix: str = "c",
) -> list[threading.Thread]:
    threads = []
    for i in range(count):
        device = devices[i % len(devices)]
        rng = random.Random(f"{seed}-{prefix}{i}")
        t = threading.Thread(
            target=converse,
            args=(device, f"{prefix}{i}", rng, traffic, keep_going),
            name=f"conversation-{prefix}{i}",
            daemon=True,  # Ctrl-C ends the run; the broker and the daemon are stopped anyway
        )
        t.start()
        threads.append(t)
    return threads


# -- the broker's bad days ------------------------------------------------------------------------


class Killer:
    """Kills the broker (SIGKILL and SIGTERM alternately) and restarts it, at random intervals."""

    def __init__(
        self, broker: Broker, restarts: int, rng: random.Random, gap: tuple[float, float]
    ) -> None:
        self.broker = broker
        self.restarts = restarts
        self.rng = rng
        self.gap = gap
        self.done = threading.Event()
        self.events: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="killer")

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join()

    def _run(self) -> None:
        began = time.monotonic()
        try:
            for k in range(self.restarts):
                if self._stop.wait(self.rng.uniform(*self.gap)):
                    return
                sig = signal.SIGKILL if k % 2 == 0 else signal.SIGTERM
                at = time.monotonic() - began
                self.broker.stop(sig)
                down = self.rng.uniform(0.2, 2.0)
                time.sleep(down)
                self.broker.start()
                self.events.append(
                    {"at_s": round(at, 2), "signal": sig.name, "down_s": round(down, 2)}
                )
                log(f"broker restart {k + 1}/{self.restarts}: {sig.name}, down {down:.1f} s")
        finally:
            self.done.set()


# -- the daemon's memory ---------------------------------------------------------------------------


def memory_kb(pid: int) -> tuple[int, int | None]:
    """(VmRSS, Pss) of a process in KiB; Pss None where smaps_rollup is unreadable."""
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    pss = None
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
    return rss, pss


class MemorySampler:
    def __init__(self, pid: int, every: float) -> None:
        self.pid = pid
        self.every = every
        self.samples: list[tuple[float, int, int | None, int]] = []  # (t, rss, pss, requests)
        self.requests_done: Callable[[], int] = lambda: 0
        self._stop = threading.Event()
        self._began = time.monotonic()
        self.thread = threading.Thread(target=self._run, name="memory")

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join()

    def _run(self) -> None:
        while True:
            with contextlib.suppress(OSError):
                rss, pss = memory_kb(self.pid)
                t = time.monotonic() - self._began
                self.samples.append((t, rss, pss, self.requests_done()))
            if self._stop.wait(self.every):
                return

    def report(self, warmup_s: float, warmup_requests: int, limit_pct: float) -> dict[str, Any]:
        """Figures after the warm-up: the later of `warmup_s` and `warmup_requests` replies
        (the daemon's KV keep store and conversation store fill during the first requests)."""
        after = [s for s in self.samples if s[0] >= warmup_s and s[3] >= warmup_requests]
        warmup_s = after[0][0] if after else warmup_s
        if len(after) < 2:
            return {"samples": len(self.samples), "error": "too few samples after the warm-up"}
        rss = [s[1] for s in after]
        pss = [s[2] for s in after if s[2] is not None]
        window = max(1, len(after) // 10)
        first_med = statistics.median(rss[:window])
        last_med = statistics.median(rss[-window:])
        spread = (max(rss) - min(rss)) / min(rss) * 100
        growth = (last_med - first_med) / first_med * 100
        mb = 1024
        return {
            "samples": len(self.samples),
            "samples_after_warmup": len(after),
            "warmup_s": round(warmup_s, 1),
            "requests_at_warmup_end": after[0][3],
            "rss_mb_first": round(rss[0] / mb, 1),
            "rss_mb_last": round(rss[-1] / mb, 1),
            "rss_mb_min": round(min(rss) / mb, 1),
            "rss_mb_max": round(max(rss) / mb, 1),
            "rss_mb_peak_during_warmup": round(
                max(s[1] for s in self.samples if s[0] < warmup_s) / mb, 1
            )
            if any(s[0] < warmup_s for s in self.samples)
            else None,
            "pss_mb_first": round(pss[0] / mb, 1) if pss else None,
            "pss_mb_last": round(pss[-1] / mb, 1) if pss else None,
            "rss_growth_pct": round(growth, 2),  # median of the last tenth vs the first tenth
            "rss_spread_pct": round(spread, 2),  # (max - min) / min after the warm-up
            "limit_pct": limit_pct,
            "flat": spread <= limit_pct,
        }


# -- the run -----------------------------------------------------------------------------------


def daemon_log_figures(daemon: Daemon) -> dict[str, Any]:
    """What the daemon says it did: replies generated per request, duplicates it ignored,
    faults it logged."""
    done: Counter[tuple[str, str]] = Counter()
    figures: Counter[str] = Counter()
    for event in daemon.log_events():
        name = event.get("event")
        if name == "request_done":
            done[(event.get("client_id", ""), event.get("request_id", ""))] += 1
        elif name in ("duplicate_ignored", "broker_back"):
            figures[name] += 1
        if event.get("level") in ("error", "critical") or name in (
            "message_handler_failed",
            "inference_fault",
        ):
            figures["errors_logged"] += 1
    twice = sorted(f"{c}/{r}" for (c, r), n in done.items() if n > 1)
    return {
        "replies_generated": sum(done.values()),
        "duplicate_generations": sum(n - 1 for n in done.values()),
        "generated_twice": twice,  # client/request_id
        "duplicates_ignored": figures["duplicate_ignored"],
        # One broker_back per outage of a link (the first connection is broker_connected).
        "reconnects": figures["broker_back"],
        "errors_logged": figures["errors_logged"],
    }


def summarise(devices: list[Device]) -> dict[str, Any]:
    requests = [r for d in devices for r in d.requests.values()]
    outcomes = Counter(r.outcome for r in requests)
    codes = Counter(
        r.final["code"] for r in requests if r.final is not None and r.final["type"] == "error"
    )
    finish = Counter(
        r.final["finish_reason"]
        for r in requests
        if r.final is not None and r.final["type"] == "done"
    )
    copies = sum(r.copies for r in requests)
    conflicting = sum(r.conflicting for r in requests)
    after_final = sum(r.after_final for r in requests)
    return {
        "requests_sent": len(requests),
        "resends": sum(r.resends for r in requests),
        # Ended well only because the device sent them again: lost on the way the first time.
        "completed_after_resend": sum(1 for r in requests if r.resends and r.final is not None),
        "completed": outcomes["completed"],
        "errored": outcomes["errored"],
        "errored_by_code": dict(codes),
        "finish_reasons": dict(finish),
        "lost": outcomes["lost"],
        "lost_ids": sorted(r.request_id for r in requests if r.outcome == "lost")[:20],
        "with_gaps": outcomes["gaps"],
        "missing_seqs": sum(len(r.missing()) for r in requests),
        "gap_ids": sorted(r.request_id for r in requests if r.outcome == "gaps")[:20],
        "duplicate_seq_before_dedup": copies + conflicting,
        "duplicates_after_dedup": conflicting + after_final,
        "duplicate_ids": sorted(
            f"{d.client_id}/{r.request_id}"
            for d in devices
            for r in d.requests.values()
            if r.conflicting or r.after_final
        ),
        "conflicting_copies": conflicting,
        "messages_after_final": after_final,
        "malformed": sum(r.malformed for r in requests),
        "unknown_messages": sum(d.tally.unknown for d in devices),
        "unreadable_messages": sum(d.tally.unreadable for d in devices),
        "error_topic_messages": sum(len(d.tally.error_topic) for d in devices),
        "device_connects": sum(d.connects for d in devices),
    }


def settle(devices: list[Device], seconds: float) -> None:
    """Wait until no message has arrived for `seconds`: late copies and second generations
    count too."""
    while True:
        last = max((r.last_activity for d in devices for r in d.requests.values()), default=0.0)
        idle = time.monotonic() - last
        if idle >= seconds:
            return
        time.sleep(seconds - idle)


@contextlib.contextmanager
def system(args: argparse.Namespace, workdir: Path) -> Iterator[tuple[Broker, Daemon]]:
    broker = Broker(workdir / "broker")
    broker.start()
    env = {
        "QWEN_EDGE_MODEL__THREADS": str(args.threads),
        "QWEN_EDGE_MODEL__SLOTS": str(args.slots),
        "QWEN_EDGE_MODEL__QUEUE_SIZE": str(args.queue_size),
    }
    if args.max_conversations:
        env["QWEN_EDGE_CONVERSATIONS__MAX_CONVERSATIONS"] = str(args.max_conversations)
    daemon = Daemon(workdir / "daemon", broker, args.model, None, **env)
    try:
        daemon.start()
        yield broker, daemon
    finally:
        with contextlib.suppress(Exception):
            daemon.stop(signal.SIGTERM, timeout=60)
        broker.stop()


def chaos(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    traffic = Traffic(
        args.turns, args.max_tokens, args.temperature, args.resend_after, args.max_resends, 1.0
    )
    with system(args, workdir) as (broker, daemon):
        devices = [Device(broker.port, f"dev{i}") for i in range(args.devices)]
        for d in devices:
            if not d.subscribed.wait(10):
                raise RuntimeError(f"{d.client_id} could not subscribe")
        time.sleep(1.5)  # the broker saves sessions every second: let it save the devices'
        killer = Killer(broker, args.restarts, random.Random(f"{args.seed}-kills"), args.gap)
        began = time.monotonic()

        def keep_going(turns: int) -> bool:
            # At least --turns turns, and more while the broker is still being killed.
            return turns < args.turns or not killer.done.is_set()

        threads = run_conversations(devices, args.conversations, args.seed, traffic, keep_going)
        time.sleep(1.0)  # the first replies are streaming
        killer.start()
        for t in threads:
            t.join()
        killer.stop()
        settle(devices, args.settle)
        wall = time.monotonic() - began
        for d in devices:
            d.close()
        alive = daemon.proc is not None and daemon.proc.poll() is None
        exit_code = daemon.stop(signal.SIGTERM, timeout=60)
    result = summarise(devices)
    result.update(
        broker_restarts=len(killer.events),
        restarts=killer.events,
        wall_s=round(wall, 1),
        daemon_alive=alive,
        daemon_exit=exit_code,
        daemon=daemon_log_figures(daemon),
    )
    return result


def soak(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    traffic = Traffic(
        args.turns, args.max_tokens, args.temperature, args.resend_after, args.max_resends, 0.0
    )
    duration = args.soak * 60
    with system(args, workdir) as (broker, daemon):
        assert daemon.proc is not None
        devices = [Device(broker.port, f"dev{i}") for i in range(args.devices)]
        for d in devices:
            if not d.subscribed.wait(10):
                raise RuntimeError(f"{d.client_id} could not subscribe")
        time.sleep(1.5)
        sampler = MemorySampler(daemon.proc.pid, args.sample_every)

        def finished() -> int:
            return sum(1 for d in devices for r in list(d.requests.values()) if r.final is not None)

        sampler.requests_done = finished
        began = time.monotonic()
        deadline = began + duration
        killer = None
        if args.kills:
            gap = (duration / (args.kills + 1) * 0.5, duration / (args.kills + 1) * 1.5)
            killer = Killer(broker, args.kills, random.Random(f"{args.seed}-kills"), gap)
        counter = {"n": 0}
        lock = threading.Lock()

        def worker(w: int) -> None:
            # One conversation after another, each of --turns turns, until the time is up.
            rng = random.Random(f"{args.seed}-w{w}")
            while time.monotonic() < deadline:
                with lock:
                    n = counter["n"]
                    counter["n"] += 1
                converse(
                    devices[w % len(devices)],
                    f"s{n}",
                    rng,
                    traffic,
                    lambda turns: turns < traffic.turns and time.monotonic() < deadline,
                )

        sampler.start()
        if killer is not None:
            killer.start()
        workers = [
            threading.Thread(target=worker, args=(w,), name=f"worker-{w}", daemon=True)
            for w in range(args.concurrency)
        ]
        for t in workers:
            t.start()
        last_note = began
        while any(t.is_alive() for t in workers):
            time.sleep(1)
            if time.monotonic() - last_note >= 60:
                last_note = time.monotonic()
                rss = sampler.samples[-1][1] / 1024 if sampler.samples else 0
                log(f"{(last_note - began) / 60:.0f} min: {finished()} replies, RSS {rss:.0f} MB")
        for t in workers:
            t.join()
        if killer is not None:
            killer.stop()
        settle(devices, args.settle)
        sampler.stop()
        wall = time.monotonic() - began
        for d in devices:
            d.close()
        alive = daemon.proc.poll() is None
        exit_code = daemon.stop(signal.SIGTERM, timeout=60)
    result = summarise(devices)
    warmup = max(duration * args.warmup, 0.0)
    result.update(
        soak_minutes=args.soak,
        broker_restarts=len(killer.events) if killer else 0,
        restarts=killer.events if killer else [],
        wall_s=round(wall, 1),
        requests_per_s=round(result["requests_sent"] / wall, 2),
        daemon_alive=alive,
        daemon_exit=exit_code,
        daemon=daemon_log_figures(daemon),
        memory=sampler.report(warmup, args.warmup_requests, args.rss_limit),
        rss_samples=[
            {"t_s": round(t, 1), "rss_kb": rss, "pss_kb": pss, "requests": n}
            for t, rss, pss, n in sampler.samples
        ],
    )
    return result


def failures(result: dict[str, Any]) -> list[str]:
    """What makes the run fail, in words; empty when it passed."""
    out = []
    for key in (
        "lost",
        "with_gaps",
        "duplicates_after_dedup",
        "malformed",
        "unknown_messages",
        "unreadable_messages",
    ):
        if result[key]:
            out.append(f"{key} = {result[key]}")
    if result["daemon"]["duplicate_generations"]:
        out.append(f"duplicate_generations = {result['daemon']['duplicate_generations']}")
    if not result["daemon_alive"] or result["daemon_exit"] != 0:
        out.append(f"daemon died or exited {result['daemon_exit']}")
    if result["daemon"]["errors_logged"]:
        out.append(f"daemon logged {result['daemon']['errors_logged']} errors")
    memory = result.get("memory")
    if memory is not None and not memory.get("flat", False):
        out.append(f"RSS not flat: {memory}")
    return out


def print_table(result: dict[str, Any]) -> None:
    rows: list[tuple[str, Any]] = [
        ("requests sent", result["requests_sent"]),
        ("  resent after silence", result["resends"]),
        ("  ended only after a resend", result["completed_after_resend"]),
        ("completed (done, no seq gap)", result["completed"]),
        ("errored (explicit error)", result["errored"]),
    ]
    rows += [(f"  {code}", n) for code, n in sorted(result["errored_by_code"].items())]
    rows += [
        ("lost (no final message)", result["lost"]),
        ("with seq gaps", result["with_gaps"]),
        ("duplicate seq before dedup", result["duplicate_seq_before_dedup"]),
        ("duplicates after dedup", result["duplicates_after_dedup"]),
        ("  other content at a seen seq", result["conflicting_copies"]),
        ("  messages after the final", result["messages_after_final"]),
        ("replies generated twice (daemon log)", result["daemon"]["duplicate_generations"]),
        ("duplicate requests ignored (daemon log)", result["daemon"]["duplicates_ignored"]),
        ("broker restarts", result["broker_restarts"]),
        ("daemon reconnects", result["daemon"]["reconnects"]),
        ("wall time, s", result["wall_s"]),
    ]
    memory = result.get("memory")
    if memory and "rss_mb_first" in memory:
        rows += [
            ("requests per second", result["requests_per_s"]),
            (
                "RSS after warm-up: first / last, MB",
                f"{memory['rss_mb_first']} / {memory['rss_mb_last']}",
            ),
            (
                "RSS after warm-up: min / max, MB",
                f"{memory['rss_mb_min']} / {memory['rss_mb_max']}",
            ),
            ("RSS growth (last vs first tenth), %", memory["rss_growth_pct"]),
            (
                "RSS spread (max-min)/min, %",
                f"{memory['rss_spread_pct']} (limit {memory['limit_pct']})",
            ),
            (
                "PSS after warm-up: first / last, MB",
                f"{memory['pss_mb_first']} / {memory['pss_mb_last']}",
            ),
        ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=SMOLLM, help="GGUF model (default SmolLM2-135M)")
    p.add_argument("--conversations", type=int, default=50)
    p.add_argument("--turns", type=int, default=3, help="turns per conversation, at least")
    p.add_argument("--restarts", type=int, default=10, help="broker kills and restarts (chaos)")
    p.add_argument(
        "--gap",
        type=float,
        nargs=2,
        default=(2.0, 6.0),
        metavar=("MIN", "MAX"),
        help="seconds between broker restarts, drawn uniformly",
    )
    p.add_argument("--devices", type=int, default=5, help="device connections (MQTT clients)")
    p.add_argument("--max-tokens", type=int, help="reply length (default 16; soak 4)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--resend-after", type=float, default=60.0, help="seconds of silence")
    p.add_argument("--max-resends", type=int, default=3)
    p.add_argument("--settle", type=float, default=3.0, help="quiet seconds before counting")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="daemon inference threads (0: all)")
    p.add_argument("--slots", type=int, default=2)
    p.add_argument("--queue-size", type=int, help="daemon wait queue (default: conversations)")
    p.add_argument("--max-conversations", type=int, help="daemon's remembered conversations")
    p.add_argument("--soak", type=float, metavar="MINUTES", help="soak run instead of chaos")
    p.add_argument("--concurrency", type=int, default=4, help="soak: requests at a time")
    p.add_argument("--kills", type=int, default=0, help="soak: broker restarts during the run")
    p.add_argument("--sample-every", type=float, default=2.0, help="soak: RSS sampling, s")
    p.add_argument("--warmup", type=float, default=0.1, help="soak: warm-up share of the time")
    p.add_argument(
        "--warmup-requests", type=int, default=200, help="soak: warm-up, at least these replies"
    )
    p.add_argument("--rss-limit", type=float, default=10.0, help="soak: allowed RSS spread, %%")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--workdir", type=Path, help="broker and daemon files (default: a temp dir)")
    args = p.parse_args(argv)
    if args.max_tokens is None:
        args.max_tokens = 16 if args.soak is None else 4
    if args.queue_size is None:
        args.queue_size = max(16, args.conversations if args.soak is None else args.concurrency)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="qwen-edge-chaos-"))
    log(f"model {args.model.name}, files in {workdir}")
    if args.soak is not None:
        if args.max_conversations is None:
            # Fresh conversations all the time: evicting old ones is part of the steady state.
            args.max_conversations = 64
        result = soak(args, workdir)
    else:
        result = chaos(args, workdir)
    result["seed"] = args.seed
    result["model"] = args.model.name
    result["workdir"] = str(workdir)
    problems = failures(result)
    result["failures"] = problems
    result["passed"] = not problems
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    for problem in problems:
        log(f"FAIL: {problem}")
    log("passed" if not problems else f"failed; broker and daemon logs in {workdir}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
