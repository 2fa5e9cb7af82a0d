"""Protocol v1 on the wire (docs/protocol.md): every payload as a typed value with one builder
(`encode`) and one parser: requests and cancels, reply messages (start, chunk, done, error), a
node's status, stats and claims. Topics are topics.py's; the names are re-exported here.

It imports nothing heavy (no llama.cpp, no paho): devices use it through qwen_edge.client.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Final, Literal, Self, TypedDict

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .formatschema import UnsupportedSchema, check_size
from .toolcalls import (
    MAX_DESCRIPTION_CHARS,
    MAX_TOOL_RESULTS,
    MAX_TOOLS,
    TOOL_NAME_PATTERN,
    ToolGrammar,
    call_schema,
)

PROTOCOL_VERSION: Final = 1
ID_PATTERN: Final = r"^[A-Za-z0-9_.:-]{1,64}$"

Identifier = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
MAX_STOPS: Final = 4
MAX_STOP_CHARS: Final = 64
MAX_CHUNK_MS: Final = 2000
# Validation context of a ChatRequest the node builds itself from its own configuration (the
# Wyoming adapter): {NODE_BUILT: True}. Its `format` is not held to the schema bounds.
NODE_BUILT: Final = "node_built"


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
    TOOL_CALLS = "tool_calls"


def _utf8_encodable(value: str) -> str:
    # JSON may carry lone surrogates ("\ud800"), which are not text and cannot be tokenised.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone UTF-16 surrogate") from None
    return value


_STRICT: Final = ConfigDict(strict=True, frozen=True, extra="ignore")


class ToolFunction(BaseModel):
    """A tool's function: its name, what it does, and the JSON Schema of its arguments (an
    object schema within the `format` subset; checked on the grammar thread)."""

    model_config = _STRICT

    name: Annotated[str, StringConstraints(pattern=TOOL_NAME_PATTERN)]
    description: Annotated[str, StringConstraints(max_length=MAX_DESCRIPTION_CHARS)] = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})

    @field_validator("parameters")
    @classmethod
    def _an_object_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        if value.get("type") != "object":
            raise ValueError('must be an object schema ({"type": "object", ...})')
        return value


class Tool(BaseModel):
    """One entry of a request's `tools`, in OpenAI's and Ollama's shape."""

    model_config = _STRICT

    type: Literal["function"]
    function: ToolFunction

    def wire(self) -> dict[str, Any]:
        """As a chat template expects it (and as it came)."""
        f = self.function
        return {
            "type": "function",
            "function": {"name": f.name, "description": f.description, "parameters": f.parameters},
        }


class _ChosenName(BaseModel):
    model_config = _STRICT

    name: Annotated[str, StringConstraints(pattern=TOOL_NAME_PATTERN)]


class ChosenTool(BaseModel):
    """`tool_choice` naming the one tool the reply must call."""

    model_config = _STRICT

    type: Literal["function"]
    function: _ChosenName


class ToolResult(BaseModel):
    """The device's answer to one call of the conversation's last reply."""

    model_config = _STRICT

    tool_call_id: Identifier
    content: str


