"""TLS and credentials for every broker connection the project makes (daemon, chat, fleet).

The TLS context always verifies the broker's certificate chain: there is no setting that turns it
off. `mqtt.tls_check_hostname = false` only stops requiring that the certificate names `mqtt.host`
(for a broker reached by an address its certificate does not list), never the chain.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import paho.mqtt.client as paho

from .settings import ConfigError, MqttSettings


def client_context(mqtt: MqttSettings) -> ssl.SSLContext | None:
    """The TLS context for `mqtt`, or None without TLS; ConfigError (one line, naming the
    setting) when a file cannot be read or used."""
    if mqtt.keyfile is not None and mqtt.certfile is None:
        raise ConfigError("invalid setting QWEN_EDGE_MQTT__KEYFILE: set without certfile")
    if not mqtt.use_tls:
        if mqtt.tls is False and (mqtt.ca_file or mqtt.certfile):
            raise ConfigError(
                "invalid setting QWEN_EDGE_MQTT__TLS: false, but ca_file or certfile is set"
            )
        return None
    for setting, path in (("CA_FILE", mqtt.ca_file), ("CERTFILE", mqtt.certfile)):
        _check_readable(setting, path)
    _check_readable("KEYFILE", mqtt.keyfile)
    # Without ca_file: the system's CA store (a broker with a public certificate).
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if mqtt.ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(mqtt.ca_file))
        except ssl.SSLError as exc:
            raise ConfigError(
                f"invalid setting QWEN_EDGE_MQTT__CA_FILE: {mqtt.ca_file} holds no usable CA "
                f"certificate ({exc.reason or exc})"
            ) from None
    if mqtt.certfile is not None:
        try:
            # The password callback keeps OpenSSL from prompting on a terminal for an
            # encrypted key; such a key then fails to load, with a clear error.
            context.load_cert_chain(
                str(mqtt.certfile), str(mqtt.keyfile or mqtt.certfile), password=lambda: b""
            )
        except ssl.SSLError as exc:
            raise ConfigError(
                f"invalid setting QWEN_EDGE_MQTT__CERTFILE: {mqtt.certfile} and its key "
                f"({'keyfile' if mqtt.keyfile else 'in the same file'}) are no usable "
                f"certificate and unencrypted private key ({exc.reason or exc})"
            ) from None
    context.check_hostname = mqtt.tls_check_hostname
    return context


def _check_readable(setting: str, path: Path | None) -> None:
    if path is None:
        return
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as exc:
        raise ConfigError(
            f"invalid setting QWEN_EDGE_MQTT__{setting}: cannot read {path}: {exc.strerror or exc}"
        ) from None


def apply_credentials(
    client: paho.Client, mqtt: MqttSettings, context: ssl.SSLContext | None = None
) -> None:
    """TLS (when configured) and user name/password on a paho client, before it connects.
    `context`: one already built by client_context(mqtt), so it is not built twice."""
    if context is None:
        context = client_context(mqtt)
    if context is not None:
        client.tls_set_context(context)
    if mqtt.username is not None:
        password = mqtt.password.get_secret_value() if mqtt.password is not None else None
        client.username_pw_set(mqtt.username, password)
