"""Tool calls, the llama-free parts: a function's schema, the call grammar's shape, reading calls
back, the prompt fallback, the request's tool fields and the `done` bytes, tool turns kept.
None of this imports llama.cpp (checked)."""

from __future__ import annotations

import enum
import json
import subprocess
import sys
from typing import Any, Literal

import jsonschema
import pytest

from devtools.harness import ROOT
from qwen_edge.client.exchange import request_body
from qwen_edge.client.functions import (
    call_tool,
    next_keywords,
    parse_docstring,
    result_text,
    tool_from_function,
)
from qwen_edge.formatschema import plain_schema
from qwen_edge.node.conversations import ConversationStore, ToolTurn, build_messages
from qwen_edge.node.statestore import StateStore
from qwen_edge.protocol import DoneMessage, FinishReason, RequestError, parse_request
from qwen_edge.toolcalls import (
    MAX_TOOLS,
    ToolGrammar,
    call_schema,
    fallback_messages,
    parse_calls,
    wrap_grammar,
)

LIMIT = 65536


class Unit(enum.Enum):
    CELSIUS = "celsius"
    FAHRENHEIT = "fahrenheit"


def get_weather(city: str, unit: Unit = Unit.CELSIUS, days: int | None = None) -> str:
    """Get the weather forecast for a city.

    Args:
        city (str): The city's name, as people say it
            (continued on a second line).
        unit: Temperature unit.
        days: How many days ahead.

    Returns:
        str: the forecast
    """
    return f"{city}: sunny"


def set_light(  # noqa: PLR0917 - a device's function, as people write them
    name: str,
    on: bool,
    brightness: float = 1.0,
    tags: list[str] | None = None,
    mode: Literal["warm", "cold"] = "warm",
    area=None,
) -> dict[str, Any]:
    """Switch a light."""
    return {"name": name, "on": on}


def test_a_functions_schema_comes_from_its_hints_and_docstring() -> None:
    tool = tool_from_function(get_weather)
    f = tool["function"]
    assert tool["type"] == "function" and f["name"] == "get_weather"
    assert f["description"] == "Get the weather forecast for a city."
    params = f["parameters"]
    assert params["required"] == ["city"]  # defaults and Optional are optional
    assert params["properties"]["city"] == {
        "type": "string",
        "description": "The city's name, as people say it (continued on a second line).",
    }
    assert params["properties"]["days"]["type"] == "integer"  # Optional[int]: null dropped
    jsonschema.Draft202012Validator.check_schema(params)
    jsonschema.validate({"city": "Paris", "unit": "fahrenheit"}, params)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"city": "Paris", "unit": "kelvin"}, params)
    plain_schema(params)  # within the format subset the node accepts


def test_more_hints_booleans_lists_literals_and_no_hint_at_all() -> None:
    params = tool_from_function(set_light)["function"]["parameters"]
    props = params["properties"]
    assert params["required"] == ["name", "on"]
    assert props["on"]["type"] == "boolean"
    assert props["tags"] == {"type": "array", "items": {"type": "string"}}
    assert props["mode"]["enum"] == ["warm", "cold"]
    assert props["area"] == {"type": "string"}  # no hint: a string, as ollama-python does
    plain_schema(params)


def test_docstring_sections_and_parameter_lines() -> None:
    text, params = parse_docstring("Do it.\n\nMore.\n\nArgs:\n  a (int): first\n  b: second\n")
    assert text == "Do it.\n\nMore."
    assert params == {"a": "first", "b": "second"}
    assert parse_docstring(None) == ("", {})


def test_call_schema_has_the_name_as_a_const_per_alternative() -> None:
    one = call_schema([("f", {"type": "object", "properties": {"x": {"type": "integer"}}})])
    assert one["properties"]["name"] == {"const": "f"}
    assert one["required"] == ["name", "arguments"] and one["additionalProperties"] is False
    both = call_schema([("f", {"type": "object"}), ("g", {"type": "object"})])
    assert [a["properties"]["name"]["const"] for a in both["anyOf"]] == ["f", "g"]
    jsonschema.validate({"name": "g", "arguments": {}}, both)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "h", "arguments": {}}, both)


def test_call_schema_keeps_each_tools_defs_apart() -> None:
    a = {
        "type": "object",
        "properties": {"u": {"$ref": "#/$defs/U"}},
        "$defs": {"U": {"enum": ["a"]}},
    }
    b = {
        "type": "object",
        "properties": {"u": {"$ref": "#/$defs/U"}},
        "$defs": {"U": {"enum": ["b"]}},
    }
    schema = call_schema([("f", a), ("g", b)])
    jsonschema.validate({"name": "f", "arguments": {"u": "a"}}, schema)
    jsonschema.validate({"name": "g", "arguments": {"u": "b"}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "f", "arguments": {"u": "b"}}, schema)
    plain_schema(schema)


