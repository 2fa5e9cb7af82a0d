"""scripts/install into a temporary root: the same steps a Raspberry Pi runs (a venv with the
project and llama-cpp-python built by scripts/install-llama-cpp, config, unit, model, broker
config), idempotent, uninstallable, and touching nothing outside the root.

Commands that would act on this machine (apt-get, sudo, systemctl without --root) are shadowed
on PATH by stand-ins that record the call and fail; only pip's cache (~/.cache/pip) is shared.
The module installs once (~20 s with the wheel cache warm from scripts/setup); the tests run in
file order, the uninstall tests last. The last test takes the real-system path (no --root)
inside private mount and network namespaces, where it also runs the installed broker and daemon.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devtools.harness import SMOLLM, Broker

from .procwatch import ProcessSampler

ROOT = Path(__file__).resolve().parent.parent
INSTALL = ROOT / "scripts" / "install"
UNIT = ROOT / "systemd" / "qwen-edge.service"
EXAMPLE_CONFIG = ROOT / "deploy" / "config.example.toml"
DEV_BROKER_CONF = ROOT / "deploy" / "mosquitto" / "dev.conf"
INSTALL_TIMEOUT = 900  # seconds; a cold pip cache would rebuild llama.cpp (~5 min on 2 cores)

# Places on this machine the installer writes to when run without --root.
HOST_PATHS = [
    Path("/opt/qwen-edge"),
    Path("/etc/qwen-edge"),
    Path("/etc/systemd/system"),
    Path("/etc/systemd/system/multi-user.target.wants"),
    Path("/etc/mosquitto/conf.d"),
    Path("/etc/mosquitto/qwen-edge.acl"),
    Path("/var/lib/qwen-edge"),
    Path("/var/lib/private/qwen-edge"),
]

GUARD = """#!/bin/sh
# Stand-in for {name}: record the call; pass only systemctl --root=... through.
echo "{name} $*" >> {log}
if [ {name} = systemctl ]; then
  for a in "$@"; do case "$a" in --root=*) exec {real} "$@" ;; esac; done
fi
exit 1
"""


@dataclass
class Installed:
    root: Path
    guard_log: Path
    env: dict[str, str]
    host_before: dict[str, object]
    first_output: str

    @property
    def venv(self) -> Path:
        return self.root / "opt" / "qwen-edge" / "venv"

    @property
    def config(self) -> Path:
        return self.root / "etc" / "qwen-edge" / "config.toml"


def host_state() -> dict[str, object]:
    """Existence, mtime and entries of the host paths the installer would write to."""
    state: dict[str, object] = {}
    for path in HOST_PATHS:
        try:
            st = path.lstat()
        except FileNotFoundError:
            state[str(path)] = None
            continue
        entries = sorted(os.listdir(path)) if path.is_dir() else None
        state[str(path)] = (st.st_mtime_ns, entries)
    return state


def tree(root: Path) -> dict[str, tuple[object, ...]]:
    """Every entry below root: type, mode, size, mtime and link target or content digest."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                what: object = os.readlink(path)
            elif stat.S_ISREG(st.st_mode) and st.st_size < 1_000_000:
                what = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                what = None
            out[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, what)
    return out


def files(root: Path) -> set[str]:
    """Files and symbolic links below root (directories left empty do not count)."""
    return {
        str(Path(d, n).relative_to(root))
        for d, dirs, names in os.walk(root)
        for n in names + [x for x in dirs if Path(d, x).is_symlink()]
    }


def run_install(installed: Installed, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(INSTALL), "--root", str(installed.root), *args],
        env=installed.env,
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT,
        check=False,
    )


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("QWEN_EDGE_")}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    root = tmp_path_factory.mktemp("root")
    guard_dir = tmp_path_factory.mktemp("guard")
    guard_log = guard_dir / "calls.log"
    guard_log.touch()
    real_systemctl = shutil.which("systemctl") or "/bin/false"
    for name in ("apt-get", "apt", "sudo", "systemctl"):
        script = guard_dir / name
        script.write_text(GUARD.format(name=name, log=guard_log, real=real_systemctl))
        script.chmod(0o755)
    env = clean_env()
    env["PATH"] = f"{guard_dir}:{env['PATH']}"
    host_before = host_state()
    inst = Installed(root, guard_log, env, host_before, "")
    result = run_install(inst, "--with-mosquitto", "dev", "--model", str(SMOLLM))
    assert result.returncode == 0, result.stdout + result.stderr
    inst.first_output = result.stderr
    yield inst


