"""Protocol v1: topic names and the parsing of request/cancel payloads (no broker, no model)."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from qwen_edge.protocol import (
    ID_PATTERN,
    PROTOCOL_VERSION,
    CancelRequest,
    ChatRequest,
    ChunkEncoder,
    ChunkMessage,
    DoneMessage,
    ErrorCode,
    ErrorMessage,
    FinishReason,
    NodeState,
    PoolProbe,
    RequestError,
    StartMessage,
    Stats,
    Status,
    encode,
    node_lost,
    parse_cancel,
    parse_reply,
    parse_request,
)
from qwen_edge.topics import InboundTopic, TopicKind, Topics

LIMIT = 65536
BIG = 64 * 1024 * 1024
TOPICS = Topics("qwen-edge", "node1")
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def payload(**fields: Any) -> bytes:
    return json.dumps(fields).encode("utf-8")


_MISSING: Any = object()


def request(**overrides: Any) -> bytes:
    """A valid request with some fields changed; _MISSING leaves a field out."""
    fields: dict[str, Any] = {"request_id": "r1", "message": "Hello"}
    fields.update(overrides)
    return payload(**{k: v for k, v in fields.items() if v is not _MISSING})


def bad(raw: bytes, max_payload: int = LIMIT) -> RequestError:
    result = parse_request(raw, max_payload)
    assert isinstance(result, RequestError), result
    return result


def assert_well_formed(result: object) -> None:
    """What every parse outcome must look like, whatever the input."""
    assert isinstance(result, ChatRequest | CancelRequest | RequestError)
    if isinstance(result, RequestError):
        assert isinstance(result.code, ErrorCode)
        assert result.code in (ErrorCode.BAD_REQUEST, ErrorCode.TOO_LARGE)
        assert isinstance(result.message, str)
        assert result.message
        for ident in (result.request_id, result.conversation_id):
            assert ident is None or re.fullmatch(ID_PATTERN, ident)
    elif isinstance(result, ChatRequest):
        assert result.message
        result.message.encode("utf-8")
        if result.system is not None:
            result.system.encode("utf-8")


# -- topics ------------------------------------------------------------------------------------


def test_topic_names_follow_prefix_and_node() -> None:
    assert TOPICS.base == "qwen-edge/node1"
    assert TOPICS.status == "qwen-edge/node1/status"
    assert TOPICS.request("dev1") == "qwen-edge/node1/request/dev1"
    assert TOPICS.cancel("dev1") == "qwen-edge/node1/cancel/dev1"
    assert TOPICS.reply("dev1", "conv-7") == "qwen-edge/node1/reply/dev1/conv-7"
    assert TOPICS.reply_namespace("dev1") == "qwen-edge/node1/reply/dev1/"
    assert TOPICS.error("dev1") == "qwen-edge/node1/error/dev1"


def test_subscriptions_cover_request_and_cancel_of_any_client() -> None:
    assert set(TOPICS.subscriptions) == {
        "qwen-edge/node1/request/+",
        "qwen-edge/node1/cancel/+",
    }


def test_request_and_cancel_topics_parse_to_kind_and_client() -> None:
    assert TOPICS.parse("qwen-edge/node1/request/dev1") == InboundTopic(TopicKind.REQUEST, "dev1")
    assert TOPICS.parse("qwen-edge/node1/cancel/dev-2") == InboundTopic(TopicKind.CANCEL, "dev-2")


def test_multi_level_prefix_parses() -> None:
    topics = Topics("site/a", "n")
    assert topics.parse("site/a/n/request/c") == InboundTopic(TopicKind.REQUEST, "c")
    assert topics.parse("site/n/request/c") is None


@pytest.mark.parametrize(
    "topic",
    [
        "qwen-edge/node2/request/dev1",  # another node
        "qwen-edge/node/request/dev1",  # a node whose name is a prefix of ours
        "qwen-edge/node1x/request/dev1",
        "other/node1/request/dev1",  # another prefix
        "qwen-edgeX/node1/request/dev1",
        "x/qwen-edge/node1/request/dev1",
        "/qwen-edge/node1/request/dev1",
        "qwen-edge/node1/request/dev1/extra",  # extra level
        "qwen-edge/node1/cancel/dev1/extra",
        "qwen-edge/node1/request/",  # empty client id
        "qwen-edge/node1/request",
        "qwen-edge/node1/reply/dev1",  # not an inbound kind
        "qwen-edge/node1/reply/dev1/default",
        "qwen-edge/node1/error/dev1",
        "qwen-edge/node1/status",
        "qwen-edge/node1/requests/dev1",
        "",
        "dev1",
    ],
)
def test_topics_of_other_nodes_prefixes_or_shapes_do_not_parse(topic: str) -> None:
    assert TOPICS.parse(topic) is None


@FUZZ
@given(st.text(st.characters(exclude_characters="/"), min_size=1, max_size=30))
def test_built_request_and_cancel_topics_parse_back(client_id: str) -> None:
    assert TOPICS.parse(TOPICS.request(client_id)) == InboundTopic(TopicKind.REQUEST, client_id)
    assert TOPICS.parse(TOPICS.cancel(client_id)) == InboundTopic(TopicKind.CANCEL, client_id)


@pytest.mark.parametrize(
    "topic",
    [
        "qwen-edge/node1/reply/dev1/x",
        "qwen-edge/node1/reply/dev1/default",
        "qwen-edge/node1/reply/dev1/a/b/c",
        "qwen-edge/node1/reply/dev1/中文",
    ],
)
def test_response_topic_inside_own_namespace_is_allowed(topic: str) -> None:
    assert TOPICS.allows_response_topic("dev1", topic)


@pytest.mark.parametrize(
    "topic",
    [
        "qwen-edge/node1/reply/dev1/",  # the bare namespace
        "qwen-edge/node1/reply/dev1",
        "qwen-edge/node1/reply/dev2/x",  # another client's namespace
        "qwen-edge/node1/reply/dev1x/x",  # prefix trick on the client id
        "qwen-edge/node1/reply/dev/1/x",
        "qwen-edge/node1/reply/x",
        "qwen-edge/node2/reply/dev1/x",  # another node
        "other/node1/reply/dev1/x",  # another prefix
        "qwen-edge/node1/error/dev1/x",
        "qwen-edge/node1/request/dev1/x",
        "qwen-edge/node1/reply/dev1/+",  # wildcards
        "qwen-edge/node1/reply/dev1/#",
        "qwen-edge/node1/reply/dev1/a/+/b",
        "qwen-edge/node1/reply/dev1/a+b",
        "qwen-edge/node1/reply/+/x",
        "qwen-edge/node1/reply/#",
        "qwen-edge/node1/reply/dev1/a\0b",
        "qwen-edge/node1/reply/dev1/" + "x" * 1024,  # longer than the 1024-byte cap
        "x/qwen-edge/node1/reply/dev1/x",
        "",
    ],
)
def test_response_topic_outside_namespace_is_refused(topic: str) -> None:
    assert not TOPICS.allows_response_topic("dev1", topic)


@FUZZ
@given(st.text(st.characters(exclude_characters="+#\0"), min_size=1, max_size=200))
def test_any_wildcard_free_suffix_under_own_namespace_is_allowed(suffix: str) -> None:
    assert TOPICS.allows_response_topic("dev1", TOPICS.reply_namespace("dev1") + suffix)


@FUZZ
@given(
    st.text(st.characters(exclude_characters="/"), min_size=1, max_size=20).filter(
        lambda c: c != "dev1"
    ),
    st.text(max_size=50),
)
def test_other_clients_namespaces_are_never_allowed(other: str, suffix: str) -> None:
    assert not TOPICS.allows_response_topic("dev1", TOPICS.reply_namespace(other) + suffix)


@FUZZ
@given(
    st.text(st.characters(exclude_characters="+#\0"), max_size=30),
    st.sampled_from("+#\0"),
    st.text(max_size=30),
)
def test_wildcard_anywhere_in_response_topic_is_refused(head: str, bad: str, tail: str) -> None:
    assert not TOPICS.allows_response_topic(
        "dev1", TOPICS.reply_namespace("dev1") + head + bad + tail
    )


# -- requests: accepted ------------------------------------------------------------------------


def test_minimal_request_gets_defaults() -> None:
    req = parse_request(request(), LIMIT)
    assert req == ChatRequest(request_id="r1", message="Hello")
    assert isinstance(req, ChatRequest)
    assert req.conversation_id == "default"
    assert req.system is None
    assert (req.max_tokens, req.temperature, req.top_p, req.top_k, req.seed) == (None,) * 5
    assert req.reset is False


def test_full_request_is_read_field_by_field() -> None:
    req = parse_request(
        request(
            request_id="A-z_0.9:x",
            conversation_id="conv:1",
            message="你好 😀",
            system="Be brief.",
            max_tokens=1,
            temperature=0,
            top_p=1,
            top_k=100_000,
            seed=0xFFFFFFFF,
            reset=True,
            unknown_field={"ignored": True},
        ),
        LIMIT,
    )
    assert isinstance(req, ChatRequest)
    assert req.request_id == "A-z_0.9:x"
    assert req.conversation_id == "conv:1"
    assert req.message == "你好 😀"
    assert req.system == "Be brief."
    assert (req.max_tokens, req.temperature, req.top_p, req.top_k, req.seed) == (
        1,
        0.0,
        1.0,
        100_000,
        0xFFFFFFFF,
    )
    assert req.reset is True


def test_request_id_of_64_characters_is_accepted() -> None:
    assert isinstance(parse_request(request(request_id="a" * 64), LIMIT), ChatRequest)


def test_json_integer_is_accepted_for_a_float_field() -> None:
    req = parse_request(request(temperature=1, top_p=1), LIMIT)
    assert isinstance(req, ChatRequest)
    assert req.temperature == 1.0


def test_escaped_surrogate_pair_is_a_valid_character() -> None:
    req = parse_request(b'{"request_id":"r1","message":"\\ud83d\\ude00"}', LIMIT)
    assert isinstance(req, ChatRequest)
    assert req.message == "\U0001f600"


def test_explicit_nulls_mean_defaults_for_optional_fields() -> None:
    req = parse_request(request(system=None, max_tokens=None, temperature=None), LIMIT)
    assert isinstance(req, ChatRequest)
    assert req.system is None


def test_payload_of_exactly_max_payload_bytes_is_accepted() -> None:
    raw = request()
    assert isinstance(parse_request(raw, len(raw)), ChatRequest)
    assert isinstance(parse_cancel(b'{"request_id":"r1"}', 19), CancelRequest)


def test_huge_message_within_limit_is_accepted() -> None:
    text = "长" * 1_000_000
    req = parse_request(request(message=text), BIG)
    assert isinstance(req, ChatRequest)
    assert req.message == text


# -- requests: refused -------------------------------------------------------------------------


def test_payload_over_max_payload_is_too_large() -> None:
    raw = request()
    err = bad(raw, len(raw) - 1)
    assert err.code is ErrorCode.TOO_LARGE
    assert str(len(raw)) in err.message
    assert (err.request_id, err.conversation_id) == (None, None)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"   ",
        b"{",
        b'{"request_id":"r1","message":"hi"',
        b"{'request_id':'r1','message':'hi'}",
        b'{"request_id":"r1","message":"hi"} trailing',
        b"not json",
        b"\x00",
    ],
)
def test_malformed_json_is_a_bad_request_without_ids(raw: bytes) -> None:
    err = bad(raw)
    assert err.code is ErrorCode.BAD_REQUEST
    assert (err.request_id, err.conversation_id) == (None, None)


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff\xfe\xfd",
        b'{"request_id":"r1","message":"\xff"}',
        b'{"request_id":"r1","message":"\xc3"}',  # truncated 2-byte sequence
        b'{"request_id":"r1","message":"\xed\xa0\x80"}',  # UTF-8-encoded surrogate
        b'{"request_id":"r1","message":"\xc0\xaf"}',  # overlong encoding
    ],
)
def test_invalid_utf8_is_a_bad_request(raw: bytes) -> None:
    assert bad(raw).code is ErrorCode.BAD_REQUEST


@pytest.mark.parametrize(
    "raw", [b"[]", b'["r1", "hi"]', b"null", b"true", b"42", b"1.5", b'"text"']
)
def test_non_object_json_is_a_bad_request_without_ids(raw: bytes) -> None:
    err = bad(raw)
    assert err.code is ErrorCode.BAD_REQUEST
    assert (err.request_id, err.conversation_id) == (None, None)


@pytest.mark.parametrize("message", [_MISSING, "", None, 5, ["hi"], {"text": "hi"}, True])
def test_missing_or_empty_message_is_a_bad_request_that_names_the_request(message: Any) -> None:
    err = bad(request(message=message))
    assert err.code is ErrorCode.BAD_REQUEST
    assert "message" in err.message
    assert (err.request_id, err.conversation_id) == ("r1", "default")


@pytest.mark.parametrize(
    "request_id",
    [
        _MISSING,
        None,
        "",
        "a" * 65,
        "has space",
        "a/b",
        "a+b",
        "a#b",
        "é",
        "r1\n",
        "\nr1",
        "\uff11",  # fullwidth digit one
        17,
        ["r1"],
        True,
    ],
)
def test_unusable_request_id_is_a_bad_request_without_request_id(request_id: Any) -> None:
    err = bad(request(request_id=request_id, conversation_id="c1"))
    assert err.code is ErrorCode.BAD_REQUEST
    assert "request_id" in err.message
    assert err.request_id is None
    assert err.conversation_id == "c1"


@pytest.mark.parametrize(
    "conversation_id", [None, "", "a/b", "+", "#", "with space", "x" * 65, 3, ["c"]]
)
def test_unusable_conversation_id_is_reported_as_none(conversation_id: Any) -> None:
    err = bad(request(conversation_id=conversation_id))
    assert err.code is ErrorCode.BAD_REQUEST
    assert "conversation_id" in err.message
    assert (err.request_id, err.conversation_id) == ("r1", None)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", "0.5"),  # strict: numbers in strings are not numbers
        ("top_p", "0.9"),
        ("max_tokens", "10"),
        ("seed", "1"),
        ("top_k", "5"),
        ("max_tokens", True),  # strict: bool is not an int
        ("seed", False),
        ("top_k", True),
        ("temperature", True),
        ("max_tokens", 1.0),  # strict: float is not an int
        ("seed", 2.5),
        ("reset", 1),
        ("reset", "true"),
        ("system", 5),
        ("system", ["a"]),
        ("temperature", [0.5]),
        ("temperature", {"value": 0.5}),
    ],
)
def test_wrong_type_is_a_bad_request_naming_the_field(field: str, value: Any) -> None:
    err = bad(request(**{field: value}))
    assert err.code is ErrorCode.BAD_REQUEST
    assert err.message.startswith(field)
    assert (err.request_id, err.conversation_id) == ("r1", "default")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.01),
        ("temperature", 5.0001),
        ("temperature", 1e308),
        ("top_p", 0),
        ("top_p", -0.5),
        ("top_p", 1.0001),
        ("max_tokens", 0),
        ("max_tokens", -1),
        ("top_k", -1),
        ("top_k", 100_001),
        ("seed", -1),
        ("seed", 2**32),
        ("seed", 10**30),
    ],
)
def test_out_of_range_value_is_a_bad_request(field: str, value: Any) -> None:
    err = bad(request(**{field: value}))
    assert err.code is ErrorCode.BAD_REQUEST
    assert err.message.startswith(field)
    assert err.request_id == "r1"


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_temperature_is_a_bad_request(literal: bytes) -> None:
    raw = b'{"request_id":"r1","message":"hi","temperature":' + literal + b"}"
    assert bad(raw).code is ErrorCode.BAD_REQUEST


@pytest.mark.parametrize(
    "raw",
    [
        b'{"request_id":"r1","message":"\\ud800"}',
        b'{"request_id":"r1","message":"a\\udfffb"}',
        b'{"request_id":"r1","message":"hi","system":"\\ud800"}',
        b'{"request_id":"r1","message":"\\ude00\\ud83d"}',  # pair in the wrong order
    ],
)
def test_lone_surrogate_in_text_is_a_bad_request(raw: bytes) -> None:
    err = bad(raw)
    assert err.code is ErrorCode.BAD_REQUEST
    assert err.request_id == "r1"


@pytest.mark.parametrize(("message", "system"), [("\ud800", None), ("ok", "x\udfff")])
def test_model_refuses_lone_surrogate_given_as_python_str(message: str, system: str | None) -> None:
    with pytest.raises(ValidationError):
        ChatRequest(request_id="r1", message=message, system=system)


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000,
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 100_000,
        b'{"request_id":"r1","message":"hi","system":' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    ],
)
def test_deeply_nested_json_is_a_bad_request_not_a_crash(raw: bytes) -> None:
    assert bad(raw, BIG).code is ErrorCode.BAD_REQUEST
    cancel = parse_cancel(raw, BIG)
    assert isinstance(cancel, RequestError)
    assert cancel.code is ErrorCode.BAD_REQUEST


def test_number_with_thousands_of_digits_does_not_crash() -> None:
    raw = b'{"request_id":"r1","message":"hi","seed":' + b"9" * 5000 + b"}"
    err = bad(raw)
    assert err.code is ErrorCode.BAD_REQUEST
    assert (err.request_id, err.conversation_id) == ("r1", "default")  # the reply topic is known
    raw = b'{"request_id":' + b"9" * 5000 + b',"message":"hi"}'
    err = bad(raw)
    assert err.request_id is None


# -- requests: format, stop, chunk_ms ----------------------------------------------------------

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "home": {"$ref": "#/$defs/place"},
        "nick": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
    "$defs": {"place": {"type": "object", "properties": {"city": {"type": "string"}}}},
}


def format_error(fmt: Any) -> str:
    """Why a format is refused: by parsing (not "json" nor an object, or too big), else by the
    node's grammar compiler, which runs off the network thread while the request waits for a
    slot (its message goes out as the request's bad_request, "format: ...")."""
    parsed = parse_request(request(format=fmt), LIMIT)
    if isinstance(parsed, ChatRequest):
        from qwen_edge.node.grammar import UnsupportedSchema, grammar_for

        with pytest.raises(UnsupportedSchema) as refused:
            grammar_for(fmt)
        return f"format: {refused.value}"
    err = bad(request(format=fmt))
    assert err.code is ErrorCode.BAD_REQUEST
    assert (err.request_id, err.conversation_id) == ("r1", "default")  # answered on its topic
    assert err.message.startswith("format"), err.message
    return err.message


def test_new_fields_default_to_off() -> None:
    req = parse_request(request(format=None, stop=None, chunk_ms=None), LIMIT)
    assert isinstance(req, ChatRequest)
    assert (req.format, req.stop, req.chunk_ms) == (None, None, None)


@pytest.mark.parametrize(
    "fmt",
    [
        "json",
        PERSON,
        {},
        {"type": "object"},
        {"type": "string", "format": "date-time"},
        {"type": ["integer", "null"]},
        {"type": "array", "prefixItems": [{"type": "number"}, {"const": "x"}], "items": False},
        {"type": "object", "additionalProperties": {"type": "integer"}},
        {"$schema": "http://json-schema.org/draft-07/schema#", "type": "boolean", "title": "t"},
        {"enum": ["中文", 1, None, [1, {"a": True}]]},
    ],
)
def test_format_json_or_an_enforceable_schema_is_accepted(fmt: Any) -> None:
    req = parse_request(request(format=fmt), LIMIT)
    assert isinstance(req, ChatRequest), req
    assert req.format == fmt  # as sent: the $ref inlining works on a copy


@pytest.mark.parametrize("fmt", ["xml", "JSON", "", 5, True, ["json"]])
def test_format_other_than_json_or_an_object_is_a_bad_request(fmt: Any) -> None:
    assert '"json" or a JSON Schema object' in format_error(fmt)


@pytest.mark.parametrize(
    "fmt",
    [
        {"type": "strin"},
        {"type": "object", "properties": 5},
        {"type": "object", "required": "name"},
        {"type": "array", "minItems": -1},
    ],
)
def test_format_that_is_no_valid_json_schema_is_a_bad_request(fmt: Any) -> None:
    assert "not a valid JSON Schema" in format_error(fmt)


@pytest.mark.parametrize(
    ("fmt", "named"),
    [
        ({"type": "integer", "minimum": 1}, "'minimum'"),
        ({"type": "number", "multipleOf": 2}, "'multipleOf'"),
        ({"type": "string", "pattern": "^[a-z]+$"}, "pattern"),
        ({"type": "string", "format": "email"}, "'email'"),
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "'uniqueItems'"),
        ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, "oneOf"),
        ({"allOf": [{"type": "object"}]}, "allOf"),
        ({"not": {"type": "string"}}, "a schema needs a type"),
        ({"type": "object", "properties": {"a": True}}, "true/false"),
        ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]}, "'b'"),
        (
            {"type": "object", "patternProperties": {"^x": {"type": "string"}}},
            "'patternProperties'",
        ),
        (
            {
                "type": "object",
                "properties": {"a": {"type": "string"}},
                "additionalProperties": {"type": "integer"},
            },
            "additionalProperties",
        ),
        ({"$ref": "https://example.com/schema.json"}, "only local $ref"),
        ({"$ref": "#/$defs/missing"}, "points at nothing"),
        (
            {"$ref": "#/$defs/node", "$defs": {"node": {"type": "array", "items": {"$ref": "#"}}}},
            "recursive",
        ),
        ({"type": "string", "maxLength": 100_000}, "above 256"),
        ({"type": "array", "items": {"type": "string"}, "minItems": 300}, "above 256"),
        ({"enum": ['say "hi"']}, "quotes"),
        ({"const": "a\\b"}, "backslashes"),
        ({"type": "object", "properties": {"line\nbreak": {"type": "string"}}}, "control"),
        ({"enum": ["😀"]}, "U+FFFF"),
        ({"enum": []}, "without values"),
        ({"type": ["string", "null"], "maxLength": 3}, "'maxLength'"),
        ({"type": "object", "anyOf": [{"type": "object"}]}, "'type'"),
        ({"type": "integer", "x-vendor": 1}, "'x-vendor'"),
    ],
)
def test_format_the_grammar_could_not_enforce_is_a_bad_request_that_says_what(
    fmt: Any, named: str
) -> None:
    assert named in format_error(fmt)


