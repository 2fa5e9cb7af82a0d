"""`qwen-edge doctor`: checks what a node needs and says what to fix.

One line per check (OK, WARN, FAIL, or SKIP when an earlier failure makes it meaningless): the
configuration, the broker (TCP, then TLS), the credentials (an MQTT CONNECT), the daemon's retained
status on the broker, the model file, the CPU features against the llama.cpp build, and memory.
Exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import socket
import ssl
import stat
import sys
import threading
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.reasoncodes import ReasonCode

from .. import mqttclient
from ..node.budget import RUNTIME_OVERHEAD, BudgetError, plan_memory
from ..protocol import NodeState, Status
from ..settings import (
    DEFAULT_CONFIG_FILE,
    DEFAULT_MODELS_DIR,
    DEFAULT_STATE_DIR,
    ConfigError,
    ModelSettings,
    MqttSettings,
    Settings,
    load_settings,
)
from ..tls import client_context
from ..topics import Topics

EXIT_FAILED = 1
MIB = 1024 * 1024
# MQTT 5 CONNACK reason codes (paho maps MQTT 3.1.1's return codes 4 and 5 onto them).
BAD_CREDENTIALS = 134
NOT_AUTHORISED = 135
# The unit's EnvironmentFile= (root-only, for the broker password) and the unit itself.
SECRETS_FILE = Path("/etc/qwen-edge/secrets.env")
UNIT_FILE = Path("/etc/systemd/system/qwen-edge.service")
FIX_REBUILD = (
    'rebuild llama.cpp for this CPU: CMAKE_ARGS="$(scripts/cmake-args)" '
    "{python} -m pip install --force-reinstall --no-cache-dir --no-deps llama-cpp-python=={version}"
)


class Level(StrEnum):
    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"
    SKIP = "SKIP"


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    level: Level
    detail: str
    fix: str = ""


@dataclass(frozen=True, slots=True)
class ModelFacts:
    size: int  # bytes
    kv_elements_per_token: int  # K and V values of every layer for one token
    head_dim: int = 64  # width of a K/V head (model.memory_mb may choose q8_0 if 32 divides it)


# -- configuration ---------------------------------------------------------------------------------


def read_env_file(text: str) -> dict[str, str]:
    """KEY=VALUE lines, as systemd's EnvironmentFile= reads them (comments, optional quotes)."""
    env: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        key, sep, value = line.partition("=")
        if not sep or line.startswith(("#", ";")):
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def use_secrets(path: Path) -> str | None:
    """Add the service's secrets file to this process's environment (variables already set
    win); returns a warning when it exists but cannot be read."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return (
            f"cannot read {path} ({exc.strerror or exc}): the daemon's password may be missing here"
        )
    for key, value in read_env_file(text).items():
        os.environ.setdefault(key, value)
    return None


def check_config(
    config_file: Path | None, secrets_warning: str | None = None
) -> tuple[Check, Settings | None]:
    try:
        settings = load_settings(config_file)
    except ConfigError as exc:
        return (
            Check(
                "config",
                Level.FAIL,
                str(exc),
                "correct that setting in the file or the environment, then run doctor again",
            ),
            None,
        )
    if config_file is None and DEFAULT_CONFIG_FILE.is_file():
        config_file = DEFAULT_CONFIG_FILE
    source = str(config_file) if config_file else "defaults and QWEN_EDGE_* variables"
    detail = f"{source}: valid (node {settings.node_id})"
    if secrets_warning:
        return Check("config", Level.WARN, f"{detail}; {secrets_warning}", "run doctor as root"), (
            settings
        )
    return Check("config", Level.OK, detail), settings


# -- broker ----------------------------------------------------------------------------------------


def tls_context(mqtt: MqttSettings) -> ssl.SSLContext | None:
    """The TLS context the daemon uses for this broker (None for plain MQTT), so that the broker
    check sees what the daemon sees. ConfigError when a certificate or key file is unusable."""
    return client_context(mqtt)


def _broker_fix(mqtt: MqttSettings) -> str:
    return (
        "start the broker (systemctl status mosquitto) or point [mqtt] host and port "
        f"(QWEN_EDGE_MQTT__HOST, QWEN_EDGE_MQTT__PORT; now {mqtt.host}:{mqtt.port}) at it"
    )


def check_broker(mqtt: MqttSettings, timeout: float, tls: ssl.SSLContext | None) -> Check:
    """Reachable: a TCP connection, and the TLS handshake when TLS is configured."""
    where = f"{mqtt.host}:{mqtt.port}"
    try:
        sock = socket.create_connection((mqtt.host, mqtt.port), timeout=timeout)
    except socket.gaierror as exc:
        return Check(
            "broker",
            Level.FAIL,
            f"unreachable: cannot resolve {mqtt.host!r} ({exc.strerror})",
            _broker_fix(mqtt),
        )
    except TimeoutError:
        return Check(
            "broker",
            Level.FAIL,
            f"unreachable: no answer from {where} within {timeout:g} s",
            _broker_fix(mqtt) + "; check firewalls between here and the broker",
        )
    except OSError as exc:
        return Check(
            "broker",
            Level.FAIL,
            f"unreachable: {where}: {exc.strerror or exc}",
            _broker_fix(mqtt),
        )
    with sock:
        if tls is None:
            return Check("broker", Level.OK, f"{where} accepts TCP connections")
        try:
            with tls.wrap_socket(sock, server_hostname=mqtt.host) as tls_sock:
                version = tls_sock.version()
        except OSError as exc:  # ssl.SSLError, or a plain listener hanging up on the ClientHello
            reason = exc.reason if isinstance(exc, ssl.SSLError) else None
            return Check(
                "broker",
                Level.FAIL,
                f"TLS failed: {where}: {reason or exc.strerror or exc}",
                "check the CA certificate, the broker's certificate and host name, and that "
                f"port {mqtt.port} is the broker's TLS listener",
            )
    return Check("broker", Level.OK, f"{where} accepts TCP connections and {version}")


class BrokerSession:
    """One MQTT connection for the checks that need the broker: CONNECT, then the node's status."""

    def __init__(self, settings: Settings, tls: ssl.SSLContext | None, timeout: float) -> None:
        self.settings = settings
        self.timeout = timeout
        self._connack = threading.Event()
        self._subscribed = threading.Event()
        self._status_seen = threading.Event()
        self.reason: ReasonCode | None = None
        self.status: bytes | None = None
        mqtt = settings.mqtt
        self.client = mqttclient.new_client(
            mqtt, mqttclient.client_id_for(mqtt, "qwen-edge-doctor"), tls=tls
        )
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.status_topic = Topics(settings.topic_prefix, settings.node_id).status

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, rc: ReasonCode, *_: Any
    ) -> None:
        self.reason = rc
        self._connack.set()

    def _on_disconnect(self, client: paho.Client, userdata: Any, *_: Any) -> None:
        self._connack.set()  # the broker hung up before (or instead of) a CONNACK

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if msg.topic == self.status_topic:
            self.status = bytes(msg.payload)
            self._status_seen.set()

    def connect(self) -> Check:
        mqtt = self.settings.mqtt
        who = f"user {mqtt.username!r}" if mqtt.username else "anonymous"
        try:
            mqttclient.connect(self.client, mqtt)
        except OSError as exc:
            return Check("credentials", Level.FAIL, f"connection failed: {exc}", _broker_fix(mqtt))
        self.client.loop_start()
        if not self._connack.wait(self.timeout) or self.reason is None:
            return Check(
                "credentials",
                Level.FAIL,
                f"no MQTT answer from {mqtt.host}:{mqtt.port} within {self.timeout:g} s",
                f"check that port {mqtt.port} is the broker's MQTT listener (a TLS listener "
                "needs the TLS settings)",
            )
        if self.reason.value in (BAD_CREDENTIALS, NOT_AUTHORISED):
            if mqtt.username is None:
                fix = (
                    "the broker wants an account: set [mqtt] username and QWEN_EDGE_MQTT__PASSWORD "
                    "(in /etc/qwen-edge/secrets.env, mode 0600)"
                )
            else:
                fix = (
                    "check [mqtt] username and QWEN_EDGE_MQTT__PASSWORD (/etc/qwen-edge/"
                    "secrets.env) against the broker's password_file (mosquitto_passwd)"
                )
            return Check(
                "credentials", Level.FAIL, f"not authorised: the broker refused {who}", fix
            )
        if self.reason.is_failure:
            return Check(
                "credentials",
                Level.FAIL,
                f"the broker refused the connection: {self.reason}",
                "see the broker's log (journalctl -u mosquitto)",
            )
        return Check("credentials", Level.OK, f"connected as {who} (MQTT {mqtt.protocol})")

    def node_status(self) -> Status | None:
        """The node's retained status, which the broker sends right after the subscription;
        None when there is none."""
        self.client.subscribe(self.status_topic, qos=1)
        if self._subscribed.wait(self.timeout):
            # mosquitto sends retained messages just after the SUBACK.
            self._status_seen.wait(min(self.timeout, 1.0))
        if self.status is None:
            return None
        return Status.parse(self.status) or Status(state="unreadable", protocol=None)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def check_node(settings: Settings, status: Status | None) -> Check:
    node = settings.node_id
    start = "systemctl start qwen-edge; journalctl -u qwen-edge -e shows why it is not running"
    if status is None:
        return Check(
            "node",
            Level.WARN,
            f"no status from node {node!r} under {settings.topic_prefix}/: its daemon has never "
            "connected to this broker",
            f"{start}; or make node_id and topic_prefix match the daemon's",
        )
    model = status.model
    if status.state == NodeState.ONLINE:
        return Check("node", Level.OK, f"node {node!r} is online (model {model})")
    if status.state == NodeState.STARTING:
        return Check(
            "node",
            Level.WARN,
            f"node {node!r} is starting (loading model {model})",
            "wait a few seconds; if it stays, journalctl -u qwen-edge -e",
        )
    return Check(
        "node",
        Level.WARN,
        f"node {node!r} is {status.state} ({status.reason or 'no reason given'})",
        start,
    )


