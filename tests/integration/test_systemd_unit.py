"""The shipped systemd unit and example configuration: valid, hardened, and in step with the code.

`systemd-analyze verify` and `systemd-analyze security --offline=yes` work on a unit file without a
running systemd. verify also checks that ExecStart's binary exists, which it does not outside an
installed node, so the unit is verified as a copy whose ExecStart points at an existing executable;
the original is verified too, accepting only that one complaint.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

from qwen_edge.cli import EXIT_CONFIG
from qwen_edge.settings import ServiceSettings, Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "qwen-edge.service"
EXAMPLE_CONFIG = ROOT / "deploy" / "config.example.toml"
INSTALLED_BINARY = "/opt/qwen-edge/venv/bin/qwen-edge"
EXIT_MODEL = 3  # qwen_edge.node.service.EXIT_MODEL (importing service would load llama.cpp)
MAX_EXPOSURE = 2.0

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed"
)


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> keys -> every value in order (keys such as Wants= may repeat)."""
    sections: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {raw!r}"
        sections[section][key.strip()].append(value.strip())
    return sections


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT.read_text())


def analyze(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "LC_ALL": "C.UTF-8"}
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=cwd,
        check=False,
    )


def runnable_copy(tmp_path: Path) -> Path:
    """The unit, same file name, with ExecStart's binary swapped for one that exists here."""
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED_BINARY} " in text
    true = shutil.which("true") or "/bin/true"
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(f"ExecStart={INSTALLED_BINARY} ", f"ExecStart={true} "))
    return copy


@needs_systemd_analyze
def test_unit_verifies_cleanly(tmp_path: Path) -> None:
    # verify exits 0 even on unknown keys or unparsable values (it only warns), so any output
    # at all counts as a failure.
    result = analyze("verify", str(runnable_copy(tmp_path)), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr
    assert result.stdout.strip() == "", result.stdout


@needs_systemd_analyze
def test_original_unit_only_misses_the_installed_binary(tmp_path: Path) -> None:
    result = analyze("verify", str(UNIT), cwd=tmp_path)
    complaints = [line for line in result.stderr.splitlines() if line.strip()]
    if Path(INSTALLED_BINARY).exists():
        assert result.returncode == 0 and not complaints, result.stderr
        return
    expected = f"Command {INSTALLED_BINARY} is not executable"
    assert complaints, "verify should complain about the missing binary"
    assert all(expected in line for line in complaints), result.stderr


@needs_systemd_analyze
def test_security_exposure_is_low(tmp_path: Path) -> None:
    result = analyze("security", "--offline=yes", str(runnable_copy(tmp_path)), cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    assert match, f"no overall exposure level in:\n{output}"
    assert float(match.group(1)) <= MAX_EXPOSURE, output


@needs_systemd_analyze
def test_unit_with_its_credentials_enabled_verifies_and_stays_hardened(tmp_path: Path) -> None:
    copy = runnable_copy(tmp_path)
    text = copy.read_text()
    commented = re.findall(r"^#(LoadCredential=(\S+?):\S+)$", text, re.MULTILINE)
    # The names the daemon looks for (qwen_edge.settings.CREDENTIAL_*).
    assert {name for _, name in commented} == {"mqtt-password", "mqtt-client-key"}
    for line, _ in commented:
        text = text.replace(f"#{line}", line)
    copy.write_text(text)
    result = analyze("verify", str(copy), cwd=tmp_path)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stderr
    result = analyze("security", "--offline=yes", str(copy), cwd=tmp_path)
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match and float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_unit_life_cycle_matches_the_daemon(unit: dict[str, dict[str, list[str]]]) -> None:
    service = unit["Service"]
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert service["ExecStart"] == [f"{INSTALLED_BINARY} serve --config /etc/qwen-edge/config.toml"]
    assert len(service["WatchdogSec"]) == 1 and int(service["WatchdogSec"][0]) > 0
    assert service["Restart"] == ["on-failure"]
    # The exit statuses that restarting cannot fix are the daemon's own.
    assert set(service["RestartPreventExitStatus"][0].split()) == {
        str(EXIT_CONFIG),
        str(EXIT_MODEL),
    }
    # Stopping drains in-flight replies (drain_timeout) and then flushes them (up to 5 s + 5 s).
    drain = ServiceSettings().drain_timeout
    assert int(service["TimeoutStopSec"][0]) >= drain + 10


def test_unit_does_not_require_a_local_broker(unit: dict[str, dict[str, list[str]]]) -> None:
    section = unit["Unit"]
    assert "mosquitto.service" in section["Wants"]
    assert "mosquitto.service" in section["After"]
    assert "Requires" not in section and "BindsTo" not in section


def test_example_config_loads_and_equals_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("QWEN_EDGE_"):
            monkeypatch.delenv(name)
    # load_settings() stores the file in a class variable; put it back after the test.
    monkeypatch.setattr(Settings, "toml_file", None)
    defaults = Settings().model_dump(mode="json")

    settings = load_settings(EXAMPLE_CONFIG)

    assert settings.model.path == Path(
        "/var/lib/qwen-edge/models/qwen2.5-0.5b-instruct-q4_k_m.gguf"
    )
    assert settings.model_dump(mode="json") == defaults
    # Every settings group appears in the example as a table.
    text = EXAMPLE_CONFIG.read_text()
    for group in ("mqtt", "model", "generation", "conversations", "limits", "service", "fleet"):
        assert f"\n[{group}]\n" in text
    for key in ("node_id", "topic_prefix"):
        assert re.search(rf"^#? ?{key} = ", text, re.MULTILINE), key
