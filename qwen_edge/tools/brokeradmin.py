"""The production broker's accounts and rights, held by mosquitto 2.0's dynamic security plugin:
the roles (one function), the first dynamic-security.json, and live changes over $CONTROL.

scripts/broker-setup is the front (mosquitto and openssl glue); this module does everything that
touches a password, so that none is ever on a command line or in an environment: passwords come
from a file or stdin (`USER:PASS` lines), the admin's and the sweeper's from root-only files in
the set-up directory, and go to the broker inside an MQTT connection (docs/security.md).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import queue
import re
import secrets
import stat
import sys
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

from pydantic import SecretStr

from .. import mqttclient
from ..settings import MqttSettings
from ..topics import PROBE_CLIENT, Leaf, TopicTree

ADMIN_USER: Final = "qwen-edge-admin"
SWEEPER_USER: Final = "qwen-edge-sweeper"
CONTROL_TOPIC: Final = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC: Final = f"{CONTROL_TOPIC}/response"
# What mosquitto 2.0.11 itself writes (`mosquitto_ctrl dynsec init`, createClient): PBKDF2-HMAC-
# SHA512, a 12-byte salt, 101 iterations; the plugin reads `iterations` per client.
PBKDF2_ITERATIONS: Final = 101
SALT_BYTES: Final = 12
# The broker's own subdirectory of the set-up directory: it rewrites dynamic-security.json there
# (by rename) and keeps its persistence file there. Root never reads anything in it.
STATE_DIR: Final = "state"
DYNSEC_FILE: Final = "dynamic-security.json"
SETUP_FILE: Final = "setup.env"
ADMIN_PASSWORD_FILE: Final = "admin.password"
SWEEPER_PASSWORD_FILE: Final = "sweeper.password"
REPLY_TIMEOUT_S: Final = 10.0

_ACCOUNT = re.compile(r"[A-Za-z0-9_.-]{1,64}")
Acl = tuple[str, str]  # (acltype, topic filter)


class SetupError(Exception):
    """A refusal with one line for the operator (exit status 2)."""


@dataclass(frozen=True, slots=True)
class Names:
    """The topic names the nodes use (their settings) that the rights are written for."""

    prefix: str = "qwen-edge"
    group: str = "pool"
    ha_prefix: str = "homeassistant"


def device_role(user: str) -> str:
    return f"qwen-edge-device-{user}"


def role_acls(names: Names, devices: Iterable[str] = ()) -> dict[str, list[Acl]]:
    """Every role and its rights: the one place they are written. Nothing is allowed unless a
    role says so (the default denies publishing, subscribing and receiving), so each role
    names what it may receive beside what it may subscribe to."""
    tree, g, ha = TopicTree(names.prefix), names.group, names.ha_prefix
    any_ = "+"

    def pattern(target: str, leaf: Leaf, *args: str) -> str:
        return tree.filter(target, leaf, *args).value

    def read(*filters: str) -> list[Acl]:
        return [(kind, f) for f in filters for kind in ("subscribePattern", "publishClientReceive")]

    def send(*topics: str) -> list[Acl]:
        return [("publishClientSend", t) for t in topics]

    requests = (pattern(any_, Leaf.REQUEST, any_), pattern(any_, Leaf.CANCEL, any_))
    node_state = (pattern(any_, Leaf.STATUS), pattern(any_, Leaf.STATS))
    roles: dict[str, list[Acl]] = {
        # The plugin's commands and nothing else: not every device's replies.
        "qwen-edge-admin": read(f"{CONTROL_TOPIC}/#") + send(f"{CONTROL_TOPIC}/#"),
        # Clears retained requests and cancels (docs/security.md, "Retained messages").
        "qwen-edge-sweeper": read(*requests) + send(*requests),
        # What every device may read: each node's status and load.
        "qwen-edge-device": read(*node_state),
        # Every node may serve any client and ends other nodes' pooled replies when they die, so
        # they share one account. Its own requests and cancels, the pool's (one share of them,
        # checked on the filter as sent), the pool's claims (failover), every node's status,
        # Home Assistant's birth message, and the pool probe's echo (docs/protocol.md).
        "qwen-edge-daemon": send(
            pattern(any_, Leaf.REPLY, "#"), pattern(any_, Leaf.ERROR, any_), *node_state, f"{ha}/#"
        )
        + read(
            *requests,
            pattern(g, Leaf.CLAIMS, any_),
            pattern(any_, Leaf.STATUS),
            f"{ha}/status",
            pattern(g, Leaf.REPLY, PROBE_CLIENT, any_),
        )
        + [("subscribePattern", tree.shared(g, tree.filter(g, Leaf.REQUEST, any_)).value)]
        + send(tree.topic(g, Leaf.REQUEST, PROBE_CLIENT), pattern(g, Leaf.CLAIMS, any_)),
        # Home Assistant: the discovery configs, every node's status and stats; its birth message.
        "qwen-edge-homeassistant": read(f"{ha}/#", *node_state) + send(f"{ha}/status"),
    }
    for user in devices:
        # Its own topics by name; '+' is every node and the pool.
        roles[device_role(user)] = send(
            pattern(any_, Leaf.REQUEST, user), pattern(any_, Leaf.CANCEL, user)
        ) + read(pattern(any_, Leaf.REPLY, user, "#"), pattern(any_, Leaf.ERROR, user))
    return roles


# -- accounts and passwords ----------------------------------------------------------------------


def check_account(user: str) -> str:
    """An account name is an MQTT user name and, for a device, a topic level: kept plain."""
    if ":" in user:
        raise SetupError(
            f"'{user.split(':', 1)[0]}:...': passwords never go on the command line (any local "
            "user sees them in ps), and this one has been: change it. Name the account alone "
            "and give USER:PASS lines in a file (--passwords FILE, mode 0600) or on stdin "
            "(--passwords -)"
        )
    if not _ACCOUNT.fullmatch(user):
        raise SetupError(f"bad account name '{user}': use letters, digits and . _ - only")
    return user


def check_device(user: str) -> str:
    """A device is bound to client id `user`: named like a node's, it could take its session."""
    check_account(user)
    if user.startswith("qwen-edge-"):
        raise SetupError(
            f"device '{user}': names starting with qwen-edge- are the nodes' client ids"
        )
    return user