# -- model -----------------------------------------------------------------------------------------


def _meta(model: Any, key: str) -> str | None:
    import llama_cpp

    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode() if n >= 0 else None


def read_model(path: Path, sha256: str | None = None) -> ModelFacts:
    """The daemon's own check (size, GGUF layout, SHA-256 when pinned), then llama.cpp reads the
    metadata and vocabulary without loading weights."""
    import llama_cpp

    from ..node.engine import llama_errors
    from ..node.modelfile import ModelError, verify_model_file

    verify_model_file(path, sha256=sha256)
    with llama_errors() as load_errors:
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        why = next((e for e in load_errors if "error loading model:" in e), None)
        why = why.split("error loading model:", 1)[1].strip() if why else "see its log"
        raise ModelError(f"model file {path}: llama.cpp cannot load it: {why}")
    try:
        # With vocab_only, llama.cpp's own hparams accessors are not usable: read the metadata.
        arch = _meta(model, "general.architecture") or ""

        def num(key: str) -> int:
            value = _meta(model, f"{arch}.{key}")
            return int(value) if value and value.isdigit() else 0

        layers, embd, heads = (
            num("block_count"),
            num("embedding_length"),
            num("attention.head_count"),
        )
        kv_heads = num("attention.head_count_kv") or heads
        head_dim = num("attention.key_length") or (embd // heads if heads else 0)
    finally:
        llama_cpp.llama_model_free(model)
    return ModelFacts(path.stat().st_size, 2 * layers * kv_heads * head_dim, head_dim)


def check_model(model: ModelSettings) -> tuple[Check, ModelFacts | None]:
    from ..node.modelfile import ModelError

    fix = (
        "put the GGUF model there or set [model] path (QWEN_EDGE_MODEL__PATH); "
        f"scripts/install --model FILE copies one into {DEFAULT_MODELS_DIR}/"
    )
    path = model.path
    try:
        facts = read_model(path, model.sha256)
    except ModelError as exc:
        if "cannot load" in str(exc) or "damaged or truncated" in str(exc):
            fix = "the file is damaged or incomplete: download it again"
        elif "SHA-256" in str(exc):
            fix = "the file differs from [model] sha256: download it again (qwen-edge model pull)"
        elif "bad header" in str(exc) or "GGUF version" in str(exc):
            fix = "that is not a GGUF model llama.cpp reads: point [model] path at the .gguf file"
        elif "Permission denied" in str(exc) and os.geteuid() != 0:
            fix = f"run doctor as root: once the service ran, {DEFAULT_STATE_DIR} is private to it"
        return Check("model", Level.FAIL, str(exc), fix), None
    detail = f"{path}: GGUF, {facts.size / MIB:.0f} MiB, every tensor within the file"
    # The service runs as a dynamic user with ProtectHome=yes: it reads the state directory
    # (systemd hands it over) and world-readable files outside /home and /root.
    resolved = path.resolve()
    if resolved.is_relative_to("/home") or resolved.is_relative_to("/root"):
        return Check(
            "model",
            Level.WARN,
            detail + "; but the service cannot see /home or /root (ProtectHome=yes)",
            f"move it to {DEFAULT_MODELS_DIR}/",
        ), facts
    if not resolved.is_relative_to(DEFAULT_STATE_DIR) and not path.stat().st_mode & stat.S_IROTH:
        return Check(
            "model",
            Level.WARN,
            detail + "; but only its owner may read it, and the service runs as a dynamic user",
            f"chmod a+r {path}, or move it to {DEFAULT_MODELS_DIR}/",
        ), facts
    return Check("model", Level.OK, detail), facts


# -- CPU -------------------------------------------------------------------------------------------

# (llama.cpp's name for a feature, /proc/cpuinfo's name, the CPU is slow without it). x86: the
# extensions scripts/cmake-args can switch on, so that a rebuild can always fix a mismatch.
X86_FEATURES = (
    ("AVX", "avx", False),
    ("AVX2", "avx2", True),
    ("FMA", "fma", True),
    ("F16C", "f16c", True),
    ("AVX512", "avx512f", False),
    ("AVX512_VBMI", "avx512vbmi", False),
    ("AVX512_VNNI", "avx512_vnni", False),
    ("AVX512_BF16", "avx512_bf16", False),
)
# ARM builds are native, so the build should have exactly what the CPU has. A Raspberry Pi 4
# (Cortex-A72) has NEON but no dot product instructions; a Pi 5 (Cortex-A76) has both.
ARM_FEATURES = (
    ("NEON", "asimd", True),
    ("DOTPROD", "asimddp", False),
    ("FP16_VA", "asimdhp", False),
    ("MATMUL_INT8", "i8mm", False),
    ("SVE", "sve", False),
)


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags of the first CPU: x86's `flags`, ARM's `Features`."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


# The bits of the kernel's AT_HWCAP / AT_HWCAP2 (arch/arm64/include/uapi/asm/hwcap.h) for the
# flags ARM_FEATURES asks about; /proc/cpuinfo's Features line prints the same names.
ARM_HWCAP = {1: "asimd", 10: "asimdhp", 20: "asimddp", 22: "sve"}
ARM_HWCAP2 = {13: "i8mm"}
AT_HWCAP, AT_HWCAP2 = 16, 26


def arm_hwcap_flags(hwcap: int, hwcap2: int) -> set[str]:
    """The ARM_FEATURES flags among an aarch64 process's hardware capability bits."""
    return {name for bit, name in ARM_HWCAP.items() if hwcap >> bit & 1} | {
        name for bit, name in ARM_HWCAP2.items() if hwcap2 >> bit & 1
    }


def _hwcaps() -> tuple[int, int]:
    """This process's AT_HWCAP and AT_HWCAP2 (0, 0 where libc has no getauxval)."""
    try:
        getauxval = ctypes.CDLL(None).getauxval
    except (OSError, AttributeError):
        return 0, 0
    getauxval.restype, getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
    return int(getauxval(AT_HWCAP)), int(getauxval(AT_HWCAP2))


def built_features(system_info: str) -> set[str]:
    """Features llama.cpp was compiled with, from llama_print_system_info()."""
    return {name for name, on in re.findall(r"(\w+) = (\d+)", system_info) if on == "1"}


def check_cpu(
    machine: str, cpuinfo: str, system_info: str, rebuild: str, hwcaps: set[str] | None = None
) -> Check:
    """hwcaps: on aarch64, the CPU's flags as the kernel hands them to this process. They win over
    /proc/cpuinfo, which under qemu-user (scripts/arm64-check) describes the host's x86 CPU."""
    flags = hwcaps or cpu_flags(cpuinfo)
    built = built_features(system_info)
    table: tuple[tuple[str, str, bool], ...]
    if machine in ("x86_64", "amd64", "i686"):
        table = X86_FEATURES
    elif machine.startswith(("aarch64", "arm")):
        table = ARM_FEATURES
        if "neon" in flags:  # 32-bit ARM kernels name it neon
            flags.add("asimd")
    else:
        return Check("cpu", Level.WARN, f"{machine}: no feature table for this architecture")
    if not flags:
        return Check("cpu", Level.WARN, "cannot read the CPU's features from /proc/cpuinfo")
    has = [name for name, flag, _ in table if flag in flags]
    extra = [name for name, flag, _ in table if name in built and flag not in flags]
    unused = [name for name in has if name not in built]
    missing = [name for name, flag, slow in table if slow and flag not in flags]
    summary = f"{machine}: {' '.join(has) or 'no SIMD extensions'}; llama.cpp uses all of them"
    if extra:
        level, fix = Level.FAIL, rebuild
        detail = (
            f"llama.cpp was built for {', '.join(extra)}, which this CPU lacks: it will die "
            "with an illegal instruction"
        )
    elif unused:
        level, fix = Level.WARN, rebuild
        detail = f"this CPU has {', '.join(unused)}, but llama.cpp was built without: slower"
    elif missing:
        level, fix = Level.WARN, "use a smaller model or fewer slots"
        detail = f"{summary}, but the CPU lacks {', '.join(missing)}: expect slow replies"
    elif machine.startswith("arm"):
        level, fix = Level.WARN, "install the 64-bit Raspberry Pi OS"
        detail = f"{summary}; a 32-bit OS cannot use the faster 64-bit ARM kernels"
    else:
        level, fix, detail = Level.OK, "", summary
    return Check("cpu", level, detail, fix)


def _llama_cpu_check() -> Check:
    try:
        import importlib.metadata

        import llama_cpp

        info = llama_cpp.llama_print_system_info().decode(errors="replace")
        version = importlib.metadata.version("llama-cpp-python")
    except Exception as exc:  # a broken build fails in many ways (ImportError, OSError, ...)
        return Check(
            "cpu",
            Level.FAIL,
            f"llama-cpp-python does not load: {exc}",
            "reinstall it: scripts/install (or scripts/install-llama-cpp PYTHON)",
        )
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        cpuinfo = ""
    rebuild = FIX_REBUILD.format(python=sys.executable, version=version)
    machine = platform.machine()
    hwcaps = arm_hwcap_flags(*_hwcaps()) if machine in ("aarch64", "arm64") else None
    return check_cpu(machine, cpuinfo, info, rebuild, hwcaps)


# -- memory ----------------------------------------------------------------------------------------


def meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo in bytes."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        match = re.match(r"(\w+):\s+(\d+) kB", line)
        if match:
            out[match.group(1)] = int(match.group(2)) * 1024
    return out


def unit_memory_max(unit_texts: list[str]) -> int | None:
    """MemoryMax= in bytes from the unit and its drop-ins, in order (the last wins); None when
    there is no fixed limit."""
    limit: int | None = None
    for text in unit_texts:
        for line in text.splitlines():
            key, sep, value = line.strip().partition("=")
            if sep and key.strip() == "MemoryMax":
                match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)", value.strip())
                # infinity, a percentage or an empty value: no limit this check can compare
                limit = (
                    int(float(match.group(1)) * 1024 ** " KMGT".index(match.group(2) or " "))
                    if match
                    else None
                )
    return limit


