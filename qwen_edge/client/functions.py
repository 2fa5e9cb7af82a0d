"""Plain Python functions as tools: the request's tool dict from a function's signature and
docstring (as ollama-python reads them), and calling them with a model's arguments.

The description is the docstring up to its `Args:` section; each `name (type): text` or
`name: text` line there describes that parameter. A parameter's schema comes from its type hint
through pydantic (a parameter without one is a string); one without a default is required, and
one whose type admits None is optional and its schema drops the null (the model leaves it out
instead). Titles are dropped: they tell the model nothing the names do not.
"""

from __future__ import annotations

import inspect
import json
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pydantic import TypeAdapter

ToolLike = Callable[..., Any] | Mapping[str, Any]

_SECTIONS = re.compile(r"^\s*(args|arguments|parameters|returns|yields|raises)\s*:\s*$", re.I)
_ARG_LINE = re.compile(r"^\s*(\*{0,2}\w+)\s*(?:\(([^)]*)\))?\s*:\s*(.*)$")


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """(description, {parameter: description}) from a Google-style docstring."""
    description: list[str] = []
    params: dict[str, str] = {}
    section = ""
    last: str | None = None
    for line in inspect.cleandoc(doc or "").splitlines():
        header = _SECTIONS.match(line)
        if header:
            section = header.group(1).lower()
            last = None
            continue
        if not section:
            description.append(line)
        elif section in ("args", "arguments", "parameters"):
            match = _ARG_LINE.match(line)
            if match:  # `name (type): text` or `name: text` starts a parameter
                last = match.group(1).lstrip("*")
                params[last] = match.group(3).strip()
            elif last is not None and line.strip():
                params[last] = f"{params[last]} {line.strip()}".strip()
    return "\n".join(description).strip(), params


def tool_from_function(func: Callable[..., Any]) -> dict[str, Any]:
    """The request's tool dict for `func` ({"type": "function", "function": {...}})."""
    description, described = parse_docstring(inspect.getdoc(func))
    properties: dict[str, Any] = {}
    required: list[str] = []
    defs: dict[str, Any] = {}
    hints = typing.get_type_hints(func)  # resolves string annotations (PEP 563)
    for name, param in inspect.signature(func).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        annotation = hints.get(name, str)
        schema = _untitled(TypeAdapter(annotation).json_schema())
        defs |= schema.pop("$defs", {})
        schema, nullable = _without_null(schema)
        if described.get(name):
            schema = {**schema, "description": described[name]}
        properties[name] = schema
        if param.default is inspect.Parameter.empty and not nullable:
            required.append(name)
    parameters: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    if defs:
        parameters["$defs"] = defs
    return {
        "type": "function",
        "function": {"name": func.__name__, "description": description, "parameters": parameters},
    }


def _untitled(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _untitled(v) for k, v in node.items() if k != "title" or not isinstance(v, str)}
    if isinstance(node, list):
        return [_untitled(v) for v in node]
    return node


def _without_null(schema: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The schema without its null alternative (Optional[x] -> x), and whether it had one."""
    options = schema.get("anyOf")
    if not isinstance(options, list) or {"type": "null"} not in options:
        return schema, schema.get("type") == "null"
    rest = [o for o in options if o != {"type": "null"}]
    kept = {k: v for k, v in schema.items() if k not in ("anyOf", "default")}
    return ({**kept, **rest[0]} if len(rest) == 1 else {**kept, "anyOf": rest}), True


def tool_dicts(tools: Sequence[ToolLike]) -> list[dict[str, Any]]:
    """The request's `tools`: functions turned into tool dicts, dicts as they are."""
    return [dict(t) if isinstance(t, Mapping) else tool_from_function(t) for t in tools]


def callables(tools: Sequence[ToolLike]) -> dict[str, Callable[..., Any]]:
    """The functions among `tools`, by the name the model calls them by."""
    found: dict[str, Callable[..., Any]] = {}
    for tool in tools:
        if isinstance(tool, Mapping):
            raise TypeError(
                f"run_tools needs functions to call; got a tool dict "
                f"({tool.get('function', {}).get('name', '?')})"
            )
        found[tool.__name__] = tool
    return found


def result_text(value: Any) -> str:
    """A function's return value as a tool result's content: text as it is, else JSON (or
    its str() when it is not JSON-serialisable)."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


def call_tool(
    functions: Mapping[str, Callable[..., Any]], name: str, arguments: dict[str, Any]
) -> Any:
    """Call the function the model named; what it returns (maybe an awaitable, for the async
    client to await), or the error as text for the model to read."""
    func = functions.get(name)
    if func is None:
        return f"error: there is no tool named {name!r}"
    try:
        return func(**arguments)
    except Exception as exc:  # the model is told, and can say so; the caller's loop goes on
        return f"error: {type(exc).__name__}: {exc}"


def next_keywords(ask_keywords: dict[str, Any], rounds: int, max_rounds: int) -> dict[str, Any]:
    """The keywords of the request that sends a round's results: never `reset` (the results
    answer calls in the conversation's history), and tool_choice `auto` (the model may answer
    now), `none` once max_rounds rounds of calls were made (it must)."""
    keywords = {k: v for k, v in ask_keywords.items() if k != "reset"}
    last = rounds >= max_rounds or ask_keywords.get("tool_choice") == "none"
    keywords["tool_choice"] = "none" if last else "auto"
    return keywords