@pytest.mark.slow
def test_install_puts_every_file_under_the_root(installed: Installed) -> None:
    root = installed.root
    binary = installed.venv / "bin" / "qwen-edge"
    assert binary.is_file() and os.access(binary, os.X_OK)
    assert (root / "etc/systemd/system/qwen-edge.service").read_bytes() == UNIT.read_bytes()
    wants = root / "etc/systemd/system/multi-user.target.wants/qwen-edge.service"
    assert os.readlink(wants) == "/etc/systemd/system/qwen-edge.service"
    assert (root / "etc/mosquitto/conf.d/qwen-edge.conf").read_bytes() == (
        DEV_BROKER_CONF.read_bytes()
    )
    assert (root / "opt/qwen-edge/share/config.example.toml").read_bytes() == (
        EXAMPLE_CONFIG.read_bytes()
    )
    model = root / "var/lib/qwen-edge/models" / SMOLLM.name
    assert model.stat().st_size == SMOLLM.stat().st_size
    assert subprocess.run(["cmp", "-s", str(model), str(SMOLLM)], check=False).returncode == 0
    # The config is the example with the model's path; world-readable for the dynamic user.
    text = installed.config.read_text()
    assert f'path = "/var/lib/qwen-edge/models/{SMOLLM.name}"' in text
    assert (
        text.replace(
            f'path = "/var/lib/qwen-edge/models/{SMOLLM.name}"',
            'path = "/var/lib/qwen-edge/models/qwen2.5-0.5b-instruct-q4_k_m.gguf"',
        )
        == EXAMPLE_CONFIG.read_text()
    )
    assert stat.S_IMODE(installed.config.stat().st_mode) == 0o644
    for expected in ("wrote /etc/qwen-edge/config.toml", "enabled qwen-edge.service"):
        assert expected in installed.first_output