def _installed_unit_texts() -> list[str]:
    drop_ins = sorted(UNIT_FILE.with_name(UNIT_FILE.name + ".d").glob("*.conf"))
    texts = []
    for path in [UNIT_FILE, *drop_ins]:
        try:
            texts.append(path.read_text())
        except OSError:
            continue
    return texts


def check_memory(
    model: ModelSettings,
    facts: ModelFacts,
    mem: dict[str, int],
    daemon_rss: int = 0,
    unit_limit: int | None = None,
) -> Check:
    """The daemon's needs (README, "Performance": model, KV cache of every slot, kept KV state,
    runtime) against this device's memory and the systemd unit's MemoryMax=. `daemon_rss`:
    memory a running daemon already holds, which it would give back on a restart."""
    fix = (
        "set [model] memory_mb to what the node may use, lower slots, n_ctx or kv_keep_mb, "
        "or use a smaller model"
    )
    try:
        plan = plan_memory(model, facts.size, facts.kv_elements_per_token, facts.head_dim)
    except BudgetError as exc:
        return Check("memory", Level.FAIL, str(exc), "raise [model] memory_mb")
    need = plan.need_bytes
    total = mem.get("MemTotal", 0)
    available = mem.get("MemAvailable", 0) + daemon_rss
    # With memory_mb the daemon runs what the budget lets it: say what it chose.
    chose = (
        f"memory_mb {plan.budget_mb} -> {plan.slots} slots x {plan.n_ctx} tokens, KV "
        f"{plan.kv_cache_type}, kept KV {plan.kv_keep_mb} MiB; "
        if plan.budget_mb is not None
        else ""
    )
    parts = (
        f"{chose}needs ~{need / MIB:.0f} MiB (model {facts.size / MIB:.0f}, KV cache "
        f"{plan.kv_bytes / MIB:.0f} for {plan.slots} x {plan.n_ctx} tokens {plan.kv_cache_type}, "
        "kept KV "
        f"{plan.kv_keep_mb}, runtime {RUNTIME_OVERHEAD / MIB:.0f}); "
        f"{available / MIB:.0f} of {total / MIB:.0f} MiB available"
    )
    if not total:
        return Check("memory", Level.WARN, "cannot read /proc/meminfo")
    if need > total:
        return Check("memory", Level.FAIL, parts, fix)
    if unit_limit is not None and need > unit_limit:
        return Check(
            "memory",
            Level.WARN,
            f"{parts}: above the unit's MemoryMax={unit_limit / MIB:.0f}M, where systemd kills it",
            "raise MemoryMax= and MemoryHigh= with `systemctl edit qwen-edge`, or " + fix,
        )
    if need > available:
        return Check("memory", Level.WARN, parts + ": other programs hold the rest", fix)
    return Check("memory", Level.OK, parts)


