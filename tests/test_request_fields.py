"""The request fields `format`, `stop` and `chunk_ms` end to end: a real mosquitto, the daemon
process, SmolLM2-135M-Instruct (docs/protocol.md, "Request")."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from functools import partial
from typing import Any

import jsonschema
import llama_cpp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devtools.harness import MODELS, SMOLLM, Broker, Daemon, Probe, reply_text
from qwen_edge.node.engine import Engine, GrammarSampler, Row, SamplingParams, quiet_llama_logs
from qwen_edge.node.grammar import UnsupportedSchema, grammar_for
from qwen_edge.settings import ModelSettings

pytestmark = pytest.mark.usefixtures("daemon")


@pytest.fixture(scope="module")
def daemon(module_broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """The daemon with SmolLM2-135M on one thread: this module asks for a few thousand tokens,
    and two llama.cpp threads on a busy two-core machine wait for each other far longer than
    one thread computes."""
    d = Daemon(
        tmp_path_factory.mktemp("daemon"), module_broker, SMOLLM, QWEN_EDGE_MODEL__THREADS="1"
    )
    d.start()
    yield d
    d.stop()


NAME = {"type": "string", "maxLength": 40}
ADDRESS = {
    "type": "object",
    "properties": {"street": NAME, "city": NAME},
    "required": ["street", "city"],
}
# (message, schema): objects with required strings, integers, enums, arrays, nesting, $ref,
# anyOf, tuples, formats, and roots that are no object.
SCHEMAS: list[tuple[str, dict[str, Any]]] = [
    (
        "Describe Alice, a 30 year old engineer, as JSON.",
        {
            "type": "object",
            "properties": {"name": NAME, "age": {"type": "integer"}, "job": NAME},
            "required": ["name", "age", "job"],
        },
    ),
    (
        "What is the weather like in Paris today? Answer in JSON.",
        {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "temperature_c": {"type": "number"},
                "condition": {"enum": ["sunny", "cloudy", "rainy", "snowy"]},
            },
            "required": ["city", "temperature_c", "condition"],
            "additionalProperties": False,
        },
    ),
    (
        "List the things I need to do to bake a cake.",
        {
            "type": "object",
            "properties": {"steps": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 5}},
            "required": ["steps"],
        },
    ),
    (
        "Tell me about the book Dune.",
        {
            "type": "object",
            "properties": {
                "title": NAME,
                "author": NAME,
                "year": {"type": "integer"},
                "genres": {
                    "type": "array",
                    "items": {"enum": ["fiction", "science fiction", "fantasy", "history"]},
                    "maxItems": 3,
                },
            },
            "required": ["title", "author", "year", "genres"],
        },
    ),
    (
        "Is the sky blue? Answer with a reason.",
        {
            "type": "object",
            "properties": {
                "answer": {"type": "boolean"},
                "reason": {"type": "string", "maxLength": 80},
            },
            "required": ["answer", "reason"],
        },
    ),
    (
        "Give me the colour orange as a name and RGB values.",
        {
            "type": "object",
            "properties": {
                "name": NAME,
                "rgb": {
                    "type": "array",
                    "prefixItems": [{"type": "integer"}] * 3,
                    "items": False,
                },
            },
            "required": ["name", "rgb"],
        },
    ),
    (
        "Plan a birthday party for next Saturday.",
        {
            "type": "object",
            "properties": {
                "title": NAME,
                "date": {"type": "string", "format": "date"},
                "guests": {"type": "integer"},
            },
            "required": ["title", "date", "guests"],
        },
    ),
    (
        "Give me a recipe for pancakes.",
        {
            "type": "object",
            "properties": {
                "dish": NAME,
                "ingredients": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"name": NAME, "grams": {"type": "integer"}},
                        "required": ["name", "grams"],
                    },
                    "minItems": 2,
                    "maxItems": 4,
                },
            },
            "required": ["dish", "ingredients"],
        },
    ),
    (
        "What is the sentiment of: 'I love this phone, it is great!'",
        {
            "type": "object",
            "properties": {
                "sentiment": {"enum": ["positive", "negative", "neutral"]},
                "confidence": {"type": "number"},
            },
            "required": ["sentiment", "confidence"],
        },
    ),
    (
        "Where do Bob live and work?",
        {
            "type": "object",
            "properties": {
                "home": {"$ref": "#/$defs/address"},
                "work": {"$ref": "#/$defs/address"},
            },
            "required": ["home", "work"],
            "$defs": {"address": ADDRESS},
        },
    ),
    (
        "Tell me about a user who may or may not have a nickname.",
        {
            "type": "object",
            "properties": {
                "nickname": {"anyOf": [{"type": "string", "maxLength": 20}, {"type": "null"}]},
                "age": {"type": "integer"},
            },
            "required": ["nickname", "age"],
        },
    ),
    (
        "How many legs does a spider have?",
        {
            "type": "object",
            "properties": {"value": {"type": ["integer", "string"]}, "unit": NAME},
            "required": ["value"],
        },
    ),
    (
        "Report the status of the server.",
        {
            "type": "object",
            "properties": {"version": {"const": 1}, "status": {"enum": ["ok", "error"]}},
            "required": ["version", "status"],
        },
    ),
    (
        "Describe a cat. Include whatever you like.",
        {
            "type": "object",
            "properties": {"name": NAME, "colour": NAME, "lives": {"type": "integer"}},
        },
    ),
    (
        "Create an account for a new user.",
        {
            "type": "object",
            "properties": {
                "user": {
                    "type": "object",
                    "properties": {"id": {"type": "integer"}, "email": NAME},
                    "required": ["id", "email"],
                },
                "active": {"type": "boolean"},
            },
            "required": ["user", "active"],
        },
    ),
    (
        "Name the planets closest to the sun and their moons.",
        {
            "type": "object",
            "properties": {
                "planets": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"name": NAME, "moons": {"type": "integer"}},
                        "required": ["name", "moons"],
                    },
                    "maxItems": 3,
                }
            },
            "required": ["planets"],
        },
    ),
    (
        "When does the morning meeting start?",
        {
            "type": "object",
            "properties": {"meeting": {"type": "string", "format": "time"}, "room": NAME},
            "required": ["meeting"],
        },
    ),
    (
        "Make a record for a new parcel.",
        {
            "type": "object",
            "properties": {
                "id": {"type": "string", "format": "uuid"},
                "label": {"type": "string", "maxLength": 10},
                "weight_kg": {"type": "number"},
            },
            "required": ["id", "label", "weight_kg"],
        },
    ),
    (
        "Give me three to five lucky numbers.",
        {"type": "array", "items": {"type": "integer"}, "minItems": 3, "maxItems": 5},
    ),
    (
        "Should I take an umbrella today?",
        {"enum": ["yes", "no", "maybe"]},
    ),
    (
        "Summarise the French revolution.",
        {
            "title": "Summary",
            "description": "A short summary",
            "type": "object",
            "properties": {
                "summary": {"type": "string", "maxLength": 120, "description": "one sentence"},
                "year": {"type": "integer", "title": "Year it began"},
            },
            "required": ["summary", "year"],
        },
    ),
    ("What is your favourite animal?", {"type": "string", "maxLength": 30}),
]


def subscribed(probe_factory: Any, client_id: str = "dev1") -> Probe:
    probe: Probe = probe_factory(client_id)
    probe.subscribe(probe.reply_topic("+"))
    return probe


def ask(probe: Probe, message: str, **fields: Any) -> list[dict[str, Any]]:
    return probe.collect(probe.request(message, **fields), timeout=120)


def chunks(messages: list[dict[str, Any]]) -> list[str]:
    return [m["text"] for m in messages if m["type"] == "chunk"]


def assert_contiguous(messages: list[dict[str, Any]]) -> None:
    assert [m["seq"] for m in messages] == list(range(len(messages)))
    assert messages[0]["type"] == "start"
    assert messages[-1]["type"] == "done"


# -- format ------------------------------------------------------------------------------------


def test_every_reply_to_a_schema_parses_and_validates(probe_factory: Any) -> None:
    dev = subscribed(probe_factory)
    started = time.monotonic()
    tokens = 0
    for i, (message, schema) in enumerate(SCHEMAS):
        msgs = ask(dev, message, format=schema, max_tokens=300, seed=i, conversation_id=f"s{i}")
        assert_contiguous(msgs)
        assert msgs[-1]["finish_reason"] == "stop", (message, reply_text(msgs))
        value = json.loads(reply_text(msgs))
        jsonschema.validate(value, schema)
        tokens += msgs[-1]["usage"]["completion_tokens"]
        print(f"{time.monotonic() - started:6.1f} s {reply_text(msgs)}")
    elapsed = time.monotonic() - started
    print(f"\n{len(SCHEMAS)} schemas: all valid, {tokens} tokens in {elapsed:.1f} s")


def test_format_json_gives_a_json_object(probe_factory: Any) -> None:
    dev = subscribed(probe_factory)
    for seed, message in enumerate(["Describe a dog.", "List three fruits.", "你好"]):
        msgs = ask(dev, message, format="json", max_tokens=300, seed=seed, conversation_id="j")
        assert msgs[-1]["finish_reason"] == "stop"
        assert isinstance(json.loads(reply_text(msgs)), dict)


def test_reply_cut_short_by_max_tokens_ends_with_length(probe_factory: Any) -> None:
    dev = subscribed(probe_factory)
    schema = {
        "type": "object",
        "properties": {"story": {"type": "string", "minLength": 100}},
        "required": ["story"],
    }
    msgs = ask(dev, "Tell me a long story.", format=schema, max_tokens=8, temperature=0)
    assert msgs[-1]["finish_reason"] == "length"
    with pytest.raises(ValueError):
        json.loads(reply_text(msgs))


@pytest.mark.parametrize(
    ("fmt", "says"),
    [
        ({"type": "object", "properties": {"a": {"type": "strnig"}}}, "not a valid JSON Schema"),
        ({"type": "integer", "minimum": 0}, "'minimum' is not supported"),
        ({"type": "string", "pattern": "^(?!x)"}, "pattern is not supported"),
        ({"$ref": "https://example.com/s.json"}, "only local $ref"),
        ("yaml", '"json" or a JSON Schema object'),
    ],
)
def test_invalid_or_unsupported_schema_is_a_bad_request_alone(
    probe_factory: Any, fmt: Any, says: str
) -> None:
    dev = subscribed(probe_factory)
    (err,) = ask(dev, "Hello", format=fmt)
    assert (err["type"], err["seq"], err["code"]) == ("error", 0, "bad_request")
    assert err["message"].startswith("format")
    assert says in err["message"]


# Schemas built from what the grammar supports, and from what it does not.
_leaves = st.sampled_from(
    [
        {},
        {"type": "string"},
        {"type": "integer"},
        {"type": "number"},
        {"type": "boolean"},
        {"type": "null"},
        {"type": "string", "minLength": 2, "maxLength": 256},
        {"type": "string", "format": "date-time"},
        {"type": "string", "format": "uuid"},
        {"enum": ["a b", 1, None, "中文"]},
        {"const": {"k": [1, 2.5]}},
        {"type": ["string", "integer"]},
        {"type": "integer", "minimum": 0},
        {"type": "string", "pattern": "^a$"},
        {"type": "string", "format": "email"},
        {"enum": ['"']},
    ]
)
_names = st.text(alphabet='abc_-. 中"', min_size=1, max_size=6)
_schemas = st.recursive(
    _leaves,
    lambda inner: (
        st.dictionaries(_names, inner, max_size=4).flatmap(
            lambda props: st.fixed_dictionaries(
                {
                    "type": st.just("object"),
                    "properties": st.just(props),
                    "required": st.lists(st.sampled_from(sorted(props) or ["x"]), unique=True),
                    "additionalProperties": st.sampled_from([False, True]),
                }
            )
        )
        | st.fixed_dictionaries(
            {"type": st.just("array"), "items": inner},
            optional={"minItems": st.integers(0, 300), "maxItems": st.integers(0, 300)},
        )
        | st.fixed_dictionaries({"anyOf": st.lists(inner, min_size=1, max_size=3)})
        | st.fixed_dictionaries({"type": st.just("array"), "prefixItems": st.lists(inner)})
    ),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def qwen_vocab() -> Iterator[Any]:
    """The Qwen2 vocabulary alone (152k tokens), without weights."""
    quiet_llama_logs()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(
        str(MODELS / "ggml-vocab-qwen2.gguf").encode(), params
    )
    assert model
    yield llama_cpp.llama_model_get_vocab(model)
    llama_cpp.llama_model_free(model)


@settings(max_examples=150, deadline=None)
@given(schema=_schemas)
def test_every_accepted_schema_gives_a_grammar_llama_cpp_reads(
    schema: dict[str, Any], qwen_vocab: Any
) -> None:
    try:
        grammar = grammar_for(schema)
    except UnsupportedSchema as exc:
        assert str(exc)
        return
    sampler = llama_cpp.llama_sampler_init_grammar(qwen_vocab, grammar.encode(), b"root")
    assert sampler, grammar
    llama_cpp.llama_sampler_free(sampler)


def _greedy_tokens(engine: Engine, message: str, sample: Any, limit: int = 80) -> list[int]:
    engine.forget(0)
    prompt = engine.chat_prompt([{"role": "user", "content": message}])
    index = engine.decode([Row(0, prompt, 0, True)])[0]
    tokens: list[int] = []
    while len(tokens) < limit:
        token = int(sample(index))
        if engine.is_end(token):
            break
        tokens.append(token)
        index = engine.decode([Row(0, (token,), len(prompt) + len(tokens) - 1, True)])[0]
    return tokens


def test_checking_only_the_picked_token_picks_what_masking_every_token_would() -> None:
    """GrammarSampler lets the grammar check the chain's pick and masks the whole vocabulary
    only when it refuses: with greedy sampling that must choose exactly the tokens a grammar
    applied to every candidate chooses."""
    engine = Engine(ModelSettings(path=SMOLLM, n_ctx=512, slots=1, threads=1))
    try:
        for message, schema in SCHEMAS[:4]:
            grammar = grammar_for(schema)
            checked = engine.new_sampler(SamplingParams(0, 1, 0, 0, 1, 0, 0, grammar))
            assert isinstance(checked, GrammarSampler)
            masked = llama_cpp.llama_sampler_chain_init(
                llama_cpp.llama_sampler_chain_default_params()
            )
            llama_cpp.llama_sampler_chain_add(
                masked,
                llama_cpp.llama_sampler_init_grammar(engine.vocab, grammar.encode(), b"root"),
            )
            llama_cpp.llama_sampler_chain_add(masked, llama_cpp.llama_sampler_init_greedy())
            try:
                ours = _greedy_tokens(engine, message, checked.sample)
                reference = _greedy_tokens(
                    engine, message, partial(llama_cpp.llama_sampler_sample, masked, engine.ctx)
                )
            finally:
                checked.close()
                llama_cpp.llama_sampler_free(masked)
            assert ours == reference
            text = b"".join(engine.piece(t) for t in ours).decode()
            jsonschema.validate(json.loads(text), schema)
    finally:
        engine.close()


def _forced(sampler: GrammarSampler, logits: Any, index: int, *tokens: int) -> int:
    """What the sampler picks when the model all but insists on `tokens`, best first."""
    logits[:] = 0.0
    for rank, token in enumerate(tokens):
        logits[token] = 30.0 - rank
    return sampler.sample(index)


@pytest.mark.parametrize(
    "fmt",
    [{"type": "object", "properties": {"name": NAME}, "required": ["name"]}, "json"],
    ids=["schema", "json"],
)
def test_grammar_refuses_a_control_character_inside_a_string(fmt: Any) -> None:
    """JSON forbids raw control characters in a string: when the model prefers a token with a
    newline inside one (common: a name, then a line break), the grammar must refuse it. The
    converter's own `char` rule let them through, and the reply failed json.loads."""
    engine = Engine(ModelSettings(path=SMOLLM, n_ctx=512, slots=1, threads=1))
    sampler = engine.new_sampler(SamplingParams(0, 1, 0, 0, 1, 0, 0, grammar_for(fmt)))
    try:
        assert isinstance(sampler, GrammarSampler)
        index = engine.decode(
            [Row(0, engine.chat_prompt([{"role": "user", "content": "Hi"}]), 0, True)]
        )[0]
        logits = np.ctypeslib.as_array(
            llama_cpp.llama_get_logits_ith(engine.ctx, index), shape=(engine.n_vocab,)
        )
        text = '{"name": "Luna'
        for token in engine.tokenize(text, special=False):
            assert _forced(sampler, logits, index, token) == token  # the grammar allows these
        (letter,) = engine.tokenize("x", special=False)
        for bad in ("\n", "\n\n", "\r\n", "\t", "\x01"):
            (token,) = engine.tokenize(bad, special=False)
            # Refused, the model's next choice: the string stays open for the next one.
            assert _forced(sampler, logits, index, token, letter) == letter, repr(bad)
            text += "x"
        for token in engine.tokenize('"}', special=False):
            assert _forced(sampler, logits, index, token) == token  # and the reply can end
        assert json.loads(text + '"}') == {"name": "Lunaxxxxx"}
    finally:
        sampler.close()
        engine.close()