def test_the_grammar_is_calls_or_text_that_cannot_hold_the_markup() -> None:
    auto = wrap_grammar('root ::= "{}"\nspace ::= " "?', calls_only=False)
    assert auto.startswith("root ::= calls | text\n")
    assert 'call-json ::= "{}"' in auto and '\nroot ::= "{}"' not in auto
    assert "text ::= [^<] text-0" in auto  # the first character decides
    required = wrap_grammar('root ::= "{}"', calls_only=True)
    assert required.startswith("root ::= calls\n") and "text" not in required
    with pytest.raises(ValueError, match="root"):
        wrap_grammar('value ::= "x"', calls_only=True)


def test_tool_grammar_key_keeps_order_and_round_trips() -> None:
    spec = ToolGrammar({"b": 1, "a": 2}, calls_only=True)
    assert spec.key == 'tools:calls:{"b":1,"a":2}'
    assert ToolGrammar.from_key(spec.key) == spec


@pytest.mark.parametrize(
    ("text", "calls"),
    [
        ('<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>', [("f", {"x": 1})]),
        (
            '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n'
            '<tool_call>\n{"name":"g","arguments":{"s":"</tool_call>"}}\n</tool_call>',
            [("f", {}), ("g", {"s": "</tool_call>"})],
        ),
        ('<tool_call>\n{"name": "f", "arguments": {"x": 1', None),  # cut short
        ('<tool_call>\n{"name": "f"}\n</tool_call>', None),
        ('hello <tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>', None),
        ("just text", None),
    ],
)
def test_calls_are_read_back_only_from_a_reply_of_calls(text: str, calls: Any) -> None:
    assert parse_calls(text) == calls


def test_the_fallback_writes_tools_calls_and_results_as_qwen_does() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [call, call]},
        {"role": "tool", "tool_call_id": "call_1", "name": "f", "content": "one"},
        {"role": "tool", "tool_call_id": "call_1", "name": "f", "content": "two"},
    ]
    out = fallback_messages(messages, tools)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.\n\n# Tools\n")
    assert json.dumps(tools[0]) in out[0]["content"]
    assert out[2]["content"] == (
        '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n'
        '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
    )
    assert out[3]["content"] == (
        "<tool_response>\none\n</tool_response>\n<tool_response>\ntwo\n</tool_response>"
    )
    assert fallback_messages([{"role": "user", "content": "x"}], tools)[0]["role"] == "system"


# -- the request's fields ---------------------------------------------------------------------


def tool(name: str, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name, "description": f"does {name}"}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


def request(**fields: Any) -> bytes:
    return json.dumps({"request_id": "r1", **fields}).encode()


def test_a_request_with_tools_and_a_choice_parses() -> None:
    req = parse_request(
        request(
            message="hi",
            tools=[tool("f"), tool("g")],
            tool_choice={"type": "function", "function": {"name": "g"}},
        ),
        LIMIT,
    )
    assert not isinstance(req, RequestError)
    spec = req.tool_grammar()
    assert spec is not None and spec.calls_only
    assert spec.schema["properties"]["name"] == {"const": "g"}  # only the chosen tool
    auto = parse_request(request(message="hi", tools=[tool("f")]), LIMIT)
    assert not isinstance(auto, RequestError)
    assert auto.tool_grammar() is not None and not auto.tool_grammar().calls_only  # type: ignore[union-attr]
    none = parse_request(request(message="hi", tools=[tool("f")], tool_choice="none"), LIMIT)
    assert not isinstance(none, RequestError) and none.tool_grammar() is None


def test_message_may_be_left_out_exactly_when_tool_results_come() -> None:
    req = parse_request(request(tool_results=[{"tool_call_id": "call_1", "content": "ok"}]), LIMIT)
    assert not isinstance(req, RequestError) and req.message is None
    err = parse_request(request(), LIMIT)
    assert isinstance(err, RequestError) and "message" in err.message
    assert err.request_id == "r1"


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"tools": [tool(f"t{i}") for i in range(MAX_TOOLS + 1)]}, "tools"),
        ({"tools": [tool("f"), tool("f")]}, "same name"),
        ({"tools": [tool("bad name")]}, "tools.0.function.name"),
        ({"tools": [tool("f", {"type": "string"})]}, "object schema"),
        ({"tools": []}, "tools"),
        (
            {"tools": [tool("f")], "tool_choice": {"type": "function", "function": {"name": "g"}}},
            "no tool is named 'g'",
        ),
        ({"tool_choice": "required"}, "tool_choice: needs tools"),
        ({"tools": [tool("f")], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [tool("f")], "format": "json"}, "format or stop"),
        ({"tools": [tool("f")], "stop": ["x"]}, "format or stop"),
        ({"tools": [tool("f", {"type": "object", "description": "x" * 9000})]}, "bytes"),
        (
            {"tool_results": [{"tool_call_id": "bad id", "content": "x"}]},
            "tool_results.0.tool_call_id",
        ),
        ({"tool_results": [{"tool_call_id": "c", "content": 5}]}, "tool_results.0.content"),
    ],
)
def test_bad_tools_are_a_bad_request_that_says_what(fields: dict[str, Any], says: str) -> None:
    err = parse_request(request(message="hi", **fields), LIMIT)
    assert isinstance(err, RequestError), err
    assert err.code == "bad_request" and says in err.message, err.message


