"""Text on the way out: TextAssembler (token bytes -> whole characters), StopStrings (the cut
at a stop string) and ReplyStream (numbering, pacing)."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_edge.node.replies import ReplyStream
from qwen_edge.node.text import StopStrings, TextAssembler
from qwen_edge.protocol import ErrorCode, FinishReason

from ..helpers import Clock

PROPERTY = settings(max_examples=200, deadline=None)

# Text rich in multi-byte characters: CJK, emoji (incl. ZWJ sequences), combining marks, and the
# boundaries of each UTF-8 length. U+FFFD is left out: the output must never contain it.
special = st.sampled_from(
    [
        "中文",
        "é",
        "e\u0301",
        "👩\u200d👩\u200d👧",
        "🇫🇷",
        "❤\ufe0f",
        "\x00",
        "\x7f",
        "\x80",
        "\u07ff",
        "\u0800",
        "\uffff",
        "\U00010000",
        "\U0010ffff",
        '"\\\n',
    ]
)
characters = (
    st.characters(codec="utf-8", exclude_characters="\ufffd")
    | st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF)
    | st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF)
    | st.characters(min_codepoint=0x0300, max_codepoint=0x036F)
)


texts = st.lists(characters | special, max_size=60).map("".join)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def assemble(pieces: list[bytes]) -> list[str]:
    assembler = TextAssembler()
    out = [assembler.push(p) for p in pieces]
    out.append(assembler.flush())
    return out


def assert_clean(piece: object) -> None:
    assert isinstance(piece, str)
    assert "\ufffd" not in piece
    assert piece.encode("utf-8").decode("utf-8") == piece  # no lone surrogates


# -- TextAssembler -----------------------------------------------------------------------------


@PROPERTY
@given(texts, st.lists(st.integers(min_value=0, max_value=400), max_size=30))
def test_split_utf8_reassembles_to_the_exact_text(text: str, cuts: list[int]) -> None:
    data = text.encode("utf-8")
    out = assemble(split_at(data, cuts))
    assert "".join(out) == text
    for piece in out:
        assert_clean(piece)


@PROPERTY
@given(texts, st.lists(st.integers(min_value=0, max_value=400), max_size=30))
def test_every_complete_character_is_released_at_once(text: str, cuts: list[int]) -> None:
    """After each push, the output so far is exactly the characters whose bytes have all arrived:
    no partial character, and no complete one held back."""
    data = text.encode("utf-8")
    assembler = TextAssembler()
    seen = 0
    emitted = ""
    for piece in split_at(data, cuts):
        emitted += assembler.push(piece)
        seen += len(piece)
        assert emitted == data[:seen].decode("utf-8", "ignore")
        assert text.startswith(emitted)
    assert assembler.flush() == ""


@pytest.mark.parametrize("text", ["中文", "😀", "👩\u200d👩\u200d👧", "e\u0301", "\U0010ffff"])
def test_character_fed_one_byte_at_a_time_comes_out_whole(text: str) -> None:
    data = text.encode("utf-8")
    out = [piece for piece in assemble([bytes([b]) for b in data]) if piece]
    assert "".join(out) == text
    assert all(p.encode("utf-8") in data for p in out)
    # each output is one or more whole characters, released on the byte that completes it
    assert len(out) == len(text)


@pytest.mark.parametrize(
    ("pieces", "expected"),
    [
        ([b"a\xffb"], "ab"),  # never valid in UTF-8
        ([b"\x80abc"], "abc"),  # continuation byte without a lead
        ([b"\xc0\xaf"], ""),  # overlong '/'
        ([b"\xed\xa0\x80"], ""),  # UTF-8-encoded surrogate
        ([b"\xf4\x90\x80\x80"], ""),  # beyond U+10FFFF
        ([b"\xe4\xb8", b"A"], "A"),  # lead bytes cut short by ASCII
        ([b"\xf0\x9f\x98", b"\xf0\x9f\x98\x80"], "😀"),  # cut short by a new character
        ([b"x\xe4\xb8"], "x"),  # incomplete at the end: dropped on flush
        ([b"\xe4", b"\xb8", b"\xad", b"\xff"], "中"),
    ],
)
def test_invalid_byte_sequences_are_dropped(pieces: list[bytes], expected: str) -> None:
    out = assemble(pieces)
    assert "".join(out) == expected
    for piece in out:
        assert_clean(piece)


@PROPERTY
@given(st.binary(max_size=80), st.lists(st.integers(min_value=0, max_value=80), max_size=20))
def test_arbitrary_bytes_decode_as_if_whole_with_invalid_bytes_dropped(
    data: bytes, cuts: list[int]
) -> None:
    out = assemble(split_at(data, cuts))
    assert "".join(out) == data.decode("utf-8", "ignore")
    for piece in out:
        assert isinstance(piece, str)
        piece.encode("utf-8")
        if b"\xef\xbf\xbd" not in data:
            assert "\ufffd" not in piece


def test_flush_without_input_is_empty_and_assemblers_are_independent() -> None:
    first, second = TextAssembler(), TextAssembler()
    assert first.flush() == ""
    assert first.push(b"\xe4\xb8") == ""
    assert second.push(b"\xad") == ""  # the other one's pending bytes do not leak here
    assert first.push(b"\xad") == "中"


# -- ReplyStream -------------------------------------------------------------------------------


class Recorder:
    """A publish function that keeps what it is given."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes | None]] = []

    def __call__(self, topic: str, payload: bytes, correlation: bytes | None) -> None:
        assert isinstance(payload, bytes)
        self.sent.append((topic, payload, correlation))

    @property
    def messages(self) -> list[dict[str, Any]]:
        return [json.loads(payload) for _, payload, _ in self.sent]


