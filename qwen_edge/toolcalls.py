"""Tool calls (docs/protocol.md, "Tool calls"): the schema one call must match, the grammar that
holds a reply to "text, or calls in Qwen2.5's markup", reading the calls back out of a reply, and
the prompt fallback for chat templates that know no tools.

Pure Python, no llama.cpp: protocol.py sizes a request's tools here on paho's thread, the node's
grammar thread wraps the JSON grammar of `call_schema` with `wrap_grammar`, the inference thread
parses finished replies with `parse_calls`, and the engine renders the fallback prompt.

The markup is Qwen2.5's, whatever the model: a call is `<tool_call>\\n{"name": ..., "arguments":
{...}}\\n</tool_call>`, several calls one per line. A template with tool support is shown the
tools its own way (Qwen2.5's says to answer in exactly this markup); for one without, the tools
are described in the system message in Qwen2.5's words (`tools_system_text`), and calls and
results are written into the messages as Qwen2.5's template would (`fallback_messages`).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

CALL_OPEN: Final = "<tool_call>"
CALL_CLOSE: Final = "</tool_call>"
MAX_TOOLS: Final = 16  # tools one request may offer
MAX_CALLS: Final = 4  # calls one reply may make (the grammar stops there)
MAX_TOOL_RESULTS: Final = 16  # results one request may carry
MAX_DESCRIPTION_CHARS: Final = 1024  # a tool's description
TOOL_NAME_PATTERN: Final = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for function names

_CALL: Final = re.compile(
    re.escape(CALL_OPEN) + r"\n(.*?)\n" + re.escape(CALL_CLOSE), flags=re.DOTALL
)


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One call the model made: the id the node gave it, the tool's name, its arguments."""

    id: str
    name: str
    arguments: dict[str, Any]

    def wire(self) -> dict[str, Any]:
        """As `done` carries it."""
        return {"id": self.id, "name": self.name, "arguments": self.arguments}


