"""The `format` schema's bounds (qwen_edge.formatschema): what parsing a request checks (its size,
cheaply), what the grammar compiler refuses before converting (parts, alternatives, literals,
properties), and the canonical form its cache is keyed on. Issue 18's attack schemas included."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from qwen_edge.formatschema import (
    MAX_ALTERNATIVES,
    MAX_PROPERTIES,
    MAX_SCHEMA_BYTES,
    UnsupportedSchema,
    canonical,
    plain_schema,
)
from qwen_edge.protocol import ErrorCode, RequestError, parse_request

pytestmark = pytest.mark.unit

# Issue 18: 950 optional integer properties (27.5 KB; 2.2 s to convert), and 100 picks from
# 2,400 strings sharing a 15-character prefix (55 KB; 0.36-0.54 s per refused token).
MANY_PROPERTIES = {
    "type": "object",
    "properties": {f"p{i}": {"type": "integer"} for i in range(950)},
}
WIDE_ENUM = {
    "type": "array",
    "minItems": 100,
    "maxItems": 100,
    "items": {"enum": [f"abcdefghijklmno{i}" for i in range(2400)]},
}


def request(fmt: Any, **fields: Any) -> bytes:
    return json.dumps({"request_id": "r1", "message": "hi", "format": fmt, **fields}).encode()


@pytest.mark.parametrize("schema", [MANY_PROPERTIES, WIDE_ENUM])
def test_the_issues_schemas_are_refused_while_parsing_naming_the_bound(schema: Any) -> None:
    parsed = parse_request(request(schema), 1 << 20)
    assert isinstance(parsed, RequestError) and parsed.code is ErrorCode.BAD_REQUEST
    assert parsed.message.startswith("format: ")
    assert f"more than the {MAX_SCHEMA_BYTES} allowed" in parsed.message
    assert parsed.request_id == "r1"  # the error goes to the request's reply topic


def test_parsing_a_request_with_a_schema_loads_no_compiler() -> None:
    """Parsing runs on paho's network thread: it only sizes a schema; what compiles one
    (jsonschema's metaschema check, llama.cpp's converter) is never even imported."""
    code = (
        "import sys; from qwen_edge.protocol import parse_request; "
        'parse_request(b\'{"request_id": "r", "message": "m", '
        '"format": {"type": "object"}}\', 65536); '
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('llama_cpp', 'jsonschema')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("schema", "says"),
    [
        ({"enum": [f"abcdefghijklmno{i}" for i in range(MAX_ALTERNATIVES + 1)]}, "alternatives"),
        (
            {
                "type": "array",
                "items": {"anyOf": [{"enum": list(range(100))}, {"enum": list(range(100, 129))}]},
            },
            f"more than {MAX_ALTERNATIVES} alternatives",
        ),
        ({"const": "x" * 300}, "more than the 256 allowed"),
        (
            {"type": "object", "properties": {f"p{i}": {} for i in range(MAX_PROPERTIES + 1)}},
            f"more than the {MAX_PROPERTIES} allowed",
        ),
        (
            # 8 definitions each using the previous twice: 2^8 parts once inlined, from 400 bytes.
            {
                "$defs": {
                    f"d{i}": {"type": "array", "prefixItems": [{"$ref": f"#/$defs/d{i - 1}"}] * 2}
                    for i in range(1, 10)
                }
                | {"d0": {"type": "integer"}},
                "$ref": "#/$defs/d9",
            },
            "more than 500 parts",
        ),
    ],
)
def test_a_schema_over_a_bound_is_refused_before_it_is_converted(schema: Any, says: str) -> None:
    assert len(canonical(schema)) <= MAX_SCHEMA_BYTES
    with pytest.raises(UnsupportedSchema, match=says):
        plain_schema(schema)


def test_the_canonical_form_ignores_key_order_and_spacing() -> None:
    a = json.loads('{"type": "object", "properties": {"x": {"type": "string"}}}')
    b = json.loads('{"properties":{"x":{"type":"string"}},"type":"object"}')
    assert canonical(a) == canonical(b)


def test_the_compiler_works_on_its_own_thread_and_caches_by_canonical_form() -> None:
    import queue
    import threading

    pytest.importorskip("llama_cpp", reason="the grammar compiler converts with llama.cpp's")
    from qwen_edge.node.grammar import Compiled, GrammarCompiler

    compiler = GrammarCompiler()
    got: queue.Queue[tuple[str, Compiled]] = queue.Queue()

    def done(result: Compiled) -> None:
        got.put((threading.current_thread().name, result))

    try:
        compiler.request(json.loads('{"type": "object", "properties": {"a": {}}}'), done)
        first, a = got.get(timeout=10)
        # Spelt otherwise: the same canonical form, answered from the cache on the caller's thread.
        compiler.request(json.loads('{"properties":{"a":{}},"type":"object"}'), done)
        second, b = got.get(timeout=10)
        compiler.request(WIDE_ENUM | {"items": {"enum": list(range(200))}}, done)
        _, wide = got.get(timeout=10)
    finally:
        compiler.close()
    assert (first, second) == ("grammar", threading.current_thread().name)
    assert a.grammar is not None and a == b
    assert wide.grammar is None and wide.error is not None and "alternatives" in wide.error


def test_a_format_the_node_builds_itself_is_held_only_to_what_the_converter_needs() -> None:
    """The Wyoming adapter's intent schema (thousands of enum values, the operator's names) is
    not a device's: unbounded, though its grammar is paced like any other."""
    from qwen_edge.protocol import NODE_BUILT, ChatRequest

    wide = {"type": "array", "items": {"enum": list(range(3600))}}
    assert len(canonical(wide)) > MAX_SCHEMA_BYTES
    body = {"request_id": "w1", "message": "hi", "format": wide}
    assert ChatRequest.model_validate(body, context={NODE_BUILT: True}).format == wide
    assert plain_schema(wide, bounded=False) == wide
    with pytest.raises(UnsupportedSchema, match="alternatives"):
        plain_schema(wide)


def test_the_canonical_form_keeps_the_order_of_the_properties() -> None:
    # The reply writes the properties in this order; sorting them would change the grammar.
    a = {"type": "object", "properties": {"zeta": {"type": "integer"}, "alpha": {}}}
    b = {"properties": {"alpha": {}, "zeta": {"type": "integer"}}, "type": "object"}
    assert canonical(a) != canonical(b)
    assert canonical(a).index('"zeta"') < canonical(a).index('"alpha"')
    assert canonical(a) == canonical(dict(reversed(list(a.items()))))  # other keys: any order


def test_a_replys_properties_come_in_the_schemas_order() -> None:
    pytest.importorskip("llama_cpp", reason="the grammar compiler converts with llama.cpp's")
    from qwen_edge.node.grammar import grammar_for

    schema = {
        "type": "object",
        "properties": {"zeta": {"type": "integer"}, "alpha": {"type": "string"}},
        "required": ["zeta", "alpha"],
    }
    [root] = [line for line in grammar_for(schema).splitlines() if line.startswith("root ::=")]
    assert root.index("zeta-kv") < root.index("alpha-kv")