def test_done_bytes_without_calls_are_as_before_and_calls_follow_finish_reason() -> None:
    plain = DoneMessage.of(
        "r1",
        3,
        FinishReason.STOP,
        prompt_tokens=1,
        completion_tokens=2,
        cached_tokens=0,
        ttft_ms=1.0,
        tokens_per_s=None,
    )
    assert plain.encode() == (
        b'{"type":"done","request_id":"r1","seq":3,"finish_reason":"stop","usage":'
        b'{"prompt_tokens":1,"completion_tokens":2,"cached_tokens":0},"timings":'
        b'{"ttft_ms":1.0,"tokens_per_s":null}}'
    )
    calls = [{"id": "call_1", "name": "f", "arguments": {"x": "é"}}]
    done = DoneMessage.of(
        "r1",
        1,
        FinishReason.TOOL_CALLS,
        prompt_tokens=1,
        completion_tokens=2,
        cached_tokens=0,
        ttft_ms=None,
        tokens_per_s=None,
        tool_calls=calls,
    )
    assert done.encode().startswith(
        '{"type":"done","request_id":"r1","seq":1,"finish_reason":"tool_calls",'
        '"tool_calls":[{"id":"call_1","name":"f","arguments":{"x":"é"}}],"usage":'.encode()
    )


# -- history ------------------------------------------------------------------------------------

CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}
TURN = ToolTurn(
    (
        {"role": "user", "content": "do f"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
    )
)


def test_a_tool_turn_keeps_its_calls_pending_and_renders_in_the_template_roles() -> None:
    store = ConversationStore(10, 3600)
    key = ("dev1", "c")
    assert store.pending_calls(key) == {} and key not in store  # asking creates nothing
    store.record(key, None, 0, "hi", "hello")
    store.record(key, None, 0, TURN)
    assert store.pending_calls(key) == {"call_1": "f"}
    result = {"role": "tool", "tool_call_id": "call_1", "name": "f", "content": "done"}
    messages = build_messages("sys", store.get(key).turns, [result])
    assert [m["role"] for m in messages] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "tool",
    ]
    store.record(key, None, 0, ToolTurn((result, {"role": "assistant", "content": "ok"})))
    assert store.pending_calls(key) == {}


def test_tool_turns_survive_the_state_store() -> None:
    db = StateStore(None)
    db.save_conversation(("dev1", "c"), "sys", [("hi", "hello"), TURN])
    (saved,) = db.load_conversations(9, 3600)
    assert saved.turns == [("hi", "hello"), TURN]


# -- the client -----------------------------------------------------------------------------------


def test_the_client_sends_functions_as_tool_dicts_and_results_without_a_message() -> None:
    body = request_body(
        None,
        "c",
        {
            "tools": [get_weather, tool("g")],
            "tool_results": ({"tool_call_id": "call_1", "content": "x"},),
        },
    )
    assert "message" not in body
    assert body["tools"][0]["function"]["name"] == "get_weather" and body["tools"][1] == tool("g")
    req = parse_request(json.dumps({**body, "request_id": "r1"}).encode(), LIMIT)
    assert not isinstance(req, RequestError), req


def test_calling_a_tool_errors_are_text_for_the_model() -> None:
    def boom(x: int) -> int:
        raise RuntimeError("no power")

    functions = {"boom": boom, "get_weather": get_weather}
    assert call_tool(functions, "get_weather", {"city": "Oslo"}) == "Oslo: sunny"
    assert call_tool(functions, "boom", {"x": 1}) == "error: RuntimeError: no power"
    assert "no tool named" in call_tool(functions, "nope", {})
    assert result_text({"a": 1}) == '{"a": 1}' and result_text(object()).startswith("<object")
    assert next_keywords({"reset": True, "tool_choice": "required"}, 1, 4) == {
        "tool_choice": "auto"
    }
    assert next_keywords({}, 4, 4) == {"tool_choice": "none"}


def test_none_of_this_imports_llama_cpp() -> None:
    code = (
        "import sys, qwen_edge.toolcalls, qwen_edge.protocol, qwen_edge.client, "
        "qwen_edge.node.conversations, qwen_edge.node.toolturns;"
        "sys.exit('llama_cpp' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False).returncode == 0
