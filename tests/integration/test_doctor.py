"""`qwen-edge doctor` against real brokers (plain, and with a password file), the real daemon and
real model files; the CPU and memory rules also as unit tests on sample /proc texts."""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.harness import NODE, PREFIX, SMOLLM, Broker, Daemon, Probe, free_port
from qwen_edge.protocol import Status
from qwen_edge.settings import ModelSettings, Settings
from qwen_edge.tools.doctor import (
    BrokerSession,
    Level,
    ModelFacts,
    _daemon_rss,
    arm_hwcap_flags,
    check_broker,
    check_cpu,
    check_memory,
    check_node,
    cpu_flags,
    is_daemon_argv,
    meminfo,
    read_env_file,
    unit_memory_max,
)

BROKER_DIR = Path(__file__).resolve().parents[1] / "broker"
AUTH_USER, AUTH_PASSWORD = "qwen-edge", "right-password"  # in tests/broker/auth.passwd
CHECKS = ["config", "broker", "credentials", "node", "model", "cpu", "memory"]


@functools.cache
def visible_model() -> Path:
    """SmolLM2 where the service could read it. doctor rightly warns about a model under /home or
    /root (ProtectHome=yes hides them from the service), and that is where a checkout lives on a
    Pi (/home/pi/...) and in scripts/arm64-check's root (/root/...): then a copy in /tmp."""
    resolved = SMOLLM.resolve()
    if not (resolved.is_relative_to("/home") or resolved.is_relative_to("/root")):
        return SMOLLM
    where = Path(tempfile.mkdtemp(prefix="qwen-edge-doctor-"))
    atexit.register(shutil.rmtree, where, True)
    copy = where / SMOLLM.name
    shutil.copyfile(SMOLLM, copy)
    where.chmod(0o755)
    copy.chmod(0o644)
    return copy


