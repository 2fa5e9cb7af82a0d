"""Chat history: fitting a prompt into the context, and the bounded conversation store."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_edge.node import conversations
from qwen_edge.node.conversations import (
    ContextOverflow,
    ConversationStore,
    build_messages,
    fit_prompt,
)

from ..helpers import Clock

Turns = list[tuple[str, str]]
Render = Callable[[list[dict[str, str]]], list[int]]

ROLE_TOKEN = {"system": 1, "user": 2, "assistant": 3}


def render(messages: list[dict[str, str]]) -> list[int]:
    """A stand-in chat template: one token for the role, then one per word of the content."""
    tokens: list[int] = []
    for m in messages:
        tokens.append(ROLE_TOKEN[m["role"]])
        tokens.extend(len(word) + 10 for word in m["content"].split())
    return tokens


class CountingRender:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, messages: list[dict[str, str]]) -> list[int]:
        self.calls += 1
        return render(messages)


def words(n: int, tag: str = "w") -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


def size(system: str | None, turns: Turns, message: str) -> int:
    return len(render(build_messages(system, turns, message)))


# -- build_messages ----------------------------------------------------------------------------


def test_messages_are_system_then_alternating_turns_then_new_message() -> None:
    assert build_messages("sys", [("u1", "a1"), ("u2", "a2")], "now") == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2"},
        {"role": "user", "content": "now"},
    ]
    assert build_messages(None, [], "now") == [{"role": "user", "content": "now"}]


# -- fit_prompt --------------------------------------------------------------------------------

TURNS: Turns = [(words(3, f"u{i}_"), words(5, f"a{i}_")) for i in range(6)]  # 10 tokens each


def test_all_turns_are_kept_when_they_fit() -> None:
    full = size("be nice", TURNS, "hello there")
    prompt, dropped = fit_prompt("be nice", TURNS, "hello there", render, full)
    assert dropped == 0
    assert prompt == render(build_messages("be nice", TURNS, "hello there"))


def test_oldest_turns_are_dropped_first() -> None:
    limit = size("sys", TURNS[2:], "msg")
    prompt, dropped = fit_prompt("sys", TURNS, "msg", render, limit)
    assert dropped == 2
    assert prompt == render(build_messages("sys", TURNS[2:], "msg"))


def test_one_token_short_drops_one_more_turn() -> None:
    limit = size("sys", TURNS[2:], "msg") - 1
    prompt, dropped = fit_prompt("sys", TURNS, "msg", render, limit)
    assert dropped == 3
    assert len(prompt) <= limit


def test_system_prompt_and_new_message_stay_when_all_turns_go() -> None:
    bare = render(build_messages("keep me", [], "new question"))
    prompt, dropped = fit_prompt("keep me", TURNS, "new question", render, len(bare))
    assert dropped == len(TURNS)
    assert prompt == bare
    assert prompt[0] == ROLE_TOKEN["system"]


def test_uneven_turns_drop_only_as_many_as_needed() -> None:
    turns: Turns = [(words(40), words(40)), ("a", "b"), ("c", "d")]
    limit = size(None, turns[1:], "m")
    assert fit_prompt(None, turns, "m", render, limit) == (
        render(build_messages(None, turns[1:], "m")),
        1,
    )


@pytest.mark.parametrize("turns", [TURNS, []])
def test_prompt_too_long_without_history_overflows(turns: Turns) -> None:
    bare = size("a long system prompt", [], words(50))
    with pytest.raises(ContextOverflow) as info:
        fit_prompt("a long system prompt", turns, words(50), render, bare - 1)
    assert info.value.prompt_tokens == bare
    assert info.value.limit == bare - 1
    assert str(bare) in str(info.value)


def brute_force(system: str | None, turns: Turns, message: str, limit: int) -> int | None:
    """The fewest oldest turns to drop for the prompt to fit, found by trying each in turn."""
    for k in range(len(turns) + 1):
        if size(system, turns[k:], message) <= limit:
            return k
    return None


turn_text = st.integers(min_value=0, max_value=12).map(words)


@settings(max_examples=200, deadline=None)
@given(
    st.none() | turn_text,
    st.lists(st.tuples(turn_text, turn_text), max_size=40),
    turn_text,
    st.integers(min_value=0, max_value=600),
)
def test_fit_matches_a_linear_search_for_the_longest_fitting_history(
    system: str | None, turns: Turns, message: str, limit: int
) -> None:
    expected = brute_force(system, turns, message, limit)
    counting = CountingRender()
    if expected is None:
        with pytest.raises(ContextOverflow):
            fit_prompt(system, turns, message, counting, limit)
        return
    prompt, dropped = fit_prompt(system, turns, message, counting, limit)
    assert dropped == expected
    assert prompt == render(build_messages(system, turns[dropped:], message))
    assert len(prompt) <= limit
    # the whole history, the bare prompt, then a bisection: O(log turns) renderings
    assert counting.calls <= 2 + max(len(turns), 1).bit_length()


# -- ConversationStore -------------------------------------------------------------------------


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(conversations, "time", fake)
    return fake


A = ("dev1", "a")
B = ("dev1", "b")
C = ("dev1", "c")


def remember(store: ConversationStore, key: tuple[str, str], text: str = "hi") -> None:
    store.record(key, None, 0, text, f"re: {text}")


def test_new_conversation_is_empty_and_the_same_one_comes_back(clock: Clock) -> None:
    store = ConversationStore(4, 60)
    conv = store.get(A)
    assert conv.turns == []
    assert conv.system is None
    assert conv.last_used == clock.now
    assert store.get(A) is conv
    assert len(store) == 1


def test_record_appends_the_turn_and_remembers_the_system_prompt(clock: Clock) -> None:
    store = ConversationStore(4, 60)
    store.record(A, "be brief", 0, "q1", "r1")
    store.record(A, "be brief", 0, "q2", "r2")
    conv = store.get(A)
    assert conv.turns == [("q1", "r1"), ("q2", "r2")]
    assert conv.system == "be brief"
    store.record(A, None, 0, "q3", "r3")
    assert store.get(A).system is None


def test_record_drops_the_oldest_turns_that_no_longer_fit(clock: Clock) -> None:
    store = ConversationStore(4, 60)
    for i in range(4):
        store.record(A, None, 0, f"q{i}", f"r{i}")
    store.record(A, None, 3, "q4", "r4")
    assert store.get(A).turns == [("q3", "r3"), ("q4", "r4")]


def test_store_forgets_least_recently_used_beyond_its_bound(clock: Clock) -> None:
    store = ConversationStore(2, 60)
    remember(store, A)
    remember(store, B)
    store.get(A)  # A is now the most recently used
    remember(store, C)  # evicts B
    assert len(store) == 2
    assert store.get(A).turns
    assert store.get(C).turns
    assert store.get(B).turns == []  # B comes back new


def test_store_never_holds_more_than_its_bound(clock: Clock) -> None:
    store = ConversationStore(3, 60)
    for i in range(50):
        remember(store, ("dev", str(i)))
        assert len(store) == min(i + 1, 3)
    assert [store.get(("dev", str(i))).turns != [] for i in (47, 48, 49)] == [True] * 3


def test_conversation_idle_exactly_ttl_survives_and_longer_expires(clock: Clock) -> None:
    store = ConversationStore(8, 60)
    remember(store, A)
    clock.now += 60
    assert store.get(A).turns  # idle exactly the TTL: kept (and touched again)
    clock.now += 60.001
    assert store.get(A).turns == []


def test_each_use_restarts_the_idle_timer(clock: Clock) -> None:
    store = ConversationStore(8, 60)
    remember(store, A)
    for _ in range(5):
        clock.now += 50
        assert store.get(A).turns
    assert store.get(A).last_used == clock.now


def test_expired_conversations_leave_the_store(clock: Clock) -> None:
    store = ConversationStore(8, 60)
    remember(store, A)
    remember(store, B)
    clock.now += 30
    remember(store, C)
    clock.now += 31  # A and B idle 61 s, C 31 s
    store.get(("other", "x"))
    assert len(store) == 2
    assert store.get(C).turns
    assert store.get(A).turns == []


def test_reset_starts_the_conversation_over(clock: Clock) -> None:
    store = ConversationStore(8, 60)
    store.record(A, "old system", 0, "q", "r")
    remember(store, B)
    fresh = store.get(A, reset=True)
    assert fresh.turns == []
    assert fresh.system is None
    assert store.get(A) is fresh
    assert store.get(B).turns  # other conversations are untouched
    assert len(store) == 2


def test_keys_isolate_clients_and_conversations(clock: Clock) -> None:
    store = ConversationStore(8, 60)
    store.record(("dev1", "default"), "s1", 0, "from dev1", "r")
    store.record(("dev2", "default"), "s2", 0, "from dev2", "r")
    store.record(("dev1", "other"), None, 0, "dev1 other", "r")
    assert store.get(("dev1", "default")).turns == [("from dev1", "r")]
    assert store.get(("dev2", "default")).turns == [("from dev2", "r")]
    assert store.get(("dev1", "other")).turns == [("dev1 other", "r")]
    assert store.get(("dev2", "default")).system == "s2"
    store.get(("dev2", "default"), reset=True)
    assert store.get(("dev1", "default")).turns == [("from dev1", "r")]


def test_reset_conversation_counts_as_most_recently_used(clock: Clock) -> None:
    store = ConversationStore(2, 60)
    remember(store, A)
    remember(store, B)
    clock.now += 1
    store.get(A, reset=True)  # A is now the most recently used
    remember(store, C)  # so this must evict B
    assert store.get(B).turns == []


def test_idle_conversation_expires_even_behind_a_reset_one(clock: Clock) -> None:
    store = ConversationStore(8, 10)
    remember(store, A)
    remember(store, B, "old")
    clock.now += 5
    store.get(A, reset=True)
    clock.now += 7  # B idle 12 s > TTL 10 s; A idle 7 s
    assert store.get(B).turns == []


# -- fair shares between clients ----------------------------------------------------------------


def test_a_client_past_its_share_loses_its_own_least_recently_used(clock: Clock) -> None:
    store = ConversationStore(10, 60, max_per_client=2)
    remember(store, ("bob", "x"))
    remember(store, A)
    remember(store, B)
    store.get(A)
    remember(store, C)  # dev1's third: its own B goes, nobody else's
    assert store.held_by("dev1") == 2 and store.held_by("bob") == 1
    assert store.get(A).turns and store.get(C).turns and store.get(("bob", "x")).turns


def test_a_client_opening_many_conversations_evicts_only_its_own(clock: Clock) -> None:
    store = ConversationStore(256, 3600, max_per_client=16)
    for i in range(3):
        remember(store, ("alice", str(i)), f"secret {i}")
        clock.now += 1
    for i in range(300):
        remember(store, ("mallory", str(i)))
        clock.now += 1
    assert store.held_by("mallory") == 16
    assert [store.get(("alice", str(i))).turns[0][0] for i in range(3)] == [
        "secret 0",
        "secret 1",
        "secret 2",
    ]


def test_a_full_table_evicts_from_the_client_holding_most(clock: Clock) -> None:
    store = ConversationStore(6, 3600, max_per_client=6)
    for client, n in (("big", 4), ("small", 2)):
        for i in range(n):
            remember(store, (client, str(i)))
            clock.now += 1
    remember(store, ("new", "0"))  # full: "big" holds most and loses its least recently used
    assert (store.held_by("big"), store.held_by("small"), store.held_by("new")) == (3, 2, 1)
    assert ("big", "0") not in store
    remember(store, ("small", "2"))  # "small" now holds as many as "big": a tie costs its own
    assert (store.held_by("big"), store.held_by("small"), store.held_by("new")) == (3, 2, 1)
    assert ("small", "0") not in store and ("small", "2") in store


def test_with_more_clients_than_places_the_least_recently_used_goes(clock: Clock) -> None:
    store = ConversationStore(2, 3600, max_per_client=2)
    for client in ("a", "b", "c"):
        remember(store, (client, "0"))
        clock.now += 1
    assert (store.held_by("a"), store.held_by("b"), store.held_by("c")) == (0, 1, 1)


@settings(max_examples=300, deadline=None)
@given(
    total=st.integers(1, 12),
    per_client=st.integers(1, 8),
    ops=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 9), st.booleans()), max_size=80),
)
def test_evictions_only_ever_take_from_a_client_holding_more(
    total: int, per_client: int, ops: list[tuple[int, int, bool]]
) -> None:
    """Whatever clients do: both bounds hold, the conversation just used stays, at most one
    goes per use, and another client's goes only if that client holds more than the one that
    caused it (or everyone holds one), and then its least recently used."""
    store = ConversationStore(total, 3600, max_per_client=per_client)
    order: list[tuple[str, str]] = []  # what the store holds, least recently used first
    for client_n, conv_n, reset in ops:
        client, key = f"c{client_n}", (f"c{client_n}", str(conv_n))
        before = Counter(k[0] for k in order)
        store.get(key, reset=reset)
        if key in order:
            order.remove(key)
        order.append(key)
        gone = [k for k in order if k not in store]
        assert key in store and len(gone) <= 1
        for lost in gone:
            owner = lost[0]
            assert lost == next(k for k in order if k[0] == owner)  # its least recently used
            order.remove(lost)
            if owner != client:
                held = sum(1 for k in order if k[0] == client)
                assert before[owner] > held or before[owner] == held == 1
        held_now = Counter(k[0] for k in order)
        assert len(store) == len(order) <= total
        assert all(store.held_by(c) == n <= per_client for c, n in held_now.items())
