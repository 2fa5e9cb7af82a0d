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
# The systemd unit's StateDirectory=: history.db, models/, the Home Assistant record. Used when
# neither [service] state_dir nor systemd's $STATE_DIRECTORY says otherwise.
DEFAULT_STATE_DIR = Path("/var/lib/qwen-edge")
DEFAULT_MODELS_DIR = DEFAULT_STATE_DIR / "models"
# systemd credentials (LoadCredential=) the daemon looks for in $CREDENTIALS_DIRECTORY.
CREDENTIAL_PASSWORD = "mqtt-password"
CREDENTIAL_CLIENT_KEY = "mqtt-client-key"

# Topic levels must not contain MQTT wildcards or separators.
_TOPIC_LEVEL_FORBIDDEN = frozenset("/+#\0")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")


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
        5.0,
        gt=0,
        description=(
            "Longest reconnect delay; the delay doubles up to it (seconds). Short, so the node "
            "is back within seconds of the broker's return."
        ),
    )
    max_payload: int = Field(
        65536, ge=256, description="Largest request payload accepted (bytes); larger -> too_large."
    )
    password_file: Path | None = Field(
        None, description="File holding the broker password (instead of password)."
    )
    tls: bool | Literal["auto"] = Field(
        "auto", description="TLS to the broker: true, false, or auto (on with ca_file or certfile)."
    )
    ca_file: Path | None = Field(
        None, description="PEM CA certificate(s) the broker's certificate must chain to."
    )
    certfile: Path | None = Field(None, description="PEM client certificate (mutual TLS).")
    keyfile: Path | None = Field(
        None, description="PEM private key of certfile, unencrypted (default: in certfile)."
    )
    tls_check_hostname: bool = Field(
        True, description="The broker's certificate must name mqtt.host (false: any name)."
    )

    @property
    def use_tls(self) -> bool:
        if self.tls == "auto":
            return self.ca_file is not None or self.certfile is not None
        return self.tls


class ModelSettings(_Section):
    """Which GGUF model to run and how."""

    path: Path = Field(
        DEFAULT_MODELS_DIR / "qwen2.5-0.5b-instruct-q4_k_m.gguf",
        description="Path of the GGUF chat model file.",
    )
    name: str | None = Field(
        None, description="Model name reported to clients (default: the file name without .gguf)."
    )
    sha256: str | None = Field(
        None,
        description="Expected SHA-256 of the model file, checked before every load (reads the "
        "whole file: seconds on a Pi); unset: size, header and layout checks only.",
    )
    dir: Path = Field(
        DEFAULT_MODELS_DIR,
        description="Where `qwen-edge model pull` puts models and `model list` looks for them.",
    )
    catalog: Path | None = Field(
        None,
        description="TOML file of models `qwen-edge model` knows besides the built-in ones.",
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
        24,
        ge=0,
        le=65536,
        description="RAM for KV state of conversations waiting for their next turn (MiB).",
    )
    use_mlock: bool = Field(False, description="Lock the model in RAM (needs CAP_IPC_LOCK).")
    flash_attn: bool = Field(
        True, description="Flash attention: less memory, faster with several slots decoding."
    )
    kv_cache_type: Literal["f16", "q8_0"] = Field(
        "q8_0",
        description="KV cache precision: q8_0 takes half the memory of f16; f16 is used where "
        "llama.cpp cannot quantise it (flash_attn off, heads not a multiple of 32 wide).",
    )
    memory_mb: int | None = Field(
        None,
        ge=64,
        le=1048576,
        description="Memory budget of the daemon (MiB): it then picks KV precision, kept-KV store, "
        "slots and n_ctx (at most as set) to fit, and logs the choice; unset: as set.",
    )

    @field_validator("sha256")
    @classmethod
    def _sha256_is_hex(cls, value: str | None) -> str | None:
        if value is not None and not _SHA256.fullmatch(value):
            raise ValueError("must be 64 hexadecimal digits")
        return value.lower() if value is not None else None

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
    system: str | None = Field(
        None,
        description="System prompt of conversations whose client sets none (unset: the chat "
        "template's own). The one prompt text whose KV state clients share: a client's own "
        "`system` is its content, reused only for that client.",
    )


