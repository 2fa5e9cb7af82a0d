"""Who owns the KV cells: the slots (one sequence of the context each) and which conversation's
tokens they hold, the choice of slot for a request, and the KV state of conversations that lost
their slot, kept in RAM so a follow-up turn does not re-read its history.

Policy: when a slot is taken over by another conversation, the KV cells of the conversation that
held it are copied out (llama_state_seq_get_data: the sequence's cells only, no logits) and kept
here, least recently used first out, within a byte budget. A follow-up turn restores them into
its slot and evaluates only its new tokens. Whatever does not fit the budget is recomputed from
the text history instead (slower, never wrong).

A state goes back only to the conversation it came from (its key holds the client id): the store
never lends one client's KV to another. Across clients KV is shared only inside the slots, and
only for a prompt's public prefix (Slots._reusable).
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from .conversations import ConversationKey, build_messages, common_prefix, shared_start
from .decoder import EngineLike

if TYPE_CHECKING:
    from .generation import Generation

log = structlog.get_logger("qwen_edge.node.scheduler")

KV_SAVE_MIN_TOKENS = 64  # shorter sequences are cheaper to recompute than to keep

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


@dataclass(slots=True)
class Slot:
    """One KV sequence of the context: what it holds outlives the requests decoded in it."""

    seq: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV the sequence holds
    owner: ConversationKey | None = None  # the conversation those tokens belong to
    public: int = 0  # leading tokens of `cached` that hold no client's content
    gen: Generation | None = None  # the request decoding in it now


class Slots:
    """The context's sequences and whose KV each holds; picks the slot a request takes and keeps
    as much of its KV as can be had. Only the inference thread calls it."""

    def __init__(self, engine: EngineLike, keep_bytes: int, node_system: str | None) -> None:
        self._engine = engine
        self._node_system = node_system
        self.all = [Slot(seq=i) for i in range(engine.slots)]
        self._kv = KvStore(keep_bytes)
        # Leading tokens no client chose, of prompts with the node's system prompt (False) and
        # with a client's own (True); rendered once, on first use.
        self._leads: dict[bool, list[int]] = {}

    def take(
        self, key: ConversationKey, prompt: list[int], free: list[Slot], *, client_system: bool
    ) -> tuple[Slot, int]:
        """A free slot for conversation `key` and how many leading tokens of `prompt` its KV
        now holds (`client_system`: the prompt has a system prompt a client set)."""
        public = common_prefix(prompt, self._lead(client_system=client_system))
        slot, reusable = self._pick(key, prompt, public, free)
        keep = min(reusable, len(prompt) - 1)  # at least one token is evaluated, for logits
        self._engine.forget(slot.seq, keep)
        del slot.cached[keep:]
        slot.public = public
        return slot, keep

    def forget(self, slot: Slot) -> None:
        """Drop all the slot holds: after a failure its cells may be half written."""
        self._engine.forget(slot.seq)
        slot.cached.clear()
        slot.public = 0
        slot.owner = None

    def _pick(
        self, key: ConversationKey, prompt: list[int], public: int, free: list[Slot]
    ) -> tuple[Slot, int]:
        """A free slot for conversation `key`, holding as much of its KV as can be had, and
        how many leading tokens of `prompt` it holds (`public`: how many hold no client content).

        Best: the slot that still holds this conversation. Else its saved KV is restored into a
        free slot, or, with none saved, the slot it claims most (see _claim). The KV of the
        conversation that held the slot before is saved first.
        """
        for slot in free:
            if slot.owner == key:
                return slot, common_prefix(slot.cached, prompt)
        saved = self._kv.take(key)  # only ever this very conversation's
        reusable = 0
        if saved is None:
            slot = max(free, key=lambda s: self._claim(s, key[0], prompt, public))
            reusable = self._reusable(slot, key[0], prompt, public)
        else:
            slot = min(free, key=lambda s: (s.owner is not None, len(s.cached)))
        if slot.owner is not None and len(slot.cached) >= KV_SAVE_MIN_TOKENS:
            self._kv.drop(slot.owner)
            if self._kv.make_room(self._engine.seq_state_size(slot.seq)):
                state = self._engine.save_seq(slot.seq)
                self._kv.put(slot.owner, SavedSequence(tuple(slot.cached), state))
        slot.owner = key
        if saved is not None:
            slot.cached = []  # the old owner's cells go whether or not the restore works
            if self._engine.restore_seq(slot.seq, saved.state):
                slot.cached = list(saved.tokens)
                reusable = common_prefix(slot.cached, prompt)
            else:
                log.warning("kv_restore_failed", conversation_id=key[1])
        return slot, reusable

    def _claim(
        self, slot: Slot, client_id: str, prompt: list[int], public: int
    ) -> tuple[int, bool, int]:
        """How much a new conversation wants `slot`: the larger, the better.

        Taking a slot another conversation holds evicts that one's KV. That is cheap when the
        store keeps it without dropping another conversation's (a copy out now, a copy back at
        its next turn) or when it is short; otherwise a whole history is read again later, and
        that is worth it only for a long shared prefix (the same long system prompt, say), not
        for a few template tokens while an empty slot is at hand.
        """
        reusable = self._reusable(slot, client_id, prompt, public)
        cheap = (
            slot.owner is None
            or reusable >= KV_SAVE_MIN_TOKENS
            or len(slot.cached) < KV_SAVE_MIN_TOKENS
            or self._engine.seq_state_size(slot.seq) <= self._kv.free_bytes
        )
        return reusable if cheap else 0, slot.owner is None, reusable

    @staticmethod
    def _reusable(slot: Slot, client_id: str, prompt: list[int], public: int) -> int:
        """Leading tokens of `prompt` whose KV `slot` may lend it.

        Any shared prefix within one client. Across clients only what holds no client content
        in either prompt (the template and the node's system prompt): otherwise the reused
        count, reported as cached_tokens and visible in the first chunk's delay, would tell a
        client how far another's prompt matches a guess.
        """
        shared = common_prefix(slot.cached, prompt)
        if slot.owner is not None and slot.owner[0] == client_id:
            return shared
        return min(shared, public, slot.public)

    def _lead(self, *, client_system: bool) -> list[int]:
        """The tokens no client chose that begin every prompt rendered with the node's system
        prompt (`client_system` False) or with one a client set (the template's part before it)."""
        lead = self._leads.get(client_system)
        if lead is None:
            node = self._node_system
            if client_system:  # two prompts differing only in the system prompt
                variants = [build_messages("A", [], "A"), build_messages("B", [], "A")]
            else:  # two prompts differing only in the client's message
                variants = [build_messages(node, [], "A"), build_messages(node, [], "B")]
            try:
                lead = shared_start(self._engine.chat_prompt, variants)
            except Exception as exc:  # a template that refuses them: nothing is shared
                log.warning("template_lead_failed", error=str(exc))
                lead = []
            self._leads[client_system] = lead
        return lead
