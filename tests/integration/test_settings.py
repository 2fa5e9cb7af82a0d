"""Settings from QWEN_EDGE_* variables and TOML, and how `qwen-edge config` reports them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ..unit.test_settings import SECRET, toml

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("QWEN_EDGE_")}
    return subprocess.run(
        [sys.executable, "-m", "qwen_edge", *args],
        env={**base, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_config_prints_settings_as_json_with_password_masked(tmp_path: Path) -> None:
    config = toml(tmp_path, '[mqtt]\nport = 1884\nusername = "edge"\n')
    done = run_cli(
        "config",
        "--config",
        str(config),
        QWEN_EDGE_MQTT__PASSWORD=SECRET,
        QWEN_EDGE_NODE_ID="cli-node",
    )
    assert done.returncode == 0, done.stderr
    assert SECRET not in done.stdout + done.stderr
    data = json.loads(done.stdout)
    assert data["mqtt"]["password"] == "***"
    assert (data["mqtt"]["port"], data["mqtt"]["username"]) == (1884, "edge")
    assert data["node_id"] == "cli-node"
    assert data["topic_prefix"] == "qwen-edge"


def test_config_masks_a_password_from_the_toml_file(tmp_path: Path) -> None:
    """Also: --config may come before the subcommand."""
    config = toml(tmp_path, f'[mqtt]\npassword = "{SECRET}"\n')
    done = run_cli("--config", str(config), "config")
    assert done.returncode == 0, done.stderr
    assert SECRET not in done.stdout + done.stderr
    assert json.loads(done.stdout)["mqtt"]["password"] == "***"


INVALID: list[tuple[str, dict[str, str], str | None, str]] = [
    # (case, environment, TOML text or None for a missing file, what stderr must name)
    ("port-not-a-number", {"QWEN_EDGE_MQTT__PORT": "notaport"}, "", "QWEN_EDGE_MQTT__PORT"),
    ("port-out-of-range", {"QWEN_EDGE_MQTT__PORT": "0"}, "", "QWEN_EDGE_MQTT__PORT"),
    ("node-id-with-slash", {"QWEN_EDGE_NODE_ID": "a/b"}, "", "QWEN_EDGE_NODE_ID"),
    ("prefix-with-wildcard", {"QWEN_EDGE_TOPIC_PREFIX": "a/+"}, "", "QWEN_EDGE_TOPIC_PREFIX"),
    ("unknown-toml-key", {}, "colour = 'blue'\n", "colour"),
    ("toml-wrong-type", {}, "[mqtt]\nport = 'x'\n", "QWEN_EDGE_MQTT__PORT"),
    ("toml-syntax-error", {}, "[mqtt\nhost = 'x'\n", "config.toml"),
    ("toml-not-utf8", {}, "node_id = '\udcff'\n", "config.toml"),
    ("missing-config-file", {}, None, "missing.toml"),
    (
        "bad-value-with-password-set",
        {"QWEN_EDGE_MQTT__PASSWORD": SECRET, "QWEN_EDGE_MQTT__PORT": "-1"},
        "",
        "QWEN_EDGE_MQTT__PORT",
    ),
    ("password-wrong-type", {}, f"[mqtt]\npassword = ['{SECRET}']\n", "QWEN_EDGE_MQTT__PASSWORD"),
]


@pytest.mark.parametrize(
    ("env", "text", "named"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid_setting_exits_2_with_one_line_and_no_traceback(
    tmp_path: Path, env: dict[str, str], text: str | None, named: str
) -> None:
    if text is None:
        config = tmp_path / "missing.toml"
    else:
        config = tmp_path / "config.toml"
        config.write_bytes(text.encode("utf-8", "surrogateescape"))
    done = run_cli("config", "--config", str(config), **env)
    assert done.returncode == 2, done.stdout
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("qwen-edge: ")
    assert named in lines[0]
    assert SECRET not in done.stderr


def test_missing_config_file_before_the_subcommand_exits_2(tmp_path: Path) -> None:
    done = run_cli("--config", str(tmp_path / "gone.toml"), "config")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"qwen-edge: config file {tmp_path / 'gone.toml'}: not found"
    ]