def test_format_whose_refs_would_expand_beyond_bounds_is_refused() -> None:
    defs = {"d0": {"type": "integer"}}
    for i in range(1, 20):  # each definition uses the one before twice: 2**19 parts inlined
        ref = {"$ref": f"#/$defs/d{i - 1}"}
        defs[f"d{i}"] = {"type": "array", "prefixItems": [ref, ref]}
    assert "more than 500 parts" in format_error({"$ref": "#/$defs/d19", "$defs": defs})


@pytest.mark.parametrize("stop", [[], ["x"], ["a", "b", "c", "d"], ["中" * 64, "\n"]])
def test_up_to_four_stop_strings_of_1_to_64_characters_are_accepted(stop: list[str]) -> None:
    req = parse_request(request(stop=stop), LIMIT)
    assert isinstance(req, ChatRequest)
    assert req.stop == stop


@pytest.mark.parametrize(
    ("stop", "where"),
    [
        (["a", "b", "c", "d", "e"], "stop: List should have at most 4 items"),
        ([""], "stop.0: String should have at least 1 character"),
        (["x", "y" * 65], "stop.1: String should have at most 64 characters"),
        ("END", "stop: Input should be a valid array"),
        ([1], "stop.0: Input should be a valid string"),
    ],
)
def test_stop_strings_out_of_bounds_are_a_bad_request(stop: Any, where: str) -> None:
    err = bad(request(stop=stop))
    assert err.code is ErrorCode.BAD_REQUEST
    assert where in err.message


