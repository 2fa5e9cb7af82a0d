"""From a spoken command to Home Assistant's intent: the prompt, the reply's JSON Schema, and the
reply read back as an intent or a spoken answer. Pure logic, no llama.cpp (the Wyoming server in
wyoming.py sends the request through the scheduler).

The schema is the request's `format`, so the model's reply is grammar-constrained: it is always
one JSON object naming one of the intents below with slots of the right kind, and `name` and
`area` can only be values of the configured names file (an `enum`). Whether it is the *right*
intent is the model's part: scripts/assist-eval measures it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

# The names file: enough for a house, small enough that the grammar stays quick to build.
MAX_NAMES: Final = 500
MAX_NAME_CHARS: Final = 64
MAX_ITEM_CHARS: Final = 80  # HassListAddItem's item
MAX_ANSWER_CHARS: Final = 160  # a spoken answer: a sentence or two
ANSWER: Final = "answer"  # the reply that is no intent: Handled with its text

DOMAINS: Final = ("light", "switch", "fan", "cover", "media_player", "climate", "lock")
COLORS: Final = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "white")
# Home Assistant's built-in intents that take no slot the model fills.
BARE_INTENTS: Final = {
    "HassCancelTimer": "cancel the timer",
    "HassGetCurrentTime": "what time it is",
    "HassGetCurrentDate": "what the date is",
    "HassGetWeather": "what the weather is",
    "HassMediaPause": "pause the music",
    "HassMediaUnpause": "resume the music",
    "HassMediaNext": "skip to the next song",
}


class EntitiesError(ValueError):
    """A names file that cannot be used; the message names the file and the fault."""


@dataclass(frozen=True, slots=True)
class Entities:
    """The device and area names the model may use (Home Assistant's names and aliases)."""

    names: tuple[str, ...] = ()
    areas: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class IntentAnswer:
    """A command: Home Assistant runs the intent; `speech` is said if its handler says nothing
    (a template over the slots, which Home Assistant renders)."""

    name: str
    slots: dict[str, Any] = field(default_factory=dict)
    speech: str = ""


@dataclass(frozen=True, slots=True)
class SpokenAnswer:
    """Anything that is no command: a short answer to say."""

    text: str


class ReplyError(ValueError):
    """The model's reply is not one object of the schema (cut short by its token limit)."""


def load_entities(path: Path) -> Entities:
    """The names file `{"names": [...], "areas": [...]}`, checked."""
    try:
        data = json.loads(path.read_bytes())
    except OSError as exc:
        raise EntitiesError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, RecursionError) as exc:
        raise EntitiesError(f"{path} is not JSON: {exc}") from None
    if not isinstance(data, dict) or set(data) - {"names", "areas"}:
        raise EntitiesError(f'{path}: must be an object {{"names": [...], "areas": [...]}}')
    return Entities(_names(data, "names", path), _names(data, "areas", path))


def _names(data: dict[str, Any], key: str, path: Path) -> tuple[str, ...]:
    values = data.get(key, [])
    if not isinstance(values, list) or len(values) > MAX_NAMES:
        raise EntitiesError(f"{path}: {key} must be a list of at most {MAX_NAMES} strings")
    seen: dict[str, None] = {}
    for value in values:
        # The grammar writes each name as a literal, which cannot hold these (grammar.py).
        if (
            not isinstance(value, str)
            or not value.strip()
            or len(value) > MAX_NAME_CHARS
            or any(c in '"\\{}' or c < " " or c > "\uffff" for c in value)
        ):
            raise EntitiesError(
                f"{path}: {key}: {value!r} is not a name of 1 to {MAX_NAME_CHARS} characters "
                "without quotes, backslashes, braces or control characters"
            )
        seen[value.strip()] = None
    return tuple(seen)


# -- the reply's schema ------------------------------------------------------------------------


def _variant(intent: str, required: dict[str, Any], optional: dict[str, Any]) -> dict[str, Any]:
    """One object shape: `intent` first (the model decides it before the slots)."""
    return {
        "type": "object",
        "properties": {"intent": {"const": intent}, **required, **optional},
        "required": ["intent", *required],
        "additionalProperties": False,
    }


def _ints(low: int, high: int) -> dict[str, Any]:
    # An enum, not minimum/maximum: the grammar can hold a reply to the one, not the other.
    return {"enum": list(range(low, high + 1))}


def intent_schema(entities: Entities) -> dict[str, Any]:
    """The JSON Schema of every reply (the request's `format`)."""
    name = {"name": {"enum": list(entities.names)}} if entities.names else {}
    area = {"area": {"enum": list(entities.areas)}} if entities.areas else {}
    domain = {"domain": {"enum": list(DOMAINS)}}
    where = {**name, **area}
    variants: list[dict[str, Any]] = []
    for on_off in ("HassTurnOn", "HassTurnOff"):
        if name:
            variants.append(_variant(on_off, name, area))
        if area:
            variants.append(_variant(on_off, area, domain))
    variants += [
        _variant("HassLightSet", {"brightness": _ints(0, 100)}, where),
        _variant("HassLightSet", {"color": {"enum": list(COLORS)}}, where),
        _variant("HassClimateSetTemperature", {"temperature": _ints(5, 95)}, where),
    ]
    if name:
        variants.append(_variant("HassGetState", name, area))
        item = {"item": {"type": "string", "minLength": 1, "maxLength": MAX_ITEM_CHARS}}
        variants.append(_variant("HassListAddItem", {**item, **name}, {}))
    variants += [
        _variant("HassStartTimer", {"minutes": _ints(1, 180)}, {"seconds": _ints(1, 59)}),
        _variant("HassStartTimer", {"seconds": _ints(1, 3600)}, {}),
        _variant("HassStartTimer", {"hours": _ints(1, 24)}, {"minutes": _ints(1, 59)}),
    ]
    variants += [_variant(bare, {}, {}) for bare in BARE_INTENTS]
    text = {"type": "string", "minLength": 1, "maxLength": MAX_ANSWER_CHARS}
    variants.append(_variant(ANSWER, {"text": text}, {}))
    return {"anyOf": variants}