TOPIC = "qwen-edge/node1/reply/dev1/default"


def stream(
    correlation: bytes | None = None, request_id: str = "r1"
) -> tuple[ReplyStream, Recorder]:
    rec = Recorder()
    return ReplyStream(rec, TOPIC, request_id, correlation), rec


@settings(max_examples=60, deadline=None)
@given(st.lists(texts.filter(bool), max_size=12), st.booleans())
def test_messages_are_numbered_contiguously_from_zero(chunks: list[str], fail: bool) -> None:
    s, rec = stream()
    s.start("node1", "qwen")
    for text in chunks:
        s.chunk(text)
    if fail:
        s.error(ErrorCode.INTERNAL, "boom")
    else:
        s.done(FinishReason.STOP, 3, len(chunks), 1.0, 2.0)
    messages = rec.messages
    assert [m["seq"] for m in messages] == list(range(len(chunks) + 2))
    assert [m["type"] for m in messages] == [
        "start",
        *["chunk"] * len(chunks),
        "error" if fail else "done",
    ]
    assert all(m["request_id"] == "r1" for m in messages)
    assert [m["text"] for m in messages[1:-1]] == chunks
    assert s.seq == len(messages)


@pytest.mark.parametrize(
    "text",
    [
        'say "hi"',
        "back\\slash\\",
        "\\u0000 is not an escape here",
        "line\nbreak\r\n\ttab",
        "你好\uff0c世界",
        "emoji 😀 and 👩\u200d👩\u200d👧",
        "\x00\x01\x1f control",
        "\u2028\u2029",
        "</script>",
        "}",
        '","seq":99,"x":"',
        " ",
    ],
)
def test_chunk_payload_is_json_with_exactly_the_chunk_fields(text: str) -> None:
    s, rec = stream()
    s.chunk(text)
    ((topic, payload, _),) = rec.sent
    assert topic == TOPIC
    assert json.loads(payload.decode("utf-8")) == {
        "type": "chunk",
        "request_id": "r1",
        "seq": 0,
        "text": text,
    }


@PROPERTY
@given(st.lists(texts, min_size=1, max_size=5))
def test_any_text_round_trips_through_chunk_payloads(chunks: list[str]) -> None:
    s, rec = stream()
    for text in chunks:
        s.chunk(text)
    assert [m["text"] for m in rec.messages] == chunks
    assert [set(m) for m in rec.messages] == [{"type", "request_id", "seq", "text"}] * len(chunks)


def test_chunk_sends_non_ascii_as_utf8_not_escapes() -> None:
    s, rec = stream()
    s.chunk("中文")
    assert "中文".encode() in rec.sent[0][1]


@pytest.mark.parametrize("request_id", ["", 'with "quotes"', "back\\slash", "中", "a" * 64])
def test_request_id_is_escaped_in_every_message(request_id: str) -> None:
    s, rec = stream(request_id=request_id)
    s.start("n", "m")
    s.chunk("x")
    s.done(FinishReason.LENGTH, 1, 1, None, None)
    assert [m["request_id"] for m in rec.messages] == [request_id] * 3