def test_model_refuses_a_lone_surrogate_in_a_stop_string() -> None:
    with pytest.raises(ValidationError, match=r"stop\.1"):
        ChatRequest(request_id="r1", message="hi", stop=["ok", "\udfff"])


@pytest.mark.parametrize("chunk_ms", [0, 1, 500, 2000])
def test_chunk_ms_from_0_to_2000_is_accepted(chunk_ms: int) -> None:
    req = parse_request(request(chunk_ms=chunk_ms), LIMIT)
    assert isinstance(req, ChatRequest)
    assert req.chunk_ms == chunk_ms


@pytest.mark.parametrize("chunk_ms", [-1, 2001, 10**9, 1.5, "100", True])
def test_chunk_ms_out_of_range_or_not_an_integer_is_a_bad_request(chunk_ms: Any) -> None:
    err = bad(request(chunk_ms=chunk_ms))
    assert err.code is ErrorCode.BAD_REQUEST
    assert err.message.startswith("chunk_ms")


# -- cancels -----------------------------------------------------------------------------------


def test_valid_cancel_is_read() -> None:
    assert parse_cancel(b'{"request_id":"r-9","extra":1}', LIMIT) == CancelRequest(request_id="r-9")


@pytest.mark.parametrize(
    "raw", [b"", b"{}", b"[]", b'{"request_id":""}', b'{"request_id":5}', b"\xff", b"{"]
)
def test_unusable_cancel_is_a_bad_request(raw: bytes) -> None:
    err = parse_cancel(raw, LIMIT)
    assert isinstance(err, RequestError)
    assert err.code is ErrorCode.BAD_REQUEST


