"""The `format` request field: which JSON Schemas a grammar can hold a reply to, and their GBNF.

llama-cpp-python's converter (`json_schema_to_gbnf`) turns a schema into a grammar for llama.cpp's
sampler, but it silently ignores keywords it cannot express (`minimum`, `uniqueItems`, ...), so
a reply it allowed could still fail the schema. This module accepts only schemas whose every
constraint the grammar enforces, and refuses the rest by name: a reply to an accepted schema
always parses and validates (unless `max_tokens` cuts it short).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import unquote

import jsonschema
from llama_cpp.llama_grammar import JSON_GBNF, PRIMITIVE_RULES, json_schema_to_gbnf

# Keywords that constrain nothing: dropped before conversion.
ANNOTATIONS: Final = frozenset(
    {
        "$comment",
        "$defs",
        "$id",
        "$schema",
        "default",
        "definitions",
        "deprecated",
        "description",
        "examples",
        "readOnly",
        "title",
        "writeOnly",
    }
)
# The converter spells a bounded repetition out as nested optional groups, which llama.cpp's
# grammar parser reads recursively: bounds stay small.
MAX_REPEAT: Final = 256
# Schema nodes after every $ref is inlined; a handful of definitions used twice each could
# otherwise expand into millions.
MAX_NODES: Final = 2000
STRING_FORMATS: Final = frozenset(
    {"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"}
)
# The converter's rule for one character of a JSON string, `[^"\\] | "\\" (...)`, lets raw
# control characters through, which JSON forbids (json.loads: "Invalid control character"), and
# a model readily puts a newline after a name. llama.cpp's own converter and JSON_GBNF exclude
# them as here; 0x7F with them, as they do.
CHAR_RULE: Final = str(PRIMITIVE_RULES["char"].content)
STRICT_CHAR_RULE: Final = CHAR_RULE.replace(r'[^"\\]', r'[^"\\\x7F\x00-\x1F]', 1)
# The types the converter has a rule for.
SIMPLE_TYPES: Final = frozenset({"array", "boolean", "integer", "null", "number", "string"})


class UnsupportedSchema(ValueError):
    """A schema that is invalid or asks for something a grammar cannot enforce."""


def grammar_for(fmt: str | Mapping[str, Any]) -> str:
    """The GBNF grammar for a request's `format` ("json" or a JSON Schema object).

    Raises UnsupportedSchema with a message fit for the client."""
    if isinstance(fmt, str):
        if fmt != "json":
            raise UnsupportedSchema('must be "json" or a JSON Schema object')
        return str(JSON_GBNF)  # llama.cpp's: any JSON object
    # Cached by the schema's text: intake converts a schema to refuse it early, the scheduler
    # converts it again when the request gets a slot.
    return _schema_grammar(json.dumps(fmt, ensure_ascii=False, allow_nan=False))


@functools.lru_cache(maxsize=64)
def _schema_grammar(text: str) -> str:
    schema = json.loads(text)
    validator = jsonschema.validators.validator_for(schema, jsonschema.Draft202012Validator)
    try:
        validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        raise UnsupportedSchema(
            f"not a valid JSON Schema: {exc.message}" + (f" (at /{where})" if where else "")
        ) from None
    try:
        plain = _Checker(schema).check(schema, "#", ())
        grammar = str(json_schema_to_gbnf(json.dumps(plain)))
    except UnsupportedSchema:
        raise
    except RecursionError:
        raise UnsupportedSchema("the schema is nested too deeply") from None
    except Exception as exc:  # the converter refuses with asserts and ValueErrors
        raise UnsupportedSchema(f"the grammar converter refused it: {exc}") from None
    # Only the converter's char rule holds this text: literals with quotes or backslashes are
    # refused above.
    return grammar.replace(f"::= {CHAR_RULE}", f"::= {STRICT_CHAR_RULE}")


class _Checker:
    """Walks a schema the way the converter's `visit` does, and returns it with every $ref
    inlined and every annotation dropped: exactly the keywords the grammar will enforce."""

    def __init__(self, root: dict[str, Any]) -> None:
        self._root = root
        self._nodes = 0

    def check(self, node: Any, where: str, refs: tuple[str, ...]) -> dict[str, Any]:
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise UnsupportedSchema(f"the schema has more than {MAX_NODES} parts ($ref inlined)")
        if not isinstance(node, dict):
            raise UnsupportedSchema(f"{where}: true/false schemas are not supported")
        keys = {k: v for k, v in node.items() if k not in ANNOTATIONS}
        if "$ref" in keys:
            return self._ref(keys, where, refs)
        kind = keys.get("type")
        out: dict[str, Any] = {k: keys[k] for k in ("type",) if k in keys}
        if "anyOf" in keys:
            out = {
                "anyOf": [
                    self.check(sub, f"{where}/anyOf/{i}", refs)
                    for i, sub in enumerate(keys["anyOf"])
                ]
            }
        elif "oneOf" in keys:
            raise UnsupportedSchema(f"{where}: oneOf is not supported (anyOf is)")
        elif "allOf" in keys:
            raise UnsupportedSchema(f"{where}: allOf is not supported")
        elif isinstance(kind, list):
            for t in kind:
                if t not in SIMPLE_TYPES | {"object"}:
                    raise UnsupportedSchema(f"{where}: type {t!r} is not supported")
        elif "const" in keys:
            out["const"] = _literal(keys["const"], f"{where}/const")
        elif "enum" in keys:
            if not keys["enum"]:
                raise UnsupportedSchema(f"{where}: an enum without values allows no reply")
            out["enum"] = [_literal(v, f"{where}/enum") for v in keys["enum"]]
        elif kind in (None, "object") and (
            "properties" in keys or keys.get("additionalProperties", True) is not True
        ):
            out.update(self._object(keys, where, refs))
        elif kind in (None, "array") and ("items" in keys or "prefixItems" in keys):
            out.update(self._array(keys, where, refs))
        elif kind in (None, "string") and "pattern" in keys:
            raise UnsupportedSchema(f"{where}: pattern is not supported")
        elif kind in (None, "string") and "format" in keys:
            if keys["format"] not in STRING_FORMATS:
                supported = ", ".join(sorted(STRING_FORMATS))
                raise UnsupportedSchema(
                    f"{where}: format {keys['format']!r} is not supported (only {supported})"
                )
            out["format"] = keys["format"]
        elif kind == "string" and ("minLength" in keys or "maxLength" in keys):
            out.update(_bounds(keys, "minLength", "maxLength", where))
        elif kind == "object" or not keys:
            pass  # any object; {} too, as the converter reads it
        elif kind not in SIMPLE_TYPES:
            raise UnsupportedSchema(f"{where}: a schema needs a type, or $ref, anyOf, const, enum")
        ignored = sorted(k for k in keys if k not in out)
        if ignored:
            raise UnsupportedSchema(
                f"{where}: {ignored[0]!r} is not supported here (the grammar could not enforce it)"
            )
        return out

    def _ref(self, keys: dict[str, Any], where: str, refs: tuple[str, ...]) -> dict[str, Any]:
        ref = keys["$ref"]
        if len(keys) > 1:
            other = sorted(k for k in keys if k != "$ref")[0]
            raise UnsupportedSchema(f"{where}: {other!r} next to $ref is not supported")
        if ref in refs:
            raise UnsupportedSchema(f"{where}: recursive $ref {ref!r} is not supported")
        if not ref.startswith("#"):
            # The converter would fetch an https:// schema: never from the node.
            raise UnsupportedSchema(f"{where}: only local $ref ('#/...') is supported, not {ref!r}")
        target: Any = self._root
        for part in ref[1:].split("/")[1:] if ref != "#" else []:
            name = unquote(part).replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and name in target:
                target = target[name]
            elif isinstance(target, list) and name.isdigit() and int(name) < len(target):
                target = target[int(name)]
            else:
                raise UnsupportedSchema(f"{where}: $ref {ref!r} points at nothing")
        return self.check(target, ref, (*refs, ref))

    def _object(self, keys: dict[str, Any], where: str, refs: tuple[str, ...]) -> dict[str, Any]:
        props: dict[str, Any] = keys.get("properties", {})
        out: dict[str, Any] = {
            "properties": {
                _name(name, where): self.check(sub, f"{where}/properties/{name}", refs)
                for name, sub in props.items()
            }
        }
        if "required" in keys:
            missing = [name for name in keys["required"] if name not in props]
            if missing:
                raise UnsupportedSchema(
                    f"{where}: required {missing[0]!r} is not among the properties"
                )
            out["required"] = keys["required"]
        extra = keys.get("additionalProperties")
        if extra is False:
            out["additionalProperties"] = False
        elif extra is not None and extra is not True:
            if props:
                # Free keys could repeat a declared name with a value of the other schema.
                raise UnsupportedSchema(
                    f"{where}: additionalProperties as a schema next to properties is not supported"
                )
            out["additionalProperties"] = self.check(extra, f"{where}/additionalProperties", refs)
        elif extra is True:
            out["additionalProperties"] = True
        return out

    def _array(self, keys: dict[str, Any], where: str, refs: tuple[str, ...]) -> dict[str, Any]:
        items = keys.get("items")
        if "prefixItems" in keys or isinstance(items, list):
            # A tuple: exactly these items, in order.
            tuple_key = "prefixItems" if "prefixItems" in keys else "items"
            if tuple_key == "prefixItems" and items not in (None, False):
                raise UnsupportedSchema(f"{where}: items next to prefixItems is not supported")
            out: dict[str, Any] = {
                tuple_key: [
                    self.check(sub, f"{where}/{tuple_key}/{i}", refs)
                    for i, sub in enumerate(keys[tuple_key])
                ]
            }
            if items is False:
                out["items"] = False
            return out
        out = {"items": self.check(items, f"{where}/items", refs)}
        out.update(_bounds(keys, "minItems", "maxItems", where))
        return out


def _bounds(keys: dict[str, Any], low: str, high: str, where: str) -> dict[str, int]:
    out = {k: keys[k] for k in (low, high) if k in keys}
    if any(v > MAX_REPEAT for v in out.values()):
        raise UnsupportedSchema(f"{where}: {low}/{high} above {MAX_REPEAT} is not supported")
    return out


def _name(name: str, where: str) -> str:
    _literal(name, f"{where}/properties")
    return name


def _literal(value: Any, where: str) -> Any:
    """A value the converter writes into the grammar as its JSON text (const, enum, property
    names). Its literal escaping is not JSON's: text that JSON must escape would come out
    wrong, so it is refused."""
    if isinstance(value, str):
        if any(c in '"\\' or c < " " or c > "\uffff" for c in value):
            raise UnsupportedSchema(
                f"{where}: strings with quotes, backslashes, control characters or characters"
                " beyond U+FFFF are not supported"
            )
    elif isinstance(value, float) and not math.isfinite(value):
        raise UnsupportedSchema(f"{where}: only finite numbers are supported")
    elif isinstance(value, list):
        for item in value:
            _literal(item, where)
    elif isinstance(value, dict):
        for key, item in value.items():
            _literal(key, where)
            _literal(item, where)
    return value
