"""Continuous batching and kept KV state, through the daemon with SmolLM2-135M."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from devtools.harness import SMOLLM, Broker, Daemon, Probe, reply_text

PROMPTS = [
    "Name three rivers in Europe.",
    "What is two plus two?",
    "Give me a synonym for happy.",
    "Describe the colour of the sky at dusk.",
]


@pytest.fixture(scope="module")
def batch_node(module_broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    node = "batchnode"
    d = Daemon(
        tmp_path_factory.mktemp("batch"),
        module_broker,
        SMOLLM,
        QWEN_EDGE_NODE_ID=node,
        QWEN_EDGE_MODEL__SLOTS="2",
        QWEN_EDGE_MODEL__QUEUE_SIZE="8",
    )
    d.start()
    yield node
    d.stop()


def _ask(probe: Probe, node: str, message: str, conversation: str, **kw: Any) -> str:
    return probe.request(message, node=node, conversation_id=conversation, **kw)


def test_batched_greedy_output_equals_solo_output(module_broker: Broker, batch_node: str) -> None:
    probe = Probe(module_broker, "batcher")
    try:
        probe.subscribe(probe.reply_topic("+", node=batch_node))
        solo = []
        for i, prompt in enumerate(PROMPTS):
            rid = _ask(probe, batch_node, prompt, f"solo{i}", temperature=0, max_tokens=32)
            solo.append(reply_text(probe.collect(rid)))
        # All four at once: two decode together, two wait and join as slots free up.
        rids = [
            _ask(probe, batch_node, p, f"batch{i}", temperature=0, max_tokens=32)
            for i, p in enumerate(PROMPTS)
        ]
        batched = {rid: probe.collect(rid) for rid in rids}  # collect() skips other requests
        assert [reply_text(batched[r]) for r in rids] == solo
    finally:
        probe.close()


def test_follow_up_reuses_kv_state_after_other_conversations_took_the_slots(
    module_broker: Broker, batch_node: str
) -> None:
    probe = Probe(module_broker, "kv")
    try:
        probe.subscribe(probe.reply_topic("+", node=batch_node))
        history = "Here are my notes: " + "apples, pears, plums, cherries. " * 40
        first = probe.collect(_ask(probe, batch_node, history, "long", max_tokens=8))
        # Three other conversations pass through both slots, evicting "long" from its slot.
        for i in range(3):
            probe.collect(
                _ask(probe, batch_node, f"Question {i}: hello?", f"other{i}", max_tokens=4)
            )
        follow = probe.collect(_ask(probe, batch_node, "Which fruits?", "long", max_tokens=8))
        usage = follow[-1]["usage"]
        assert usage["prompt_tokens"] > first[-1]["usage"]["prompt_tokens"]
        # Only the new turn (plus the re-tokenised end of the last reply) is evaluated again.
        assert usage["prompt_tokens"] - usage["cached_tokens"] < 40
        assert usage["cached_tokens"] >= first[-1]["usage"]["prompt_tokens"]
    finally:
        probe.close()