def test_oversized_cancel_is_too_large() -> None:
    err = parse_cancel(b'{"request_id":"r1"}', 18)
    assert isinstance(err, RequestError)
    assert err.code is ErrorCode.TOO_LARGE


# -- fuzzing -----------------------------------------------------------------------------------

FIELDS = [
    "request_id",
    "conversation_id",
    "message",
    "system",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "reset",
]

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(["r1", "default", "", "a" * 64, "a" * 65, "\ud800", "中文", "😀"])
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=25,
)
request_like = st.fixed_dictionaries({}, optional=dict.fromkeys(FIELDS, json_values | json_scalars))


def dumps_any(value: Any, ensure_ascii: bool) -> bytes:
    return json.dumps(value, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")


def check_both_parsers(raw: bytes, max_payload: int = LIMIT) -> None:
    assert_well_formed(parse_request(raw, max_payload))
    assert_well_formed(parse_cancel(raw, max_payload))


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(raw: bytes) -> None:
    check_both_parsers(raw)


@FUZZ
@given(json_values, st.booleans())
def test_arbitrary_json_values_never_raise(value: Any, ensure_ascii: bool) -> None:
    check_both_parsers(dumps_any(value, ensure_ascii))


@FUZZ
@given(request_like, st.booleans())
def test_request_shaped_objects_never_raise_and_report_only_valid_ids(
    value: dict[str, Any], ensure_ascii: bool
) -> None:
    raw = dumps_any(value, ensure_ascii)
    result = parse_request(raw, LIMIT)
    assert_well_formed(result)
    if isinstance(result, ChatRequest):
        assert result.request_id == value["request_id"]
        assert result.message == value["message"]
    else:
        assert isinstance(result, RequestError)
        if result.request_id is not None:
            assert result.request_id == value["request_id"]
        if result.conversation_id is not None:
            assert result.conversation_id == value.get("conversation_id", "default")


@FUZZ
@given(
    st.text(
        st.characters(codec="utf-8") | st.characters(categories=["Cs"]) | st.sampled_from("\0"),
        min_size=0,
        max_size=200,
    ),
    st.booleans(),
)
def test_unicode_edge_cases_in_message_never_raise(text: str, ensure_ascii: bool) -> None:
    raw = dumps_any({"request_id": "r1", "message": text}, ensure_ascii)
    result = parse_request(raw, LIMIT)
    assert_well_formed(result)
    clean = text != "" and not any(0xD800 <= ord(ch) <= 0xDFFF for ch in text)
    if clean:
        assert isinstance(result, ChatRequest)
        assert result.message == text
    else:
        assert isinstance(result, RequestError)
        assert result.code is ErrorCode.BAD_REQUEST
        # Escaped surrogates leave the ids readable; raw ones make the payload invalid UTF-8.
        assert result.request_id == ("r1" if ensure_ascii or text == "" else None)


@FUZZ
@given(st.binary(max_size=64), st.integers(min_value=0, max_value=80))
def test_payload_limit_decides_before_parsing(raw: bytes, max_payload: int) -> None:
    result = parse_request(raw, max_payload)
    assert_well_formed(result)
    too_large = isinstance(result, RequestError) and result.code is ErrorCode.TOO_LARGE
    assert too_large == (len(raw) > max_payload)


@pytest.mark.parametrize("size", [1_000_000, 4_000_000])
def test_huge_strings_never_raise(size: int) -> None:
    for raw in (
        b'"' + b"x" * size + b'"',
        b'{"request_id":"' + b"a" * size + b'","message":"hi"}',
        b'{"request_id":"r1","message":"' + b"\\ud800" * (size // 6) + b'"}',
        b"\xf0\x9f\x98" * (size // 3),
    ):
        check_both_parsers(raw, BIG)


def test_encode_is_compact_utf8_json() -> None:
    raw = encode({"type": "x", "text": '中"\\\n'})
    assert raw == '{"type":"x","text":"中\\"\\\\\\n"}'.encode()
    assert json.loads(raw) == {"type": "x", "text": '中"\\\n'}


# -- fuzzing: what the issue lists beyond the above --------------------------------------------
# BOMs, NUL, overlong UTF-8, numbers like 1e400 / -0 / NaN in every numeric field, duplicate
# keys, deep values of any depth anywhere, and byte-level mutations of a valid request.

NUMERIC = ["max_tokens", "temperature", "top_p", "top_k", "seed"]
VALID = b'{"request_id":"r1","conversation_id":"c1","message":"Hello","max_tokens":5}'


@pytest.mark.parametrize("bom", [b"\xef\xbb\xbf", b"\xfe\xff", b"\xff\xfe", b"\x00\x00\xfe\xff"])
def test_byte_order_mark_before_the_json_is_a_bad_request_without_ids(bom: bytes) -> None:
    # RFC 8259: no BOM in networked JSON; a node that guessed would accept two encodings.
    err = bad(bom + VALID)
    assert err.code is ErrorCode.BAD_REQUEST
    assert (err.request_id, err.conversation_id) == (None, None)


def test_bom_character_inside_the_message_is_text() -> None:
    req = parse_request(request(message="\ufeffhi"), LIMIT)
    assert isinstance(req, ChatRequest)
    assert req.message == "\ufeffhi"


@pytest.mark.parametrize("field", NUMERIC)
@pytest.mark.parametrize("literal", [b"1e400", b"-1e400", b"1E+400", b"NaN", b"Infinity"])
def test_non_finite_or_overflowing_number_is_a_bad_request_naming_the_field(
    field: str, literal: bytes
) -> None:
    raw = VALID[:-1] + b',"' + field.encode() + b'":' + literal + b"}"
    err = bad(raw)
    assert err.code is ErrorCode.BAD_REQUEST
    assert err.message.startswith(field)
    assert (err.request_id, err.conversation_id) == ("r1", "c1")


@pytest.mark.parametrize(
    ("field", "literal", "value"),
    [
        ("temperature", b"-0", 0.0),
        ("temperature", b"-0.0", 0.0),
        ("temperature", b"1e-400", 0.0),  # underflows to zero: greedy
        ("top_k", b"-0", 0),
        ("seed", b"-0", 0),
        ("top_p", b"1.0e0", 1.0),
    ],
)
def test_negative_zero_and_underflow_read_as_zero(field: str, literal: bytes, value: Any) -> None:
    req = parse_request(VALID[:-1] + b',"' + field.encode() + b'":' + literal + b"}", LIMIT)
    assert isinstance(req, ChatRequest)
    assert getattr(req, field) == value


@pytest.mark.parametrize("literal", [b"-0", b"1e2", b"1.0", b"-0.0"])
def test_max_tokens_must_be_a_positive_json_integer(literal: bytes) -> None:
    err = bad(b'{"request_id":"r1","message":"hi","max_tokens":' + literal + b"}")
    assert err.message.startswith("max_tokens")


@pytest.mark.parametrize(
    ("raw", "request_id", "outcome"),
    [
        (b'{"request_id":"r1","request_id":"r2","message":"hi"}', "r2", "ok"),
        (b'{"request_id":"bad id","request_id":"r2","message":""}', "r2", "message"),
        (b'{"request_id":"r2","request_id":"bad id","message":"hi"}', None, "request_id"),
        (b'{"request_id":"r1","message":"hi","message":5}', "r1", "message"),
        (b'{"request_id":"r1","message":5,"message":"hi"}', "r1", "ok"),
    ],
)
def test_duplicate_keys_the_last_one_counts_in_request_and_error_alike(
    raw: bytes, request_id: str | None, outcome: str
) -> None:
    result = parse_request(raw, LIMIT)
    if outcome == "ok":
        assert isinstance(result, ChatRequest)
        assert result.request_id == request_id
    else:
        assert isinstance(result, RequestError)
        assert result.message.startswith(outcome)
        assert result.request_id == request_id


@pytest.mark.parametrize(
    "raw",
    [
        b'{"request_id":"r1","message":"a\x00b"}',  # raw control character in a string
        b'{"request_id":"r1","message":"hi"}\x00',
        b'\x00{"request_id":"r1","message":"hi"}',
        b'{"request_id":"r1\\u0000","message":"hi"}',
        b'{"request_id":"r1","conversation_id":"c\\u0000","message":"hi"}',
    ],
)
def test_nul_outside_text_or_in_an_id_is_a_bad_request(raw: bytes) -> None:
    assert bad(raw).code is ErrorCode.BAD_REQUEST


def test_escaped_nul_in_the_message_is_text() -> None:
    req = parse_request(b'{"request_id":"r1","message":"a\\u0000b"}', LIMIT)
    assert isinstance(req, ChatRequest)
    assert req.message == "a\0b"


def overlong(codepoint: int, length: int) -> bytes:
    """`codepoint` encoded in `length` UTF-8 bytes although it needs fewer: invalid UTF-8."""
    head = {2: 0xC0, 3: 0xE0, 4: 0xF0}[length]
    tail = [0x80 | ((codepoint >> (6 * i)) & 0x3F) for i in range(length - 1)][::-1]
    return bytes([head | (codepoint >> (6 * (length - 1))), *tail])


@FUZZ
@given(st.integers(min_value=0, max_value=0xFFFF), st.sampled_from([2, 3, 4]), st.booleans())
def test_overlong_utf8_anywhere_is_a_bad_request_without_ids(
    codepoint: int, length: int, in_id: bool
) -> None:
    needed = len(chr(codepoint).encode("utf-8", "surrogatepass"))
    if needed >= length:
        codepoint &= 0x7F  # an ASCII character is overlong in any longer form
    seq = overlong(codepoint, length)
    with pytest.raises(UnicodeDecodeError):
        seq.decode("utf-8")
    where = b"r" + seq if in_id else b"Hi " + seq
    raw = (
        b'{"request_id":"' + where + b'","message":"hi"}'
        if in_id
        else b'{"request_id":"r1","message":"' + where + b'"}'
    )
    err = bad(raw)
    assert err.code is ErrorCode.BAD_REQUEST
    assert (err.request_id, err.conversation_id) == (None, None)


NUMBER_LITERALS = [
    b"1e400", b"-1e400", b"1e-400", b"-0", b"-0.0", b"0e0", b"NaN", b"-NaN", b"Infinity",
    b"-Infinity", b"1" * 400, b"-" + b"9" * 30, b"4294967295", b"4294967296", b"0.5",
    b"5.000000000000001", b"1e2", b"01", b"+1", b".5", b"1.", b"0x10", b"1_000",
]  # fmt: skip
weird_numbers = (
    st.sampled_from(NUMBER_LITERALS)
    | st.floats().map(lambda f: repr(f).encode())
    | st.integers().map(lambda i: b"%d" % i)
)


@FUZZ
@given(st.sampled_from(NUMERIC), weird_numbers)
def test_any_number_literal_in_a_numeric_field_gives_a_valid_request_or_typed_error(
    field: str, literal: bytes
) -> None:
    result = parse_request(VALID[:-1] + b',"' + field.encode() + b'":' + literal + b"}", LIMIT)
    assert_well_formed(result)
    if isinstance(result, ChatRequest):
        value = getattr(result, field)
        assert isinstance(value, int) or math.isfinite(value)  # max_tokens: any size, clamped
        assert ChatRequest.model_validate(result.model_dump()) == result  # in range


@FUZZ
@given(
    st.lists(
        st.tuples(st.sampled_from([*FIELDS, "x"]), json_values | json_scalars),
        min_size=1,
        max_size=12,
    )
)
def test_objects_with_repeated_keys_read_the_last_value_of_each(
    pairs: list[tuple[str, Any]],
) -> None:
    raw = ("{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs) + "}").encode(
        "utf-8", "surrogatepass"
    )
    result = parse_request(raw, LIMIT)
    assert_well_formed(result)
    last = dict(pairs)
    if isinstance(result, ChatRequest):
        assert result.request_id == last["request_id"]
        assert result.message == last["message"]
    elif result.request_id is not None:
        assert result.request_id == last["request_id"]


@FUZZ
@given(
    st.sampled_from([*FIELDS, "unknown"]),
    st.integers(min_value=1, max_value=200_000),
    st.sampled_from([(b"[", b"]"), (b'{"a":', b"}"), (b'[{"k":', b"}]")]),
    st.booleans(),
)
def test_values_nested_to_any_depth_in_any_field_never_raise(
    field: str, depth: int, brackets: tuple[bytes, bytes], closed: bool
) -> None:
    opening, closing = brackets
    value = opening * depth + b"1" + (closing * depth if closed else b"")
    raw = b'{"request_id":"r1","message":"hi","' + field.encode() + b'":' + value + b"}"
    check_both_parsers(raw, BIG)
    result = parse_request(raw, BIG)
    if field in FIELDS:  # a nested value is wrong for every known field
        assert isinstance(result, RequestError)


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["insert", "delete", "replace", "repeat"]),
            st.integers(min_value=0, max_value=len(VALID)),
            st.binary(min_size=1, max_size=4),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_mutations_of_a_valid_request_never_raise(edits: list[tuple[str, int, bytes]]) -> None:
    raw = bytearray(VALID)
    for op, where, data in edits:
        pos = min(where, len(raw))
        if op == "insert":
            raw[pos:pos] = data
        elif op == "delete":
            del raw[pos : pos + len(data)]
        elif op == "replace":
            raw[pos : pos + len(data)] = data
        else:
            raw[pos:pos] = raw[pos : pos + 8] * 3
    check_both_parsers(bytes(raw))


@pytest.mark.parametrize(
    "raw",
    [
        b'{"request_id":"r1","message":"' + b"x" * (LIMIT - 31) + b'"}',  # one byte over
        b'{"request_id":"r1","message":"hi","pad":"' + b"\\u0041" * 20_000 + b'"}',
        b'{"request_id":"r1","message":"hi","pad":[' + b"1," * 30_000 + b"1]}",
        b'{"request_id":"r1","message":"hi","pad":{'
        + b",".join(b'"k%d":%d' % (i, i) for i in range(5_000))
        + b"}}",
    ],
)
def test_huge_values_near_the_payload_limit_give_a_result_or_typed_error(raw: bytes) -> None:
    check_both_parsers(raw)


def _at_stack_depth(depth: int, raw: bytes) -> ChatRequest | RequestError:
    return parse_request(raw, BIG) if depth == 0 else _at_stack_depth(depth - 1, raw)


@pytest.mark.parametrize("nesting", [150, 199, 201, 300, 600, 900, 990])
def test_deeply_nested_request_gives_the_same_error_at_any_stack_depth(nesting: int) -> None:
    """Found by fuzzing the daemon: json.loads (reading the ids of a bad request) went deeper
    in the test's stack than in paho's network thread, so the error's topic depended on the
    caller. Now the outcome depends on the payload only."""
    raw = b'{"request_id":"r1","message":"hi","system":' + b"[" * nesting + b"]" * nesting + b"}"
    shallow = parse_request(raw, BIG)
    assert isinstance(shallow, RequestError)
    for depth in (100, 400, 700):
        assert _at_stack_depth(depth, raw) == shallow
    readable = ("r1", "default") if "recursion limit" not in shallow.message else (None, None)
    assert (shallow.request_id, shallow.conversation_id) == readable


# -- reply, status and stats payloads: built here, parsed here, the same bytes as before --------
# The expected bytes were captured from the builders before they moved into protocol.py
# (replies.py, service.py, failover.py), so these pin the wire format byte for byte.

TRICKY = 'Hé "x"\n😀 \\ \u2028'

WIRE: list[tuple[Any, bytes]] = [
    (
        StartMessage(request_id="r-1", seq=0, node="pi", model="qwen2.5-0.5b"),
        b'{"type":"start","request_id":"r-1","seq":0,"node":"pi","model":"qwen2.5-0.5b"}',
    ),
    (
        ChunkMessage(request_id="r-1", seq=1, text=TRICKY),
        b'{"type":"chunk","request_id":"r-1","seq":1,'
        b'"text":"H\xc3\xa9 \\"x\\"\\n\xf0\x9f\x98\x80 \\\\ \xe2\x80\xa8"}',
    ),
    (
        ChunkMessage(request_id="r-1", seq=2, text=""),
        b'{"type":"chunk","request_id":"r-1","seq":2,"text":""}',
    ),
    (
        DoneMessage.of(
            "r-1",
            3,
            FinishReason.STOP,
            prompt_tokens=12,
            completion_tokens=3,
            cached_tokens=4,
            ttft_ms=45.678,
            tokens_per_s=12.3456,
        ),
        b'{"type":"done","request_id":"r-1","seq":3,"finish_reason":"stop","usage":'
        b'{"prompt_tokens":12,"completion_tokens":3,"cached_tokens":4},'
        b'"timings":{"ttft_ms":45.7,"tokens_per_s":12.35}}',
    ),
    (
        DoneMessage.of(
            "r-3",
            0,
            FinishReason.LENGTH,
            prompt_tokens=1,
            completion_tokens=0,
            cached_tokens=0,
            ttft_ms=None,
            tokens_per_s=None,
        ),
        b'{"type":"done","request_id":"r-3","seq":0,"finish_reason":"length","usage":'
        b'{"prompt_tokens":1,"completion_tokens":0,"cached_tokens":0},'
        b'"timings":{"ttft_ms":null,"tokens_per_s":null}}',
    ),
    (
        ErrorMessage(
            request_id=None,
            seq=0,
            code=ErrorCode.TOO_LARGE,
            message="payload is 9 bytes; the limit is 1",
        ),
        b'{"type":"error","request_id":null,"seq":0,"code":"too_large",'
        b'"message":"payload is 9 bytes; the limit is 1"}',
    ),
    (
        ErrorMessage(
            request_id="r-2",
            seq=0,
            code=ErrorCode.RATE_LIMITED,
            message="slow down",
            retry_after=1.5,
        ),
        b'{"type":"error","request_id":"r-2","seq":0,"code":"rate_limited",'
        b'"message":"slow down","retry_after":1.5}',
    ),
    (  # an int stays an int: 2, not 2.0
        ErrorMessage(request_id="r-5", seq=0, code="rate_limited", message="x", retry_after=2),
        b'{"type":"error","request_id":"r-5","seq":0,"code":"rate_limited","message":"x",'
        b'"retry_after":2}',
    ),
    (
        node_lost("r-4", 5, "b", "connection lost"),
        b'{"type":"error","request_id":"r-4","seq":5,"code":"node_lost","message":"node b went '
        b'offline (connection lost) before finishing this reply; send the request again"}',
    ),
]

STATUSES: list[tuple[Status, bytes]] = [
    (
        Status(state=NodeState.STARTING, node="pi", model="m", version="0.1.0", pid=42),
        b'{"state":"starting","node":"pi","model":"m","version":"0.1.0","protocol":1,"pid":42}',
    ),
    (
        Status(
            state=NodeState.ONLINE,
            node="pi",
            model="m",
            version="0.1.0",
            group="pool",
            slots=2,
            pid=42,
        ),
        b'{"state":"online","node":"pi","model":"m","version":"0.1.0","protocol":1,'
        b'"group":"pool","slots":2,"pid":42}',
    ),
    (
        Status(
            state=NodeState.OFFLINE, node="pi", model="m", version="0.1.0", reason="connection lost"
        ),
        b'{"state":"offline","node":"pi","model":"m","version":"0.1.0","protocol":1,'
        b'"reason":"connection lost"}',
    ),
]

STATS = (
    Stats(
        node="pi",
        model="m",
        uptime_s=12.5,
        slots=2,
        active_slots=1,
        queue_depth=0,
        tokens_per_s=10.25,
        requests_done=3,
        ts=1764360000.123,
    ),
    b'{"node":"pi","model":"m","uptime_s":12.5,"slots":2,"active_slots":1,"queue_depth":0,'
    b'"tokens_per_s":10.25,"requests_done":3,"ts":1764360000.123}',
)


@pytest.mark.parametrize(("message", "wire"), WIRE)
def test_reply_messages_are_built_byte_for_byte_and_parse_back_equal(
    message: Any, wire: bytes
) -> None:
    assert message.encode() == wire
    assert parse_reply(wire) == message


@pytest.mark.parametrize(("status", "wire"), STATUSES)
def test_status_is_built_byte_for_byte_and_parses_back_equal(status: Status, wire: bytes) -> None:
    assert status.encode() == wire
    assert Status.parse(wire) == status
    assert status.protocol == PROTOCOL_VERSION


def test_stats_are_built_byte_for_byte_and_parse_back_equal() -> None:
    stats, wire = STATS
    assert stats.encode() == wire
    assert Stats.parse(wire) == stats


@given(
    request_id=st.one_of(st.none(), st.from_regex(ID_PATTERN, fullmatch=True)),
    seq=st.integers(0, 2**40),
    text=st.text(),
)
@FUZZ
def test_the_per_token_chunk_encoder_builds_what_the_chunk_message_does(
    request_id: str | None, seq: int, text: str
) -> None:
    fast = ChunkEncoder(request_id)(seq, text)
    assert fast == ChunkMessage(request_id=request_id, seq=seq, text=text).encode()
    assert fast == encode({"type": "chunk", "request_id": request_id, "seq": seq, "text": text})
    assert parse_reply(fast) == ChunkMessage(request_id=request_id, seq=seq, text=text)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"null",
        b"[]",
        b'{"type":"chunk","request_id":"r","seq":-1,"text":"x"}',
        b'{"type":"chunk","request_id":"r","seq":0}',
        b'{"type":"start","request_id":"r","seq":0}',
        b'{"type":"poll","request_id":"r","seq":0}',
        b'{"state":"online"}',
        b"\xff",
    ],
)
def test_what_is_no_reply_message_parses_to_none(raw: bytes) -> None:
    assert parse_reply(raw) is None


