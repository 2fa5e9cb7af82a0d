"""Root never reads what the broker's user can write (issue 18, item 5).

scripts/broker-setup --tls --user nobody, as root: every file root reads, runs or trusts stays
root's and unwritable by nobody, nobody cannot read the CA key, setup.env is parsed and never
sourced, and the broker still starts as nobody, serves TLS and saves a live change in its own
state directory. Checked as nobody itself (setpriv), not only from the modes.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devtools.harness import ROOT, Broker, free_port

BROKER_SETUP = ROOT / "scripts" / "broker-setup"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0
    or shutil.which("setpriv") is None
    or shutil.which("openssl") is None
    or not any(p.pw_name == "nobody" for p in pwd.getpwall()),
    reason="needs root, setpriv, openssl and the user nobody",
)

# Run as nobody: every path below DIR it may write to, and the ones it may read among `secret`.
AS_NOBODY = r"""
import json, os, sys
top, secret = sys.argv[1], sys.argv[2:]
writable = []
for d, dirs, files in os.walk(top):
    for name in [d, *(os.path.join(d, f) for f in files)]:
        if os.access(name, os.W_OK):
            writable.append(os.path.relpath(name, top))
print(json.dumps({"writable": writable, "readable": [p for p in secret if os.access(p, os.R_OK)]}))
"""


def as_nobody(*args: str) -> dict[str, list[str]]:
    done = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "python3", "-c",
         AS_NOBODY, *args],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    result: dict[str, list[str]] = json.loads(done.stdout)
    return result


@pytest.fixture(scope="module")
def setup_dir() -> Iterator[Path]:
    # Not below pytest's private (0700) temporary directory: nobody must reach DIR.
    top = Path(tempfile.mkdtemp(prefix="qwen-edge-owners-", dir="/tmp"))
    top.chmod(0o755)
    yield top / "broker"
    shutil.rmtree(top)


@pytest.fixture(scope="module")
def broker(setup_dir: Path) -> Iterator[Broker]:
    b = Broker.__new__(Broker)
    b.port, b.workdir, b.proc = free_port(), setup_dir, None
    done = subprocess.run(
        [str(BROKER_SETUP), "--dir", str(setup_dir), "--tls", "--bind", "127.0.0.1",
         "--port", str(b.port), "--user", "nobody", "--daemon", "qwen-edge",
         "--device", "devA", "--passwords", "-"],
        input="qwen-edge:pw-daemon\ndevA:pw-devA\n",
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    b.conf = setup_dir / "mosquitto.conf"
    # The log goes elsewhere: DIR is root's.
    b.workdir = setup_dir.parent
    b.start()
    yield b
    b.stop()


def test_the_broker_user_writes_only_its_state_and_reads_no_ca_key(
    setup_dir: Path, broker: Broker
) -> None:
    """Issue 18, item 5: chown -R gave the broker's user setup.env (which root sourced) and
    certs/ca.key."""
    nobody = pwd.getpwnam("nobody").pw_uid
    for path in [setup_dir, *setup_dir.rglob("*")]:
        st = path.lstat()
        relative = path.relative_to(setup_dir)
        if relative.parts[:1] == ("state",):
            assert st.st_uid == nobody, relative
        else:
            assert st.st_uid == 0 and not st.st_mode & 0o022, (relative, oct(st.st_mode))
    certs = setup_dir / "certs"
    seen = as_nobody(str(setup_dir), str(certs / "ca.key"), str(certs / "server.key"))
    assert [p for p in seen["writable"] if p.split("/")[0] != "state"] == [], seen
    assert "state/dynamic-security.json" in seen["writable"]
    assert seen["readable"] == [str(certs / "server.key")]
    for name in ("admin.password", "sweeper.password", "certs/ca.key"):
        assert (setup_dir / name).stat().st_mode & 0o777 == 0o600, name


def test_the_broker_runs_as_nobody_serves_tls_and_saves_a_live_change(
    setup_dir: Path, broker: Broker
) -> None:
    assert broker.proc is not None
    status = Path(f"/proc/{broker.proc.pid}/status").read_text()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    assert uid_line.split()[1] == str(pwd.getpwnam("nobody").pw_uid)

    added = subprocess.run(
        [str(BROKER_SETUP), "--dir", str(setup_dir), "--add-device", "devB", "--passwords", "-"],
        input="devB:pw-devB\n", capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    # The broker (as nobody) rewrote its file in its own directory.
    saved = json.loads((setup_dir / "state" / "dynamic-security.json").read_text())
    assert "devB" in [c["username"] for c in saved["clients"]]

    connected: list[int] = []
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="devB", protocol=paho.MQTTv5)
    client.tls_set(
        ca_certs=str(setup_dir / "certs" / "ca.crt"), tls_version=ssl.PROTOCOL_TLS_CLIENT
    )
    client.username_pw_set("devB", "pw-devB")
    client.on_connect = lambda c, u, f, rc, p: connected.append(rc.value)
    client.connect("127.0.0.1", broker.port)
    while not connected:
        client.loop(timeout=1.0)
    client.disconnect()
    assert connected == [0]


def test_setup_env_is_parsed_never_sourced(setup_dir: Path, broker: Broker) -> None:
    """As the broker's user could once append to it: a shell line in setup.env runs nothing."""
    marker = setup_dir.parent / "sourced"
    env = setup_dir / "setup.env"
    original = env.read_text()
    env.write_text(original + f"touch {marker}\nx=$(touch {marker})\n")
    try:
        added = subprocess.run(
            [str(BROKER_SETUP), "--dir", str(setup_dir), "--add-device", "devC", "--passwords",
             "-"],
            input="devC:pw-devC\n", capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert added.returncode == 0, added.stderr
        assert not marker.exists()
    finally:
        env.write_text(original)


def test_a_setup_env_the_broker_user_could_change_is_not_trusted(
    setup_dir: Path, broker: Broker
) -> None:
    """As in a directory an older broker-setup made: setup.env owned by the broker's user could
    point the admin's password at another listener. Refused, naming the file."""
    env = setup_dir / "setup.env"
    nobody = pwd.getpwnam("nobody").pw_uid
    os.chown(env, nobody, -1)
    try:
        added = subprocess.run(
            [str(BROKER_SETUP), "--dir", str(setup_dir), "--add-device", "devD", "--passwords",
             "-"],
            input="devD:pw-devD\n", capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert added.returncode == 2 and "not trusted" in added.stderr, added.stderr
    finally:
        os.chown(env, 0, -1)
