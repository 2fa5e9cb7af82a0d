"""Protocol v1 on the wire: topic names, the request schema, and reply-message payloads.

This is the one module that builds or parses topic strings (see docs/protocol.md).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
)

PROTOCOL_VERSION: Final = 1
ID_PATTERN: Final = r"^[A-Za-z0-9_.:-]{1,64}$"

Identifier = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
MAX_STOPS: Final = 4
MAX_STOP_CHARS: Final = 64
MAX_CHUNK_MS: Final = 2000


class ErrorCode(StrEnum):
    """Machine-readable reasons carried by an `error` message."""

    BAD_REQUEST = "bad_request"
    TOO_LARGE = "too_large"
    CONTEXT_OVERFLOW = "context_overflow"
    FORBIDDEN = "forbidden"
    BUSY = "busy"
    RATE_LIMITED = "rate_limited"
    TOO_MANY_CONVERSATIONS = "too_many_conversations"
    DUPLICATE = "duplicate"
    SHUTTING_DOWN = "shutting_down"
    NODE_LOST = "node_lost"
    INTERNAL = "internal"


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"


def _utf8_encodable(value: str) -> str:
    # JSON may carry lone surrogates ("\ud800"), which are not text and cannot be tokenised.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone UTF-16 surrogate") from None
    return value


class ChatRequest(BaseModel):
    """A request published by a device to {prefix}/{node}/request/{client_id}."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")

    request_id: Identifier
    conversation_id: Identifier = "default"
    message: Annotated[str, StringConstraints(min_length=1)]
    system: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=5)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0, le=100_000)] | None = None
    seed: Annotated[int, Field(ge=0, le=0xFFFFFFFF)] | None = None
    reset: bool = False
    # "json": any JSON object; an object: a JSON Schema the reply must validate against.
    format: Literal["json"] | dict[str, Any] | None = None
    stop: (
        Annotated[
            list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]],
            Field(max_length=MAX_STOPS),
        ]
        | None
    ) = None
    chunk_ms: Annotated[int, Field(ge=0, le=MAX_CHUNK_MS)] | None = None  # None: 0

    @field_validator("format", mode="before")
    @classmethod
    def _format_is_json_or_a_schema(cls, value: Any) -> Any:
        if value is None:
            return None
        if value != "json" and not isinstance(value, dict):
            raise ValueError('must be "json" or a JSON Schema object')
        # Converted here, so that a schema the grammar cannot enforce is refused before the
        # request is accepted. Imported late: the grammar needs llama.cpp, and this module
        # must stay importable without it.
        from .grammar import UnsupportedSchema, grammar_for

        try:
            grammar_for(value)
        except UnsupportedSchema as exc:
            raise ValueError(str(exc)) from None
        return value

    def model_post_init(self, context: Any, /) -> None:
        _utf8_encodable(self.message)
        if self.system is not None:
            _utf8_encodable(self.system)