def test_a_newer_nodes_reply_and_status_still_parse() -> None:
    error = parse_reply(b'{"type":"error","request_id":"r","seq":2,"code":"new_code","x":1}')
    assert error == ErrorMessage(request_id="r", seq=2, code="new_code")
    status = Status.parse(b'{"state":"draining","node":"n","protocol":2,"extra":[1]}')
    assert status is not None
    assert (status.state, status.protocol, status.online) == ("draining", 2, False)


@pytest.mark.parametrize("raw", [b"", b"{}", b"[1]", b'{"state":5}', b"not json"])
def test_an_unreadable_or_cleared_status_parses_to_none(raw: bytes) -> None:
    assert Status.parse(raw) is None


def test_partial_statuses_and_stats_parse_with_what_they_have() -> None:
    status = Status.parse(b'{"state":"offline","reason":"stopped"}')
    assert status is not None
    assert (status.state, status.reason, status.node, status.slots) == (
        "offline",
        "stopped",
        None,
        None,
    )
    assert Stats.parse(b'{"active_slots":1}') == Stats(active_slots=1)
    assert Stats.parse(b"[]") is None


def test_pool_probe_round_trips_and_refuses_a_node_that_is_no_topic_level() -> None:
    probe = PoolProbe(probe="node-a", nonce="00ff")
    wire = b'{"probe":"node-a","nonce":"00ff"}'
    assert probe.encode() == wire
    assert PoolProbe.parse(wire) == probe
    for bad in (
        b'{"probe":"a/b","nonce":"n"}',
        b'{"probe":"a+","nonce":"n"}',
        b'{"probe":"","nonce":"n"}',
        b'{"probe":"' + b"x" * 129 + b'","nonce":"n"}',
        b'{"probe":"a","nonce":1}',
        b'{"probe":"a"}',
        b"[]",
        b"",
    ):
        assert PoolProbe.parse(bad) is None, bad


def test_cancel_round_trips() -> None:
    cancel = CancelRequest(request_id="r-1")
    assert cancel.encode() == b'{"request_id":"r-1"}'
    assert parse_cancel(cancel.encode(), LIMIT) == cancel
