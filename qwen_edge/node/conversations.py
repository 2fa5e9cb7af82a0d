"""Chat history per (client_id, conversation_id), bounded in count and age, fitted to the context.

Only the inference thread touches the store, so it needs no lock. With a `persist`, every change
is written through (statestore), so the history survives a restart.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

ConversationKey = tuple[str, str]  # (client_id, conversation_id)
Message = dict[str, Any]  # a chat message as the template takes it


@dataclass(frozen=True, slots=True)
class ToolTurn:
    """A turn with tool calls or tool results: the messages it adds, in the template's roles
    (`tool` results, the user's message if any, the assistant's text or `tool_calls`)."""

    messages: tuple[Message, ...]

    def pending_calls(self) -> dict[str, str]:
        """The calls this turn ended with ({id: name}), which the next request may answer."""
        last = self.messages[-1] if self.messages else {}
        calls = last.get("tool_calls") or () if last.get("role") == "assistant" else ()
        return {c["id"]: c["function"]["name"] for c in calls}


# A plain turn is (user, assistant), as before tools; persisted the same way.
Turn = tuple[str, str] | ToolTurn


@dataclass(slots=True)
class Conversation:
    system: str | None = None
    turns: list[Turn] = field(default_factory=list)
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
    system: str | None, turns: Sequence[Turn], message: str | Sequence[Message]
) -> list[Message]:
    """The chat messages of a prompt; `message` is the new user message, or the new turn's
    messages (tool results, then the user's message if any)."""
    messages: list[Message] = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    for turn in turns:
        if isinstance(turn, ToolTurn):
            messages.extend(turn.messages)
        else:
            messages.append({"role": "user", "content": turn[0]})
            messages.append({"role": "assistant", "content": turn[1]})
    if isinstance(message, str):
        messages.append({"role": "user", "content": message})
    else:
        messages.extend(message)
    return messages


def fit_prompt(
    system: str | None,
    turns: Sequence[Turn],
    message: str | Sequence[Message],
    render: Callable[[list[Message]], list[int]],
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
        self, key: ConversationKey, system: str | None, turns: list[Turn]
    ) -> None: ...

    def delete_conversation(self, key: ConversationKey) -> None: ...


class ConversationStore:
    """Conversations forgotten after `idle_ttl` seconds without use, within two bounds.

    Each client keeps at most `max_per_client`; past that, its own least recently used goes.
    All clients together keep at most `max_conversations`; past that, the least recently used of
    the client holding the most goes (on a tie the newcomer's own, then the longest idle). So a
    client's conversation is only ever evicted by another client holding fewer: with K clients
    holding conversations, one keeping at most max_conversations / K is never evicted by
    another, however many conversations the others open. (With more clients than places, every
    client holds one and the least recently used of all goes.)
    """

    def __init__(
        self,
        max_conversations: int,
        idle_ttl: float,
        persist: ConversationPersistence | None = None,
        *,
        max_per_client: int | None = None,
    ) -> None:
        self._items: OrderedDict[ConversationKey, Conversation] = OrderedDict()
        # The same keys, per client, least recently used first; no client maps to an empty one.
        self._by_client: dict[str, OrderedDict[ConversationKey, None]] = {}
        self._max = max_conversations
        self._per_client = max_conversations if max_per_client is None else max_per_client
        self._ttl = idle_ttl
        self._persist = persist

    def restore(
        self, key: ConversationKey, system: str | None, turns: list[Turn], idle: float
    ) -> None:
        """Put back a saved conversation, unused for `idle` seconds; call least recent first."""
        if idle > self._ttl:
            return
        self._remove(key)
        self._add(key, Conversation(system, list(turns), time.monotonic() - idle))

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        """Whether `key` is remembered; unlike get(), neither uses nor creates it."""
        return key in self._items

    def held_by(self, client_id: str) -> int:
        """How many conversations `client_id` has remembered."""
        return len(self._by_client.get(client_id, ()))

    def get(self, key: ConversationKey, *, reset: bool = False) -> Conversation:
        """The conversation for `key`, new if unknown, expired or reset."""
        now = time.monotonic()
        self._expire(now)
        conversation = None if reset else self._items.get(key)
        if conversation is None:
            conversation = Conversation(last_used=now)
            if self._remove(key) and self._persist is not None:
                self._persist.delete_conversation(key)  # reset
            self._add(key, conversation)  # a reset one goes to the young end, like a new one
        else:
            conversation.last_used = now
            self._items.move_to_end(key)
            self._by_client[key[0]].move_to_end(key)
        return conversation

    def pending_calls(self, key: ConversationKey) -> dict[str, str]:
        """The calls ({id: name}) the conversation's last reply ended with; neither uses nor
        creates it."""
        conversation = self._items.get(key)
        if conversation is None or not conversation.turns:
            return {}
        last = conversation.turns[-1]
        return last.pending_calls() if isinstance(last, ToolTurn) else {}

    def record(
        self,
        key: ConversationKey,
        system: str | None,
        dropped: int,
        user: str | ToolTurn,
        reply: str = "",
    ) -> None:
        """Remember a finished turn, (user, reply) or a ToolTurn; `dropped` old turns no longer
        fit the context and go."""
        conversation = self.get(key)
        conversation.system = system
        del conversation.turns[:dropped]
        conversation.turns.append(user if isinstance(user, ToolTurn) else (user, reply))
        if self._persist is not None:
            self._persist.save_conversation(key, system, conversation.turns)

    def _add(self, key: ConversationKey, conversation: Conversation) -> None:
        """Insert `key` as the most recently used, then evict what the bounds say."""
        self._items[key] = conversation
        mine = self._by_client.setdefault(key[0], OrderedDict())
        mine[key] = None
        if len(mine) > self._per_client:
            self._evict(next(iter(mine)))
        while len(self._items) > self._max:
            self._evict(self._victim(key[0]))

    def _victim(self, newcomer: str) -> ConversationKey:
        """The conversation to evict when the table is full and `newcomer` just added one."""

        def claim(client: str) -> tuple[int, bool, float]:
            keys = self._by_client[client]
            return (len(keys), client == newcomer, -self._items[next(iter(keys))].last_used)

        client = max(self._by_client, key=claim)
        keys = self._by_client[client]
        if client == newcomer and len(keys) == 1:
            # Everyone holds one: the least recently used of all, never the one just added
            # (it is the youngest, and the table holds more than one).
            return next(iter(self._items))
        return next(iter(keys))

    def _evict(self, key: ConversationKey) -> None:
        self._remove(key)
        if self._persist is not None:
            self._persist.delete_conversation(key)

    def _remove(self, key: ConversationKey) -> bool:
        if self._items.pop(key, None) is None:
            return False
        mine = self._by_client[key[0]]
        del mine[key]
        if not mine:
            del self._by_client[key[0]]
        return True

    def _expire(self, now: float) -> None:
        while self._items:
            key, oldest = next(iter(self._items.items()))
            if now - oldest.last_used <= self._ttl:
                return
            self._evict(key)


def shared_start(
    render: Callable[[list[Message]], list[int]], variants: list[list[Message]]
) -> list[int]:
    """The tokens that every one of `variants` starts with once rendered.

    Given messages that differ only in one client-chosen text, these are the template's (and
    the node's) tokens before that text: no client content can be in them, since each variant
    has a different first character there.
    """
    prompts = [render(messages) for messages in variants]
    first = prompts[0]
    n = min(common_prefix(first, other) for other in prompts[1:])
    return first[:n]


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