def test_start_done_and_error_payloads_carry_their_fields() -> None:
    s, rec = stream()
    s.start("node1", "qwen2.5-0.5b")
    s.done(FinishReason.LENGTH, 12, 34, 123.456, 7.891, cached_tokens=5)
    start, done = rec.messages
    assert start == {
        "type": "start",
        "request_id": "r1",
        "seq": 0,
        "node": "node1",
        "model": "qwen2.5-0.5b",
    }
    assert done == {
        "type": "done",
        "request_id": "r1",
        "seq": 1,
        "finish_reason": "length",
        "usage": {"prompt_tokens": 12, "completion_tokens": 34, "cached_tokens": 5},
        "timings": {"ttft_ms": 123.5, "tokens_per_s": 7.89},
    }

    s, rec = stream()
    s.done(FinishReason.CANCELLED, 0, 0, None, None)
    assert rec.messages[0]["timings"] == {"ttft_ms": None, "tokens_per_s": None}
    assert rec.messages[0]["finish_reason"] == "cancelled"

    s, rec = stream()
    s.error(ErrorCode.CONTEXT_OVERFLOW, 'too "long"\n')
    assert rec.messages == [
        {
            "type": "error",
            "request_id": "r1",
            "seq": 0,
            "code": "context_overflow",
            "message": 'too "long"\n',
        }
    ]


@pytest.mark.parametrize("first", ["done", "error"])
def test_done_or_error_ends_the_stream_once_and_for_all(first: str) -> None:
    s, rec = stream()
    s.start("n", "m")
    end = {
        "done": lambda: s.done(FinishReason.STOP, 1, 1, None, None),
        "error": lambda: s.error(ErrorCode.INTERNAL, "x"),
    }
    end[first]()
    assert s.ended
    sent = len(rec.sent)
    seq = s.seq
    for again in ("done", "error", "done"):
        end[again]()
    assert len(rec.sent) == sent
    assert s.seq == seq
    assert rec.messages[-1]["type"] == first


@pytest.mark.parametrize("first", ["done", "error"])
def test_chunk_and_start_after_done_or_error_send_nothing(first: str) -> None:
    s, rec = stream()
    if first == "done":
        s.done(FinishReason.STOP, 1, 1, None, None)
    else:
        s.error(ErrorCode.INTERNAL, "x")
    s.chunk("late")
    s.start("n", "m")
    assert len(rec.sent) == 1


@pytest.mark.parametrize("correlation", [None, b"", b"\x00\xffcorr-1", "中".encode() * 100])
def test_correlation_data_and_topic_go_with_every_message(correlation: bytes | None) -> None:
    s, rec = stream(correlation)
    s.start("n", "m")
    s.chunk("a")
    s.chunk("b")
    s.error(ErrorCode.BUSY, "later")
    assert len(rec.sent) == 4
    assert all(topic == TOPIC for topic, _, _ in rec.sent)
    assert all(corr is correlation for _, _, corr in rec.sent)


# -- StopStrings -------------------------------------------------------------------------------


def first_stop(text: str, stops: list[str]) -> int | None:
    """Where the reply ends: the start of the stop string completed first (the longer of two
    completed by the same character)."""
    found = [(i + len(s), i) for s in stops if (i := text.find(s)) >= 0]
    return min(found)[1] if found else None


def held_back(text: str, stops: list[str]) -> int:
    """The length of the longest end of `text` that begins a stop string (not all of one)."""
    lengths = (n for s in stops for n in range(1, min(len(s) - 1, len(text)) + 1))
    return max(
        (n for n in lengths if any(text.endswith(s[:n]) for s in stops if n < len(s))), default=0
    )


def run_stops(pieces: list[str], stops: list[str]) -> tuple[list[str], StopStrings]:
    scanner = StopStrings(stops)
    out = [scanner.push(piece) for piece in pieces]
    if not scanner.hit:
        out.append(scanner.flush())
    return out, scanner


def split_text(text: str, cuts: list[int]) -> list[str]:
    points = sorted({min(c, len(text)) for c in cuts})
    return [text[a:b] for a, b in itertools.pairwise([0, *points, len(text)])]


# A small alphabet, so that stop strings occur, overlap and repeat often.
small_texts = st.text(alphabet="ab中😀\n", max_size=40)
stop_lists = st.lists(st.text(alphabet="ab中😀\n", min_size=1, max_size=5), min_size=1, max_size=4)


