"""Follow-up turns evaluate only what is new, through the daemon with SmolLM2-135M."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from devtools.harness import SMOLLM, Broker, Daemon, Probe

NODE = "followup"
HISTORY = "Here are my notes: " + "apples, pears, plums, cherries. " * 30


@pytest.fixture(scope="module")
def node(module_broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # No store for evicted KV: a conversation that loses its slot loses its KV, so every
    # eviction shows in cached_tokens.
    d = Daemon(
        tmp_path_factory.mktemp("followup"),
        module_broker,
        SMOLLM,
        QWEN_EDGE_NODE_ID=NODE,
        QWEN_EDGE_MODEL__SLOTS="2",
        QWEN_EDGE_MODEL__KV_KEEP_MB="0",
    )
    d.start()
    yield NODE
    d.stop()


def _usage(probe: Probe, message: str, conversation: str, **kw: Any) -> dict[str, int]:
    rid = probe.request(
        message, node=NODE, conversation_id=conversation, temperature=0, max_tokens=8, **kw
    )
    done = probe.collect(rid, timeout=600)[-1]
    assert done["type"] == "done", done
    usage: dict[str, int] = done["usage"]
    return usage


def test_a_fresh_conversation_takes_an_empty_slot_not_one_holding_another_conversation(
    module_broker: Broker, node: str
) -> None:
    probe = Probe(module_broker, "follower")
    try:
        probe.subscribe(probe.reply_topic("+", node=node))
        _usage(probe, HISTORY, "notes")
        # Shares only the template's first tokens with "notes": it must not evict it.
        _usage(probe, "Tell me about the sea.", "other", system="Be brief.")
        follow = _usage(probe, "Which fruits?", "notes")
        # The same two turns with nothing in between: what a follow-up has to evaluate (the
        # end of the last reply, which was sampled but never fed back, and the new message).
        _usage(probe, HISTORY, "reference")
        reference = _usage(probe, "Which fruits?", "reference")
        new = reference["prompt_tokens"] - reference["cached_tokens"]
        assert 0 < new < 30
        assert follow["prompt_tokens"] == reference["prompt_tokens"]
        assert follow["cached_tokens"] == follow["prompt_tokens"] - new
    finally:
        probe.close()
