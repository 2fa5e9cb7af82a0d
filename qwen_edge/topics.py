"""MQTT topics as values, and qwen-edge's topic tree: the one place that builds, parses and matches
topic strings (the node, the client, failover and the broker's ACL all ask it).

`Topic` and `Wildcard` are MQTT's syntax (as aiomqtt has them): validated, immutable, with the
matching rule next to them. `TopicTree` is the project's shape, `{prefix}/{target}/{leaf}/...`,
where `target` is a node id or a pool's group (a pooled request has a node's shape with the group
in the node's place); `Topics` and `FleetTopics` are the views one node or client needs of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final

MAX_TOPIC_BYTES: Final = 65_535  # MQTT's limit on a topic's UTF-8 length
SHARE: Final = "$share"
# The client id of pool probes: a node proves at start that the broker hands it pooled requests
# by sending itself one (docs/protocol.md, "Fleet"). A probe is never served; a device account
# must not be named like it (with broker ACLs a device can use only its own account's id).
PROBE_CLIENT: Final = "$probe"


def _check_length(value: str) -> None:
    if not value:
        raise ValueError("a topic is never empty")
    if "\0" in value or len(value.encode("utf-8", "surrogatepass")) > MAX_TOPIC_BYTES:
        raise ValueError(f"not a valid MQTT topic: {value[:80]!r}")


@dataclass(frozen=True, slots=True)
class Topic:
    """A topic a message is published on: no wildcards."""

    value: str

    def __post_init__(self) -> None:
        _check_length(self.value)
        if "+" in self.value or "#" in self.value:
            raise ValueError(f"a topic to publish on has no wildcards: {self.value!r}")

    def matches(self, wildcard: Wildcard | str) -> bool:
        target = wildcard if isinstance(wildcard, Wildcard) else Wildcard(wildcard)
        return target.matches(self)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class Wildcard:
    """A topic filter to subscribe with: `+` a whole level, `#` the last level and all below, and
    `$share/{group}/{filter}` a shared subscription (MQTT 5 section 4.8.2)."""

    value: str

    def __post_init__(self) -> None:
        _check_length(self.value)
        levels = self.filter.split("/")
        for i, level in enumerate(levels):
            if ("+" in level or "#" in level) and level not in ("+", "#"):
                raise ValueError(f"a wildcard takes a whole level: {self.value!r}")
            if level == "#" and i != len(levels) - 1:
                raise ValueError(f"# must be the last level: {self.value!r}")

    @property
    def share_group(self) -> str | None:
        """The group of a shared subscription, or None."""
        head, _, rest = self.value.partition("/")
        if head != SHARE:
            return None
        group, sep, _ = rest.partition("/")
        if not group or not sep or "+" in group or "#" in group:
            raise ValueError(f"$share needs a group and a filter: {self.value!r}")
        return group

    @property
    def filter(self) -> str:
        """The filter without a `$share/{group}/` head: what the broker matches topics against."""
        if not self.value.startswith(SHARE + "/"):
            return self.value
        _, _, rest = self.value.partition("/")
        group, sep, topic_filter = rest.partition("/")
        if not group or not sep or not topic_filter:
            raise ValueError(f"$share needs a group and a filter: {self.value!r}")
        return topic_filter

    def matches(self, topic: Topic | str) -> bool:
        """Whether a message on `topic` is delivered to this subscription (a `$` topic is not
        matched by a filter that starts with a wildcard, MQTT 5 section 4.7.2)."""
        value = topic.value if isinstance(topic, Topic) else topic
        pattern = self.filter.split("/")
        levels = value.split("/")
        if value.startswith("$") and pattern[0] in ("+", "#"):
            return False
        for i, want in enumerate(pattern):
            if want == "#":
                return True
            if i >= len(levels) or (want != "+" and want != levels[i]):
                return False
        return len(levels) == len(pattern)

    def __str__(self) -> str:
        return self.value


class Leaf(StrEnum):
    """The third part of every qwen-edge topic, `{prefix}/{target}/{leaf}/...`."""

    REQUEST = "request"  # .../request/{client_id}: a device's requests
    CANCEL = "cancel"  # .../cancel/{client_id}
    REPLY = "reply"  # .../reply/{client_id}/{conversation_id}: the node's reply messages
    ERROR = "error"  # .../error/{client_id}: errors for requests that could not be read
    STATUS = "status"  # .../status: a node's retained status
    STATS = "stats"  # .../stats
    CLAIMS = "claims"  # {prefix}/{group}/claims/{node}: the pooled replies a node holds


# How many levels follow each leaf.
_ARITY: Final = {
    Leaf.REQUEST: 1,
    Leaf.CANCEL: 1,
    Leaf.REPLY: 2,
    Leaf.ERROR: 1,
    Leaf.STATUS: 0,
    Leaf.STATS: 0,
    Leaf.CLAIMS: 1,
}
# A reply's last part is the rest of the topic: an MQTT 5 response topic may be any topic in the
# client's reply namespace ({prefix}/{target}/reply/{client_id}/...), with levels of its own.
_OPEN_ENDED: Final = frozenset({Leaf.REPLY})


@dataclass(frozen=True, slots=True)
class Address:
    """A parsed qwen-edge topic: whose (`target`), what (`leaf`), and the levels after it."""

    target: str
    leaf: Leaf
    args: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TopicTree:
    """Every qwen-edge topic under one `prefix` (which may itself have several levels)."""

    prefix: str

    def topic(self, target: str, leaf: Leaf, *args: str) -> str:
        """The topic string of a message (no wildcards checked: on the per-token path)."""
        if len(args) != _ARITY[leaf]:
            raise ValueError(f"{leaf} takes {_ARITY[leaf]} level(s) after it, not {len(args)}")
        return "/".join((self.prefix, target, leaf.value, *args))

    def filter(self, target: str, leaf: Leaf, *args: str) -> Wildcard:
        """A subscription or ACL pattern: any part may be `+`; `#` only as the last."""
        levels = (self.prefix, target, leaf.value, *args)
        if args and args[-1] == "#":
            if len(args) - 1 > _ARITY[leaf]:
                raise ValueError(f"{leaf} has {_ARITY[leaf]} level(s) after it")
        elif len(args) != _ARITY[leaf]:
            raise ValueError(f"{leaf} takes {_ARITY[leaf]} level(s) after it, not {len(args)}")
        return Wildcard("/".join(levels))

    def shared(self, group: str, wildcard: Wildcard) -> Wildcard:
        """`wildcard` as a shared subscription of `group`: each message to one subscriber."""
        return Wildcard(f"{SHARE}/{group}/{wildcard.filter}")

    def parse(self, topic: str) -> Address | None:
        """The address of a qwen-edge topic under this prefix, or None for any other topic."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            return None
        target, _, rest = topic[len(head) :].partition("/")
        name, _, rest = rest.partition("/")
        try:
            leaf = Leaf(name)
        except ValueError:
            return None
        arity = _ARITY[leaf]
        if leaf in _OPEN_ENDED:
            args = tuple(rest.split("/", arity - 1))
        else:
            args = tuple(rest.split("/")) if rest else ()
        if not target or len(args) != arity or not all(args):
            return None
        return Address(target, leaf, args)