def is_daemon_argv(cmdline: bytes) -> bool:
    """Whether /proc/PID/cmdline is the daemon's: `qwen-edge serve` (the unit's ExecStart) or
    `python -m qwen_edge serve`, after whatever runs it (an interpreter, qemu-user). A pid in an
    old status may since belong to anything, and a checkout named qwen-edge puts "qwen" in every
    command line run from it."""
    argv = cmdline.rstrip(b"\0").split(b"\0")
    named = any(a == b"qwen_edge" or a.rsplit(b"/", 1)[-1] == b"qwen-edge" for a in argv)
    return named and b"serve" in argv


def _daemon_rss(status: Status | None) -> int:
    """Resident memory of the node's daemon if it runs on this machine (its status names its
    pid), else 0."""
    if status is None or status.state not in (NodeState.ONLINE, NodeState.STARTING):
        return 0
    pid = status.pid
    if pid is None:
        return 0
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        proc_status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    if not is_daemon_argv(cmdline):
        return 0
    match = re.search(r"^VmRSS:\s+(\d+) kB", proc_status, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


# -- all of it -------------------------------------------------------------------------------------


def diagnose(
    config_file: Path | None, timeout: float = 5.0, secrets: Path = SECRETS_FILE
) -> list[Check]:
    checks: list[Check] = []
    config, settings = check_config(config_file, use_secrets(secrets))
    checks.append(config)
    if settings is None:
        needs = "needs a valid configuration"
        checks += [Check(n, Level.SKIP, needs) for n in ("broker", "credentials", "node", "model")]
        checks.append(_llama_cpu_check())
        checks.append(Check("memory", Level.SKIP, needs))
        return checks

    status: Status | None = None
    try:
        tls = tls_context(settings.mqtt)
    except ConfigError as exc:
        tls = None
        reachable = Check(
            "broker", Level.FAIL, str(exc), "fix the TLS file settings in [mqtt] (see README)"
        )
    else:
        reachable = check_broker(settings.mqtt, timeout, tls)
    checks.append(reachable)
    if reachable.level is Level.FAIL:
        checks.append(Check("credentials", Level.SKIP, "needs the broker"))
        checks.append(Check("node", Level.SKIP, "needs the broker"))
    else:
        session = BrokerSession(settings, tls, timeout)
        try:
            login = session.connect()
            checks.append(login)
            if login.level is Level.OK:
                status = session.node_status()
                checks.append(check_node(settings, status))
            else:
                checks.append(Check("node", Level.SKIP, "needs a connection to the broker"))
        finally:
            session.close()

    try:
        model, facts = check_model(settings.model)
    except Exception as exc:  # llama-cpp-python itself is broken: the cpu check says how
        model, facts = Check("model", Level.SKIP, f"needs llama-cpp-python ({exc})"), None
    checks.append(model)
    checks.append(_llama_cpu_check())
    if facts is None:
        checks.append(Check("memory", Level.SKIP, "needs a readable model"))
    else:
        try:
            mem = meminfo(Path("/proc/meminfo").read_text())
        except OSError:
            mem = {}
        limit = unit_memory_max(_installed_unit_texts())
        checks.append(check_memory(settings.model, facts, mem, _daemon_rss(status), limit))
    return checks


def render(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{c.level.value:<5} {c.name:<{width}}  {c.detail}")
        if c.fix:
            lines.append(f"{'':<5} {'':<{width}}  fix: {c.fix}")
    return "\n".join(lines)


def run_doctor(args: argparse.Namespace) -> int:
    checks = diagnose(args.config, args.timeout, args.secrets or SECRETS_FILE)
    failed = any(c.level is Level.FAIL for c in checks)
    if args.json:
        report = {"ok": not failed, "checks": [asdict(c) for c in checks]}
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print(render(checks))
    return EXIT_FAILED if failed else 0
