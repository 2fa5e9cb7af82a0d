"""What the scheduler needs of an engine, and nothing of llama.cpp: the rows of a decode step,
a request's sampling parameters, the engine and sampler protocols, their errors, and the grammar
source a format's grammar comes from. The real engine (engine.py, llama.cpp), the paced
stand-in (pacedengine.py, `fake://40ms`) and the unit tests' fake implement it; the scheduler,
the intake and the unit tier import only this."""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..toolcalls import ToolGrammar


class DecodeError(Exception):
    """llama_decode failed."""

    def __init__(self, code: int) -> None:
        super().__init__(f"llama_decode returned {code}")


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repeat_penalty: float
    repeat_last_n: int
    seed: int
    grammar: str | None = None  # GBNF the reply must follow (root rule `root`)


class GrammarError(ValueError):
    """llama.cpp could not read a grammar."""


class TokenSampler(Protocol):
    """Picks one request's tokens; bound to its engine, so callers never see a llama context."""

    def sample(self, index: int) -> int:
        """Sample (and accept) the next token from the logits of the last decode's row `index`."""

    def close(self) -> None:
        """Free what the sampler holds; called once, when its request ends."""

    @property
    def grammar_seconds(self) -> float:
        """Time spent on the request's grammar so far (0 without one); read per step by the
        scheduler for requests with a grammar only."""


@dataclass(frozen=True, slots=True)
class Row:
    """One sequence's share of a decode batch: tokens at positions pos.. for seq; `logits` marks
    whether the last token's logits are wanted."""

    seq: int
    tokens: Sequence[int]
    pos: int
    logits: bool


class EngineLike(Protocol):
    """What the scheduler needs of an engine: Engine, or a fake in tests and benchmarks.

    Called from one thread only. Sequences are numbered 0..slots-1, each with room for
    n_ctx_seq tokens.
    """

    @property
    def slots(self) -> int: ...
    @property
    def n_ctx_seq(self) -> int: ...
    @property
    def n_batch(self) -> int: ...

    def chat_prompt(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """The tokens of `messages` in the chat template, ready for the assistant's turn;
        `tools` shown to the model (the template's way, or toolcalls' fallback)."""

    def decode(self, rows: Sequence[Row]) -> list[int]:
        """Evaluate the rows in one step (at most n_batch tokens); each row's logits index, -1
        for none. Raises DecodeError."""

    def forget(self, seq: int, keep: int = 0) -> None:
        """Drop the KV cells of `seq` from position `keep` on."""

    def seq_state_size(self, seq: int) -> int: ...
    def save_seq(self, seq: int) -> ctypes.Array[ctypes.c_uint8]: ...
    def restore_seq(self, seq: int, state: ctypes.Array[ctypes.c_uint8]) -> bool:
        """Load a saved sequence into `seq`; False (and `seq` empty) if it was refused."""

    def new_sampler(self, params: SamplingParams) -> TokenSampler:
        """A sampler for one request, bound to this engine's logits. Raises GrammarError."""

    def piece(self, token: int) -> bytes:
        """The bytes a generated token stands for."""

    def is_end(self, token: int) -> bool:
        """Whether `token` ends the reply."""


@dataclass(frozen=True, slots=True)
class Compiled:
    """A format's grammar, or why it has none (a message fit for the client)."""

    grammar: str | None
    error: str | None = None


OnCompiled = Callable[[Compiled], None]


# What a grammar is made from: a request's `format` ("json" or a schema), or its tools.
GrammarSpec = str | Mapping[str, Any] | ToolGrammar


class GrammarSource(Protocol):
    """What the scheduler needs: a format's (or tools') grammar, handed to `done` on some
    thread (maybe the caller's, at once, when it is known). `bounded` False: a format the node
    built itself (formatschema.plain_schema); tools are always bounded."""

    def request(self, fmt: GrammarSpec, done: OnCompiled, *, bounded: bool = True) -> None: ...

    def close(self) -> None: ...
