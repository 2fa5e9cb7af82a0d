"""The `format` request field's JSON Schemas: which ones a grammar can hold a reply to, and the
bounds that keep turning one into a grammar, and holding a reply to it, cheap.

Pure Python, no llama.cpp and no jsonschema: protocol.py checks a schema's size here while it
parses a request (on paho's network thread, so only what takes a fraction of a millisecond),
and the node's grammar compiler (node/grammar.py, on a thread of its own) walks it here before
converting it. Bounds and why (docs/protocol.md lists them for clients):
- MAX_SCHEMA_BYTES of compact JSON: every later step (the metaschema check, this walk, the
  converter, llama.cpp's parser) costs about in proportion to it.
- MAX_PARTS schema nodes after every $ref is inlined: a few definitions used twice each could
  otherwise expand into millions.
- MAX_ALTERNATIVES enum/anyOf/type-list choices in all, MAX_ENUM_LITERAL_CHARS per literal:
  while a reply is inside a choice, llama.cpp's grammar keeps one parse per alternative alive
  and checks every vocabulary token against each of them when the model's pick is refused
  (2,400 enum strings with a shared prefix: 0.36-0.54 s per refused token).
- MAX_PROPERTIES per object: the converter spells optional properties out pairwise (its time
  grows with their square: 950 took 2.2 s).
- MAX_REPEAT for minItems/maxItems/minLength/maxLength: spelt out as nested optional groups,
  which llama.cpp's grammar parser reads recursively.
"""

from __future__ import annotations

import json
import math
from typing import Any, Final
from urllib.parse import unquote

MAX_SCHEMA_BYTES: Final = 8192
MAX_PARTS: Final = 500
MAX_ALTERNATIVES: Final = 128
MAX_ENUM_LITERAL_CHARS: Final = 256
MAX_PROPERTIES: Final = 64
MAX_REPEAT: Final = 256

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
STRING_FORMATS: Final = frozenset(
    {"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"}
)
# The types the converter has a rule for.
SIMPLE_TYPES: Final = frozenset({"array", "boolean", "integer", "null", "number", "string"})


class UnsupportedSchema(ValueError):
    """A schema that is invalid, too big, or asks for something a grammar cannot enforce."""


def canonical(schema: dict[str, Any]) -> str:
    """The schema's canonical text: the same for every spelling of the same schema (key order,
    whitespace, escapes), so a cache keyed on it is not defeated by respelling. The order of
    the names under `properties` is kept: it is the order the reply writes them in."""
    return json.dumps(_ordered(schema), separators=(",", ":"), ensure_ascii=False)


def _ordered(node: Any, *, names: bool = False) -> Any:
    """`node` with every object's keys sorted, but a `properties` object's names in their order."""
    if isinstance(node, dict):
        keys = list(node) if names else sorted(node)
        return {k: _ordered(node[k], names=(k == "properties" and not names)) for k in keys}
    if isinstance(node, list):
        return [_ordered(v) for v in node]
    return node


def check_size(schema: dict[str, Any]) -> str:
    """The schema's canonical text, or UnsupportedSchema naming the size bound. Cheap (the
    C JSON encoder over at most a payload's worth): run while parsing a request."""
    try:
        text = canonical(schema)
    except (ValueError, RecursionError):  # NaN cannot come from JSON; depth is pydantic's
        raise UnsupportedSchema("the schema is not valid JSON") from None
    size = len(text.encode("utf-8"))
    if size > MAX_SCHEMA_BYTES:
        raise UnsupportedSchema(
            f"the schema is {size} bytes as compact JSON, more than the {MAX_SCHEMA_BYTES} allowed"
        )
    return text


def plain_schema(schema: dict[str, Any], *, bounded: bool = True) -> dict[str, Any]:
    """The schema with every $ref inlined and every annotation dropped: exactly the keywords
    the grammar will enforce. Raises UnsupportedSchema for anything else or over a bound.
    Expects a schema that passed the JSON Schema metaschema (keyword values well typed).
    `bounded` False: a format the node itself builds from its operator's configuration (the
    Wyoming adapter's intents), held only to what the converter needs (parts, repeats); its
    grammar's per-token work is still paced like any other (node/pacing.py)."""
    try:
        return _Checker(schema, bounded).check(schema, "#", ())
    except RecursionError:
        raise UnsupportedSchema("the schema is nested too deeply") from None