@dataclass(frozen=True, slots=True)
class ToolGrammar:
    """What the grammar thread compiles for a request with tools: the schema of one call and
    whether text is allowed instead (`auto`) or only calls (`required`, a named tool)."""

    schema: dict[str, Any]
    calls_only: bool

    @property
    def key(self) -> str:
        """The cache key, never the canonical text of a schema (those start with `{`). Keys
        keep their order, unlike formatschema.canonical: the converter writes properties in
        the order it reads them, and a call is `{"name": ..., "arguments": ...}`."""
        mode = "calls" if self.calls_only else "auto"
        return f"tools:{mode}:" + json.dumps(self.schema, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_key(cls, key: str) -> ToolGrammar:
        _, mode, text = key.split(":", 2)
        return cls(json.loads(text), mode == "calls")


def call_schema(tools: Sequence[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """The JSON Schema of one call to any of `tools` ((name, parameters) pairs): the name as a
    const per alternative, the arguments as that tool's parameters. Its `$defs` are gathered
    at the top, so each tool's local `$ref`s are rewritten to stay apart."""
    alternatives: list[dict[str, Any]] = []
    defs: dict[str, Any] = {}
    for i, (name, parameters) in enumerate(tools):
        params = dict(parameters)
        own = params.pop("$defs", None) or params.pop("definitions", None)
        if own:
            rename = {f"#/$defs/{k}": f"#/$defs/t{i}-{k}" for k in own}
            rename |= {f"#/definitions/{k}": f"#/$defs/t{i}-{k}" for k in own}
            params = _renamed_refs(params, rename)
            defs |= {f"t{i}-{k}": _renamed_refs(v, rename) for k, v in own.items()}
        alternatives.append(
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    schema = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
    if defs:
        schema = {**schema, "$defs": defs}
    return schema


def _renamed_refs(node: Any, rename: Mapping[str, str]) -> Any:
    if isinstance(node, dict):
        return {
            k: rename.get(v, v) if k == "$ref" and isinstance(v, str) else _renamed_refs(v, rename)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_renamed_refs(v, rename) for v in node]
    return node


def wrap_grammar(call_gbnf: str, *, calls_only: bool) -> str:
    """The GBNF of a reply to a request with tools, from the GBNF of one call's JSON (its root
    rule `root`): one to MAX_CALLS calls in the markup, or (unless `calls_only`) text that
    neither starts with `<` nor contains the call markup anywhere. So the reply's first
    character decides: `<` is a call, anything else is text that can never turn into one."""
    body = re.sub(r"^root ::=", "call-json ::=", call_gbnf, count=1, flags=re.MULTILINE)
    if body == call_gbnf:
        raise ValueError("the call grammar has no root rule")
    rules = [
        "calls ::= call (" + r'"\n"' + f" call){{0,{MAX_CALLS - 1}}}",
        "call ::= "
        + _gbnf_literal(CALL_OPEN + "\n")
        + " call-json "
        + _gbnf_literal("\n" + CALL_CLOSE),
    ]
    if calls_only:
        rules.insert(0, "root ::= calls")
    else:
        rules.insert(0, "root ::= calls | text")
        rules.extend(_text_rules(CALL_OPEN))
    return "\n".join(rules) + "\n" + body


def _text_rules(marker: str) -> list[str]:
    """`text`: a first character other than `<`, then any text without `marker`. Rule text-k
    holds after the text's end matches the first k characters of the marker (the marker's
    first character appears nowhere else in it, so a mismatch goes back to 0, or to 1 on it)."""
    first = marker[0]
    assert first not in marker[1:]
    rules = [f"text ::= [^{_class_char(first)}] text-0"]
    for k in range(len(marker)):
        alternatives = []
        expect = marker[k]
        if k + 1 < len(marker):
            alternatives.append(f"{_gbnf_literal(expect)} text-{k + 1}")
        if expect != first:
            alternatives.append(f"{_gbnf_literal(first)} text-1")
        excluded = _class_char(expect) + ("" if expect == first else _class_char(first))
        alternatives.append(f"[^{excluded}] text-0")
        rules.append(f"text-{k} ::= | " + " | ".join(alternatives))  # "": the text may end
    return rules


def _gbnf_literal(text: str) -> str:
    return json.dumps(text)  # GBNF string literals take JSON's escapes for these characters


def _class_char(char: str) -> str:
    return "\\" + char if char in "]^-\\" else char


def parse_calls(text: str) -> list[tuple[str, dict[str, Any]]] | None:
    """The calls of a reply made of calls only (as the grammar makes them), or None when the
    text is not that (cut short by max_tokens, for one)."""
    calls: list[tuple[str, dict[str, Any]]] = []
    position = 0
    for match in _CALL.finditer(text):
        if text[position : match.start()].strip():
            return None
        position = match.end()
        try:
            data = json.loads(match.group(1))
        except ValueError:
            return None
        if not (
            isinstance(data, dict)
            and isinstance(data.get("name"), str)
            and isinstance(data.get("arguments"), dict)
        ):
            return None
        calls.append((data["name"], data["arguments"]))
    if not calls or text[position:].strip():
        return None
    return calls


def new_call_id() -> str:
    """An id for one call: random, so a device's results cannot name another reply's calls."""
    return "call_" + secrets.token_hex(8)


def call_markup(name: str, arguments: Mapping[str, Any]) -> str:
    """One call as the model writes it (and as Qwen2.5's template writes past calls)."""
    call = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{CALL_OPEN}\n{call}\n{CALL_CLOSE}"


def tools_system_text(tools: Sequence[Mapping[str, Any]]) -> str:
    """How Qwen2.5's template shows the tools in the system message (the fallback uses it)."""
    lines = "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>{lines}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        f"{CALL_OPEN}{CALL_CLOSE} XML tags:\n{CALL_OPEN}\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n'
        f"{CALL_CLOSE}"
    )


def fallback_messages(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None
) -> list[dict[str, str]]:
    """Messages with tool calls and results, and the tools, for a template that knows only
    role and content: the tools join the system message, a call becomes its markup in the
    assistant's text, consecutive results one user message of `<tool_response>` blocks."""
    out: list[dict[str, str]] = []
    for message in messages:
        role, content = message["role"], str(message.get("content") or "")
        if role == "assistant" and message.get("tool_calls"):
            calls = [c.get("function", c) for c in message["tool_calls"]]
            markup = "\n".join(call_markup(c["name"], c["arguments"]) for c in calls)
            out.append({"role": "assistant", "content": f"{content}\n{markup}".lstrip("\n")})
        elif role == "tool":
            block = f"<tool_response>\n{content}\n</tool_response>"
            if (
                out
                and out[-1]["role"] == "user"
                and out[-1]["content"].endswith("</tool_response>")
            ):
                out[-1] = {"role": "user", "content": out[-1]["content"] + "\n" + block}
            else:
                out.append({"role": "user", "content": block})
        else:
            out.append({"role": role, "content": content})
    if tools:
        text = tools_system_text(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{text}"}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out