# -- the views a node and a client use ------------------------------------------------------------


class TopicKind(StrEnum):
    REQUEST = Leaf.REQUEST.value
    CANCEL = Leaf.CANCEL.value


@dataclass(frozen=True, slots=True)
class InboundTopic:
    kind: TopicKind
    client_id: str
    pooled: bool = False  # sent to the pool, {prefix}/{group}/..., not to this node


class WatchKind(StrEnum):
    REPLY = Leaf.REPLY.value
    STATUS = Leaf.STATUS.value
    STATS = Leaf.STATS.value
    CLAIMS = Leaf.CLAIMS.value


@dataclass(frozen=True, slots=True)
class WatchedTopic:
    """A message about other nodes: a pooled reply (`name` = client id), or a node's status,
    stats or claims (`name` = node id)."""

    kind: WatchKind
    name: str


@dataclass(frozen=True, slots=True)
class Topics:
    """Every topic of one target, {prefix}/{target}/...: a node, or the pool's group (a pooled
    request has a node's shape with the group in the node's place)."""

    prefix: str
    target: str

    @property
    def tree(self) -> TopicTree:
        return TopicTree(self.prefix)

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.target}"

    @property
    def status(self) -> str:
        return self.tree.topic(self.target, Leaf.STATUS)

    @property
    def stats(self) -> str:
        return self.tree.topic(self.target, Leaf.STATS)

    @property
    def subscriptions(self) -> tuple[str, ...]:
        return tuple(
            self.tree.filter(self.target, Leaf(kind.value), "+").value for kind in TopicKind
        )

    def request(self, client_id: str) -> str:
        return self.tree.topic(self.target, Leaf.REQUEST, client_id)

    def cancel(self, client_id: str) -> str:
        return self.tree.topic(self.target, Leaf.CANCEL, client_id)

    def reply(self, client_id: str, conversation_id: str) -> str:
        # Built for every token: a plain f-string, the same string as tree.topic(...).
        return f"{self.base}/reply/{client_id}/{conversation_id}"

    def reply_namespace(self, client_id: str) -> str:
        return f"{self.base}/reply/{client_id}/"

    def error(self, client_id: str) -> str:
        return self.tree.topic(self.target, Leaf.ERROR, client_id)

    def parse(self, topic: str) -> InboundTopic | None:
        """The kind and client id of a topic this target's subscriptions deliver, or None."""
        address = self.tree.parse(topic)
        if address is None or address.target != self.target:
            return None
        if address.leaf not in (Leaf.REQUEST, Leaf.CANCEL):
            return None
        return InboundTopic(TopicKind(address.leaf.value), address.args[0])

    def allows_response_topic(self, client_id: str, topic: str) -> bool:
        """An MQTT 5 response topic is honoured only inside the requester's reply namespace."""
        namespace = self.reply_namespace(client_id)
        return (
            topic.startswith(namespace)
            and len(topic) > len(namespace)
            and not any(ch in topic for ch in "+#\0")
            and len(topic.encode("utf-8", "replace")) <= 1024
        )


