"""The `format` request field's grammar: a JSON Schema (or "json") turned into GBNF for llama.cpp's
sampler, on a thread of its own, cached on the schema's canonical form.

llama-cpp-python's converter (`json_schema_to_gbnf`) silently ignores keywords it cannot express
(`minimum`, `uniqueItems`, ...), so a reply it allowed could still fail the schema. Only schemas
whose every constraint the grammar enforces are accepted (qwen_edge.formatschema walks them), the
rest are refused by name: a reply to an accepted schema always parses and validates (unless
`max_tokens` cuts it short).

Compiling takes milliseconds to tens of milliseconds (the metaschema check alone is ~0.3 ms a
property), so it runs neither on paho's network thread (which would stall every delivery) nor
on the inference thread (which would stall every slot): GrammarCompiler's thread does it while
the request waits in the queue, and the scheduler starts it once its grammar is ready.
"""

from __future__ import annotations

import json
import queue
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Final

import jsonschema
import structlog
from llama_cpp.llama_grammar import JSON_GBNF, PRIMITIVE_RULES, json_schema_to_gbnf

from ..formatschema import UnsupportedSchema, canonical, check_size, plain_schema
from ..toolcalls import ToolGrammar, wrap_grammar
from .decoder import Compiled, GrammarSpec, OnCompiled

log = structlog.get_logger("qwen_edge.node.grammar")

# The converter's rule for one character of a JSON string, `[^"\\] | "\\" (...)`, lets raw
# control characters through, which JSON forbids (json.loads: "Invalid control character"), and
# a model readily puts a newline after a name. llama.cpp's own converter and JSON_GBNF exclude
# them as here; 0x7F with them, as they do.
CHAR_RULE: Final = str(PRIMITIVE_RULES["char"].content)
STRICT_CHAR_RULE: Final = CHAR_RULE.replace(r'[^"\\]', r'[^"\\\x7F\x00-\x1F]', 1)
# GBNF text one schema may become; llama.cpp parses it for every request that uses it. The
# schema bounds (formatschema) keep real schemas far below it.
MAX_GRAMMAR_BYTES: Final = 65536
CACHE_SIZE: Final = 64  # grammars (or refusals) kept, by the schema's canonical text

__all__ = [
    "Compiled",
    "GrammarCompiler",
    "GrammarSpec",
    "UnsupportedSchema",
    "grammar_for",
    "tool_grammar_for",
]


def grammar_for(fmt: str | Mapping[str, Any]) -> str:
    """The GBNF grammar for a request's `format` ("json" or a JSON Schema object), compiled on
    the calling thread (tests, tools; the node uses GrammarCompiler).

    Raises UnsupportedSchema with a message fit for the client."""
    if isinstance(fmt, str):
        if fmt != "json":
            raise UnsupportedSchema('must be "json" or a JSON Schema object')
        return str(JSON_GBNF)  # llama.cpp's: any JSON object
    check_size(dict(fmt))
    return _schema_grammar(canonical(dict(fmt)), bounded=True)


def tool_grammar_for(spec: ToolGrammar) -> str:
    """The GBNF of a reply to a request with tools (toolcalls.wrap_grammar around the grammar
    of one call's schema), compiled on the calling thread. Raises UnsupportedSchema."""
    return _compile_tools(spec)


def _compile_tools(spec: ToolGrammar) -> str:
    check_size(spec.schema)  # protocol.py did, for a request; tests and tools call this directly
    text = json.dumps(spec.schema, ensure_ascii=False)  # in its order: see ToolGrammar.key
    # A device's tools: the bounds of a device's format apply to the combined schema.
    return wrap_grammar(_schema_grammar(text, bounded=True), calls_only=spec.calls_only)


def _schema_grammar(text: str, *, bounded: bool) -> str:
    schema = json.loads(text)
    validator = jsonschema.validators.validator_for(schema, jsonschema.Draft202012Validator)
    try:
        validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        raise UnsupportedSchema(
            f"not a valid JSON Schema: {exc.message}" + (f" (at /{where})" if where else "")
        ) from None
    plain = plain_schema(schema, bounded=bounded)
    try:
        grammar = str(json_schema_to_gbnf(json.dumps(plain)))
    except RecursionError:
        raise UnsupportedSchema("the schema is nested too deeply") from None
    except Exception as exc:  # the converter refuses with asserts and ValueErrors
        raise UnsupportedSchema(f"the grammar converter refused it: {exc}") from None
    if bounded and len(grammar) > MAX_GRAMMAR_BYTES:
        raise UnsupportedSchema(
            f"its grammar is {len(grammar)} bytes, more than the {MAX_GRAMMAR_BYTES} allowed"
        )
    # Only the converter's char rule holds this text: literals with quotes or backslashes are
    # refused by the walk.
    return grammar.replace(f"::= {CHAR_RULE}", f"::= {STRICT_CHAR_RULE}")


class GrammarCompiler:
    """Compiles formats on its own thread ("grammar"), one at a time, in arrival order. Its
    backlog is bounded by the scheduler's queue (a request holds a queue place while it waits
    here). Started on first use; close() stops and joins it."""

    def __init__(self, cache_size: int = CACHE_SIZE) -> None:
        self._cache: OrderedDict[tuple[str, bool], Compiled] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[tuple[tuple[str, bool], OnCompiled] | None] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None

    def request(self, fmt: GrammarSpec, done: OnCompiled, *, bounded: bool = True) -> None:
        if isinstance(fmt, str):
            done(_json_grammar(fmt))
            return
        # Sized already by protocol.py; a tools key never equals a schema's text (see .key).
        key = (fmt.key, True) if isinstance(fmt, ToolGrammar) else (canonical(dict(fmt)), bounded)
        with self._lock:
            known = self._cache.get(key)
            if known is not None:
                self._cache.move_to_end(key)
            elif self._thread is None:
                self._thread = threading.Thread(target=self._run, name="grammar")
                self._thread.start()
        if known is not None:
            done(known)
        else:
            self._jobs.put((key, done))

    def close(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put(None)
            thread.join()

    def _run(self) -> None:
        while (item := self._jobs.get()) is not None:
            key, done = item
            with self._lock:
                result = self._cache.get(key)
            if result is None:
                result = _compile(key)
                with self._lock:
                    self._cache[key] = result
                    if len(self._cache) > self._cache_size:
                        self._cache.popitem(last=False)
            try:
                done(result)
            except Exception:  # the scheduler's callback; the thread must go on
                log.exception("grammar_callback_failed")


def _json_grammar(fmt: str) -> Compiled:
    if fmt != "json":
        return Compiled(None, 'must be "json" or a JSON Schema object')
    return Compiled(str(JSON_GBNF))


def _compile(key: tuple[str, bool]) -> Compiled:
    try:
        if key[0].startswith("tools:"):
            return Compiled(_compile_tools(ToolGrammar.from_key(key[0])))
        return Compiled(_schema_grammar(key[0], bounded=key[1]))
    except UnsupportedSchema as exc:
        return Compiled(None, str(exc))
    except Exception as exc:  # never kill the thread over one schema
        log.exception("grammar_compile_failed")
        return Compiled(None, f"the schema could not be compiled: {type(exc).__name__}")