class CancelRequest(BaseModel):
    """A cancel published to {prefix}/{node}/cancel/{client_id}."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")

    request_id: Identifier


@dataclass(frozen=True, slots=True)
class RequestError:
    """A request that cannot be served; where its error goes depends on what could be read."""

    code: ErrorCode
    message: str
    request_id: str | None = None
    conversation_id: str | None = None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in err["loc"]) or "payload"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {err['msg']}{more}"


def _readable_ids(payload: bytes, exc: ValidationError) -> tuple[str | None, str | None]:
    """request_id and conversation_id from a payload that failed validation, when they are valid."""
    if any("recursion limit" in e["msg"] for e in exc.errors() if e["type"] == "json_invalid"):
        # Nested deeper than the validator reads: unreadable. json.loads would go deeper or not
        # depending on how deep the calling thread's stack already is.
        return None, None
    try:
        # strict: invalid UTF-8 is unreadable. Integers are not needed here: skipping them also
        # skips Python's limit on their digits, which the validator does not have.
        data = json.loads(payload.decode("utf-8"), parse_int=_no_int)
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(data, dict):
        return None, None
    ids: list[str | None] = []
    for key, default in (("request_id", None), ("conversation_id", "default")):
        value = data.get(key, default)
        try:
            ids.append(_ID_CHECK.validate_python(value))
        except ValidationError:
            ids.append(None)
    return ids[0], ids[1]


def _no_int(literal: str) -> None:
    return None


_ID_CHECK: Final = TypeAdapter(Identifier, config=ConfigDict(strict=True))


def parse_request(payload: bytes, max_payload: int) -> ChatRequest | RequestError:
    """Turn a raw payload into a request or a typed error. Never raises."""
    if len(payload) > max_payload:
        return RequestError(
            ErrorCode.TOO_LARGE, f"payload is {len(payload)} bytes; the limit is {max_payload}"
        )
    try:
        return ChatRequest.model_validate_json(payload)
    except ValidationError as exc:
        request_id, conversation_id = _readable_ids(payload, exc)
        return RequestError(ErrorCode.BAD_REQUEST, _first_error(exc), request_id, conversation_id)
    except Exception as exc:
        return RequestError(ErrorCode.BAD_REQUEST, f"unreadable payload: {type(exc).__name__}")


def parse_cancel(payload: bytes, max_payload: int) -> CancelRequest | RequestError:
    """Turn a raw cancel payload into a cancel or a typed error. Never raises."""
    if len(payload) > max_payload:
        return RequestError(ErrorCode.TOO_LARGE, f"payload is {len(payload)} bytes")
    try:
        return CancelRequest.model_validate_json(payload)
    except ValidationError as exc:
        return RequestError(ErrorCode.BAD_REQUEST, _first_error(exc))
    except Exception as exc:
        return RequestError(ErrorCode.BAD_REQUEST, f"unreadable payload: {type(exc).__name__}")


class TopicKind(StrEnum):
    REQUEST = "request"
    CANCEL = "cancel"


@dataclass(frozen=True, slots=True)
class InboundTopic:
    kind: TopicKind
    client_id: str
    pooled: bool = False  # sent to the pool, {prefix}/{group}/..., not to this node


class WatchKind(StrEnum):
    REPLY = "reply"
    STATUS = "status"
    STATS = "stats"
    CLAIMS = "claims"


@dataclass(frozen=True, slots=True)
class WatchedTopic:
    """A message about other nodes: a pooled reply (`name` = client id), or a node's status,
    stats or claims (`name` = node id)."""

    kind: WatchKind
    name: str


@dataclass(frozen=True, slots=True)
class Topics:
    """Every topic of one node: {prefix}/{node}/..."""

    prefix: str
    node: str

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.node}"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def stats(self) -> str:
        return f"{self.base}/stats"

    @property
    def subscriptions(self) -> tuple[str, ...]:
        return (f"{self.base}/request/+", f"{self.base}/cancel/+")

    def request(self, client_id: str) -> str:
        return f"{self.base}/request/{client_id}"

    def cancel(self, client_id: str) -> str:
        return f"{self.base}/cancel/{client_id}"

    def reply(self, client_id: str, conversation_id: str) -> str:
        return f"{self.base}/reply/{client_id}/{conversation_id}"

    def reply_namespace(self, client_id: str) -> str:
        return f"{self.base}/reply/{client_id}/"

    def error(self, client_id: str) -> str:
        return f"{self.base}/error/{client_id}"

    def parse(self, topic: str) -> InboundTopic | None:
        """The kind and client id of a topic this node subscribes to, or None."""
        head, sep, rest = topic.rpartition("/")
        if not sep or not rest:
            return None
        for kind in TopicKind:
            if head == f"{self.base}/{kind.value}":
                return InboundTopic(kind, rest)
        return None

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
    return (f"{prefix}/+/status", f"{prefix}/+/stats")


def parse_node_topic(prefix: str, topic: str) -> WatchedTopic | None:
    """`{prefix}/{node}/status` or `{prefix}/{node}/stats` -> the node and which; else None."""
    head = f"{prefix}/"
    if not topic.startswith(head):
        return None
    node, sep, leaf = topic[len(head) :].partition("/")
    if not node or not sep or leaf not in (WatchKind.STATUS, WatchKind.STATS):
        return None
    return WatchedTopic(WatchKind(leaf), node)


# The client id of pool probes: a node proves at start that the broker hands it pooled requests
# by sending itself one (docs/protocol.md, "Fleet"). A probe is never served; a device account
# must not be named like it (with broker ACLs a device can use only its own account's id).
PROBE_CLIENT: Final = "$probe"


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
        return self.pool.node

    @property
    def shared_requests(self) -> str:
        """Each request published to the pool goes to exactly one subscriber of this."""
        return f"$share/{self.group}/{self.pool.base}/request/+"

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
            f"{self.pool.base}/cancel/+",
            self.probe_echo(self.own.node),
            self.claims("+"),
            node_filters(self.own.prefix)[0],
        )

    def parse(self, topic: str) -> InboundTopic | WatchedTopic | None:
        """A pooled request or cancel, a returned probe, a node's claims, or a node's status."""
        inbound = self.pool.parse(topic)
        if inbound is not None:
            return InboundTopic(inbound.kind, inbound.client_id, pooled=True)
        namespace = f"{self.pool.base}/reply/"
        if topic.startswith(namespace):
            client_id, _, rest = topic[len(namespace) :].partition("/")
            return WatchedTopic(WatchKind.REPLY, client_id) if client_id and rest else None
        head, _, node = topic.rpartition("/")
        if head == f"{self.pool.base}/claims" and node:
            return WatchedTopic(WatchKind.CLAIMS, node)
        return parse_node_topic(self.own.prefix, topic)


# -- claims: the pooled replies a node holds (docs/protocol.md, "Fleet") -------------------------

MAX_CLAIMS: Final = 10_000  # replies one claims message may list; a longer one is refused


def final_seq(max_tokens_limit: int) -> int:
    """A seq past every message a reply can have: `start`, at most one chunk per token, one
    chunk of held-back text, and its end make at most max_tokens_limit + 3 messages, numbered
    from 0. Another node's `node_lost` takes it, so it sorts after whatever the client saw."""
    return max_tokens_limit + 3


