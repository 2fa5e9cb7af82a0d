"""The kiosk page (deploy/kiosk/): its pure logic under node's test runner, its committed bundle
rebuilt from the lock file, the dev broker's WebSockets listener, and the page itself in real
headless Chromium against a real mosquitto and the real daemon (tests/kiosk/kiosk_e2e.mjs).

Needs node >= 20, `npm ci` in deploy/kiosk and Debian's chromium (scripts/setup installs them).
Missing, they skip the tests locally and fail them under CI=true: nothing is skipped silently.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from .conftest import NODE, PREFIX, ROOT, SMOLLM, Broker, Daemon, free_port

KIOSK = ROOT / "deploy" / "kiosk"
DIST = KIOSK / "dist"
E2E = Path(__file__).resolve().parent / "kiosk" / "kiosk_e2e.mjs"
ARTIFACTS = ROOT / "test-artifacts" / "kiosk"
CHROMIUM = os.environ.get("QWEN_EDGE_TEST_CHROMIUM", "/usr/bin/chromium")
FAKE_NODE = "scripted"


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI=true: the kiosk tests must run; scripts/setup installs it)")
    pytest.skip(reason)


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        _unavailable("node is not installed")
        raise AssertionError  # unreachable
    major = int(
        subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
        .stdout.strip()
        .lstrip("v")
        .split(".")[0]
    )
    if major < 20:
        _unavailable(f"node {major} is too old: the kiosk tools need node >= 20")
    return node


def _node_modules() -> None:
    if not (KIOSK / "node_modules" / "playwright-core").is_dir():
        _unavailable("deploy/kiosk/node_modules is missing: run `npm ci` in deploy/kiosk")


def test_kiosk_logic_unit_tests() -> None:
    """Reply assembly (de-duplication, seq order, final message) and settings, in node."""
    result = subprocess.run(
        [_node(), "--test", "test/"],
        cwd=KIOSK,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    passed = re.search(r"^# pass (\d+)$", result.stdout, re.M)
    assert passed and int(passed.group(1)) >= 10, result.stdout[-2000:]
    assert re.search(r"^# fail 0$", result.stdout, re.M)


def test_committed_bundle_is_what_the_lock_file_builds(tmp_path: Path) -> None:
    """dist/ is committed so that a kiosk needs no node; it must never go stale. A clean `npm ci`
    from package-lock.json and `node build.mjs` must give the committed files byte for byte."""
    node = _node()
    npm = shutil.which("npm")
    if npm is None:
        _unavailable("npm is not installed")
    work = tmp_path / "kiosk"
    work.mkdir()
    for name in ("package.json", "package-lock.json", "build.mjs"):
        shutil.copy2(KIOSK / name, work / name)
    shutil.copytree(KIOSK / "src", work / "src")
    ci = subprocess.run(
        [str(npm), "ci", "--no-audit", "--no-fund", "--prefer-offline"],
        cwd=work,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ci.returncode == 0, ci.stderr[-3000:]
    build = subprocess.run(
        [node, "build.mjs", "--outdir", str(tmp_path / "dist")],
        cwd=work,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    built = {p.name: p.read_bytes() for p in (tmp_path / "dist").iterdir()}
    committed = {p.name: p.read_bytes() for p in DIST.iterdir() if p.name != "config.json"}
    assert sorted(built) == sorted(committed)
    stale = [name for name in built if built[name] != committed[name]]
    assert not stale, f"deploy/kiosk/dist is stale ({stale}): run `npm run build` in deploy/kiosk"
    assert len(built["kiosk.js"]) < 800_000  # minified


def _ws_client(port: int) -> paho.Client:
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"ws-{uuid.uuid4().hex[:6]}",
        protocol=paho.MQTTv5,
        transport="websockets",
    )
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def test_dev_broker_config_has_a_websockets_listener(tmp_path: Path) -> None:
    """deploy/mosquitto/dev.conf, ports moved to free ones: MQTT 5 over WebSockets reaches a
    plain-TCP client through it."""
    plain, ws = free_port(), free_port()
    conf = (ROOT / "deploy" / "mosquitto" / "dev.conf").read_text()
    assert "listener 9001 127.0.0.1\nprotocol websockets\n" in conf
    conf = conf.replace("listener 1883 ", f"listener {plain} ").replace(
        "listener 9001 ", f"listener {ws} "
    )
    conf = conf.replace("persistence true", "persistence false")
    (tmp_path / "dev.conf").write_text(conf + ("user root\n" if os.geteuid() == 0 else ""))
    broker = subprocess.Popen(
        [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(tmp_path / "dev.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        got: list[bytes] = []
        subscribed = threading.Event()
        client = None
        for _ in range(100):
            try:
                client = _ws_client(ws)
                break
            except OSError:
                time.sleep(0.05)
        assert client is not None, "nothing listens on the websockets port"
        client.on_message = lambda c, u, m: got.append(m.payload)
        client.on_subscribe = lambda *a: subscribed.set()
        client.subscribe("kiosk/check", qos=1)
        assert subscribed.wait(5)
        tcp = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        tcp.connect("127.0.0.1", plain)
        tcp.loop_start()
        tcp.publish("kiosk/check", "你好", qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.02)
        assert got == ["你好".encode()]
        for c in (client, tcp):
            c.disconnect()
            c.loop_stop()
    finally:
        broker.terminate()
        broker.wait(10)


class KioskBroker(Broker):
    """The test broker with a WebSockets listener next to its plain one (mosquitto 2.0.11 wants
    both), as deploy/mosquitto/dev.conf has, which also serves the page (`http_dir`)."""

    def __init__(self, workdir: Path, http_dir: Path) -> None:
        super().__init__(workdir)
        self.ws_port = free_port()
        self.conf.write_text(
            self.conf.read_text()
            + f"listener {self.ws_port} 127.0.0.1\nprotocol websockets\nhttp_dir {http_dir}\n"
        )


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def page_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """The committed dist/ served by a plain static HTTP server, as a kiosk would serve it,
    plus a config.json the test writes next to it."""
    root = tmp_path / "www"
    shutil.copytree(DIST, root)
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, name="kiosk-http", daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/index.html", root
    server.shutdown()
    thread.join()
    server.server_close()


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    width, height = struct.unpack(">II", head[16:24])
    return width, height


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kiosk_page_in_chromium(tmp_path: Path, page_server: tuple[str, Path]) -> None:
    """Type, watch the reply stream in, Markdown and code render, stop cancels, offline shows
    when the daemon stops, reconnection after a broker restart: at 800x480 and 1920x1080."""
    node = _node()
    _node_modules()
    if not Path(CHROMIUM).exists():
        _unavailable(f"{CHROMIUM} is missing: apt-get install chromium")
    page_url, www = page_server
    broker = KioskBroker(tmp_path / "broker", www)
    daemon = Daemon(tmp_path / "daemon", broker, SMOLLM, QWEN_EDGE_MODEL__THREADS="1")
    # Settings from config.json (broker, title); the page's URL adds the rest (node, ...).
    (www / "config.json").write_text(
        json.dumps(
            {"broker": f"ws://127.0.0.1:{broker.ws_port}", "node": NODE, "title": "Kiosk test"}
        )
    )
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    setup = {
        "page_url": page_url,
        "broker_page_url": f"http://127.0.0.1:{broker.ws_port}/index.html",
        "mqtt_url": f"mqtt://127.0.0.1:{broker.port}",
        "prefix": PREFIX,
        "node": NODE,
        "fake_node": FAKE_NODE,
        "chromium": CHROMIUM,
        "artifacts": str(ARTIFACTS),
        "timeout_ms": 180_000,
    }
    output: list[str] = []
    stderr: list[str] = []
    finished: dict[str, object] = {}
    proc: subprocess.Popen[str] | None = None
    try:
        broker.start()
        daemon.start()
        proc = subprocess.Popen(
            [node, str(E2E)],
            env={**os.environ, "KIOSK_E2E": json.dumps(setup)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        err = proc.stderr
        threading.Thread(target=lambda: stderr.extend(err), daemon=True).start()
        for line in proc.stdout:
            if not line.startswith("@@"):
                output.append(line.rstrip())
                continue
            action = json.loads(line[2:])["do"]
            if action == "finished":
                finished = json.loads(line[2:])
                continue
            error = None
            try:
                if action == "stop_daemon":
                    assert daemon.stop() == 0
                elif action == "start_daemon":
                    daemon.start()
                elif action == "restart_broker":
                    broker.stop()
                    time.sleep(1)
                    broker.start()
                else:
                    error = f"unknown action {action}"
            except Exception as e:  # reported to the script, which fails the scenario
                error = repr(e)
            proc.stdin.write(json.dumps({"ok": error is None, "error": error}) + "\n")
            proc.stdin.flush()
        code = proc.wait(timeout=60)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        daemon.stop()
        broker.stop()
    report = "\n".join(output[-60:]) + "\n" + "".join(stderr)[-4000:]
    assert code == 0, report + "\n--- daemon log ---\n" + daemon.log()[-3000:]
    steps = finished.get("steps")
    assert isinstance(steps, list) and len(steps) == 12, report
    (ARTIFACTS / "figures.json").write_text(json.dumps(finished.get("figures"), indent=2) + "\n")
    shots = {p.name: _png_size(p) for p in ARTIFACTS.glob("*.png")}
    for name, size in {
        "markdown-1920x1080.png": (1920, 1080),
        "markdown-zh-800x480.png": (800, 480),
        "reply-800x480.png": (800, 480),
        "cancelled-1920x1080.png": (1920, 1080),
        "offline-800x480.png": (800, 480),
        "reconnected-800x480.png": (800, 480),
    }.items():
        assert shots.get(name) == size, (name, shots)