def doctor(
    broker_port: int, secrets: Path = Path("/nonexistent/secrets.env"), **env: str
) -> tuple[int, dict[str, dict[str, Any]], str]:
    """Run `qwen-edge doctor --json`; returns the exit status, the checks by name, stderr."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("QWEN_EDGE_")}
    full.update(
        QWEN_EDGE_MQTT__HOST="127.0.0.1",
        QWEN_EDGE_MQTT__PORT=str(broker_port),
        QWEN_EDGE_MODEL__PATH=str(visible_model()),
        QWEN_EDGE_NODE_ID=NODE,
    )
    full.update(env)
    command = [sys.executable, "-m", "qwen_edge", "doctor", "--json", "--timeout", "10"]
    result = subprocess.run(
        [*command, "--secrets", str(secrets)],
        capture_output=True,
        text=True,
        env=full,
        timeout=120,
        check=False,
    )
    report = json.loads(result.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == CHECKS, result.stdout
    assert report["ok"] == (result.returncode == 0)
    return result.returncode, checks, result.stderr


def levels(checks: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {name: c["level"] for name, c in checks.items()}


@pytest.fixture(scope="module")
def auth_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    workdir = tmp_path_factory.mktemp("auth-broker")
    conf = workdir / "auth-base.conf"
    conf.write_text(
        (BROKER_DIR / "auth.conf").read_text() + f"password_file {BROKER_DIR / 'auth.passwd'}\n"
    )
    broker = Broker(workdir, base_conf=conf)
    broker.start()
    yield broker
    broker.stop()


# -- end to end ------------------------------------------------------------------------------------


@pytest.mark.smoke
def test_everything_ok_with_a_running_daemon(daemon: Daemon, module_broker: Broker) -> None:
    code, checks, _ = doctor(module_broker.port)

    assert code == 0, checks
    assert levels(checks) == dict.fromkeys(CHECKS, "OK"), checks
    assert "online" in checks["node"]["detail"]
    assert "SmolLM2-135M-Instruct.Q4_1" in checks["node"]["detail"]
    assert "every tensor within the file" in checks["model"]["detail"]
    # The running daemon's memory counts as available: a restart would give it back.
    assert daemon.proc is not None
    status = Status(state="online", pid=daemon.proc.pid)
    assert _daemon_rss(status) > SMOLLM.stat().st_size // 4
    assert _daemon_rss(Status(state="offline", pid=daemon.proc.pid)) == 0
    assert _daemon_rss(Status(state="online", pid=os.getpid())) == 0  # not a qwen-edge


def test_wrong_port_fails_the_broker_check_with_a_fix(module_broker: Broker) -> None:
    port = free_port()

    code, checks, _ = doctor(port)

    assert code == 1
    broker = checks["broker"]
    assert broker["level"] == "FAIL"
    assert f"unreachable: 127.0.0.1:{port}" in broker["detail"]
    assert "QWEN_EDGE_MQTT__PORT" in broker["fix"]
    assert levels(checks)["credentials"] == levels(checks)["node"] == "SKIP"
    # Checks that need no broker still run.
    assert levels(checks)["model"] == levels(checks)["cpu"] == levels(checks)["memory"] == "OK"


def test_unresolvable_host_says_so(module_broker: Broker) -> None:
    code, checks, _ = doctor(module_broker.port, QWEN_EDGE_MQTT__HOST="no-such-host.invalid")

    assert code == 1
    assert "cannot resolve 'no-such-host.invalid'" in checks["broker"]["detail"]


@pytest.mark.parametrize("fault", ["missing", "not_gguf", "truncated", "empty"])
def test_bad_model_fails_the_model_check(module_broker: Broker, tmp_path: Path, fault: str) -> None:
    path = tmp_path / "model.gguf"
    if fault == "not_gguf":
        path.write_text("<html>404 Not Found</html>")
    elif fault == "truncated":
        path.write_bytes(SMOLLM.read_bytes()[: SMOLLM.stat().st_size // 2])
    elif fault == "empty":
        path.touch()

    code, checks, stderr = doctor(module_broker.port, QWEN_EDGE_MODEL__PATH=str(path))

    assert code == 1
    model = checks["model"]
    assert model["level"] == "FAIL"
    expected = {
        "missing": ("No such file or directory", "set [model] path"),
        "not_gguf": ("not a GGUF file", "point [model] path at the .gguf file"),
        "empty": ("not a GGUF file", "point [model] path at the .gguf file"),
        "truncated": ("damaged or truncated GGUF", "damaged or incomplete: download it again"),
    }[fault]
    assert expected[0] in model["detail"], model
    assert expected[1] in model["fix"], model
    assert checks["memory"]["level"] == "SKIP"
    assert levels(checks)["broker"] == levels(checks)["credentials"] == "OK"
    assert "error loading model" not in stderr  # llama.cpp's own log goes into the check


def test_bad_password_is_not_authorised(auth_broker: Broker) -> None:
    code, checks, _ = doctor(
        auth_broker.port,
        QWEN_EDGE_MQTT__USERNAME=AUTH_USER,
        QWEN_EDGE_MQTT__PASSWORD="wrong-password",
    )

    assert code == 1
    credentials = checks["credentials"]
    assert credentials["level"] == "FAIL"
    assert credentials["detail"] == f"not authorised: the broker refused user {AUTH_USER!r}"
    assert "QWEN_EDGE_MQTT__PASSWORD" in credentials["fix"]
    assert "wrong-password" not in json.dumps(checks)
    assert checks["broker"]["level"] == "OK"  # reachable: a different problem, told apart
    assert checks["node"]["level"] == "SKIP"


def test_anonymous_client_is_told_the_broker_wants_an_account(auth_broker: Broker) -> None:
    code, checks, _ = doctor(auth_broker.port)

    assert code == 1
    assert checks["credentials"]["detail"] == "not authorised: the broker refused anonymous"
    assert "the broker wants an account" in checks["credentials"]["fix"]


def test_right_password_connects(auth_broker: Broker) -> None:
    _, checks, _ = doctor(
        auth_broker.port,
        QWEN_EDGE_MQTT__USERNAME=AUTH_USER,
        QWEN_EDGE_MQTT__PASSWORD=AUTH_PASSWORD,
    )

    assert checks["credentials"]["level"] == "OK"
    assert checks["credentials"]["detail"] == f"connected as user {AUTH_USER!r} (MQTT 5)"
    assert checks["node"]["level"] == "WARN"  # no daemon on this broker


def test_password_from_the_services_secrets_file(auth_broker: Broker, tmp_path: Path) -> None:
    # What systemd gives the daemon (EnvironmentFile=), doctor reads too.
    secrets = tmp_path / "secrets.env"
    secrets.write_text(f"# broker account\nQWEN_EDGE_MQTT__PASSWORD='{AUTH_PASSWORD}'\n")

    _, checks, _ = doctor(auth_broker.port, secrets, QWEN_EDGE_MQTT__USERNAME=AUTH_USER)

    assert checks["credentials"]["level"] == "OK", checks["credentials"]
    assert checks["config"]["level"] == "OK"
    # A variable set in the environment wins over the file, as for a test run by hand.
    _, checks, _ = doctor(
        auth_broker.port,
        secrets,
        QWEN_EDGE_MQTT__USERNAME=AUTH_USER,
        QWEN_EDGE_MQTT__PASSWORD="wrong-password",
    )
    assert checks["credentials"]["level"] == "FAIL"


def test_unreadable_secrets_file_is_a_warning(module_broker: Broker, tmp_path: Path) -> None:
    # Reading a directory fails like reading a root-only file as a normal user.
    _, checks, _ = doctor(module_broker.port, tmp_path)

    assert checks["config"]["level"] == "WARN"
    assert "the daemon's password may be missing here" in checks["config"]["detail"]
    assert checks["config"]["fix"] == "run doctor as root"


def test_mqtt_311_is_refused_the_same_way(auth_broker: Broker) -> None:
    _, checks, _ = doctor(
        auth_broker.port,
        QWEN_EDGE_MQTT__PROTOCOL="3.1.1",
        QWEN_EDGE_MQTT__USERNAME=AUTH_USER,
        QWEN_EDGE_MQTT__PASSWORD="wrong-password",
    )

    assert (
        checks["credentials"]["detail"] == f"not authorised: the broker refused user {AUTH_USER!r}"
    )


def test_tls_to_a_plain_listener_is_reported_as_a_tls_failure(module_broker: Broker) -> None:
    settings = Settings(mqtt={"host": "127.0.0.1", "port": module_broker.port}, node_id=NODE)

    check = check_broker(settings.mqtt, 10, ssl.create_default_context())

    assert check.level is Level.FAIL
    assert check.detail.startswith(f"TLS failed: 127.0.0.1:{module_broker.port}: ")
    assert "TLS listener" in check.fix
    assert check_broker(settings.mqtt, 10, None).level is Level.OK


def test_a_port_that_does_not_speak_mqtt(tmp_path: Path) -> None:
    # Something listens but never answers the CONNECT.
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        settings = Settings(mqtt={"host": "127.0.0.1", "port": port}, node_id=NODE)
        session = BrokerSession(settings, None, timeout=1)
        try:
            check = session.connect()
        finally:
            session.close()

    assert check.level is Level.FAIL
    assert check.detail == f"no MQTT answer from 127.0.0.1:{port} within 1 s"


@pytest.mark.parametrize(
    ("status", "level", "words"),
    [
        ({"state": "offline", "reason": "stopped"}, "WARN", "is offline (stopped)"),
        ({"state": "starting", "model": "m"}, "WARN", "is starting (loading model m)"),
        ({"state": "online", "model": "m"}, "OK", "is online (model m)"),
    ],
)
def test_node_status_comes_from_the_retained_status(
    module_broker: Broker, status: dict[str, Any], level: str, words: str
) -> None:
    node = f"ghost-{status['state']}"
    probe = Probe(module_broker, "doctor-test")
    topic = f"{PREFIX}/{node}/status"
    try:
        info = probe.client.publish(topic, json.dumps(status), qos=1, retain=True)
        info.wait_for_publish(5)
        time.sleep(0.1)
        _, checks, _ = doctor(module_broker.port, QWEN_EDGE_NODE_ID=node)
    finally:
        probe.client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
        probe.close()

    assert checks["node"]["level"] == level
    assert f"node {node!r} {words}" in checks["node"]["detail"]


def test_bad_configuration_is_a_failed_check_not_a_crash(module_broker: Broker) -> None:
    code, checks, _ = doctor(module_broker.port, QWEN_EDGE_MODEL__SLOTS="0")

    assert code == 1
    assert checks["config"]["level"] == "FAIL"
    assert "QWEN_EDGE_MODEL__SLOTS" in checks["config"]["detail"]
    assert levels(checks) == {
        **dict.fromkeys(CHECKS, "SKIP"),
        "config": "FAIL",
        "cpu": "OK",
    }


def test_text_output_prints_a_fix_line_under_each_problem(module_broker: Broker) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QWEN_EDGE_")}
    env.update(QWEN_EDGE_MQTT__PORT=str(free_port()), QWEN_EDGE_MODEL__PATH=str(visible_model()))
    result = subprocess.run(
        [sys.executable, "-m", "qwen_edge", "doctor"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )

    assert result.returncode == 1
    lines = result.stdout.splitlines()
    broker = next(i for i, line in enumerate(lines) if line.startswith("FAIL  broker"))
    assert lines[broker + 1].lstrip().startswith("fix: start the broker")
    assert [line.split()[0] for line in lines if not line.startswith(" ")] == [
        "OK",
        "FAIL",
        "SKIP",
        "SKIP",
        "OK",
        "OK",
        "OK",
    ]


# -- rules on sample /proc texts -------------------------------------------------------------------

X86_CPUINFO = "processor\t: 0\nflags\t\t: fpu sse2 pni ssse3 fma avx f16c avx2 bmi2\n"
X86_AVX2_BUILD = "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 |"
PI4_CPUINFO = "processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
PI5_CPUINFO = (
    "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp "
    "asimdhp cpuid asimdrdm lrcpc dcpop asimddp\n"
)
ARM_NEON_BUILD = "CPU : NEON = 1 | ARM_FMA = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 |"
PI5_BUILD = "CPU : NEON = 1 | ARM_FMA = 1 | FP16_VA = 1 | DOTPROD = 1 | REPACK = 1 |"


@pytest.mark.smoke
def test_cpu_flags_read_x86_and_arm_cpuinfo() -> None:
    assert {"avx2", "fma", "f16c"} <= cpu_flags(X86_CPUINFO)
    assert cpu_flags(PI4_CPUINFO) == {"fp", "asimd", "evtstrm", "crc32", "cpuid"}
    assert cpu_flags("processor : 0\n") == set()


@pytest.mark.smoke
def test_cpu_matching_build_is_ok() -> None:
    check = check_cpu("x86_64", X86_CPUINFO, X86_AVX2_BUILD, "rebuild")
    assert check.level is Level.OK
    assert check.detail == "x86_64: AVX AVX2 FMA F16C; llama.cpp uses all of them"
    assert check_cpu("aarch64", PI4_CPUINFO, ARM_NEON_BUILD, "rebuild").level is Level.OK
    assert check_cpu("aarch64", PI5_CPUINFO, PI5_BUILD, "rebuild").level is Level.OK


@pytest.mark.smoke
def test_cpu_feature_the_build_lacks_is_a_warning_with_the_rebuild() -> None:
    avx512_cpu = X86_CPUINFO.replace("bmi2", "bmi2 avx512f avx512_vnni")
    check = check_cpu("x86_64", avx512_cpu, X86_AVX2_BUILD, "rebuild it")
    assert check.level is Level.WARN
    assert "AVX512, AVX512_VNNI" in check.detail
    assert check.fix == "rebuild it"
    pi5 = check_cpu("aarch64", PI5_CPUINFO, ARM_NEON_BUILD, "rebuild it")
    assert pi5.level is Level.WARN
    assert "DOTPROD" in pi5.detail


@pytest.mark.smoke
def test_cpu_build_for_a_feature_the_cpu_lacks_fails() -> None:
    check = check_cpu("x86_64", X86_CPUINFO, X86_AVX2_BUILD + " AVX512 = 1 |", "rebuild it")
    assert check.level is Level.FAIL
    assert "AVX512" in check.detail and "illegal instruction" in check.detail
    assert check_cpu("aarch64", PI4_CPUINFO, PI5_BUILD, "r").level is Level.FAIL


@pytest.mark.smoke
def test_cpu_without_avx2_or_on_a_32_bit_arm_os_warns() -> None:
    old = "flags\t\t: fpu sse2 pni ssse3 avx\n"
    check = check_cpu("x86_64", old, "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 |", "r")
    assert check.level is Level.WARN
    assert "lacks AVX2, FMA, F16C" in check.detail
    armv7 = "Features\t: half thumb fastmult vfp edsp neon vfpv3 tls vfpv4 idiva idivt\n"
    check = check_cpu("armv7l", armv7, "CPU : NEON = 1 |", "r")
    assert check.level is Level.WARN
    assert "64-bit" in check.fix
    assert check_cpu("riscv64", "", "", "r").level is Level.WARN
    assert check_cpu("x86_64", "", X86_AVX2_BUILD, "r").level is Level.WARN


@pytest.mark.smoke
def test_aarch64_reads_the_kernels_hwcaps_not_a_foreign_cpuinfo() -> None:
    """Under qemu-user (scripts/arm64-check) /proc/cpuinfo is the x86 host's; AT_HWCAP is the
    emulated CPU's. The values are qemu's cortex-a72 (a Pi 4) and cortex-a76 (a Pi 5)."""
    pi4, pi5 = arm_hwcap_flags(0x8FB, 0), arm_hwcap_flags(0x119FFB, 0)
    assert pi4 == {"asimd"}
    assert pi5 == {"asimd", "asimdhp", "asimddp"}
    assert arm_hwcap_flags(1 << 22 | 2, 1 << 13) == {"asimd", "sve", "i8mm"}
    assert check_cpu("aarch64", X86_CPUINFO, ARM_NEON_BUILD, "r", pi4).level is Level.OK
    assert check_cpu("aarch64", X86_CPUINFO, PI5_BUILD, "r", pi5).level is Level.OK
    assert check_cpu("aarch64", X86_CPUINFO, PI5_BUILD, "r", pi4).level is Level.FAIL


MEMINFO = "MemTotal:        2000000 kB\nMemFree:          100000 kB\nMemAvailable:    1500000 kB\n"
QWEN_05B = ModelFacts(size=400 * 1024 * 1024, kv_elements_per_token=2 * 24 * 2 * 64)


def test_meminfo_is_read_in_bytes() -> None:
    assert meminfo(MEMINFO) == {
        "MemTotal": 2_048_000_000,
        "MemFree": 102_400_000,
        "MemAvailable": 1_536_000_000,
    }


def test_memory_estimate_matches_the_measured_daemon() -> None:
    # README, "Performance": 4 slots x 4,096 tokens of F16 KV cache for Qwen2.5-0.5B are 192 MB.
    settings = ModelSettings(slots=4, n_ctx=4096, kv_cache_type="f16", kv_keep_mb=64)
    check = check_memory(settings, QWEN_05B, meminfo(MEMINFO))
    assert check.level is Level.OK
    assert "KV cache 192 for 4 x 4096 tokens f16" in check.detail
    assert check.detail.startswith("needs ~806 MiB")
    q8 = check_memory(ModelSettings(slots=4, n_ctx=4096, kv_cache_type="q8_0"), QWEN_05B, {})
    assert q8.level is Level.WARN  # no /proc/meminfo
    half = check_memory(
        ModelSettings(slots=4, n_ctx=4096, kv_cache_type="q8_0"), QWEN_05B, meminfo(MEMINFO)
    )
    assert "KV cache 102 for" in half.detail


def test_memory_too_small_fails_and_busy_memory_warns() -> None:
    big = ModelSettings(slots=16, n_ctx=32768)
    check = check_memory(big, QWEN_05B, meminfo(MEMINFO))
    assert check.level is Level.FAIL
    assert "lower slots, n_ctx" in check.fix
    tight = meminfo(MEMINFO.replace("1500000", "500000"))
    warned = check_memory(ModelSettings(), QWEN_05B, tight)
    assert warned.level is Level.WARN
    # Unless a running daemon holds the difference.
    running = check_memory(ModelSettings(), QWEN_05B, tight, daemon_rss=600 * 1024 * 1024)
    assert running.level is Level.OK


def test_memory_above_the_units_limit_warns() -> None:
    big = ModelSettings(slots=8, n_ctx=16384, kv_cache_type="f16")  # 1.5 GiB of KV cache
    lots = meminfo("MemTotal: 8000000 kB\nMemAvailable: 7000000 kB\n")
    assert check_memory(big, QWEN_05B, lots).level is Level.OK
    check = check_memory(big, QWEN_05B, lots, unit_limit=1600 * 1024 * 1024)
    assert check.level is Level.WARN
    assert "MemoryMax=1600M" in check.detail
    assert "systemctl edit qwen-edge" in check.fix


def test_unit_memory_max_reads_the_unit_and_its_drop_ins() -> None:
    shipped = (Path(__file__).resolve().parents[2] / "systemd" / "qwen-edge.service").read_text()
    assert unit_memory_max([shipped]) == 1600 * 1024 * 1024
    assert unit_memory_max([shipped, "[Service]\nMemoryMax=3G\n"]) == 3 * 1024**3
    assert unit_memory_max([shipped, "[Service]\nMemoryMax=infinity\n"]) is None
    assert unit_memory_max([shipped, "[Service]\nMemoryMax=50%\n"]) is None
    assert unit_memory_max(["[Service]\nMemoryMax=1048576\n"]) == 1024 * 1024
    assert unit_memory_max([]) is None


def test_env_file_is_read_like_systemd() -> None:
    text = "# c\n; c\nA=1\n B = two words \nC=\"quoted\"\nD='x=y'\nnot a line\n"
    assert read_env_file(text) == {"A": "1", "B": "two words", "C": "quoted", "D": "x=y"}


def test_node_without_status_warns_with_what_to_check() -> None:
    settings = Settings(node_id="kitchen")
    check = check_node(settings, None)
    assert check.level is Level.WARN
    assert "no status from node 'kitchen' under qwen-edge/" in check.detail
    assert "node_id and topic_prefix" in check.fix


@pytest.mark.parametrize(
    ("argv", "daemon"),
    [
        ("/opt/qwen-edge/venv/bin/python /opt/qwen-edge/venv/bin/qwen-edge serve --config x", 1),
        ("/usr/bin/python3 -m qwen_edge serve", 1),
        (
            "/usr/libexec/qemu-binfmt/aarch64-binfmt-P /v/python3 /v/python3 -m qwen_edge serve",
            1,
        ),
        # Anything run from a checkout named qwen-edge (a Pi user's clone, arm64-check's root).
        ("/home/pi/qwen-edge/.venv/bin/python -m pytest -m smoke", 0),
        ("/home/pi/qwen-edge/.venv/bin/qwen-edge doctor", 0),
        ("/usr/bin/python3 serve.py qwen2.5-0.5b-instruct-q4_k_m.gguf", 0),
    ],
)
def test_only_the_daemons_command_line_counts_as_the_daemon(argv: str, daemon: int) -> None:
    assert is_daemon_argv(argv.replace(" ", "\0").encode() + b"\0") is bool(daemon)


def test_a_process_run_from_a_qwen_edge_checkout_is_not_taken_for_the_daemon() -> None:
    """What arm64-check's smoke run hit: pytest in /root/qwen-edge-CPU counted as the daemon."""
    other = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "/home/pi/qwen-edge/x", "serve"]
    )
    try:
        time.sleep(0.2)
        assert _daemon_rss(Status(state="online", pid=other.pid)) == 0
    finally:
        other.kill()
        other.wait()
