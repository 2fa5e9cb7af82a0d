"""KvStore: saved KV states stay within their byte budget, least recently used out first."""

from __future__ import annotations

import ctypes

from qwen_edge.node.kvstore import KvStore, SavedSequence


def saved(size: int, tokens: tuple[int, ...] = (1, 2, 3)) -> SavedSequence:
    return SavedSequence(tokens, (ctypes.c_uint8 * size)())


def test_states_within_budget_are_kept_and_taken_once() -> None:
    store = KvStore(100)
    assert store.put(("c", "a"), saved(40, (7,)))
    assert store.put(("c", "b"), saved(40))
    assert store.used_bytes == 80
    taken = store.take(("c", "a"))
    assert taken is not None and taken.tokens == (7,)
    assert store.take(("c", "a")) is None
    assert store.used_bytes == 40


def test_least_recently_saved_state_is_evicted_first() -> None:
    store = KvStore(100)
    store.put(("c", "old"), saved(40))
    store.put(("c", "mid"), saved(40))
    store.put(("c", "new"), saved(40))
    assert ("c", "old") not in store
    assert ("c", "mid") in store and ("c", "new") in store
    assert store.used_bytes == 80


def test_make_room_evicts_before_a_copy_is_made_and_refuses_the_impossible() -> None:
    store = KvStore(100)
    store.put(("c", "a"), saved(60))
    assert store.make_room(50)
    assert len(store) == 0 and store.used_bytes == 0
    assert not store.make_room(101)
    assert not store.put(("c", "huge"), saved(101))
    assert len(store) == 0


def test_saving_a_conversation_again_replaces_its_old_state() -> None:
    store = KvStore(100)
    store.put(("c", "a"), saved(30, (1,)))
    store.put(("c", "a"), saved(50, (1, 2)))
    assert len(store) == 1 and store.used_bytes == 50


def test_zero_budget_keeps_nothing() -> None:
    store = KvStore(0)
    assert not store.put(("c", "a"), saved(1))
    assert len(store) == 0


def test_a_state_goes_back_only_to_the_conversation_it_came_from() -> None:
    store = KvStore(100)
    store.put(("alice", "c1"), saved(10))
    assert store.take(("bob", "c1")) is None  # same conversation id, another client
    assert store.take(("alice", "c2")) is None
    assert store.take(("alice", "c1")) is not None