@settings(max_examples=500, deadline=None)
@given(small_texts, stop_lists, st.lists(st.integers(min_value=0, max_value=40), max_size=20))
def test_reply_is_the_text_up_to_the_first_stop_string_however_it_is_split(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    out, scanner = run_stops(split_text(text, cuts), stops)
    cut = first_stop(text, stops)
    assert "".join(out) == (text if cut is None else text[:cut])
    assert scanner.hit == (cut is not None)
    for piece in out:
        assert not any(s in piece for s in stops)


@settings(max_examples=300, deadline=None)
@given(small_texts, stop_lists, st.lists(st.integers(min_value=0, max_value=40), max_size=20))
def test_only_text_that_could_still_become_a_stop_string_waits(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    scanner = StopStrings(stops)
    seen = emitted = ""
    for piece in split_text(text, cuts):
        emitted += scanner.push(piece)
        seen += piece
        if scanner.hit:
            break
        assert emitted == seen[: len(seen) - held_back(seen, stops)]


@pytest.mark.parametrize(
    ("pieces", "stops", "expected", "hit"),
    [
        (["Hello", " wor", "ld"], ["wor"], ["Hello", " ", ""], True),
        (["a", "b", "c"], ["bcd"], ["a", "", "", "bc"], False),  # never completed: released
        (["ab", "cd"], ["bc", "abcd"], ["", "a"], True),  # bc completes first
        (["abcd"], ["bc", "abcd"], ["a"], True),  # however the text is split
        (["abcd"], ["cd", "abcd"], [""], True),  # completed by the same character: the longer
        (["x<", "|e", "nd|>y"], ["<|end|>"], ["x", "", ""], True),
        (["中文", "。好"], ["。"], ["中文", ""], True),
        (["aaa", "ab"], ["aab"], ["a", "a"], True),
        (["end"], ["end"], [""], True),
    ],
)
def test_stop_string_examples(
    pieces: list[str], stops: list[str], expected: list[str], hit: bool
) -> None:
    out, scanner = run_stops(pieces, stops)
    assert out == expected
    assert scanner.hit is hit


def test_nothing_comes_after_a_stop_string() -> None:
    scanner = StopStrings(["x"])
    assert scanner.push("axb") == "a"
    assert scanner.push("more") == ""
    assert scanner.flush("tail") == ""


# -- ReplyStream: chunk pacing -----------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(texts.filter(bool), st.floats(min_value=0, max_value=0.7)), max_size=40),
    st.integers(min_value=1, max_value=2000),
    st.booleans(),
)
def test_paced_chunks_are_at_most_one_per_interval_and_join_to_the_text(
    pieces: list[tuple[str, float]], chunk_ms: int, fail: bool
) -> None:
    clock = Clock()
    s, rec = stream()
    s.pace(chunk_ms, clock)
    s.start("n", "m")
    sent_at: list[float] = []
    for text, delay in pieces:
        clock.now += delay
        before = len(rec.sent)
        s.chunk(text)
        sent_at += [clock.now] * (len(rec.sent) - before)
    if fail:
        s.error(ErrorCode.INTERNAL, "x")
    else:
        s.done(FinishReason.STOP, 1, len(pieces), None, None)
    messages = rec.messages
    assert [m["seq"] for m in messages] == list(range(len(messages)))
    chunks = [m for m in messages if m["type"] == "chunk"]
    assert "".join(m["text"] for m in chunks) == "".join(text for text, _ in pieces)
    assert all(m["text"] for m in chunks)
    assert messages[-1]["type"] == ("error" if fail else "done")
    # Chunks sent as text arrived are chunk_ms apart; only the last may follow sooner.
    assert all(b - a >= chunk_ms / 1000 for a, b in itertools.pairwise(sent_at))
    assert len(chunks) <= len(sent_at) + 1


def test_paced_stream_sends_the_first_text_at_once_then_waits() -> None:
    clock = Clock()
    s, rec = stream()
    s.pace(500, clock)
    s.chunk("a")
    assert [m["text"] for m in rec.messages] == ["a"]
    clock.now += 0.499
    s.chunk("b")
    s.chunk("c")
    assert len(rec.sent) == 1
    clock.now += 0.001
    s.chunk("d")
    assert [m["text"] for m in rec.messages] == ["a", "bcd"]
    s.chunk("e")
    s.done(FinishReason.CANCELLED, 1, 5, None, None)
    assert [(m["type"], m.get("text")) for m in rec.messages] == [
        ("chunk", "a"),
        ("chunk", "bcd"),
        ("chunk", "e"),
        ("done", None),
    ]


def test_unpaced_stream_sends_every_chunk() -> None:
    s, rec = stream()
    s.pace(0)
    for text in "abc":
        s.chunk(text)
    assert [m["text"] for m in rec.messages] == ["a", "b", "c"]
