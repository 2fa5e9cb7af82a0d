"""All configuration: one pydantic-settings model fed by QWEN_EDGE_* variables and a TOML file.

Environment variables win over the TOML file, which wins over the defaults. Every default is one
that works on a Raspberry Pi with 2 GB of memory.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

DEFAULT_CONFIG_FILE = Path("/etc/qwen-edge/config.toml")

# Topic levels must not contain MQTT wildcards or separators.
_TOPIC_LEVEL_FORBIDDEN = frozenset("/+#\0")


class _Section(BaseModel):
    # A misspelt key in a table must be an error, not silently ignored.
    model_config = ConfigDict(extra="forbid")


def _check_topic_level(value: str, what: str) -> str:
    if not value or any(ch in _TOPIC_LEVEL_FORBIDDEN for ch in value):
        raise ValueError(f"{what} must be a non-empty MQTT topic level without '/', '+', '#'")
    return value


class MqttSettings(_Section):
    """How to reach the broker."""

    host: str = Field("127.0.0.1", description="Broker host name or address.")
    port: int = Field(1883, ge=1, le=65535, description="Broker TCP port.")
    username: str | None = Field(None, description="User name for the broker, if it wants one.")
    password: SecretStr | None = Field(None, description="Password for the broker.")
    client_id: str | None = Field(
        None, description="MQTT client id of the daemon (default: qwen-edge-{node_id})."
    )
    protocol: Literal["5", "3.1.1"] = Field(
        "5", description="MQTT protocol version. 5 is needed for response topics."
    )
    keepalive: int = Field(30, ge=5, le=3600, description="Keep-alive interval (seconds).")
    reconnect_min_delay: float = Field(
        0.5, gt=0, description="First reconnect delay after the link drops (seconds)."
    )
    reconnect_max_delay: float = Field(
        30.0, gt=0, description="Longest reconnect delay; the delay doubles up to it (seconds)."
    )
    max_payload: int = Field(
        65536, ge=256, description="Largest request payload accepted (bytes); larger -> too_large."
    )


class ModelSettings(_Section):
    """Which GGUF model to run and how."""

    path: Path = Field(
        Path("/var/lib/qwen-edge/models/qwen2.5-0.5b-instruct-q4_k_m.gguf"),
        description="Path of the GGUF chat model file.",
    )
    name: str | None = Field(
        None, description="Model name reported to clients (default: the file name without .gguf)."
    )
    n_ctx: int = Field(
        4096, ge=256, le=131072, description="Context window of one conversation (tokens)."
    )
    n_batch: int = Field(
        128,
        ge=16,
        le=8192,
        description="Most tokens evaluated per decode step (more: larger buffers, no faster here).",
    )
    threads: int = Field(
        0, ge=0, le=256, description="CPU threads for inference (0: all cores the process may use)."
    )
    slots: int = Field(
        2, ge=1, le=16, description="Requests decoded together in one batch (concurrent replies)."
    )
    queue_size: int = Field(
        16, ge=0, le=1024, description="Requests that may wait for a free slot before 'busy'."
    )
    kv_keep_mb: int = Field(
        64,
        ge=0,
        le=65536,
        description="RAM for KV state of conversations waiting for their next turn (MiB).",
    )
    use_mlock: bool = Field(False, description="Lock the model in RAM (needs CAP_IPC_LOCK).")
    flash_attn: bool = Field(
        True, description="Flash attention: less memory, faster with several slots decoding."
    )
    kv_cache_type: Literal["f16", "q8_0"] = Field(
        "f16", description="KV cache precision; q8_0 halves its memory (needs flash_attn)."
    )

    @property
    def display_name(self) -> str:
        return self.name or self.path.name.removesuffix(".gguf")


class GenerationSettings(_Section):
    """Defaults for requests that do not say otherwise (Qwen2.5's recommended sampling)."""

    max_tokens: int = Field(512, ge=1, description="Default reply length limit (tokens).")
    max_tokens_limit: int = Field(
        2048, ge=1, description="Largest max_tokens a request may ask for (tokens)."
    )
    temperature: float = Field(0.7, ge=0, le=5, description="Default sampling temperature.")
    top_p: float = Field(0.8, gt=0, le=1, description="Default nucleus sampling mass.")
    top_k: int = Field(20, ge=0, description="Default top-k (0: off).")
    min_p: float = Field(0.0, ge=0, le=1, description="Min-p filter (0: off).")
    repeat_penalty: float = Field(
        1.05, ge=0.5, le=2, description="Repetition penalty when sampling (1.0: off)."
    )
    repeat_last_n: int = Field(64, ge=0, description="Tokens the repetition penalty looks back.")


class ConversationSettings(_Section):
    """Bounds on remembered chat history."""

    max_conversations: int = Field(
        256, ge=1, description="Conversations remembered; the least recently used go first."
    )
    idle_ttl: float = Field(
        3600.0, gt=0, description="A conversation idle this long is forgotten (seconds)."
    )


class ServiceSettings(_Section):
    """Process life cycle."""

    drain_timeout: float = Field(
        10.0, ge=0, description="On stop, how long in-flight replies may finish (seconds)."
    )
    watchdog_stall: float = Field(
        30.0, gt=0, description="Inference loop silent this long counts as stuck (seconds)."
    )
    log_format: Literal["auto", "console", "json", "journald"] = Field(
        "auto", description="auto: console on a terminal, journald under systemd, else JSON."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info")
    state_dir: Path | None = Field(
        None,
        description=(
            "Where history.db (conversations, accepted and finished requests) is kept "
            "(default: $STATE_DIRECTORY from systemd, else /var/lib/qwen-edge)."
        ),
    )
    outcomes_max: int = Field(
        1000,
        ge=0,
        description="Finished requests remembered, so a duplicate gets the same reply again.",
    )
    outcomes_ttl: float = Field(
        3600.0, ge=0, description="How long a finished request is remembered (seconds)."
    )


class FleetSettings(_Section):
    """Several nodes behind one broker serving a shared request pool."""

    enabled: bool = Field(
        True, description="Take requests from the pool and end replies of nodes that vanish."
    )
    group: str = Field(
        "pool", description="Pool name: {topic_prefix}/{group}/request/... reaches one node."
    )
    stats_interval: float = Field(
        10.0, ge=0, description="Publish retained load figures this often (seconds; 0: never)."
    )

    @field_validator("group")
    @classmethod
    def _group_is_topic_level(cls, value: str) -> str:
        return _check_topic_level(value, "fleet.group")


class Settings(BaseSettings):
    """The effective configuration of one qwen-edge node."""

    model_config = SettingsConfigDict(
        env_prefix="QWEN_EDGE_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )
    # Set by load_settings() before instantiation; pydantic-settings reads it in the TOML source.
    toml_file: ClassVar[Path | None] = None

    node_id: str = Field(
        default_factory=socket.gethostname, description="This node's name in topics."
    )
    topic_prefix: str = Field("qwen-edge", description="First topic level of every topic.")
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    conversations: ConversationSettings = Field(default_factory=ConversationSettings)
    service: ServiceSettings = Field(default_factory=ServiceSettings)
    fleet: FleetSettings = Field(default_factory=FleetSettings)

    @field_validator("node_id")
    @classmethod
    def _node_id_is_topic_level(cls, value: str) -> str:
        return _check_topic_level(value, "node_id")

    @field_validator("topic_prefix")
    @classmethod
    def _prefix_is_topic_levels(cls, value: str) -> str:
        for level in value.split("/"):
            _check_topic_level(level, "topic_prefix levels")
        return value

    @field_validator("fleet")
    @classmethod
    def _group_is_not_a_node(cls, value: FleetSettings, info: ValidationInfo) -> FleetSettings:
        # {prefix}/{group}/reply/... would be both this node's and the pool's reply topic.
        if value.enabled and value.group == info.data.get("node_id"):
            raise ValueError(
                f"group {value.group!r} is also this node's node_id, which makes its topics "
                "ambiguous; rename the node (QWEN_EDGE_NODE_ID) or the pool "
                "(QWEN_EDGE_FLEET__GROUP)"
            )
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls.toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls.toml_file))
        return tuple(sources)

    def masked(self) -> dict[str, Any]:
        """The settings as plain data with every secret replaced by '***'."""
        data: dict[str, Any] = self.model_dump(mode="json")
        if self.mqtt.password is not None:
            data["mqtt"]["password"] = "***"
        return data


class ConfigError(Exception):
    """A configuration that cannot be used; the message is one line naming the setting."""


def load_settings(config_file: Path | None = None) -> Settings:
    """Build the settings from the environment and an optional TOML file.

    Without an explicit file, the default file is read when it exists.
    """
    if config_file is None and DEFAULT_CONFIG_FILE.is_file():
        config_file = DEFAULT_CONFIG_FILE
    if config_file is not None and not config_file.is_file():
        raise ConfigError(f"config file {config_file}: not found")
    Settings.toml_file = config_file
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigError(_describe(exc, config_file)) from None
    except SettingsError as exc:  # a QWEN_EDGE_<SECTION> variable that is not valid JSON
        match = re.search(r'field "([^"]+)"', str(exc))
        name = match.group(1).upper() if match else "?"
        raise ConfigError(f"invalid setting QWEN_EDGE_{name}: not valid JSON") from None
    except (ValueError, OSError) as exc:  # e.g. TOML syntax errors
        raise ConfigError(f"config file {config_file}: {exc}") from None
    finally:
        Settings.toml_file = None


def _describe(exc: ValidationError, config_file: Path | None) -> str:
    first = exc.errors()[0]
    path = [str(p) for p in first["loc"]]
    env_name = "QWEN_EDGE_" + "__".join(p.upper() for p in path)
    table = f"[{'.'.join(path[:-1])}] " if len(path) > 1 else ""
    where = f" (or {table}{path[-1]} in {config_file})" if config_file else ""
    more = f"; and {exc.error_count() - 1} more" if exc.error_count() > 1 else ""
    value = os.environ.get(env_name)
    shown = f" (got {value!r})" if value is not None and "PASSWORD" not in env_name else ""
    return f"invalid setting {env_name}{where}: {first['msg']}{shown}{more}"