# -- stop --------------------------------------------------------------------------------------

GREEDY = {"temperature": 0, "max_tokens": 40}
STORY = "Write a short story about a robot who learns to paint."


def stored_turns(daemon: Daemon, client_id: str, conversation_id: str) -> list[list[str]]:
    """The history the node recorded, read from its state store as another process may."""
    deadline = time.monotonic() + 10
    while True:
        with closing(sqlite3.connect(daemon.workdir / "state" / "history.db", timeout=5)) as db:
            row = db.execute(
                "SELECT turns FROM conversations WHERE client_id = ? AND conversation_id = ?",
                (client_id, conversation_id),
            ).fetchone()
        if row is not None or time.monotonic() > deadline:
            assert row is not None, "no history recorded"
            turns: list[list[str]] = json.loads(row[0])
            return turns
        time.sleep(0.05)


def test_reply_ends_before_a_stop_string_split_across_tokens(
    probe_factory: Any, daemon: Daemon
) -> None:
    dev = subscribed(probe_factory)
    full = ask(dev, STORY, conversation_id="whole", reset=True, **GREEDY)
    pieces = chunks(full)
    text = "".join(pieces)
    assert len(pieces) > 8, text
    # A stop string that begins in the middle of one token and ends inside a later one, its
    # first occurrence in the middle of the reply.
    at = next(
        i
        for i in range(len(pieces) // 3, len(pieces) - 2)
        if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2
    )
    stop = pieces[at][-2:] + pieces[at + 1] + pieces[at + 2][:1]
    cut = text.find(stop)
    assert 0 < cut < len(text) - len(stop)

    msgs = ask(dev, STORY, conversation_id="cut", reset=True, stop=["\u2603", stop], **GREEDY)
    assert_contiguous(msgs)
    assert msgs[-1]["finish_reason"] == "stop"
    assert reply_text(msgs) == text[:cut]
    assert not any(stop in piece for piece in chunks(msgs))
    assert msgs[-1]["usage"]["completion_tokens"] < full[-1]["usage"]["completion_tokens"]

    # The history holds the text before the stop string, and a follow-up is built on it.
    assert stored_turns(daemon, "dev1", "cut") == [[STORY, text[:cut]]]
    follow_cut = ask(dev, "Go on.", conversation_id="cut", **GREEDY)[-1]
    follow_whole = ask(dev, "Go on.", conversation_id="whole", **GREEDY)[-1]
    assert follow_cut["usage"]["prompt_tokens"] < follow_whole["usage"]["prompt_tokens"]


def test_stop_string_that_never_appears_holds_nothing_back(probe_factory: Any) -> None:
    dev = subscribed(probe_factory)
    plain = ask(dev, STORY, conversation_id="p1", reset=True, **GREEDY)
    text = reply_text(plain)
    # Each stop string begins with text the reply contains, so pieces wait, then are released.
    stops = [text[:3] + "\u2603", text[-2:] + "\u2603"]
    msgs = ask(dev, STORY, conversation_id="p2", reset=True, stop=stops, **GREEDY)
    assert reply_text(msgs) == text
    assert msgs[-1]["finish_reason"] == plain[-1]["finish_reason"]


@pytest.mark.parametrize(
    ("stop", "says"),
    [
        (["a", "b", "c", "d", "e"], "at most 4 items"),
        ([""], "at least 1 character"),
        (["x" * 65], "at most 64 characters"),
        ("END", "valid array"),
    ],
)
def test_stop_strings_out_of_bounds_are_a_bad_request(
    probe_factory: Any, stop: Any, says: str
) -> None:
    dev = subscribed(probe_factory)
    (err,) = ask(dev, "Hello", stop=stop)
    assert (err["type"], err["code"]) == ("error", "bad_request")
    assert err["message"].startswith("stop")
    assert says in err["message"]


# -- chunk_ms ----------------------------------------------------------------------------------

LONG = {"temperature": 0, "max_tokens": 64}
DRAGON = "Write a long story about a dragon."


def test_paced_reply_has_few_chunks_and_the_same_text(probe_factory: Any) -> None:
    dev = subscribed(probe_factory)
    each = ask(dev, DRAGON, conversation_id="c0", reset=True, **LONG)
    started = time.monotonic()
    paced = ask(dev, DRAGON, conversation_id="c1", reset=True, chunk_ms=500, **LONG)
    duration = time.monotonic() - started
    assert_contiguous(paced)
    assert reply_text(paced) == reply_text(each)
    tokens = paced[-1]["usage"]["completion_tokens"]
    assert tokens >= 48
    assert 1 <= len(chunks(paced)) <= duration / 0.5 + 2
    assert len(chunks(paced)) < len(chunks(each))


def test_cancel_sends_the_pending_text_before_done(probe_factory: Any) -> None:
    dev = subscribed(probe_factory)
    rid = dev.request(DRAGON, conversation_id="c2", reset=True, chunk_ms=2000, max_tokens=400)
    first = dev.until(rid, 1)  # start, then the first chunk goes out at once
    time.sleep(0.5)
    dev.publish(f"qwen-edge/testnode/cancel/{dev.client_id}", json.dumps({"request_id": rid}))
    msgs = dev.collect(rid, before=first)
    assert_contiguous(msgs)
    assert msgs[-1]["finish_reason"] == "cancelled"
    assert len(chunks(msgs)) == 2  # the first, and the rest on cancel
    assert msgs[-1]["usage"]["completion_tokens"] > 2


def test_duplicate_of_a_paced_stopped_reply_is_replayed_byte_for_byte(
    probe_factory: Any,
) -> None:
    dev = subscribed(probe_factory)
    fields = {"conversation_id": "d", "reset": True, "stop": ["."], "chunk_ms": 100, **LONG}
    rid = dev.request(DRAGON, request_id="dup-1", **fields)
    dev.collect(rid)
    first = [payload for _, payload in dev.raw if json.loads(payload)["request_id"] == rid]
    dev.raw.clear()
    dev.request(DRAGON, request_id="dup-1", **fields)
    dev.collect(rid)
    again = [payload for _, payload in dev.raw if json.loads(payload)["request_id"] == rid]
    assert again == first


@pytest.mark.parametrize("chunk_ms", [-1, 2001, 2.5, "500"])
def test_chunk_ms_out_of_range_is_a_bad_request(probe_factory: Any, chunk_ms: Any) -> None:
    dev = subscribed(probe_factory)
    (err,) = ask(dev, "Hello", chunk_ms=chunk_ms)
    assert (err["type"], err["code"]) == ("error", "bad_request")
    assert err["message"].startswith("chunk_ms")