class ConversationSettings(_Section):
    """Bounds on remembered chat history."""

    max_conversations: int = Field(
        256,
        ge=1,
        description="Conversations remembered in all. When full, a new one evicts the least "
        "recently used conversation of the client holding the most (the newcomer's own on a "
        "tie), so no client loses one to a client holding more: with K clients, one keeping at "
        "most max_conversations / K is never evicted by another.",
    )
    max_per_client: int = Field(
        16,
        ge=1,
        description="Conversations remembered per client (not only those in flight); past it "
        "the client's own least recently used goes.",
    )
    idle_ttl: float = Field(
        3600.0, gt=0, description="A conversation idle this long is forgotten (seconds)."
    )


class LimitSettings(_Section):
    """Per-client limits, checked when a request arrives, before any model work. A client is
    the {client_id} topic level (which the broker's ACL binds to the device's account)."""

    requests_per_minute: float = Field(
        60.0, ge=0, description="Sustained requests per minute of one client (0: no limit)."
    )
    burst: int = Field(
        10, ge=1, description="Requests a client may send at once before the rate applies."
    )
    max_conversations_per_client: int = Field(
        4,
        ge=0,
        description="Conversations of one client with a request queued or generating (0: any).",
    )
    max_queued_per_client: int = Field(
        8,
        ge=0,
        description=(
            "Requests of one client that may wait in the queue (model.queue_size) at once; past "
            "it, busy (0: any). Slots free up for clients in turn, the client holding the fewest "
            "first, and when the queue is full a client's request takes the newest place of the "
            "client holding the most (which gets busy) if that one holds two or more more."
        ),
    )
    grammar_share: float = Field(
        0.1,
        gt=0,
        le=1,
        description=(
            "Share of the decode loop's time one request's `format` grammar may take while "
            "others are generating; past it the request sits out steps until it is within "
            "again, so the others keep at least 1 - grammar_share of their speed."
        ),
    )
    grammar_step_ms: float = Field(
        1000.0,
        gt=0,
        description=(
            "Longest one token's grammar check may take (milliseconds); a request whose grammar "
            "takes longer ends with bad_request (the others stalled that long once)."
        ),
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
            f"(default: $STATE_DIRECTORY from systemd, else {DEFAULT_STATE_DIR})."
        ),
    )
    outcomes_max: int = Field(
        1000,
        ge=0,
        description="Finished requests remembered, so a duplicate gets the same reply again. "
        "When full, the oldest of the client holding the most goes (the newcomer's own on a "
        "tie): with K clients, one keeping at most outcomes_max / K loses none to another.",
    )
    outcomes_per_client: int = Field(
        100,
        ge=1,
        description="Finished requests remembered per client; past it the client's oldest goes.",
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


class HomeAssistantSettings(_Section):
    """Home Assistant MQTT discovery: the node appears there as a device (docs/homeassistant.md)."""

    enabled: bool = Field(
        False,
        description="Publish retained discovery configs on every connect; false removes those "
        "this node published.",
    )
    discovery_prefix: str = Field(
        "homeassistant", description="Home Assistant's discovery prefix (its MQTT settings)."
    )

    @field_validator("discovery_prefix")
    @classmethod
    def _prefix_is_topic_levels(cls, value: str) -> str:
        for level in value.split("/"):
            _check_topic_level(level, "homeassistant.discovery_prefix levels")
        return value


class WyomingSettings(_Section):
    """Home Assistant Assist over the Wyoming protocol: the node as a conversation agent that
    turns a transcript into an intent (docs/homeassistant.md)."""

    enabled: bool = Field(
        False, description="Serve the Wyoming protocol and announce it over zeroconf."
    )
    host: str = Field("0.0.0.0", description="Address the Wyoming service listens on.")
    port: int = Field(10500, ge=1, le=65535, description="TCP port of the Wyoming service.")
    entities: Path | None = Field(
        None,
        description='JSON file {"names": [...], "areas": [...]}: the only device and area names '
        "the model may put in an intent (none: intents without a target only).",
    )
    languages: list[str] = Field(
        default_factory=lambda: ["en"], description="Languages the service declares to Assist."
    )
    zeroconf: bool = Field(
        True, description="Announce the service as _wyoming._tcp so Home Assistant finds it."
    )
    zeroconf_host: str | None = Field(
        None,
        description="Address announced over zeroconf (and the interface it is sent on); none: "
        "the address of the interface that reaches the multicast group.",
    )
    max_connections: int = Field(
        16, ge=1, le=1024, description="Wyoming connections open at once, all peers together."
    )
    max_connections_per_peer: int = Field(
        4, ge=1, le=1024, description="Wyoming connections open at once from one address."
    )
    max_event_bytes: int = Field(
        65536,
        ge=1024,
        le=16 * 1024 * 1024,
        description="Largest Wyoming event accepted (header line, data and payload; bytes).",
    )
    idle_timeout: float = Field(
        30.0, gt=0, description="Close a connection that sends no complete event this long (s)."
    )
    reply_timeout: float = Field(
        60.0, gt=0, description="Answer not-handled when the model has not replied by then (s)."
    )
    max_tokens: int = Field(
        192,
        ge=32,
        le=1024,
        description="Token limit of the model's reply to one transcript (an intent takes 10 to "
        "40; a spoken answer it cuts is said as far as it got).",
    )

    @field_validator("entities")
    @classmethod
    def _entities_file_is_usable(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        # Checked here, so that a broken names file stops start-up with one line naming it.
        if value is not None and info.data.get("enabled"):
            from .node.assist import EntitiesError, load_entities

            try:
                load_entities(value)
            except EntitiesError as exc:
                raise ValueError(str(exc)) from None
        return value


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
    limits: LimitSettings = Field(default_factory=LimitSettings)
    service: ServiceSettings = Field(default_factory=ServiceSettings)
    fleet: FleetSettings = Field(default_factory=FleetSettings)
    homeassistant: HomeAssistantSettings = Field(default_factory=HomeAssistantSettings)
    wyoming: WyomingSettings = Field(default_factory=WyomingSettings)

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
        return _with_secrets(Settings())
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


def _with_secrets(settings: Settings) -> Settings:
    """Read the password and the client key from where they are kept (a file, or a systemd
    credential), and check that every TLS file can be used, so that a broken one stops start-up
    with exit status 2 instead of failing in a reconnect loop."""
    mqtt = settings.mqtt
    update: dict[str, Any] = {}
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")

    def credential(name: str) -> Path | None:
        path = Path(credentials, name) if credentials else None
        return path if path is not None and path.exists() else None

    if mqtt.password is not None and mqtt.password_file is not None:
        raise ConfigError(
            "invalid setting QWEN_EDGE_MQTT__PASSWORD_FILE: mqtt.password is set too; keep one"
        )
    source, setting = mqtt.password_file, "QWEN_EDGE_MQTT__PASSWORD_FILE"
    if mqtt.password is None and source is None:
        source, setting = credential(CREDENTIAL_PASSWORD), f"credential {CREDENTIAL_PASSWORD}"
    if source is not None:
        update["password"] = SecretStr(_read_secret(source, setting))
    if mqtt.keyfile is None and (key := credential(CREDENTIAL_CLIENT_KEY)) is not None:
        if mqtt.certfile is None:
            raise ConfigError(
                f"invalid setting QWEN_EDGE_MQTT__CERTFILE: the systemd credential "
                f"{CREDENTIAL_CLIENT_KEY} is a client key, which needs its certificate"
            )
        update["keyfile"] = key
    if update:
        settings = settings.model_copy(update={"mqtt": mqtt.model_copy(update=update)})

    from .tls import client_context  # imports this module

    client_context(settings.mqtt)  # raises ConfigError
    return settings


def _read_secret(path: Path, setting: str) -> str:
    """The first line of a secret file, without its line end; never in an error message."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"invalid setting {setting}: cannot read {path}: {reason}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"invalid setting {setting}: {path} is not UTF-8 text") from None
    secret = text.split("\n", 1)[0].removesuffix("\r")
    if not secret:
        raise ConfigError(f"invalid setting {setting}: {path} is empty")
    return secret


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