class ChatRequest(BaseModel):
    """A request published by a device to {prefix}/{node}/request/{client_id}."""

    model_config = _STRICT

    request_id: Identifier
    conversation_id: Identifier = "default"
    # Required, except in a request that carries tool_results (the model goes on from them).
    message: Annotated[str, StringConstraints(min_length=1)] | None = None
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
    tools: Annotated[list[Tool], Field(min_length=1, max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["auto", "none", "required"] | ChosenTool | None = None  # None: auto
    tool_results: (
        Annotated[list[ToolResult], Field(min_length=1, max_length=MAX_TOOL_RESULTS)] | None
    ) = None

    @field_validator("format", mode="before")
    @classmethod
    def _format_is_json_or_a_schema(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return None
        if value != "json" and not isinstance(value, dict):
            raise ValueError('must be "json" or a JSON Schema object')
        # Only its size here (this runs on paho's network thread, before the client's limits
        # are charged): the node's grammar compiler checks the rest on a thread of its own,
        # while the request holds its queue place (formatschema, node/grammar.py). A request
        # the node builds itself (context NODE_BUILT) carries its operator's format: unbounded.
        if isinstance(value, dict) and not (info.context or {}).get(NODE_BUILT):
            try:
                check_size(value)
            except UnsupportedSchema as exc:
                raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _tools_fit(self) -> Self:
        # Cheap checks only (paho's network thread): the call schema's size; the grammar
        # thread checks the schemas themselves (formatschema, node/grammar.py).
        if self.message is None and not self.tool_results:
            raise ValueError("message: required (only a request with tool_results may omit it)")
        choice = self.tool_choice
        if self.tools is None:
            if choice not in (None, "auto", "none"):
                raise ValueError("tool_choice: needs tools")
            return self
        names = [t.function.name for t in self.tools]
        if len(set(names)) < len(names):
            raise ValueError("tools: two tools have the same name")
        if isinstance(choice, ChosenTool) and choice.function.name not in names:
            raise ValueError(f"tool_choice: no tool is named {choice.function.name!r}")
        if choice != "none" and (self.format is not None or self.stop):
            raise ValueError(
                "tools: cannot be combined with format or stop (unless tool_choice is none)"
            )
        grammar = self.tool_grammar()
        if grammar is not None:
            try:
                check_size(grammar.schema)
            except UnsupportedSchema as exc:
                raise ValueError(f"tools: {exc}") from None
        return self

    def tool_grammar(self) -> ToolGrammar | None:
        """What the reply is held to when the model may call a tool (None: no tools, or
        tool_choice none): the calls' schema, and whether text is allowed instead."""
        choice = self.tool_choice
        if self.tools is None or choice == "none":
            return None
        tools = self.tools
        if isinstance(choice, ChosenTool):
            tools = [t for t in tools if t.function.name == choice.function.name]
        schema = call_schema([(t.function.name, t.function.parameters) for t in tools])
        return ToolGrammar(schema, calls_only=choice not in (None, "auto"))

    def model_post_init(self, context: Any, /) -> None:
        if self.message is not None:
            _utf8_encodable(self.message)
        if self.system is not None:
            _utf8_encodable(self.system)
        for result in self.tool_results or ():
            _utf8_encodable(result.content)


# A request's envelope; every other field ChatRequest declares is an option a device may set.
REQUEST_ENVELOPE: Final = frozenset({"request_id", "conversation_id", "message"})
REQUEST_OPTIONS: Final = frozenset(ChatRequest.model_fields) - REQUEST_ENVELOPE


class RequestOptions(TypedDict, total=False):
    """The options of REQUEST_OPTIONS as keyword arguments of the client's stream() and ask(),
    for type checkers (`max_tokens` is their positional parameter). tests/unit checks that the
    two agree, so ChatRequest stays the one declaration of the request's fields."""

    system: str | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    seed: int | None
    reset: bool
    format: str | dict[str, Any] | None
    stop: Sequence[str] | None
    chunk_ms: int | None
    tools: Sequence[Any] | None  # the client turns functions into tool dicts
    tool_choice: str | dict[str, Any] | None
    tool_results: Sequence[dict[str, Any]] | None


class CancelRequest(BaseModel):
    """A cancel published to {prefix}/{node}/cancel/{client_id}."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")

    request_id: Identifier

    def encode(self) -> bytes:
        return encode({"request_id": self.request_id})


@dataclass(frozen=True, slots=True)
class RequestError:
    """A request that cannot be served; where its error goes depends on what could be read."""

    code: ErrorCode
    message: str
    request_id: str | None = None
    conversation_id: str | None = None
    size: int | None = None  # too_large: the refused payload's bytes


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
            ErrorCode.TOO_LARGE,
            f"payload is {len(payload)} bytes; the limit is {max_payload}",
            size=len(payload),
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
        return RequestError(
            ErrorCode.TOO_LARGE, f"payload is {len(payload)} bytes", size=len(payload)
        )
    try:
        return CancelRequest.model_validate_json(payload)
    except ValidationError as exc:
        return RequestError(ErrorCode.BAD_REQUEST, _first_error(exc))
    except Exception as exc:
        return RequestError(ErrorCode.BAD_REQUEST, f"unreadable payload: {type(exc).__name__}")


class PoolProbe(BaseModel):
    """The payload of a pool probe: who sent it (`probe`, a node id, which names the topic
    level it comes back on) and a nonce that tells this run's probe from an older one's."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")

    probe: Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[^/+#\x00]+$")]
    nonce: str

    def encode(self) -> bytes:
        return encode({"probe": self.probe, "nonce": self.nonce})

    @classmethod
    def parse(cls, payload: bytes) -> Self | None:
        try:
            return cls.model_validate_json(payload)
        except ValidationError:
            return None


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


# -- reply messages: start, chunks, then exactly one done or error, numbered by seq --------------
# Parsed leniently (extra fields ignored, codes and reasons as plain strings) so that a client
# understands a newer node; built with the fields in the order docs/protocol.md shows them.


# A JSON number kept as it came: an int stays an int, so a payload built from one is the same
# bytes as before it went through a model (2, not 2.0).
Number = int | float


class _ReplyMessage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    request_id: str | None  # None: an error for a request whose id could not be read
    seq: Annotated[int, Field(ge=0)]

    def _encode(self, kind: str, **fields: Any) -> bytes:
        """The message on the wire: type, request_id and seq first, then its own fields."""
        return encode({"type": kind, "request_id": self.request_id, "seq": self.seq, **fields})


class StartMessage(_ReplyMessage):
    type: Literal["start"] = "start"
    node: str
    model: str = ""

    def encode(self) -> bytes:
        return self._encode("start", node=self.node, model=self.model)


class ChunkMessage(_ReplyMessage):
    type: Literal["chunk"] = "chunk"
    text: str

    def encode(self) -> bytes:
        return ChunkEncoder(self.request_id)(self.seq, self.text)


class DoneMessage(_ReplyMessage):
    type: Literal["done"] = "done"
    finish_reason: str  # a FinishReason
    # finish_reason tool_calls only: [{"id", "name", "arguments"}], arguments a JSON object.
    tool_calls: list[dict[str, Any]] | None = None
    usage: dict[str, int] = Field(default_factory=dict)  # prompt/completion/cached_tokens
    timings: dict[str, Number | None] = Field(default_factory=dict)  # ttft_ms, tokens_per_s

    @classmethod
    def of(
        cls,
        request_id: str | None,
        seq: int,
        finish_reason: FinishReason,
        *,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int,
        ttft_ms: float | None,
        tokens_per_s: float | None,
        tool_calls: list[dict[str, Any]] | None = None,
    ) -> Self:
        """The done message of a reply, timings rounded as sent."""
        return cls(
            request_id=request_id,
            seq=seq,
            finish_reason=finish_reason.value,
            tool_calls=tool_calls,
            usage={
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "cached_tokens": cached_tokens,
            },
            timings={
                "ttft_ms": None if ttft_ms is None else round(ttft_ms, 1),
                "tokens_per_s": None if tokens_per_s is None else round(tokens_per_s, 2),
            },
        )

    def encode(self) -> bytes:
        if self.tool_calls is None:  # the bytes of every done before tools
            return self._encode(
                "done", finish_reason=self.finish_reason, usage=self.usage, timings=self.timings
            )
        return self._encode(
            "done",
            finish_reason=self.finish_reason,
            tool_calls=self.tool_calls,
            usage=self.usage,
            timings=self.timings,
        )


class ErrorMessage(_ReplyMessage):
    type: Literal["error"] = "error"
    code: str  # an ErrorCode; a newer node may send one this version does not know
    message: str = ""
    retry_after: Number | None = None  # seconds, for rate_limited
    # too_large: the refused payload's bytes, so that a client can tell which of its requests
    # it was (the node could not read the request id) without reading the English message.
    size: int | None = None

    def encode(self) -> bytes:
        extra: dict[str, Any] = {}
        if self.retry_after is not None:
            extra["retry_after"] = self.retry_after
        if self.size is not None:
            extra["size"] = self.size
        return self._encode("error", code=self.code, message=self.message, **extra)


ReplyMessage = StartMessage | ChunkMessage | DoneMessage | ErrorMessage
_REPLY: Final = TypeAdapter[ReplyMessage](Annotated[ReplyMessage, Field(discriminator="type")])


def parse_reply(payload: bytes) -> ReplyMessage | None:
    """A reply message, or None for anything else (not ours to judge: ignored)."""
    try:
        return _REPLY.validate_json(payload)
    except ValidationError:
        return None


def node_lost(request_id: str, seq: int, node: str, reason: str) -> ErrorMessage:
    """The error a pool member sends in place of the end of a reply whose node vanished."""
    return ErrorMessage(
        request_id=request_id,
        seq=seq,
        code=ErrorCode.NODE_LOST,
        message=f"node {node} went offline ({reason}) before finishing this reply; "
        "send the request again",
    )


# One encoder, not json.dumps(..., ensure_ascii=False): that builds a new encoder on every call,
# and a chunk is built for every token. The output is the same.
_encode_text: Final = json.JSONEncoder(ensure_ascii=False).encode


class ChunkEncoder:
    """The chunk messages of one reply, built on the per-token path: they differ only in seq
    and text, so the head is encoded once. The same bytes as ChunkMessage(...).encode()."""

    __slots__ = ("_head",)

    def __init__(self, request_id: str | None) -> None:
        # Request ids are ASCII (ID_PATTERN), so json.dumps's default escaping changes nothing.
        self._head = b'{"type":"chunk","request_id":%s,"seq":' % json.dumps(request_id).encode(
            "utf-8"
        )

    def __call__(self, seq: int, text: str) -> bytes:
        return b'%s%d,"text":%s}' % (self._head, seq, _encode_text(text).encode("utf-8"))


# -- a node's status and stats: retained, under {prefix}/{node}/status and .../stats -------------


class NodeState(StrEnum):
    STARTING = "starting"
    ONLINE = "online"
    OFFLINE = "offline"


class Status(BaseModel):
    """What a node is doing; also its Last Will (offline, "connection lost").

    Only `state` is needed to parse one: readers show what they find."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    state: str  # a NodeState
    node: str | None = None
    model: str | None = None
    version: str | None = None
    protocol: int | None = PROTOCOL_VERSION
    group: str | None = None  # the pool it serves; pool members count one another by it
    slots: int | None = None  # online only
    pid: int | None = None  # starting and online: `doctor` finds the daemon's memory by it
    reason: str | None = None  # offline only: why

    @property
    def online(self) -> bool:
        return self.state == NodeState.ONLINE

    def encode(self) -> bytes:
        body: dict[str, Any] = {
            "state": self.state,
            "node": self.node,
            "model": self.model,
            "version": self.version,
            "protocol": self.protocol,
        }
        for key in ("group", "slots", "pid", "reason"):
            value = getattr(self, key)
            if value is not None:
                body[key] = value
        return encode(body)

    @classmethod
    def parse(cls, payload: bytes) -> Self | None:
        """A status, or None for anything else (an empty payload: a status cleared)."""
        try:
            return cls.model_validate_json(payload)
        except ValidationError:
            return None


class Stats(BaseModel):
    """A node's load figures, published every fleet.stats_interval seconds.

    Every field may be missing when parsed: readers show what they find."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    node: str | None = None
    model: str | None = None
    uptime_s: Number | None = None
    slots: int | None = None
    active_slots: int | None = None
    queue_depth: int | None = None
    tokens_per_s: Number | None = None  # every slot's tokens since the last stats message
    requests_done: int | None = None
    ts: Number | None = None  # Unix time of these figures

    def encode(self) -> bytes:
        return encode(self.model_dump())

    @classmethod
    def parse(cls, payload: bytes) -> Self | None:
        try:
            return cls.model_validate_json(payload)
        except ValidationError:
            return None