def node_filters(prefix: str) -> tuple[str, str]:
    """Subscriptions to the status and the stats of every node under `prefix`."""
    tree = TopicTree(prefix)
    return (tree.filter("+", Leaf.STATUS).value, tree.filter("+", Leaf.STATS).value)


def parse_node_topic(prefix: str, topic: str) -> WatchedTopic | None:
    """`{prefix}/{node}/status` or `{prefix}/{node}/stats` -> the node and which; else None."""
    address = TopicTree(prefix).parse(topic)
    if address is None or address.leaf not in (Leaf.STATUS, Leaf.STATS):
        return None
    return WatchedTopic(WatchKind(address.leaf.value), address.target)


@dataclass(frozen=True, slots=True)
class FleetTopics:
    """The topics a node of a pool uses besides its own: the pool's, which have the shape of a
    node's with the group in place of the node id, and every node's status.

    The broker delivers a shared subscription's messages under the plain topic, without the
    `$share/{group}/` head, so pooled requests parse like the pool's request topic.
    """

    own: Topics
    pool: Topics

    @classmethod
    def of(cls, prefix: str, node: str, group: str) -> FleetTopics:
        if node == group:  # settings refuse this too; the topics would be ambiguous
            raise ValueError("a node may not be named like its pool")
        return cls(Topics(prefix, node), Topics(prefix, group))

    @property
    def group(self) -> str:
        return self.pool.target

    @property
    def shared_requests(self) -> str:
        """Each request published to the pool goes to exactly one subscriber of this."""
        tree = self.pool.tree
        return tree.shared(self.group, tree.filter(self.group, Leaf.REQUEST, "+")).value

    def claims(self, node: str) -> str:
        """Retained: the pooled replies `node` holds (see Claims)."""
        return f"{self.pool.base}/claims/{node}"

    @property
    def probe_request(self) -> str:
        """Where a node sends its pool probe: a pooled request of the reserved PROBE_CLIENT."""
        return self.pool.request(PROBE_CLIENT)

    def probe_echo(self, node: str) -> str:
        """Where a pool member returns a probe that `node` sent (and the pool gave to another
        member): a pooled reply topic of PROBE_CLIENT; each member watches its own."""
        return self.pool.reply(PROBE_CLIENT, node)

    @property
    def subscriptions(self) -> tuple[str, ...]:
        """What the pool link subscribes to: none carries other nodes' replies, so what a node
        receives grows with the pool's requests, not with its tokens (docs/protocol.md)."""
        return (
            self.shared_requests,
            self.pool.tree.filter(self.group, Leaf.CANCEL, "+").value,
            self.probe_echo(self.own.target),
            self.claims("+"),
            node_filters(self.own.prefix)[0],
        )

    def parse(self, topic: str) -> InboundTopic | WatchedTopic | None:
        """A pooled request or cancel, a returned probe, a node's claims, or a node's status."""
        address = self.pool.tree.parse(topic)
        if address is None:
            return None
        if address.target == self.group:
            if address.leaf in (Leaf.REQUEST, Leaf.CANCEL):
                return InboundTopic(TopicKind(address.leaf.value), address.args[0], pooled=True)
            if address.leaf in (Leaf.REPLY, Leaf.CLAIMS):
                return WatchedTopic(WatchKind(address.leaf.value), address.args[0])
        return parse_node_topic(self.own.prefix, topic)
