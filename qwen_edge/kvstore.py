"""KV state of conversations that lost their slot, kept in RAM so a follow-up turn does not
re-read its history.

Policy: when a slot is taken over by another conversation, the KV cells of the conversation that
held it are copied out (llama_state_seq_get_data: the sequence's cells only, no logits) and kept
here, least recently used first out, within a byte budget. A follow-up turn restores them into
its slot and evaluates only its new tokens. Whatever does not fit the budget is recomputed from
the text history instead (slower, never wrong).

A state goes back only to the conversation it came from (its key holds the client id): the store
never lends one client's KV to another. Across clients KV is shared only inside the slots, and
only for a prompt's public prefix (scheduler.Scheduler._reusable).
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict
from dataclasses import dataclass

from .conversations import ConversationKey

State = ctypes.Array[ctypes.c_uint8]


@dataclass(frozen=True, slots=True)
class SavedSequence:
    tokens: tuple[int, ...]  # the tokens whose KV the state holds, in order
    state: State


class KvStore:
    def __init__(self, budget_bytes: int) -> None:
        self._budget = budget_bytes
        self._used = 0
        self._items: OrderedDict[ConversationKey, SavedSequence] = OrderedDict()

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def free_bytes(self) -> int:
        """Bytes a state may take without evicting another."""
        return self._budget - self._used

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def make_room(self, size: int) -> bool:
        """Evict least recently used states until `size` more bytes fit; False if they never
        can. Called before a state is copied out, so memory never peaks above the budget."""
        if size > self._budget:
            return False
        while self._used + size > self._budget:
            _, evicted = self._items.popitem(last=False)
            self._used -= len(evicted.state)
        return True

    def put(self, key: ConversationKey, saved: SavedSequence) -> bool:
        """Keep `saved` for `key`, evicting the least recently used; False if it cannot fit."""
        self.drop(key)
        if not self.make_room(len(saved.state)):
            return False
        self._items[key] = saved
        self._used += len(saved.state)
        return True

    def take(self, key: ConversationKey) -> SavedSequence | None:
        """Remove and return the state of exactly `key` (it is about to live in a slot again)."""
        saved = self._items.pop(key, None)
        if saved is not None:
            self._used -= len(saved.state)
        return saved

    def drop(self, key: ConversationKey) -> None:
        self.take(key)
