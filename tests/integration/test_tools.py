"""Tool calls with the real parts: SmolLM2 behind a real broker. Every call the model makes, over
many tool sets and prompts, parses and validates against its tool's schema; chunks never carry
call markup; the client library runs a multi-round tool conversation; bad tools and unknown
result ids are bad_request. And Qwen2.5's own template shows tools and past calls in the markup
the grammar holds the model to."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from devtools.harness import ROOT, SMOLLM, Daemon, Probe
from qwen_edge.client import AsyncEdgeClient, EdgeClient
from qwen_edge.toolcalls import CALL_OPEN, fallback_messages

QWEN25_TEMPLATE = (Path(__file__).parent / "templates" / "qwen2.5-instruct.jinja").read_text()


def tool(
    name: str, description: str, properties: dict[str, Any], required: list[str]
) -> dict[str, Any]:
    params: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        params["required"] = required
    return {
        "type": "function",
        "function": {"name": name, "description": description, "parameters": params},
    }


NAME = {"type": "string", "maxLength": 24}
WEATHER = tool(
    "get_weather",
    "Current weather in a city",
    {"city": NAME, "unit": {"enum": ["celsius", "fahrenheit"]}},
    ["city"],
)
LIGHT = tool(
    "set_light",
    "Switch a light on or off",
    {
        "name": {"enum": ["kitchen", "hall", "bedroom"]},
        "on": {"type": "boolean"},
        "brightness": {"type": "integer"},
    },
    ["name", "on"],
)
TIMER = tool(
    "start_timer", "Start a timer", {"minutes": {"type": "integer"}, "label": NAME}, ["minutes"]
)
SHOPPING = tool(
    "add_items",
    "Add items to the shopping list",
    {"items": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 3}},
    ["items"],
)
CALC = tool(
    "calculate",
    "Do arithmetic",
    {
        "a": {"type": "number"},
        "b": {"type": "number"},
        "op": {"enum": ["add", "sub", "mul", "div"]},
    },
    ["a", "b", "op"],
)
CALENDAR = tool(
    "add_event",
    "Put an event in the calendar",
    {"title": NAME, "date": {"type": "string", "format": "date"}, "all_day": {"type": "boolean"}},
    ["title", "date"],
)
THERMO = {
    "type": "function",
    "function": {
        "name": "set_thermostat",
        "description": "Set a room's temperature",
        "parameters": {
            "type": "object",
            "properties": {"room": {"$ref": "#/$defs/Room"}, "celsius": {"type": "number"}},
            "required": ["room", "celsius"],
            "$defs": {"Room": {"enum": ["living room", "office"]}},
        },
    },
}
TIME = tool("get_time", "The current time", {}, [])
NOTE = tool(
    "save_note",
    "Save a note",
    {
        "note": {
            "type": "object",
            "properties": {"text": NAME, "tags": {"type": "array", "items": NAME, "maxItems": 2}},
            "required": ["text"],
        }
    },
    ["note"],
)

TOOL_SETS: list[tuple[list[dict[str, Any]], list[str]]] = [
    ([WEATHER], ["What's the weather in Paris?", "Is it cold in Oslo today, in fahrenheit?"]),
    ([LIGHT], ["Turn on the kitchen light.", "Switch off the hall light please"]),
    ([TIMER], ["Set a timer for ten minutes for the pasta.", "Timer, 3 minutes"]),
    ([SHOPPING], ["Add milk and eggs to my shopping list.", "We need bread"]),
    ([CALC], ["What is 12 times 7?", "Divide 100 by 4"]),
    (
        [CALENDAR],
        ["Put dentist on 2025-03-14 in my calendar.", "Birthday party on May 2nd, all day"],
    ),
    ([THERMO], ["Make the office 21 degrees.", "Living room to 19.5 please"]),
    ([TIME], ["What time is it?", "Tell me the time"]),
    ([NOTE], ["Note: call mum, tag family.", "Remember to water the plants"]),
    ([WEATHER, LIGHT, TIMER], ["Turn on the bedroom light", "How warm is it in Rome?"]),
    ([CALC, SHOPPING, CALENDAR, TIME], ["What is 2 plus 2?", "Add apples to the list"]),
    ([THERMO, NOTE, LIGHT], ["It's too cold in the office", "Lights off in the kitchen"]),
]


def cases() -> list[tuple[list[dict[str, Any]], str, Any]]:
    """39 requests: every tool set's prompts under required, its first under auto, and a named
    tool of each set with several."""
    out: list[tuple[list[dict[str, Any]], str, Any]] = []
    for tools, prompts in TOOL_SETS:
        out.extend((tools, prompt, "required") for prompt in prompts)
        out.append((tools, prompts[0], "auto"))
        if len(tools) > 1:
            named = tools[-1]["function"]["name"]
            out.append((tools, prompts[1], {"type": "function", "function": {"name": named}}))
    return out


@pytest.fixture(scope="module")
def probe(daemon: Daemon, module_broker: Any) -> Any:
    p = Probe(module_broker, "tooldev")
    p.subscribe("qwen-edge/+/reply/tooldev/#", "qwen-edge/+/error/tooldev")
    yield p
    p.close()


@pytest.mark.timeout(900)
def test_every_call_over_many_tool_sets_parses_and_validates(probe: Probe) -> None:
    all_cases = cases()
    assert len(all_cases) >= 30
    outcomes: list[tuple[list[dict[str, Any]], Any, list[dict[str, Any]]]] = []
    for batch_start in range(0, len(all_cases), 6):  # within the client's share of the queue
        batch = all_cases[batch_start : batch_start + 6]
        ids = [
            probe.request(
                prompt,
                conversation_id=f"case{batch_start + i}",
                tools=tools,
                tool_choice=choice,
                # Calls get room for up to 4 (one cut short is no call); text need not be long.
                max_tokens=48 if choice == "auto" else 200,
                temperature=0.7,
                seed=batch_start + i,
                reset=True,
            )
            for i, (tools, prompt, choice) in enumerate(batch)
        ]
        for rid, (tools, _, choice) in zip(ids, batch, strict=True):
            outcomes.append((tools, choice, probe.collect(rid, timeout=300)))
    validated = 0
    ids_seen: set[str] = set()
    for tools, choice, messages in outcomes:
        end = messages[-1]
        assert end["type"] == "done", end
        chunks = [m["text"] for m in messages if m["type"] == "chunk"]
        assert not any("<tool_call" in text or "</tool_call" in text for text in chunks)
        if end["finish_reason"] == "tool_calls":
            assert not chunks  # a call is never streamed
            schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
            for call in end["tool_calls"]:
                assert re.fullmatch(r"call_[0-9a-f]{16}", call["id"]) and call["id"] not in ids_seen
                ids_seen.add(call["id"])
                if isinstance(choice, dict):
                    assert call["name"] == choice["function"]["name"]
                jsonschema.validate(call["arguments"], schemas[call["name"]])
                validated += 1
        elif choice != "auto":
            assert end["finish_reason"] == "length"  # cut short inside a call: no calls
            assert not chunks
        else:
            assert "".join(chunks).strip() or end["finish_reason"] == "length"
    cut = sum(1 for _, c, m in outcomes if c != "auto" and m[-1]["finish_reason"] == "length")
    assert validated >= 30 and cut <= 2, (validated, cut)


def test_a_multi_round_tool_conversation_through_the_client_library(
    daemon: Daemon, module_broker: Any
) -> None:
    called: list[tuple[str, Any]] = []

    def get_temperature(room: str) -> float:
        """The temperature in a room, in degrees Celsius.

        Args:
            room: The room's name.
        """
        called.append(("get_temperature", room))
        return 17.5

    def set_heating(on: bool) -> str:
        """Switch the heating on or off."""
        called.append(("set_heating", on))
        return "done"

    tools = [get_temperature, set_heating]
    with EdgeClient(port=module_broker.port, client_id="tooldev2", node="testnode") as client:
        reply = client.run_tools(
            "How warm is the kitchen? If it is below 20, switch the heating on.",
            tools,
            conversation_id="rounds",
            tool_choice="required",
            max_tokens=256,  # room for MAX_CALLS calls: a call cut short is no call
            temperature=0,
            max_rounds=2,
            timeout=300,
        )
        assert reply.tool_calls == () and reply.finish_reason in ("stop", "length")
        assert called and len(called) <= 2 * 4  # at least one round, at most max_rounds
        for name, value in called:
            assert isinstance(value, str if name == "get_temperature" else bool)
        # The conversation went on from the results and remembers them: a follow-up.
        follow = client.ask("Thanks.", "rounds", max_tokens=8, temperature=0, timeout=300)
        assert follow.usage["prompt_tokens"] > reply.usage["prompt_tokens"]


def test_the_async_client_awaits_coroutine_tools(daemon: Daemon, module_broker: Any) -> None:
    called: list[str] = []

    async def lookup(word: str) -> dict[str, str]:
        """Look a word up in the dictionary."""
        await asyncio.sleep(0)
        called.append(word)
        return {"word": word, "meaning": "a small bird"}

    async def run() -> Any:
        async with AsyncEdgeClient(
            port=module_broker.port, client_id="tooldev3", node="testnode"
        ) as c:
            return await c.run_tools(
                "What does wren mean?",
                [lookup],
                tool_choice="required",
                max_tokens=200,
                temperature=0,
                max_rounds=1,
                timeout=300,
            )

    reply = asyncio.run(run())
    assert called and reply.tool_calls == ()


def test_bad_tools_and_unknown_result_ids_are_bad_requests(probe: Probe) -> None:
    def refused(**fields: Any) -> str:
        rid = probe.request(**fields)
        (error,) = probe.collect(rid, timeout=120)
        assert error["type"] == "error" and error["code"] == "bad_request", error
        return str(error["message"])

    pattern = tool("f", "x", {"s": {"type": "string", "pattern": "^a"}}, ["s"])
    assert "pattern" in refused(message="hi", tools=[pattern])  # found on the grammar thread
    assert refused(message="hi", tools=[WEATHER, WEATHER]).endswith("same name")
    assert "no call of this conversation" in refused(
        message=None,
        conversation_id="fresh",
        tool_results=[{"tool_call_id": "call_0", "content": "x"}],
    )
    # A real call's id is accepted once, and answered twice in one request it is refused.
    rid = probe.request(
        "Timer for 5 minutes",
        conversation_id="ids",
        tools=[TIMER],
        tool_choice="required",
        max_tokens=200,
        temperature=0,
        reset=True,
    )
    done = probe.collect(rid, timeout=300)[-1]
    call_id = done["tool_calls"][0]["id"]
    twice = [{"tool_call_id": call_id, "content": "ok"}] * 2
    assert "answered twice" in refused(message=None, conversation_id="ids", tool_results=twice)
    rid = probe.request(
        None, conversation_id="ids", tool_results=twice[:1], max_tokens=16, temperature=0
    )
    assert probe.collect(rid, timeout=300)[-1]["type"] == "done"
    # Answered: no longer pending.
    assert "no call" in refused(message=None, conversation_id="ids", tool_results=twice[:1])


def test_qwen25s_template_shows_tools_and_past_calls_in_the_grammars_markup() -> None:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from qwen_edge.node.engine import CHATML_TEMPLATE, template_takes_tools

    assert template_takes_tools(QWEN25_TEMPLATE)
    assert not template_takes_tools(CHATML_TEMPLATE)
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Oslo"}},
    }
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "-3 C"},
    ]
    format_ = Jinja2ChatFormatter(QWEN25_TEMPLATE, "<|im_end|>", "<|endoftext|>")
    native = format_(messages=messages, tools=[WEATHER]).prompt  # type: ignore[arg-type]
    markup = (
        f'{CALL_OPEN}\n{{"name": "get_weather", "arguments": {{"city": "Oslo"}}}}\n</tool_call>'
    )
    assert markup in native and json.dumps(WEATHER) in native
    assert "<|im_start|>user\n<tool_response>\n-3 C\n</tool_response><|im_end|>" in native
    # The fallback, for templates without tools, writes the same markup and tool block.
    plain = Jinja2ChatFormatter(CHATML_TEMPLATE, "<|im_end|>", "<|endoftext|>")
    fallback = plain(messages=fallback_messages(messages, [WEATHER])).prompt  # type: ignore[arg-type]
    assert markup in fallback and json.dumps(WEATHER) in fallback
    assert "<tool_response>\n-3 C\n</tool_response>" in fallback


def test_smollm_has_no_tool_template_so_the_node_uses_the_fallback() -> None:
    import llama_cpp

    from qwen_edge.node.engine import template_takes_tools

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(SMOLLM).encode(), params)
    try:
        template = llama_cpp.llama_model_chat_template(model, None).decode()
    finally:
        llama_cpp.llama_model_free(model)
    assert not template_takes_tools(template)
    assert ROOT.exists()


def test_chat_shows_the_calls_a_reply_makes(
    daemon: Daemon, module_broker: Any, tmp_path: Path
) -> None:
    tools_file = tmp_path / "tools.json"
    tools_file.write_text(json.dumps([LIGHT]))
    env = {k: v for k, v in os.environ.items() if not k.startswith("QWEN_EDGE_")}
    env.update(QWEN_EDGE_MQTT__PORT=str(module_broker.port), QWEN_EDGE_NODE_ID="testnode")
    chat = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwen_edge",
            "chat",
            "--tools",
            str(tools_file),
            "--tool-choice",
            "required",
            "--max-tokens",
            "200",
            "--temperature",
            "0",
            "--client-id",
            "toolchat",
            "Turn on the kitchen light",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert chat.returncode == 0, chat.stderr
    calls = re.findall(r"^\[call set_light (\{.*\}) id call_[0-9a-f]{16}\]$", chat.stdout, re.M)
    assert calls, chat.stdout
    for arguments in calls:
        jsonschema.validate(json.loads(arguments), LIGHT["function"]["parameters"])
    assert "[tool_calls" in chat.stderr
