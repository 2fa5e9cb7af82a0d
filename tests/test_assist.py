"""The Assist logic without a model: the names file, the reply's schema and grammar, reading a
reply (cut ones too), the Wyoming event reader's bounds, ids for peers and conversations, and
the [wyoming] settings."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

from qwen_edge import settings as settings_module
from qwen_edge.node.assist import (
    Entities,
    EntitiesError,
    IntentAnswer,
    ReplyError,
    SpokenAnswer,
    intent_schema,
    load_entities,
    read_reply,
    system_prompt,
)
from qwen_edge.node.grammar import grammar_for
from qwen_edge.node.wyoming import (
    EventError,
    client_id_for,
    conversation_id_for,
    read_event,
)
from qwen_edge.protocol import ID_PATTERN
from qwen_edge.settings import ConfigError, Settings, load_settings

HOUSE = Entities(("kitchen light", "shopping list"), ("kitchen", "living room"))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    for name in list(os.environ):
        if name.upper().startswith("QWEN_EDGE_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(settings_module, "DEFAULT_CONFIG_FILE", tmp_path / "absent.toml")
    yield
    Settings.toml_file = None


def test_names_file_is_read_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "e.json"
    path.write_text('{"names": ["kitchen light", " kitchen light "], "areas": ["kitchen"]}')
    assert load_entities(path) == Entities(("kitchen light",), ("kitchen",))
    for bad in (
        '{"names": ["a\\"b"]}',
        '{"names": "x"}',
        "[]",
        '{"rooms": []}',
        "{",
        '{"names": [""]}',
    ):
        path.write_text(bad)
        with pytest.raises(EntitiesError, match=str(path)):
            load_entities(path)


def test_schema_holds_names_and_areas_to_the_lists() -> None:
    schema = intent_schema(HOUSE)
    grammar_for(schema)  # a schema the grammar enforces in full (else UnsupportedSchema)
    jsonschema.validate({"intent": "HassTurnOn", "name": "kitchen light"}, schema)
    jsonschema.validate({"intent": "HassTurnOff", "area": "kitchen", "domain": "light"}, schema)
    jsonschema.validate({"intent": "answer", "text": "Hi."}, schema)
    for bad in (
        {"intent": "HassTurnOn", "name": "garden sprinkler"},
        {"intent": "HassTurnOn", "area": "garage"},
        {"intent": "HassLightSet", "brightness": 101},
        {"intent": "HassTurnOn", "name": "kitchen light", "extra": 1},
        {"intent": "HassDeleteEverything"},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_schema_without_names_has_no_targeted_intents() -> None:
    schema = intent_schema(Entities())
    grammar_for(schema)
    intents = {v["properties"]["intent"]["const"] for v in schema["anyOf"]}
    assert "HassTurnOn" not in intents and "HassGetCurrentTime" in intents
    assert "kitchen" in system_prompt(Entities())  # examples still there


def test_reply_is_read_as_intent_or_answer() -> None:
    answer = read_reply('{"intent": "HassTurnOn", "name": "kitchen light"}')
    assert answer == IntentAnswer("HassTurnOn", {"name": "kitchen light"}, answer.speech)
    assert "{{ slots." in answer.speech
    assert read_reply('{"intent": "answer", "text": " Hi. "}') == SpokenAnswer("Hi.")
    # Cut by the token limit: an answer is said as far as it got, an intent is not guessed.
    assert read_reply('{"intent": "answer", "text": "It is a long \\u00', cut=True) == (
        SpokenAnswer("It is a long...")
    )
    with pytest.raises(ReplyError):
        read_reply('{"intent": "HassTurnOn", "name": "kitch', cut=True)
    with pytest.raises(ReplyError):
        read_reply('{"intent": "answer", "text": "cut', cut=False)


def events(raw: bytes, limit: int = 4096) -> list[object]:
    async def read() -> list[object]:
        reader = asyncio.StreamReader(limit=limit)
        reader.feed_data(raw)
        reader.feed_eof()
        out: list[object] = []
        while True:
            try:
                event = await read_event(reader, limit)
            except EventError as exc:
                out.append(str(exc))
                return out
            if event is None:
                return out
            out.append((event.type, event.data, event.payload))

    return asyncio.run(read())


def test_event_reader_merges_data_and_bounds_every_part() -> None:
    data = json.dumps({"text": "hi"}).encode()
    header = json.dumps({"type": "transcript", "data": {"a": 1}, "data_length": len(data)})
    assert events(header.encode() + b"\n" + data) == [("transcript", {"a": 1, "text": "hi"}, None)]
    assert events(b'{"type": "describe"}\n' * 2) == [("describe", {}, None)] * 2
    assert "larger than 4096" in str(events(b'{"type": "x", "payload_length": 5000}\n'))
    assert "header longer" in str(events(b"x" * 5000))
    assert "middle of an event" in str(events(b'{"type": "x", "data_length": 10}\n{}'))
    assert "not JSON" in str(events(b"[" * 5000 + b"\n", limit=8192))
    assert "whole number" in str(events(b'{"type": "x", "data_length": 1.5}\n'))


def test_peer_and_conversation_ids_fit_the_protocol() -> None:
    import re

    ids = [
        client_id_for("127.0.0.1"),
        client_id_for("fe80::1%eth0"),
        conversation_id_for({"conversation_id": "01JD0ABCDEF"}),
        conversation_id_for({"conversation_id": "x y/z" * 50}),
        conversation_id_for(None),
    ]
    assert all(re.fullmatch(ID_PATTERN, i) for i in ids)
    assert ids[2] == "01JD0ABCDEF"
    assert conversation_id_for({"conversation_id": "a b"}) == conversation_id_for(
        {"conversation_id": "a b"}
    )
    assert conversation_id_for({}) != conversation_id_for({})


def test_wyoming_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    names = tmp_path / "names.json"
    names.write_text('{"names": ["tv"], "areas": []}')
    monkeypatch.setenv("QWEN_EDGE_WYOMING__ENABLED", "true")
    monkeypatch.setenv("QWEN_EDGE_WYOMING__PORT", "10555")
    monkeypatch.setenv("QWEN_EDGE_WYOMING__ENTITIES", str(names))
    wyoming = load_settings(None).wyoming
    assert (wyoming.enabled, wyoming.port, wyoming.entities) == (True, 10555, names)
    names.write_text('{"names": ["a\\\\b"]}')
    with pytest.raises(ConfigError, match=r"QWEN_EDGE_WYOMING__ENTITIES.*backslashes"):
        load_settings(None)
