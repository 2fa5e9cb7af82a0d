"""A small deterministic engine for in-process scheduler tests: no model, no llama.cpp context.

A "token" is one byte of the rendered prompt (`role: content` lines), so prefixes of two prompts
share tokens exactly where their text does. Every sampler replies with `FakeEngine.reply`, a byte
per token, then the end token. The engine keeps each sequence's KV as the tokens decoded into
it and checks every row against them, so a scheduler that loses track of its cells fails loudly;
it records each step's rows for the tests of batching order.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from qwen_edge.node.decoder import (
    Compiled,
    DecodeError,
    GrammarError,
    OnCompiled,
    Row,
    SamplingParams,
)

END = 256  # the end-of-reply token; 0..255 are bytes


class FakeSampler:
    """Replies with the bytes of `reply`, then END."""

    __slots__ = ("_at", "_cost", "_reply", "closed", "grammar_seconds")

    def __init__(self, reply: bytes, grammar_cost: float = 0.0) -> None:
        self._reply = reply
        self._at = 0
        self.closed = False
        self._cost = grammar_cost  # grammar seconds it reports per token (none spent)
        self.grammar_seconds = 0.0

    def sample(self, index: int) -> int:
        assert not self.closed, "sampled after close"
        self.grammar_seconds += self._cost
        at = self._at
        self._at = at + 1
        return self._reply[at] if at < len(self._reply) else END

    def close(self) -> None:
        assert not self.closed, "closed twice"
        self.closed = True


class FakeEngine:
    """EngineLike without a model. Set `reply`, `on_decode` and the `fail_` fields to steer it."""

    def __init__(self, slots: int = 2, n_ctx_seq: int = 512, n_batch: int = 64) -> None:
        self.slots = slots
        self.n_ctx_seq = n_ctx_seq
        self.n_batch = n_batch
        self.reply = "hello"  # what every sampler made from now on replies
        self.fail_decode = 0  # how many of the next decode calls raise DecodeError
        self.fail_sampler: Exception | None = None  # raised by the next new_sampler
        self.fail_piece: Exception | None = None  # raised by the next piece
        # Called with the step's number (from 0) as each decode begins, on the inference thread.
        self.on_decode: Callable[[int], None] | None = None
        self.kv: list[list[int]] = [[] for _ in range(slots)]  # each sequence's tokens
        self.steps: list[list[Row]] = []  # the rows of every decode call, in order
        self.samplers: list[FakeSampler] = []
        # Grammar seconds a sampler with a grammar reports per token (without spending them);
        # None: a grammar is refused (GrammarError), as llama.cpp may.
        self.grammar_cost: float | None = None

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        return list(text.encode("utf-8"))

    def decode(self, rows: Sequence[Row]) -> list[int]:
        assert sum(len(r.tokens) for r in rows) <= self.n_batch, "batch over n_batch"
        assert len({r.seq for r in rows}) == len(rows), "a sequence twice in one step"
        if self.on_decode is not None:
            self.on_decode(len(self.steps))
        self.steps.append(list(rows))
        out = []
        n = 0
        for row in rows:
            cells = self.kv[row.seq]
            assert row.pos == len(cells), f"seq {row.seq}: row at {row.pos}, KV holds {len(cells)}"
            cells.extend(row.tokens)
            assert len(cells) <= self.n_ctx_seq, f"seq {row.seq} past n_ctx_seq"
            n += len(row.tokens)
            out.append(n - 1 if row.logits else -1)
        if self.fail_decode:  # as llama_decode may, after writing some of the cells
            self.fail_decode -= 1
            raise DecodeError(-1)
        return out

    def forget(self, seq: int, keep: int = 0) -> None:
        del self.kv[seq][keep:]

    def seq_state_size(self, seq: int) -> int:
        return len(self.kv[seq]) * 2

    def save_seq(self, seq: int) -> ctypes.Array[ctypes.c_uint8]:
        cells = self.kv[seq]
        # Two bytes a token: tokens run to END (256).
        return (ctypes.c_uint8 * (2 * len(cells)))(*(b for t in cells for b in divmod(t, 256)))

    def restore_seq(self, seq: int, state: ctypes.Array[ctypes.c_uint8]) -> bool:
        raw = bytes(state)
        self.kv[seq] = [raw[i] * 256 + raw[i + 1] for i in range(0, len(raw), 2)]
        return True

    def new_sampler(self, params: SamplingParams) -> FakeSampler:
        if self.fail_sampler is not None:
            exc, self.fail_sampler = self.fail_sampler, None
            raise exc
        if params.grammar is not None and self.grammar_cost is None:
            raise GrammarError("the fake reads no grammar")
        cost = self.grammar_cost if params.grammar is not None else 0.0
        sampler = FakeSampler(self.reply.encode("utf-8"), cost or 0.0)
        self.samplers.append(sampler)
        return sampler

    def piece(self, token: int) -> bytes:
        if self.fail_piece is not None:
            exc, self.fail_piece = self.fail_piece, None
            raise exc
        return bytes((token,)) if token < END else b""

    def is_end(self, token: int) -> bool:
        return token == END


class FakeGrammars:
    """A GrammarSource that hands every format a grammar at once: the fake engine ignores it, so
    the scheduler's handling of formats runs without llama.cpp (the real compiler is tested with
    the real parts)."""

    def __init__(self) -> None:
        self.closed = False

    def request(
        self, fmt: str | Mapping[str, Any], done: OnCompiled, *, bounded: bool = True
    ) -> None:
        done(Compiled('root ::= "{}"'))

    def close(self) -> None:
        self.closed = True