class _Checker:
    """Walks a schema the way the converter's `visit` does, and returns it with every $ref
    inlined and every annotation dropped: exactly the keywords the grammar will enforce."""

    def __init__(self, root: dict[str, Any], bounded: bool) -> None:
        self._root = root
        self._bounded = bounded
        self._nodes = 0
        self._alternatives = 0

    def check(self, node: Any, where: str, refs: tuple[str, ...]) -> dict[str, Any]:
        self._count_part()
        if not isinstance(node, dict):
            raise UnsupportedSchema(f"{where}: true/false schemas are not supported")
        keys = {k: v for k, v in node.items() if k not in ANNOTATIONS}
        if "$ref" in keys:
            return self._ref(keys, where, refs)
        kind = keys.get("type")
        out: dict[str, Any] = {k: keys[k] for k in ("type",) if k in keys}
        if "anyOf" in keys:
            self._choices(len(keys["anyOf"]), where)
            out = {
                "anyOf": [
                    self.check(sub, f"{where}/anyOf/{i}", refs)
                    for i, sub in enumerate(keys["anyOf"])
                ]
            }
        elif "oneOf" in keys or "allOf" in keys:
            which = "oneOf" if "oneOf" in keys else "allOf"
            raise UnsupportedSchema(f"{where}: {which} is not supported (anyOf is)")
        elif isinstance(kind, list):
            self._choices(len(kind), where)
            for t in kind:
                if t not in SIMPLE_TYPES | {"object"}:
                    raise UnsupportedSchema(f"{where}: type {t!r} is not supported")
        elif "const" in keys:
            out["const"] = self._literal(keys["const"], f"{where}/const")
        elif "enum" in keys:
            if not keys["enum"]:
                raise UnsupportedSchema(f"{where}: an enum without values allows no reply")
            self._choices(len(keys["enum"]), where)
            out["enum"] = [self._literal(v, f"{where}/enum") for v in keys["enum"]]
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

    def _count_part(self) -> None:
        self._nodes += 1
        if self._nodes > MAX_PARTS:
            raise UnsupportedSchema(f"the schema has more than {MAX_PARTS} parts ($ref inlined)")

    def _literal(self, value: Any, where: str) -> Any:
        return _literal(value, where, MAX_ENUM_LITERAL_CHARS if self._bounded else None)

    def _name(self, name: str, where: str) -> str:
        self._literal(name, f"{where}/properties")
        return name

    def _choices(self, n: int, where: str) -> None:
        """Count a choice's alternatives against the schema's bound."""
        self._alternatives += n
        if self._bounded and self._alternatives > MAX_ALTERNATIVES:
            raise UnsupportedSchema(
                f"{where}: the schema has more than {MAX_ALTERNATIVES} alternatives in all "
                "(enum values, anyOf branches, types in a list; $ref inlined)"
            )

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
        if self._bounded and len(props) > MAX_PROPERTIES:
            raise UnsupportedSchema(
                f"{where}: {len(props)} properties, more than the {MAX_PROPERTIES} allowed"
            )
        out: dict[str, Any] = {
            "properties": {
                self._name(name, where): self.check(sub, f"{where}/properties/{name}", refs)
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


def _literal(value: Any, where: str, longest: int | None = MAX_ENUM_LITERAL_CHARS) -> Any:
    """A value the converter writes into the grammar as its JSON text (const, enum, property
    names). Its literal escaping is not JSON's: text that JSON must escape would come out
    wrong, so it is refused."""
    if isinstance(value, str):
        if longest is not None and len(value) > longest:
            raise UnsupportedSchema(
                f"{where}: a string of {len(value)} characters, more than the {longest} allowed"
            )
        if any(c in '"\\' or c < " " or c > "\uffff" for c in value):
            raise UnsupportedSchema(
                f"{where}: strings with quotes, backslashes, control characters or characters"
                " beyond U+FFFF are not supported"
            )
    elif isinstance(value, float) and not math.isfinite(value):
        raise UnsupportedSchema(f"{where}: only finite numbers are supported")
    elif isinstance(value, list):
        for item in value:
            _literal(item, where, longest)
    elif isinstance(value, dict):
        for key, item in value.items():
            _literal(key, where, longest)
            _literal(item, where, longest)
    return value
