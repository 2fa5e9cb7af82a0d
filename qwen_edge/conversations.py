"""Chat history per (client_id, conversation_id), bounded in count and age, fitted to the context.

Only the inference thread touches the store, so it needs no lock. With a `persist`, every change
is written through (statestore), so the history survives a restart.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

ConversationKey = tuple[str, str]  # (client_id, conversation_id)


@dataclass(slots=True)
class Conversation:
    system: str | None = None
    turns: list[tuple[str, str]] = field(default_factory=list)  # (user, assistant)
    last_used: float = field(default_factory=time.monotonic)


class ContextOverflow(Exception):
    """Even without history the prompt leaves no room for a reply."""

    def __init__(self, prompt_tokens: int, limit: int) -> None:
        super().__init__(
            f"the prompt needs {prompt_tokens} tokens; at most {limit} fit with room for a reply"
        )
        self.prompt_tokens = prompt_tokens
        self.limit = limit


def build_messages(
    system: str | None, turns: list[tuple[str, str]], message: str
) -> list[dict[str, str]]:
    messages: list[dict[str, str]] = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    for user, assistant in turns:
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": assistant})
    messages.append({"role": "user", "content": message})
    return messages


def fit_prompt(
    system: str | None,
    turns: list[tuple[str, str]],
    message: str,
    render: Callable[[list[dict[str, str]]], list[int]],
    limit: int,
) -> tuple[list[int], int]:
    """The longest-history prompt of at most `limit` tokens, and how many old turns it dropped.

    The oldest turns go first; the system prompt and the new message always stay. Finds the cut
    by bisection, so a long history costs O(log turns) renderings.
    """
    prompt = render(build_messages(system, turns, message))
    if len(prompt) <= limit:
        return prompt, 0
    bare = render(build_messages(system, [], message))
    if len(bare) > limit:
        raise ContextOverflow(len(bare), limit)
    # Invariant: dropping `hi` turns fits, dropping `lo` does not.
    lo, hi, best = 0, len(turns), bare
    while hi - lo > 1:
        mid = (lo + hi) // 2
        candidate = render(build_messages(system, turns[mid:], message))
        if len(candidate) <= limit:
            hi, best = mid, candidate
        else:
            lo = mid
    return best, hi


class ConversationPersistence(Protocol):
    def save_conversation(
        self, key: ConversationKey, system: str | None, turns: list[tuple[str, str]]
    ) -> None: ...

    def delete_conversation(self, key: ConversationKey) -> None: ...


class ConversationStore:
    """Least-recently-used conversations, forgotten after `idle_ttl` seconds without use."""

    def __init__(
        self,
        max_conversations: int,
        idle_ttl: float,
        persist: ConversationPersistence | None = None,
    ) -> None:
        self._items: OrderedDict[ConversationKey, Conversation] = OrderedDict()
        self._max = max_conversations
        self._ttl = idle_ttl
        self._persist = persist

    def restore(
        self, key: ConversationKey, system: str | None, turns: list[tuple[str, str]], idle: float
    ) -> None:
        """Put back a saved conversation, unused for `idle` seconds; call least recent first."""
        if idle > self._ttl:
            return
        self._items.pop(key, None)
        self._items[key] = Conversation(system, list(turns), time.monotonic() - idle)
        while len(self._items) > self._max:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: ConversationKey, *, reset: bool = False) -> Conversation:
        """The conversation for `key`, new if unknown, expired or reset."""
        now = time.monotonic()
        self._expire(now)
        conversation = None if reset else self._items.get(key)
        if conversation is None:
            conversation = Conversation(last_used=now)
            if self._items.pop(key, None) is not None and self._persist is not None:
                self._persist.delete_conversation(key)  # reset
            self._items[key] = conversation  # a reset one goes to the young end, like a new one
            while len(self._items) > self._max:
                self._forget(self._items.popitem(last=False)[0])
        else:
            conversation.last_used = now
            self._items.move_to_end(key)
        return conversation

    def record(
        self, key: ConversationKey, system: str | None, dropped: int, user: str, reply: str
    ) -> None:
        """Remember a finished turn; `dropped` old turns no longer fit the context and go."""
        conversation = self.get(key)
        conversation.system = system
        del conversation.turns[:dropped]
        conversation.turns.append((user, reply))
        if self._persist is not None:
            self._persist.save_conversation(key, system, conversation.turns)

    def _forget(self, key: ConversationKey) -> None:
        if self._persist is not None:
            self._persist.delete_conversation(key)

    def _expire(self, now: float) -> None:
        while self._items:
            key, oldest = next(iter(self._items.items()))
            if now - oldest.last_used <= self._ttl:
                return
            del self._items[key]
            self._forget(key)