# -- the prompt --------------------------------------------------------------------------------


def system_prompt(entities: Entities) -> str:
    """What the model is told: the intents, the names it may use, and worked examples built from
    those names (a small model follows examples far better than rules)."""
    device = entities.names[0] if entities.names else "kitchen light"
    room = entities.areas[0] if entities.areas else "kitchen"
    lines = [
        "You are the voice assistant of a smart home. Reply to every message with one JSON "
        "object. For a command, give the intent and its slots; for anything else, "
        f'{{"intent": "{ANSWER}", "text": "<a short spoken answer>"}}.',
        "Intents:",
        '- HassTurnOn / HassTurnOff: a device by "name", or everything in an "area" '
        '(with "domain": light, switch, fan, ...).',
        '- HassLightSet: "brightness" in percent or "color", of a light "name" or an "area".',
        '- HassClimateSetTemperature: "temperature" in degrees, optionally "area" or "name".',
        '- HassGetState: the state of a device "name" (is it on, is it open).',
        '- HassListAddItem: add "item" to the list "name".',
        '- HassStartTimer: "hours", "minutes" or "seconds".',
        *(f"- {intent}: {what}." for intent, what in BARE_INTENTS.items()),
        "Device names: " + (", ".join(entities.names) or "(none)"),
        "Areas: " + (", ".join(entities.areas) or "(none)"),
        "Examples:",
        *(f"{said} -> {json.dumps(reply)}" for said, reply in _examples(device, room)),
    ]
    return "\n".join(lines)


def _examples(device: str, room: str) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"turn on the {device}", {"intent": "HassTurnOn", "name": device}),
        (
            f"switch off the lights in the {room}",
            {"intent": "HassTurnOff", "area": room, "domain": "light"},
        ),
        (
            f"dim the {device} to 30 percent",
            {"intent": "HassLightSet", "brightness": 30, "name": device},
        ),
        ("set a timer for 5 minutes", {"intent": "HassStartTimer", "minutes": 5}),
        ("what time is it", {"intent": "HassGetCurrentTime"}),
        ("who wrote hamlet", {"intent": ANSWER, "text": "William Shakespeare wrote Hamlet."}),
    ]


# -- the reply ---------------------------------------------------------------------------------

# Said when Home Assistant's intent handler sets no speech of its own; templates over the slots
# (Home Assistant renders them with the slot values as data, never as template text).
SPEECH: Final = {
    "HassTurnOn": "Turned on {{ slots.name or slots.area }}.",
    "HassTurnOff": "Turned off {{ slots.name or slots.area }}.",
    "HassLightSet": "Done.",
    "HassClimateSetTemperature": "Set the temperature to {{ slots.temperature }}.",
    "HassGetState": "{{ state.name }} is {{ state.state }}.",
    "HassListAddItem": "Added {{ slots.item }} to {{ slots.name }}.",
    "HassStartTimer": "Timer started.",
}


# A spoken answer whose text the token limit cut: what it says so far is still worth saying.
_CUT_ANSWER: Final = re.compile(
    r'\s*\{\s*"intent"\s*:\s*"' + ANSWER + r'"\s*,\s*"text"\s*:\s*"(?P<text>.*)', re.DOTALL
)


def read_reply(text: str, *, cut: bool = False) -> IntentAnswer | SpokenAnswer:
    """The model's (grammar-constrained) reply as an intent or a spoken answer. `cut`: the
    token limit ended it (only an answer's text can be long enough for that: read up to there)."""
    try:
        data = json.loads(text)
    except ValueError:
        partial = _CUT_ANSWER.fullmatch(text) if cut else None
        if partial is not None and (said := _cut_string(partial["text"])):
            return SpokenAnswer(said + "...")
        raise ReplyError(f"the reply is not complete JSON: {text[:80]!r}") from None
    if not isinstance(data, dict) or not isinstance(data.get("intent"), str):
        raise ReplyError("the reply names no intent")
    intent = data.pop("intent")
    if intent == ANSWER:
        return SpokenAnswer(str(data.get("text", "")).strip() or "OK.")
    return IntentAnswer(intent, data, SPEECH.get(intent, "Done."))


def _cut_string(body: str) -> str:
    """The text of a JSON string cut anywhere (in an escape too), as far as it decodes."""
    for end in range(len(body), max(len(body) - 6, -1), -1):
        try:
            value = json.loads('"' + body[:end] + '"')
        except ValueError:
            continue
        return str(value).strip()
    return ""