def read_passwords(source: str) -> dict[str, str]:
    """USER:PASS lines from a file (not readable by others) or from stdin ('-')."""
    if source == "-":
        return parse_passwords(sys.stdin)
    path = Path(source)
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SetupError(f"--passwords {path}: others may read it; chmod 600 {path}")
        with path.open(encoding="utf-8") as lines:
            return parse_passwords(lines)
    except OSError as exc:
        raise SetupError(f"--passwords {path}: {exc.strerror or exc}") from exc


def parse_passwords(lines: IO[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.rstrip("\r\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not password:
            raise SetupError(f"--passwords line {number}: give USER:PASS")
        found[check_account(user)] = password
    return found


def passwords_for(users: Iterable[str], source: str | None) -> dict[str, str]:
    wanted = list(users)
    if not wanted:
        return {}
    if source is None:
        raise SetupError("give the accounts' passwords with --passwords FILE or --passwords -")
    given = read_passwords(source)
    missing = [u for u in wanted if u not in given]
    if missing:
        raise SetupError(f"--passwords: no password for {', '.join(missing)}")
    return {u: given[u] for u in wanted}


def hashed(password: str, salt: bytes | None = None) -> dict[str, Any]:
    """The password fields of a client in dynamic-security.json (the plugin's own format)."""
    salt = salt if salt is not None else os.urandom(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
    return {
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": PBKDF2_ITERATIONS,
    }


def new_password() -> str:
    return secrets.token_urlsafe(24)


@dataclass(frozen=True, slots=True)
class Accounts:
    """The first accounts: user -> password for each kind."""

    daemons: dict[str, str]
    devices: dict[str, str]
    viewers: dict[str, str]  # Home Assistant
    admin: str
    sweeper: str


def initial_config(names: Names, accounts: Accounts) -> dict[str, Any]:
    """A new dynamic-security.json. The defaults are written here rather than set with
    setDefaultACLAccess, which in mosquitto 2.0.11 reports success for publishClientReceive
    and keeps `allow`."""
    roles = role_acls(names, accounts.devices)
    clients: list[dict[str, Any]] = []

    def client(user: str, password: str, role_names: list[str], bound: bool) -> None:
        entry = {"username": user, **hashed(password)}
        if bound:  # the only MQTT client id this account may connect with
            entry["clientid"] = user
        entry["roles"] = [{"rolename": r} for r in role_names]
        clients.append(entry)

    client(ADMIN_USER, accounts.admin, ["qwen-edge-admin"], False)
    # Not bound either: a one-shot sweep must not take the running watcher's connection.
    client(SWEEPER_USER, accounts.sweeper, ["qwen-edge-sweeper"], False)
    for user, password in accounts.daemons.items():
        client(user, password, ["qwen-edge-daemon"], False)  # every node uses two client ids
    for user, password in accounts.devices.items():
        client(user, password, [device_role(user), "qwen-edge-device"], True)
    for user, password in accounts.viewers.items():
        client(user, password, ["qwen-edge-homeassistant"], True)
    return {
        "clients": clients,
        "groups": [],
        "roles": [
            {"rolename": name, "acls": [{"acltype": k, "topic": t, "allow": True} for k, t in acls]}
            for name, acls in roles.items()
        ],
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": True,
        },
    }


# -- the set-up directory ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Setup:
    """What live changes need to reach the running broker (DIR/setup.env, parsed, never
    sourced)."""

    directory: Path
    port: int
    tls: bool
    host: str
    names: Names

    @classmethod
    def load(cls, directory: Path) -> Setup:
        path = directory / SETUP_FILE
        trusted(directory)
        trusted(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise SetupError(
                f"{path}: {exc.strerror or exc}: is {directory} made by broker-setup?"
            ) from exc
        values: dict[str, str] = {}
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep and not key.startswith("#"):
                values[key.strip()] = value.strip().strip("'\"")
        try:
            return cls(
                directory,
                int(values["port"]),
                values.get("tls", "0") == "1",
                values.get("ctrl_host", "127.0.0.1"),
                Names(
                    values.get("prefix", "qwen-edge"),
                    values.get("group", "pool"),
                    values.get("ha_prefix", "homeassistant"),
                ),
            )
        except (KeyError, ValueError) as exc:
            raise SetupError(f"{path}: unreadable ({exc})") from exc

    def write(self) -> None:
        lines = [
            "# written by scripts/broker-setup; read (not sourced) by it",
            f"port={self.port}",
            f"tls={int(self.tls)}",
            f"prefix={self.names.prefix}",
            f"group={self.names.group}",
            f"ha_prefix={self.names.ha_prefix}",
            f"admin_user={ADMIN_USER}",
            f"ctrl_host={self.host}",
        ]
        write_private(self.directory / SETUP_FILE, "\n".join(lines) + "\n", 0o644)

    def mqtt(self, user: str, password_file: str) -> MqttSettings:
        password = first_line(trusted(self.directory / password_file))
        if self.tls:
            trusted(self.directory / "certs")
            trusted(self.directory / "certs" / "ca.crt")
        return MqttSettings(
            host=self.host,
            port=self.port,
            username=user,
            password=SecretStr(password),
            ca_file=self.directory / "certs" / "ca.crt" if self.tls else None,
        )


def trusted(path: Path) -> Path:
    """`path` if only root (or whoever runs this) can change it: what decides where the admin's
    password goes, and which broker it trusts, is never the broker user's to write."""
    try:
        st = path.stat()
    except OSError as exc:
        raise SetupError(f"{path}: {exc.strerror or exc}: is it made by broker-setup?") from exc
    if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
        raise SetupError(
            f"{path} may be changed by another user than root (owner uid {st.st_uid}, mode "
            f"{st.st_mode & 0o777:o}): not trusted; made by an older broker-setup? See "
            "docs/security.md, 'Upgrading a broker made before'"
        )
    return path


def first_line(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").splitlines()[0].strip()
    except (OSError, IndexError) as exc:
        raise SetupError(f"cannot read {path}: {exc}") from exc


def write_private(path: Path, text: str, mode: int = 0o600) -> None:
    """Write a file root keeps: made afresh with `mode` (never through an existing link)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    os.chmod(path, mode)


# -- the running broker --------------------------------------------------------------------------


@dataclass
class Control:
    """One connection to the running broker as the admin account, for dynsec commands."""

    mqtt: MqttSettings

    def __post_init__(self) -> None:
        self._replies: queue.Queue[bytes] = queue.Queue()
        self._ready: queue.Queue[int] = queue.Queue()
        self._client = mqttclient.new_client(self.mqtt, f"{ADMIN_USER}-{uuid.uuid4().hex[:8]}")
        self._client.on_connect = lambda c, u, f, rc, p: self._ready.put(rc.value)
        self._client.on_subscribe = lambda c, u, mid, rcs, p: self._ready.put(rcs[0].value)
        self._client.on_message = lambda c, u, msg: self._replies.put(bytes(msg.payload))

    def __enter__(self) -> Control:
        try:
            mqttclient.connect(self._client, self.mqtt)
        except OSError as exc:
            raise SetupError(
                f"cannot reach the broker at {self.mqtt.host}:{self.mqtt.port} ({exc}): "
                "is it running?"
            ) from exc
        self._client.loop_start()
        self._expect("the admin account's connection", 0)
        self._client.subscribe(RESPONSE_TOPIC, qos=1)
        self._expect(f"subscribing to {RESPONSE_TOPIC}", 1)
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _expect(self, what: str, code: int) -> None:
        try:
            got = self._ready.get(timeout=REPLY_TIMEOUT_S)
        except queue.Empty:
            raise SetupError(f"{what}: no answer from the broker") from None
        if got != code:
            raise SetupError(f"{what}: refused by the broker (reason {got:#x})")

    def run(self, commands: list[dict[str, Any]], tolerate: str = "") -> list[dict[str, Any]]:
        """Send `commands` in one message; their responses. SetupError on the first error
        (unless its text contains `tolerate`)."""
        self._client.publish(CONTROL_TOPIC, json.dumps({"commands": commands}), qos=1)
        try:
            answer = json.loads(self._replies.get(timeout=REPLY_TIMEOUT_S))
        except queue.Empty:
            raise SetupError(f"{commands[0]['command']}: no answer from the broker") from None
        responses: list[dict[str, Any]] = answer.get("responses", [])
        for sent, response in zip(commands, responses, strict=False):
            error = response.get("error")
            if error and not (tolerate and tolerate in error):
                name = sent.get("username") or sent.get("rolename") or ""
                raise SetupError(f"dynsec {sent['command']} {name}: {error}")
        return responses

    def default_acl_access(self) -> dict[str, bool]:
        response = self.run([{"command": "getDefaultACLAccess"}])[0]
        return {a["acltype"]: a["allow"] for a in response["data"]["acls"]}


def role_commands(name: str, acls: list[Acl]) -> list[dict[str, Any]]:
    return [{"command": "createRole", "rolename": name}] + [
        {"command": "addRoleACL", "rolename": name, "acltype": k, "topic": t, "allow": True}
        for k, t in acls
    ]


def add_device_commands(names: Names, user: str, password: str) -> list[dict[str, Any]]:
    role = device_role(user)
    return [
        *role_commands(role, role_acls(names, [user])[role]),
        {"command": "createClient", "username": user, "password": password, "clientid": user},
        {"command": "addClientRole", "username": user, "rolename": role},
        {"command": "addClientRole", "username": user, "rolename": "qwen-edge-device"},
    ]


def remove_device_commands(user: str) -> list[dict[str, Any]]:
    return [
        {"command": "deleteClient", "username": user},
        {"command": "deleteRole", "rolename": device_role(user)},
    ]


def ensure_sweeper(setup: Setup, control: Control) -> None:
    """A set-up directory from before the sweeper account existed gets it now."""
    password_file = setup.directory / SWEEPER_PASSWORD_FILE
    if password_file.exists():
        return
    password = new_password()
    control.run(
        [
            *role_commands("qwen-edge-sweeper", role_acls(setup.names)["qwen-edge-sweeper"]),
            {"command": "createClient", "username": SWEEPER_USER, "password": password},
            {"command": "addClientRole", "username": SWEEPER_USER, "rolename": "qwen-edge-sweeper"},
        ],
        tolerate="already",  # a sweeper whose password file was lost: given a new password
    )
    control.run([{"command": "setClientPassword", "username": SWEEPER_USER, "password": password}])
    write_private(password_file, password + "\n")


# -- commands --------------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> None:
    """A new set-up directory's accounts: DIR/state/dynamic-security.json and the root-only
    admin and sweeper password files."""
    directory = Path(args.dir)
    names = Names(args.prefix, args.group, args.ha_prefix)
    daemons = [check_account(u) for u in args.daemon]
    devices = [check_device(u) for u in args.device]
    viewers = [check_device(u) for u in args.homeassistant]
    given = passwords_for([*daemons, *devices, *viewers], args.passwords)
    accounts = Accounts(
        {u: given[u] for u in daemons},
        {u: given[u] for u in devices},
        {u: given[u] for u in viewers},
        admin=new_password(),
        sweeper=new_password(),
    )
    state = directory / STATE_DIR
    if (state / DYNSEC_FILE).exists() or (directory / DYNSEC_FILE).exists():
        raise SetupError(f"{directory} already holds a broker; add devices with --add-device")
    # Root's directory (the broker only passes through it to state/ and certs/).
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    directory.chmod(0o755)
    state.mkdir(mode=0o700, exist_ok=True)
    config = json.dumps(initial_config(names, accounts), indent=1)
    write_private(state / DYNSEC_FILE, config + "\n")
    write_private(directory / ADMIN_PASSWORD_FILE, accounts.admin + "\n")
    write_private(directory / SWEEPER_PASSWORD_FILE, accounts.sweeper + "\n")
    Setup(directory, args.port, args.tls, args.ctrl_host, names).write()
    for kind, users in (("daemon", daemons), ("device", devices), ("Home Assistant", viewers)):
        for user in users:
            print(f"broker-setup: {kind} account {user}", file=sys.stderr)


def cmd_add_device(args: argparse.Namespace) -> None:
    setup = Setup.load(Path(args.dir))
    users = [check_device(u) for u in args.device]
    given = passwords_for(users, args.passwords)
    with Control(setup.mqtt(ADMIN_USER, ADMIN_PASSWORD_FILE)) as control:
        ensure_sweeper(setup, control)
        for user in users:
            control.run(add_device_commands(setup.names, user, given[user]))
            print(f"broker-setup: device {user}: its topics, client id {user}", file=sys.stderr)


def cmd_remove_device(args: argparse.Namespace) -> None:
    from .retainsweep import sweep_once

    setup = Setup.load(Path(args.dir))
    users = [check_account(u) for u in args.device]
    with Control(setup.mqtt(ADMIN_USER, ADMIN_PASSWORD_FILE)) as control:
        ensure_sweeper(setup, control)
        for user in users:
            # First the account (which also ends its connection), then what it left behind.
            control.run(remove_device_commands(user))
    cleared = sweep_once(setup.mqtt(SWEEPER_USER, SWEEPER_PASSWORD_FILE), setup.names.prefix)
    for user in users:
        print(f"broker-setup: removed device {user}", file=sys.stderr)
    print(f"broker-setup: cleared {cleared} retained requests/cancels", file=sys.stderr)


def cmd_sweep(args: argparse.Namespace) -> None:
    from .retainsweep import sweep_once, watch

    setup = Setup.load(Path(args.dir))
    if args.sweeper_password_file is None:
        with Control(setup.mqtt(ADMIN_USER, ADMIN_PASSWORD_FILE)) as control:
            ensure_sweeper(setup, control)
        mqtt = setup.mqtt(SWEEPER_USER, SWEEPER_PASSWORD_FILE)
    else:  # the watcher's service: the password as a systemd credential
        mqtt = setup.mqtt(SWEEPER_USER, args.sweeper_password_file)
    if args.watch:
        watch(mqtt, setup.names.prefix, args.resweep)
    else:
        cleared = sweep_once(mqtt, setup.names.prefix)
        print(f"broker-setup: cleared {cleared} retained requests/cancels", file=sys.stderr)


def cmd_default_acl(args: argparse.Namespace) -> None:
    setup = Setup.load(Path(args.dir))
    with Control(setup.mqtt(ADMIN_USER, ADMIN_PASSWORD_FILE)) as control:
        print(json.dumps(control.default_acl_access()))


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="broker-setup", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init")
    init.add_argument("--dir", required=True)
    init.add_argument("--port", type=int, required=True)
    init.add_argument("--tls", type=int, choices=(0, 1), default=0)
    init.add_argument("--ctrl-host", default="127.0.0.1")
    init.add_argument("--prefix", default="qwen-edge")
    init.add_argument("--group", default="pool")
    init.add_argument("--ha-prefix", default="homeassistant")
    for kind in ("daemon", "device", "homeassistant"):
        init.add_argument(f"--{kind}", action="append", default=[])
    init.add_argument("--passwords")
    for name in ("add-device", "remove-device", "sweep", "default-acl"):
        one = sub.add_parser(name)
        one.add_argument("--dir", required=True)
        if name in ("add-device", "remove-device"):
            one.add_argument("--device", action="append", required=True)
        if name == "add-device":
            one.add_argument("--passwords")
        if name == "sweep":
            one.add_argument("--watch", action="store_true")
            one.add_argument("--resweep", type=float, default=60.0)
            one.add_argument("--sweeper-password-file")
    return top


COMMANDS: Final = {
    "init": cmd_init,
    "add-device": cmd_add_device,
    "remove-device": cmd_remove_device,
    "sweep": cmd_sweep,
    "default-acl": cmd_default_acl,
}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except SetupError as exc:
        print(f"broker-setup: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