@dataclass(frozen=True, slots=True)
class Claim:
    """One pooled reply a node holds: where it goes and how it is told apart."""

    topic: str
    request_id: str
    correlation: bytes | None


@dataclass(frozen=True, slots=True)
class Claims:
    """Retained on {prefix}/{group}/claims/{node}: every pooled reply the node holds now.
    `boot` names the process (a new one after a restart); `final_seq` is the seq another node
    gives the `node_lost` that ends one of these replies."""

    node: str
    boot: str
    final_seq: int
    replies: tuple[Claim, ...]

    def encode(self) -> bytes:
        return encode(
            {
                "node": self.node,
                "boot": self.boot,
                "final_seq": self.final_seq,
                "replies": [
                    {
                        "topic": c.topic,
                        "request_id": c.request_id,
                        "correlation": None
                        if c.correlation is None
                        else base64.b64encode(c.correlation).decode("ascii"),
                    }
                    for c in self.replies
                ],
            }
        )


class _ClaimModel(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")

    topic: Annotated[str, StringConstraints(min_length=1)]
    request_id: str
    correlation: str | None = None


class _ClaimsModel(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")

    node: Annotated[str, StringConstraints(min_length=1)]
    boot: Annotated[str, StringConstraints(min_length=1)]
    final_seq: Annotated[int, Field(ge=1)]
    replies: Annotated[list[_ClaimModel], Field(max_length=MAX_CLAIMS)]


def parse_claims(payload: bytes) -> Claims | None:
    """A node's claims, or None for anything else (an empty payload: cleared). Never raises."""
    try:
        model = _ClaimsModel.model_validate_json(payload)
        replies = tuple(
            Claim(
                c.topic,
                c.request_id,
                None if c.correlation is None else base64.b64decode(c.correlation, validate=True),
            )
            for c in model.replies
        )
    except (ValidationError, ValueError):
        return None
    return Claims(model.node, model.boot, model.final_seq, replies)


def encode(message: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON, the encoding of every message the daemon sends."""
    return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