@pytest.mark.slow
def test_installed_venv_runs_the_installed_config(installed: Installed) -> None:
    binary = str(installed.venv / "bin" / "qwen-edge")
    env = clean_env()
    help_ = subprocess.run([binary, "--help"], capture_output=True, text=True, env=env, check=False)
    assert help_.returncode == 0, help_.stderr
    for command in ("serve", "chat", "fleet", "doctor"):
        assert command in help_.stdout

    config = subprocess.run(
        [binary, "config", "--config", str(installed.config)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert config.returncode == 0, config.stderr
    settings = json.loads(config.stdout)
    assert settings["model"]["path"] == f"/var/lib/qwen-edge/models/{SMOLLM.name}"

    # llama-cpp-python in the venv is the version scripts/setup pins, and it loads.
    version = subprocess.run(
        [
            str(installed.venv / "bin" / "python"),
            "-c",
            "import importlib.metadata as m, llama_cpp; print(m.version('llama-cpp-python'))",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    pinned = next(
        line.split("=", 1)[1]
        for line in (ROOT / "scripts" / "setup").read_text().splitlines()
        if line.startswith("LLAMA_CPP_VERSION=")
    )
    assert version.stdout.strip() == pinned, version.stderr


@pytest.mark.slow
def test_installed_doctor_passes_with_a_broker(installed: Installed, module_broker: Broker) -> None:
    # The installed config names the model by its path on the device; here it sits in the root.
    env = clean_env()
    env.update(
        QWEN_EDGE_MQTT__PORT=str(module_broker.port),
        QWEN_EDGE_MODEL__PATH=str(installed.root / "var/lib/qwen-edge/models" / SMOLLM.name),
        QWEN_EDGE_NODE_ID="not-running",
    )
    result = subprocess.run(
        [str(installed.venv / "bin/qwen-edge"), "doctor", "--config", str(installed.config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout
    # No daemon runs, so the node's status is the one warning.
    assert [line.split()[1] for line in result.stdout.splitlines() if line.startswith("WARN")] == [
        "node"
    ], result.stdout


@pytest.mark.slow
def test_installed_unit_verifies_against_the_installed_binary(
    installed: Installed, tmp_path: Path
) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (installed.root / "etc/systemd/system/qwen-edge.service").read_text()
    binary = "/opt/qwen-edge/venv/bin/qwen-edge"
    assert f"ExecStart={binary} serve --config /etc/qwen-edge/config.toml" in unit
    # verify checks that ExecStart's binary is executable; point it into the root.
    copy = tmp_path / "qwen-edge.service"
    copy.write_text(unit.replace(f"ExecStart={binary} ", f"ExecStart={installed.root}{binary} "))
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": ""}
    result = subprocess.run(
        [analyze, "verify", str(copy)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stderr
    enabled = subprocess.run(
        ["systemctl", f"--root={installed.root}", "is-enabled", "qwen-edge.service"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert enabled.stdout.strip() == "enabled", enabled.stdout + enabled.stderr


@pytest.mark.slow
def test_second_run_changes_nothing(installed: Installed) -> None:
    before = tree(installed.root)

    result = run_install(installed, "--with-mosquitto", "dev", "--model", str(SMOLLM))

    assert result.returncode == 0, result.stderr
    assert "up to date, nothing changed" in result.stderr
    assert tree(installed.root) == before


@pytest.mark.slow
def test_an_edited_config_is_never_overwritten(installed: Installed) -> None:
    edited = installed.config.read_text().replace('host = "127.0.0.1"', 'host = "broker.lan"')
    edited = edited.replace("qwen2.5", "mine")
    installed.config.write_text(edited)

    result = run_install(installed, "--model", str(SMOLLM))

    assert result.returncode == 0, result.stderr
    assert installed.config.read_text() == edited
    assert "/etc/qwen-edge/config.toml exists and is left alone" not in result.stderr
    # A model the kept config does not name gets a note, not an edit.
    other = installed.root.parent / "other-model.gguf"
    shutil.copy(SMOLLM, other)
    result = run_install(installed, "--model", str(other))
    assert result.returncode == 0, result.stderr
    assert "config.toml exists and is left alone" in result.stderr
    assert installed.config.read_text() == edited
    assert (installed.root / "var/lib/qwen-edge/models/other-model.gguf").is_file()


@pytest.mark.slow
def test_bad_arguments_stop_before_changing_anything(installed: Installed) -> None:
    before = tree(installed.root)
    not_gguf = installed.root.parent / "notes.gguf"
    not_gguf.write_text("not a model")
    cases = [
        (("--model", str(not_gguf)), "not a GGUF file"),
        (("--model", "/nonexistent/model.gguf"), "not a readable file"),
        (("--with-mosquitto", "staging"), "takes dev or prod"),
        (("--start",), "cannot start anything inside --root"),
        (("--purge",), "--purge goes with --uninstall"),
        (("--frobnicate",), "unknown option"),
    ]
    for args, message in cases:
        result = run_install(installed, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
    assert tree(installed.root) == before


@pytest.mark.slow
def test_nothing_outside_the_root_is_touched(installed: Installed) -> None:
    calls = installed.guard_log.read_text().splitlines()
    assert all("--root=" in call for call in calls), calls
    assert not [c for c in calls if c.startswith(("apt", "sudo"))], calls
    assert host_state() == installed.host_before


@pytest.mark.slow
def test_uninstall_keeps_configuration_and_models(installed: Installed) -> None:
    result = run_install(installed, "--uninstall")

    assert result.returncode == 0, result.stderr
    assert files(installed.root) == {
        "etc/qwen-edge/config.toml",
        f"var/lib/qwen-edge/models/{SMOLLM.name}",
        "var/lib/qwen-edge/models/other-model.gguf",
    }
    # A second uninstall finds nothing to do.
    again = run_install(installed, "--uninstall")
    assert again.returncode == 0, again.stderr
    assert "removed" not in again.stderr


@pytest.mark.slow
def test_uninstall_purge_leaves_an_empty_root(installed: Installed) -> None:
    result = run_install(installed, "--uninstall", "--purge")

    assert result.returncode == 0, result.stderr
    assert files(installed.root) == set()
    assert host_state() == installed.host_before


# -- the real-system path (no --root), isolated ----------------------------------------------------

# Debian 12's /etc/mosquitto/mosquitto.conf as the package ships it (this machine's may be edited).
DEBIAN_MOSQUITTO_CONF = """\
pid_file /run/mosquitto/mosquitto.pid
persistence true
persistence_location /var/lib/mosquitto/
log_dest file /var/log/mosquitto/mosquitto.log
include_dir /etc/mosquitto/conf.d
"""

# Runs as root in a private mount namespace: /etc, /opt, /var and /usr are overlays whose changes
# land in $T/<dir>/upper. So scripts/install takes the path a device takes (no --root: systemctl
# enable, apt-ensure, /etc/mosquitto), with the network for pip. Then, in a private network
# namespace too (a loopback of its own, with a fresh /run), the installed broker config,
# config.toml, model and venv run together: mosquitto, `qwen-edge doctor`, the daemon, chat.
DEVICE_SCRIPT = r"""
T="$1" MODEL="$2" CHECKOUT="$3" RUN="$4"
for d in etc opt var usr; do
  mkdir -p "$T/$d/upper" "$T/$d/work"
  mount -t overlay overlay -o "lowerdir=/$d,upperdir=$T/$d/upper,workdir=$T/$d/work" "/$d"
done
mkdir -p /etc/mosquitto/conf.d
cp "$T/debian-mosquitto.conf" /etc/mosquitto/mosquitto.conf

"$CHECKOUT/scripts/install" --with-mosquitto dev --model "$MODEL" 2> "$T/install-1.log"
"$CHECKOUT/scripts/install" --with-mosquitto dev --model "$MODEL" 2> "$T/install-2.log"
find /opt/qwen-edge/venv/bin/qwen-edge /etc/qwen-edge /etc/systemd/system/qwen-edge.service \
  /etc/systemd/system/multi-user.target.wants/qwen-edge.service /etc/mosquitto/conf.d \
  /var/lib/qwen-edge > "$T/installed.txt"
unshare --net bash -euo pipefail -c "$RUN" run "$T"
"$CHECKOUT/scripts/install" --uninstall 2> "$T/uninstall.log"
"""

RUN_SCRIPT = r"""
T="$1"
mount -t tmpfs tmpfs /run
ip link set lo up
mkdir -p /run/mosquitto && chown mosquitto: /run/mosquitto
mosquitto -c /etc/mosquitto/mosquitto.conf & broker=$!
daemon=""
trap 'kill $broker $daemon 2>/dev/null || true; wait' EXIT
bin=/opt/qwen-edge/venv/bin/qwen-edge
export QWEN_EDGE_NODE_ID=device QWEN_EDGE_MODEL__THREADS=1
for _ in $(seq 50); do (echo > /dev/tcp/127.0.0.1/1883) 2>/dev/null && break; sleep 0.1; done
"$bin" doctor --json --config /etc/qwen-edge/config.toml > "$T/doctor-before.json" || true
"$bin" serve --config /etc/qwen-edge/config.toml > "$T/daemon.log" 2>&1 & daemon=$!
for _ in $(seq 120); do
  if "$bin" doctor --json --config /etc/qwen-edge/config.toml > "$T/doctor-after.json" \
     && grep -q "is online" "$T/doctor-after.json"; then break; fi
  sleep 1
done
"$bin" chat --config /etc/qwen-edge/config.toml --timeout 120 --max-tokens 8 \
  --temperature 0 "Say hello." > "$T/chat.txt"
kill $daemon; wait $daemon || true; daemon=""
"""


def overlay_namespaces_work(tmp: Path) -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        return False
    probe = (
        f"mkdir -p {tmp}/u {tmp}/w && mount -t overlay overlay "
        f"-o lowerdir=/opt,upperdir={tmp}/u,workdir={tmp}/w /opt && ip link set lo up"
    )
    result = subprocess.run(
        ["unshare", "--mount", "--net", "sh", "-ec", probe], capture_output=True, check=False
    )
    return result.returncode == 0


@pytest.mark.slow
def test_device_install_runs_broker_daemon_and_doctor_in_namespaces(tmp_path: Path) -> None:
    if not overlay_namespaces_work(tmp_path / "probe"):
        pytest.skip("needs root, unshare and overlayfs in a private mount namespace")
    (tmp_path / "debian-mosquitto.conf").write_text(DEBIAN_MOSQUITTO_CONF)
    args = [str(tmp_path), str(SMOLLM), str(ROOT), RUN_SCRIPT]
    result = subprocess.run(
        ["unshare", "--mount", "bash", "-euo", "pipefail", "-c", DEVICE_SCRIPT, "device", *args],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=INSTALL_TIMEOUT,
        check=False,
    )
    logs = {p.name: p.read_text() for p in tmp_path.glob("*.log")}
    assert result.returncode == 0, (result.stdout, result.stderr, logs)

    installed = (tmp_path / "installed.txt").read_text().split()
    assert "/etc/qwen-edge/config.toml" in installed
    assert "/etc/mosquitto/conf.d/qwen-edge.conf" in installed
    assert f"/var/lib/qwen-edge/models/{SMOLLM.name}" in installed
    assert "/etc/systemd/system/multi-user.target.wants/qwen-edge.service" in installed
    assert "enabled qwen-edge.service" in logs["install-1.log"]
    assert "up to date, nothing changed" in logs["install-2.log"]
    assert "warning: /etc/mosquitto" not in logs["install-1.log"]

    # Before the daemon: everything but the node is fine; with it, everything is.
    before = {
        c["name"]: c["level"]
        for c in json.loads((tmp_path / "doctor-before.json").read_text())["checks"]
    }
    assert before == {**dict.fromkeys(before, "OK"), "node": "WARN"}, before
    after = json.loads((tmp_path / "doctor-after.json").read_text())
    assert after["ok"] and {c["level"] for c in after["checks"]} == {"OK"}, after
    assert (tmp_path / "chat.txt").read_text().strip(), logs["daemon.log"]

    # What the installer left on the "host" after --uninstall: configuration, models and state only
    # (plus the broker's own files from running it, and the stock config this test put there).
    left = files(tmp_path / "etc" / "upper") | {
        f"var/{p}" for p in files(tmp_path / "var" / "upper")
    }
    assert left == {
        "qwen-edge/config.toml",
        "mosquitto/mosquitto.conf",
        f"var/lib/qwen-edge/models/{SMOLLM.name}",
        "var/lib/qwen-edge/history.db",  # the node's state: kept, like the models, until --purge
        "var/lib/mosquitto/mosquitto.db",
        "var/log/mosquitto/mosquitto.log",
    }, left
    assert files(tmp_path / "opt" / "upper") == set()
    if "apt-ensure: installing" not in logs["install-1.log"]:  # else apt wrote to /usr
        assert files(tmp_path / "usr" / "upper") == set()


# The production broker: scripts/install --with-mosquitto prod into the same overlays, beside
# Debian's stock mosquitto.conf (include_dir conf.d, persistence_location set there), then the
# broker runs from /etc/mosquitto/mosquitto.conf and serves the accounts broker-setup made.
PROD_SCRIPT = r"""
T="$1" CHECKOUT="$2" RUN="$3"
for d in etc opt var usr; do
  mkdir -p "$T/$d/upper" "$T/$d/work"
  mount -t overlay overlay -o "lowerdir=/$d,upperdir=$T/$d/upper,workdir=$T/$d/work" "/$d"
done
mkdir -p /etc/mosquitto/conf.d
cp "$T/debian-mosquitto.conf" /etc/mosquitto/mosquitto.conf
"$CHECKOUT/scripts/install" --with-mosquitto prod --broker-name broker.lan 2> "$T/install-1.log"
"$CHECKOUT/scripts/install" --with-mosquitto prod --broker-name broker.lan 2> "$T/install-2.log"
unshare --net bash -euo pipefail -c "$RUN" run "$T" "$CHECKOUT"
"""

PROD_RUN_SCRIPT = r"""
T="$1" CHECKOUT="$2"
mount -t tmpfs tmpfs /run
ip link set lo up
mkdir -p /run/mosquitto && chown mosquitto: /run/mosquitto
mosquitto -c /etc/mosquitto/mosquitto.conf 2> "$T/mosquitto.log" & broker=$!
trap 'kill $broker 2>/dev/null || true; wait' EXIT
for _ in $(seq 50); do (echo > /dev/tcp/127.0.0.1/8883) 2>/dev/null && break; sleep 0.1; done
kill -0 $broker
tls=(-h 127.0.0.1 -p 8883 --cafile /etc/qwen-edge/ca.crt -q 1)
# The daemon's account, its password read from its file (never on a command line).
/opt/qwen-edge/venv/bin/python -c '
import paho.mqtt.client as m
from paho.mqtt.enums import CallbackAPIVersion
c = m.Client(CallbackAPIVersion.VERSION2, client_id="qwen-edge-device", protocol=m.MQTTv5)
c.tls_set(ca_certs="/etc/qwen-edge/ca.crt")
c.username_pw_set("qwen-edge", open("/etc/qwen-edge/mqtt-password").read().strip())
c.connect("127.0.0.1", 8883)
c.loop_start()
status = c.publish("qwen-edge/device/status", "{\"state\":\"online\"}", qos=1, retain=True)
status.wait_for_publish(10)
c.disconnect()
c.loop_stop()'
printf 'kiosk1:pw-kiosk1\n' | "$CHECKOUT/scripts/broker-setup" --dir /etc/mosquitto/qwen-edge \
  --add-device kiosk1 --passwords - 2> "$T/add-device.log"
stat -c '%U %a %n' /etc/mosquitto/qwen-edge/* /etc/mosquitto/qwen-edge/certs/* > "$T/owners.txt"
mosquitto_sub "${tls[@]}" -u kiosk1 -P pw-kiosk1 -i kiosk1 -t qwen-edge/+/status -C 1 -W 10 \
  > "$T/status.txt"
# Another client id than its own: refused.
if mosquitto_pub "${tls[@]}" -u kiosk1 -P pw-kiosk1 -i qwen-edge-device \
   -t qwen-edge/device/request/kiosk1 -m '{}' 2> "$T/refused.txt"; then
  echo "taken" > "$T/refused.txt"
fi
kill $broker; wait $broker || true
"""


@pytest.mark.slow
def test_prod_install_runs_the_broker_beside_debians_stock_config(tmp_path: Path) -> None:
    if not overlay_namespaces_work(tmp_path / "probe"):
        pytest.skip("needs root, unshare and overlayfs in a private mount namespace")
    (tmp_path / "debian-mosquitto.conf").write_text(DEBIAN_MOSQUITTO_CONF)
    args = [str(tmp_path), str(ROOT), PROD_RUN_SCRIPT]
    with ProcessSampler(pause_s=0.002) as sampler:
        result = subprocess.run(
            ["unshare", "--mount", "bash", "-euo", "pipefail", "-c", PROD_SCRIPT, "device", *args],
            capture_output=True,
            text=True,
            env=clean_env(),
            timeout=INSTALL_TIMEOUT,
            check=False,
        )
    logs = {p.name: p.read_text() for p in tmp_path.glob("*.log")}
    assert result.returncode == 0, (result.stdout, result.stderr, logs)
    # Issue 18, item 4: no password in any process's arguments or environment meanwhile.
    etc = tmp_path / "etc" / "upper"
    secrets = [
        (etc / name).read_text().strip()
        for name in (
            "qwen-edge/mqtt-password",
            "mosquitto/qwen-edge/admin.password",
            "mosquitto/qwen-edge/sweeper.password",
        )
    ]
    assert sampler.saw("broker-setup") and sampler.saw("brokeradmin"), "the sampler saw nothing"
    assert sampler.leaks(*secrets) == []
    # Issue 18, item 5: the broker (user mosquitto) owns its state directory and nothing else.
    owners = {
        line.split()[2].removeprefix("/etc/mosquitto/qwen-edge/"): line.split()[:2]
        for line in (tmp_path / "owners.txt").read_text().splitlines()
    }
    assert owners.pop("state") == ["mosquitto", "700"], owners
    assert owners.pop("certs/server.key") == ["root", "640"], owners
    assert owners.pop("certs/ca.key") == ["root", "600"], owners
    assert {user for user, _ in owners.values()} == {"root"}, owners
    wants = etc / "systemd/system/multi-user.target.wants/qwen-edge-broker-sweep.service"
    assert os.readlink(wants) == "/etc/systemd/system/qwen-edge-broker-sweep.service"
    assert "Duplicate" not in logs["mosquitto.log"]
    assert json.loads((tmp_path / "status.txt").read_text()) == {"state": "online"}
    assert "not authori" in (tmp_path / "refused.txt").read_text().lower()
    assert "up to date, nothing changed" in logs["install-2.log"]
    etc = tmp_path / "etc" / "upper"
    assert stat.S_IMODE((etc / "qwen-edge" / "mqtt-password").stat().st_mode) == 0o600
    snippet = (etc / "mosquitto" / "conf.d" / "qwen-edge.conf").read_text()
    assert "max_queued_bytes" in snippet and "persistence_location" not in snippet


def test_the_broker_sweeper_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (ROOT / "systemd" / "qwen-edge-broker-sweep.service").read_text()
    python = "/opt/qwen-edge/venv/bin/python"
    assert f"ExecStart={python} -m qwen_edge.tools.brokeradmin sweep --watch" in unit
    copy = tmp_path / "qwen-edge-broker-sweep.service"
    copy.write_text(unit.replace(f"ExecStart={python} ", f"ExecStart={sys.executable} "))
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": ""}
    result = subprocess.run(
        [analyze, "verify", str(copy)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stderr
