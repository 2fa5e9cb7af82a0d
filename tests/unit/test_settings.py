"""Settings from QWEN_EDGE_* variables and TOML, and how `qwen-edge config` reports them."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qwen_edge import settings as settings_module
from qwen_edge.settings import ConfigError, Settings, load_settings

pytestmark = pytest.mark.usefixtures("clean_env")

SECRET = "s3cr3t-Pa55-7f1c"


def toml(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def password(s: Settings) -> str | None:
    return None if s.mqtt.password is None else s.mqtt.password.get_secret_value()


# -- in process --------------------------------------------------------------------------------


def test_defaults_without_file_or_environment() -> None:
    s = load_settings()
    assert s.mqtt.host == "127.0.0.1"
    assert s.mqtt.port == 1883
    assert s.mqtt.username is None
    assert s.mqtt.password is None
    assert s.node_id == socket.gethostname()
    assert s.topic_prefix == "qwen-edge"
    assert s.model.path == Path("/var/lib/qwen-edge/models/qwen2.5-0.5b-instruct-q4_k_m.gguf")


Getter = Callable[[Settings], Any]
EnvCase = tuple[str, str, Getter, Any]  # (variable, value, what to read, expected)

ENV_CASES: list[EnvCase] = [
    ("QWEN_EDGE_MQTT__HOST", "broker.lan", lambda s: s.mqtt.host, "broker.lan"),
    ("QWEN_EDGE_MQTT__PORT", "8883", lambda s: s.mqtt.port, 8883),
    ("QWEN_EDGE_MQTT__USERNAME", "edge", lambda s: s.mqtt.username, "edge"),
    ("QWEN_EDGE_MQTT__PASSWORD", SECRET, password, SECRET),
    ("QWEN_EDGE_MODEL__PATH", "/models/m.gguf", lambda s: s.model.path, Path("/models/m.gguf")),
    ("QWEN_EDGE_NODE_ID", "kitchen-pi", lambda s: s.node_id, "kitchen-pi"),
    ("QWEN_EDGE_TOPIC_PREFIX", "home/llm", lambda s: s.topic_prefix, "home/llm"),
    ("QWEN_EDGE_MODEL__N_CTX", "2048", lambda s: s.model.n_ctx, 2048),
    ("QWEN_EDGE_SERVICE__LOG_LEVEL", "debug", lambda s: s.service.log_level, "debug"),
    ("QWEN_EDGE_SERVICE__STATE_DIR", "/srv/qe", lambda s: s.service.state_dir, Path("/srv/qe")),
    ("QWEN_EDGE_SERVICE__OUTCOMES_MAX", "5", lambda s: s.service.outcomes_max, 5),
]


@pytest.mark.parametrize("case", ENV_CASES, ids=[c[0] for c in ENV_CASES])
@pytest.mark.parametrize("with_file", [False, True], ids=["no-file", "with-file"])
def test_environment_variable_is_honoured(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, case: EnvCase, with_file: bool
) -> None:
    name, value, get, expected = case
    monkeypatch.setenv(name, value)
    config = toml(tmp_path, "[service]\ndrain_timeout = 3.0\n") if with_file else None
    s = load_settings(config)
    assert get(s) == expected
    assert s.service.drain_timeout == (3.0 if with_file else 10.0)


def test_toml_nested_tables_are_read(tmp_path: Path) -> None:
    config = toml(
        tmp_path,
        """
node_id = "from-toml"
topic_prefix = "site/llm"

[mqtt]
host = "toml-host"
port = 1884
username = "u"
password = "p"
protocol = "3.1.1"

[model]
path = "/m/x.gguf"
slots = 3

[generation]
temperature = 0.2

[conversations]
max_conversations = 7

[service]
log_format = "json"
""",
    )
    s = load_settings(config)
    assert (s.node_id, s.topic_prefix) == ("from-toml", "site/llm")
    assert (s.mqtt.host, s.mqtt.port, s.mqtt.username, password(s)) == ("toml-host", 1884, "u", "p")
    assert s.mqtt.protocol == "3.1.1"
    assert (s.model.path, s.model.slots) == (Path("/m/x.gguf"), 3)
    assert s.generation.temperature == 0.2
    assert s.conversations.max_conversations == 7
    assert s.service.log_format == "json"


def test_toml_dotted_keys_work_like_tables(tmp_path: Path) -> None:
    s = load_settings(toml(tmp_path, 'mqtt.host = "dotted"\nmodel.n_batch = 64\n'))
    assert s.mqtt.host == "dotted"
    assert s.model.n_batch == 64


def test_environment_overrides_toml_key_by_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = toml(
        tmp_path,
        'node_id = "toml-node"\ntopic_prefix = "toml"\n'
        '[mqtt]\nhost = "toml-host"\nport = 1884\npassword = "toml-pass"\n',
    )
    monkeypatch.setenv("QWEN_EDGE_MQTT__HOST", "env-host")
    monkeypatch.setenv("QWEN_EDGE_MQTT__PASSWORD", "env-pass")
    monkeypatch.setenv("QWEN_EDGE_NODE_ID", "env-node")
    s = load_settings(config)
    assert s.mqtt.host == "env-host"
    assert password(s) == "env-pass"
    assert s.node_id == "env-node"
    assert s.mqtt.port == 1884  # the rest of [mqtt] still comes from the file
    assert s.topic_prefix == "toml"


def test_default_config_file_is_read_when_present(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(
        settings_module, "DEFAULT_CONFIG_FILE", toml(tmp_path, 'node_id = "etc-node"\n')
    )
    assert load_settings().node_id == "etc-node"


def test_missing_explicit_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("QWEN_EDGE_MQTT__PORT", "notaport"),
        ("QWEN_EDGE_MQTT__PORT", "70000"),
        ("QWEN_EDGE_NODE_ID", "a/b"),
        ("QWEN_EDGE_NODE_ID", "+"),
        ("QWEN_EDGE_NODE_ID", ""),
        ("QWEN_EDGE_TOPIC_PREFIX", "a//b"),
        ("QWEN_EDGE_TOPIC_PREFIX", "x/#"),
        ("QWEN_EDGE_MQTT__PROTOCOL", "4"),
        ("QWEN_EDGE_MODEL__SLOTS", "0"),
    ],
)
def test_invalid_variable_gives_one_line_naming_it(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert name in message
    assert "\n" not in message


def test_masked_hides_the_password_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWEN_EDGE_MQTT__PASSWORD", SECRET)
    monkeypatch.setenv("QWEN_EDGE_MQTT__USERNAME", "edge")
    s = load_settings()
    data = s.masked()
    assert data["mqtt"]["password"] == "***"
    assert data["mqtt"]["username"] == "edge"
    assert SECRET not in json.dumps(data)
    assert password(s) == SECRET  # masking does not change the settings
    monkeypatch.delenv("QWEN_EDGE_MQTT__PASSWORD")
    assert load_settings().masked()["mqtt"]["password"] is None


def test_unknown_key_in_a_toml_table_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="hots"):
        load_settings(toml(tmp_path, '[mqtt]\nhots = "broker.lan"\n'))


def test_malformed_json_section_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWEN_EDGE_MQTT", "{not json")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "QWEN_EDGE_MQTT" in str(info.value)
    assert "config file" not in str(info.value)


# -- the command line --------------------------------------------------------------------------
