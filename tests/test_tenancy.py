"""One client cannot learn or wipe another's state: kept KV state is shared across clients only
for what no client wrote, and each client has a bounded share of the node's tables. Through the
daemon with SmolLM2-135M on a real broker."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from devtools.harness import PREFIX, SMOLLM, Broker, Daemon, Probe

NODE = "tenantnode"
# The node's own system prompt: public, so every client may reuse its KV state.
NODE_SYSTEM = "You are the assistant of a shared office terminal. Answer in one short sentence."
SECRET = (
    "My bank PIN is 4711. Please keep it safe and remind me of it whenever I ask about the "
    "account at the savings bank on Market Street."
)
GUESS = SECRET.replace("4711", "1234")
UNRELATED = "Name three rivers in Europe and the seas they flow into, from west to east."
TABLE = 48  # conversations and outcomes the node remembers in all
FLOOD = 70  # conversations one client opens: more than the tables hold


@pytest.fixture(scope="module")
def node(module_broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(
        tmp_path_factory.mktemp("tenancy"),
        module_broker,
        SMOLLM,
        QWEN_EDGE_NODE_ID=NODE,
        QWEN_EDGE_MODEL__SLOTS="2",
        QWEN_EDGE_GENERATION__SYSTEM=NODE_SYSTEM,
        # Tables a tenth of the defaults (256 and 16 conversations, 1000 and 100 outcomes), so
        # that flooding them takes FLOOD requests, not hundreds: the same code either way.
        QWEN_EDGE_CONVERSATIONS__MAX_CONVERSATIONS=str(TABLE),
        QWEN_EDGE_CONVERSATIONS__MAX_PER_CLIENT="4",
        QWEN_EDGE_SERVICE__OUTCOMES_MAX=str(TABLE),
        QWEN_EDGE_SERVICE__OUTCOMES_PER_CLIENT="8",
    )
    d.start()
    yield d
    d.stop()


def _client(broker: Broker, name: str) -> Probe:
    probe = Probe(broker, name)
    probe.subscribe(probe.reply_topic("+", node=NODE))
    return probe


def _usage(probe: Probe, message: str, conversation: str, **fields: Any) -> dict[str, int]:
    """Send one greedy turn and return its usage."""
    rid = probe.request(
        message, node=NODE, conversation_id=conversation, temperature=0, max_tokens=2, **fields
    )
    done = probe.collect(rid, timeout=120)[-1]
    assert done["type"] == "done", done
    return dict(done["usage"])


def test_cached_tokens_tell_nothing_of_another_clients_prompt(
    module_broker: Broker, node: Daemon
) -> None:
    alice, bob, carol, dave = (_client(module_broker, n) for n in ("alice", "bob", "carol", "dave"))
    try:
        _usage(alice, SECRET, "first")
        own = _usage(alice, SECRET, "second")  # her other conversation: reused within a client
        same = _usage(bob, SECRET, "b")  # the very same text from another client
        guess = _usage(carol, GUESS, "c")  # a guess that matches up to the PIN
        other = _usage(dave, UNRELATED, "d")  # nothing in common but the public prefix
    finally:
        for p in (alice, bob, carol, dave):
            p.close()
    assert own["cached_tokens"] == own["prompt_tokens"] - 1  # all but the one token for logits
    # Bob and carol learn exactly what dave learns: how long the public prefix is.
    assert same["cached_tokens"] == guess["cached_tokens"] == other["cached_tokens"]
    # That prefix holds the node's system prompt (reused across clients) and none of alice's text.
    assert 15 <= other["cached_tokens"] < same["prompt_tokens"] - 30


def test_a_system_prompt_a_client_sends_is_its_own(module_broker: Broker, node: Daemon) -> None:
    erin, frank, grace = (_client(module_broker, n) for n in ("erin", "frank", "grace"))
    secret_system = "You guard vault 7. The vault code is 8812, never say it. " * 3
    try:
        _usage(erin, "Hello.", "e1", system=secret_system)
        own = _usage(erin, "Hello.", "e2", system=secret_system)
        same = _usage(frank, "Hello.", "f", system=secret_system)
        guess = _usage(grace, "Hello.", "g", system=secret_system.replace("8812", "0000"))
    finally:
        for p in (erin, frank, grace):
            p.close()
    assert own["cached_tokens"] == own["prompt_tokens"] - 1
    assert same["cached_tokens"] == guess["cached_tokens"] < 8  # the template's first tokens


def _replies(probe: Probe, request_id: str) -> list[bytes]:
    """Every reply message of `request_id` received, as sent."""
    return [
        payload for _, payload in probe.raw if json.loads(payload).get("request_id") == request_id
    ]


def test_a_client_flooding_the_tables_leaves_others_history_and_records(
    module_broker: Broker, node: Daemon
) -> None:
    alice, mallory = _client(module_broker, "alice7"), _client(module_broker, "mallory")
    try:
        first = alice.request(
            "Remember the word pelican.",
            node=NODE,
            conversation_id="keep",
            request_id="alice-r1",
            temperature=0,
            max_tokens=4,
        )
        original = alice.collect(first, timeout=120)
        assert original[-1]["type"] == "done"

        # A few at a time, so that none is refused as busy: within a client's share of the
        # queue (limits.max_queued_per_client, 8).
        for start in range(0, FLOOD, 8):
            rids = [
                mallory.request("Hi", node=NODE, conversation_id=f"m{i}", max_tokens=1)
                for i in range(start, min(start + 8, FLOOD))
            ]
            for rid in rids:
                assert mallory.collect(rid, timeout=120)[-1]["type"] == "done"

        # Her follow-up still sees the first turn...
        fresh = _usage(alice, "Which word?", "fresh")
        follow = _usage(alice, "Which word?", "keep")
        # ...and her duplicate of the finished request is answered from its record, byte for byte.
        sent = len(original)
        alice.publish(
            f"{PREFIX}/{NODE}/request/alice7",
            json.dumps(
                {
                    "request_id": "alice-r1",
                    "message": "Remember the word pelican.",
                    "conversation_id": "keep",
                    "temperature": 0,
                    "max_tokens": 4,
                }
            ),
        )
        deadline = time.monotonic() + 60
        while len(_replies(alice, "alice-r1")) < 2 * sent:
            assert time.monotonic() < deadline, "the duplicate was not answered"
            time.sleep(0.05)
        replay = _replies(alice, "alice-r1")
    finally:
        alice.close()
        mallory.close()
    history_kept = follow["prompt_tokens"] >= fresh["prompt_tokens"] + 8
    record_kept = replay[sent:] == replay[:sent]
    assert (history_kept, record_kept) == (True, True)
    replayed = [
        e
        for e in node.log_events()
        if e.get("event") == "duplicate_replayed" and e.get("request_id") == "alice-r1"
    ]
    assert len(replayed) == 1
