"""PacedEngine, a stand-in without a model: a token every N ms, to measure all but inference.

`model.path = "fake://40ms"` selects it (scripts/bench --fleet runs 16 nodes on 2 cores this way):
each decode step waits until N ms after the previous one and every generating slot gets one more
token, a word from a short list. Prompts are "tokenised" as every 4th byte of the messages, so
prefix reuse and the KV keep store behave as with a model; KV states are empty. Only
open_paced() knows the spelling of the path.
"""

from __future__ import annotations

import ctypes
import re
import time
from collections.abc import Sequence
from typing import Any, Final

from ..settings import ModelSettings
from .budget import MemoryPlan
from .decoder import Row, SamplingParams

# pathlib folds "fake://40ms" into "fake:/40ms"; accept either.
_FAKE_PATH: Final = re.compile(r"fake:/{0,2}(\d+(?:\.\d+)?)ms")
_WORDS: Final = tuple(
    f" {w}".encode() for w in ("the", "sea", "is", "calm", "and", "blue", "tonight")
)


def open_paced(settings: ModelSettings) -> PacedEngine | None:
    """A PacedEngine if `settings.path` asks for one (`fake://<milliseconds>ms`), else None."""
    match = _FAKE_PATH.fullmatch(str(settings.path))
    return None if match is None else PacedEngine(settings, float(match.group(1)) / 1000)


class PacedSampler:
    """Picks the next word of _WORDS; needs no logits."""

    __slots__ = ("_next",)
    grammar_seconds = 0.0  # follows no grammar

    def __init__(self, seed: int) -> None:
        self._next = seed % len(_WORDS)

    def sample(self, index: int) -> int:
        token = self._next
        self._next = (token + 1) % len(_WORDS)
        return token

    def close(self) -> None:
        pass


class PacedEngine:
    """An EngineLike with none of Engine's state: no model, no context, no logits."""

    def __init__(self, settings: ModelSettings, interval: float) -> None:
        self.interval = interval
        self.slots = settings.slots
        self.n_batch = settings.n_batch
        self.n_ctx_seq = settings.n_ctx
        self.threads = 1
        # The settings as they are: no memory budget to fit, as there is no model.
        self.plan = MemoryPlan(
            slots=settings.slots,
            n_ctx=settings.n_ctx,
            kv_cache_type=settings.kv_cache_type,
            kv_keep_mb=settings.kv_keep_mb,
            model_bytes=0,
            kv_bytes=0,
            budget_mb=None,
        )
        self._next_step = 0.0

    def decode(self, rows: Sequence[Row]) -> list[int]:
        now = time.monotonic()
        if self._next_step > now:
            time.sleep(self._next_step - now)
        self._next_step = max(now, self._next_step) + self.interval
        return [i if row.logits else -1 for i, row in enumerate(rows)]

    def forget(self, seq: int, keep: int = 0) -> None:
        pass

    def seq_state_size(self, seq: int) -> int:
        return 0

    def save_seq(self, seq: int) -> ctypes.Array[ctypes.c_uint8]:
        return (ctypes.c_uint8 * 0)()

    def restore_seq(self, seq: int, state: ctypes.Array[ctypes.c_uint8]) -> bool:
        return True

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        return list(text.encode("utf-8")[::4])

    def chat_prompt(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        text = "\n".join(f"{m['role']}: {m.get('content') or ''}" for m in messages)
        return self.tokenize(text + (f"\ntools: {len(tools)}" if tools else ""))

    def new_sampler(self, params: SamplingParams) -> PacedSampler:
        return PacedSampler(params.seed)  # a format's grammar is not followed

    def piece(self, token: int) -> bytes:
        return _WORDS[token % len(_WORDS)]

    def is_end(self, token: int) -> bool:
        return False  # replies run to max_tokens: the bench wants slots busy

    def close(self) -> None:
        pass
