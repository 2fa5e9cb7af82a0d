"""The scheduler in-process over a fake engine (tests/fakes.py): admission, queueing, cancel,
batching order, reuse of KV, failures and drain, in milliseconds and without a broker.

The end-to-end tests (test_batching, test_tenancy, test_streaming, ...) check the same behaviour
with the real model and broker; these pin the scheduling logic itself.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from qwen_edge.node.conversations import ConversationStore
from qwen_edge.node.grammar import Compiled
from qwen_edge.node.replies import ReplyStream
from qwen_edge.node.scheduler import Job, Scheduler
from qwen_edge.protocol import ChatRequest, ErrorCode
from qwen_edge.settings import GenerationSettings, LimitSettings

from .fakes import FakeEngine

pytestmark = pytest.mark.unit

WAIT = 5.0  # seconds any one test may wait for the loop; each takes milliseconds


class Replies:
    """A recording publish function: every message sent, per request id, parsed."""

    def __init__(self) -> None:
        self.messages: dict[str, list[dict[str, Any]]] = {}
        self.ended: list[str] = []  # request ids in the order their done/error went out
        self.order: list[tuple[str, str]] = []  # (request id, type) of every message, in order
        self._changed = threading.Condition()

    def publish(self, topic: str, payload: bytes, correlation: bytes | None) -> None:
        message = json.loads(payload)
        with self._changed:
            self.messages.setdefault(message["request_id"], []).append(message)
            self.order.append((message["request_id"], message["type"]))
            if message["type"] in ("done", "error"):
                self.ended.append(message["request_id"])
            self._changed.notify_all()

    def wait(self, *request_ids: str) -> None:
        with self._changed:
            assert self._changed.wait_for(
                lambda: all(r in self.ended for r in request_ids), WAIT
            ), f"not ended: {set(request_ids) - set(self.ended)}"

    def end(self, request_id: str) -> dict[str, Any]:
        """The request's one final message, after checking the stream's shape."""
        stream = self.messages[request_id]
        assert [m["seq"] for m in stream] == list(range(len(stream)))
        finals = [m for m in stream if m["type"] in ("done", "error")]
        assert len(finals) == 1 and stream[-1] is finals[0], stream
        assert stream[0]["type"] == "start" or finals[0]["type"] == "error"
        return finals[0]

    def text(self, request_id: str) -> str:
        return "".join(m["text"] for m in self.messages[request_id] if m["type"] == "chunk")

    def chunks(self, request_id: str) -> list[str]:
        return [m["text"] for m in self.messages[request_id] if m["type"] == "chunk"]


class Node:
    """A Scheduler over a FakeEngine, with helpers to submit requests and run the loop."""

    def __init__(
        self,
        *,
        slots: int = 2,
        n_batch: int = 64,
        n_ctx_seq: int = 512,
        queue_size: int = 4,
        kv_keep_bytes: int = 0,
        limits: LimitSettings | None = None,
        grammars: Any = None,
        **generation: Any,
    ) -> None:
        self.engine = FakeEngine(slots=slots, n_ctx_seq=n_ctx_seq, n_batch=n_batch)
        self.store = ConversationStore(100, 3600)
        self.replies = Replies()
        self.scheduler = Scheduler(
            self.engine,
            store=self.store,
            generation=GenerationSettings(**generation),
            queue_size=queue_size,
            kv_keep_bytes=kv_keep_bytes,
            node="node1",
            model_name="fake",
            limits=limits,
            grammars=grammars,
        )
        self._thread: threading.Thread | None = None

    def job(self, request_id: str, message: str = "hi", client: str = "dev1", **fields: Any) -> Job:
        request = ChatRequest(request_id=request_id, message=message, **fields)
        stream = ReplyStream(self.replies.publish, f"reply/{client}", request_id)
        return Job(client, request, stream)

    def submit(
        self, request_id: str, message: str = "hi", client: str = "dev1", **fields: Any
    ) -> Job:
        job = self.job(request_id, message, client, **fields)
        assert self.scheduler.submit(job) is None
        return job

    def start(self) -> None:
        """Run the inference loop on its own thread (once); close() stops it."""
        if self._thread is None:
            self._thread = threading.Thread(target=self.scheduler.run, name="inference")
            self._thread.start()

    def close(self) -> None:
        """Stop (drain) and join the loop; every sampler made must have been closed."""
        self.scheduler.stop(WAIT)
        if self._thread is not None:
            self._thread.join(WAIT)
            assert not self._thread.is_alive()
        assert all(s.closed for s in self.engine.samplers), "a sampler was never closed"

    def wait_idle(self) -> None:
        """Until every slot is free again (a job's done goes out just before its slot frees)."""
        for _ in range(int(WAIT / 0.001)):
            if self.scheduler.load == (0, 0):
                return
            threading.Event().wait(0.001)
        raise AssertionError(f"still busy: {self.scheduler.load}")

    def ask(self, request_id: str, message: str = "hi", **fields: Any) -> dict[str, Any]:
        """Submit, run until it ends, and return its final message."""
        self.submit(request_id, message, **fields)
        self.start()
        self.replies.wait(request_id)
        return self.replies.end(request_id)


Make = Callable[..., Node]


@pytest.fixture
def make() -> Iterator[Make]:
    """Node(...), closed (drained, joined, samplers checked) after the test."""
    nodes: list[Node] = []

    def build(**settings: Any) -> Node:
        nodes.append(Node(**settings))
        return nodes[-1]

    yield build
    for node in nodes:
        node.close()


# -- admission and queueing --------------------------------------------------------------------


def test_admission_takes_free_slots_plus_the_queue_then_says_busy(make: Make) -> None:
    node = make(slots=2, queue_size=1)
    for i in range(3):
        node.submit(f"r{i}")
    assert node.scheduler.submit(node.job("r3")) is ErrorCode.BUSY
    assert node.scheduler.submit(node.job("r0")) is ErrorCode.DUPLICATE
    assert node.scheduler.load == (0, 3)
    assert node.replies.messages == {}  # a refused job sends nothing itself: intake answers


def test_a_stopping_node_refuses_new_jobs_and_ends_waiting_ones_shutting_down(make: Make) -> None:
    node = make(slots=1)
    node.submit("waiting")
    node.scheduler.stop(0)
    assert node.scheduler.submit(node.job("late")) is ErrorCode.SHUTTING_DOWN
    node.scheduler.run()  # returns: stopped and drained
    assert node.replies.end("waiting")["code"] == "shutting_down"


def test_waiting_jobs_are_served_in_arrival_order(make: Make) -> None:
    node = make(slots=1, queue_size=5)
    ids = [f"r{i}" for i in range(5)]
    for i, request_id in enumerate(ids):
        node.submit(request_id, conversation_id=f"c{i}")
    node.start()
    node.replies.wait(*ids)
    assert node.replies.ended == ids
    assert all(node.replies.end(r)["finish_reason"] == "stop" for r in ids)


def test_a_freed_slot_admits_the_next_job(make: Make) -> None:
    node = make(slots=1, queue_size=0)
    node.submit("first")
    assert node.scheduler.submit(node.job("second")) is ErrorCode.BUSY
    node.start()
    node.replies.wait("first")
    node.wait_idle()
    node.submit("third")
    node.replies.wait("third")
    assert node.replies.text("third") == "hello"


# -- cancel ------------------------------------------------------------------------------------


def test_cancelling_a_waiting_job_ends_it_cancelled_without_decoding_it(make: Make) -> None:
    node = make(slots=1)
    node.submit("running")
    node.submit("waiting", conversation_id="other")
    assert node.scheduler.cancel("dev1", "waiting")
    assert not node.scheduler.cancel("dev2", "waiting")  # another client's id is not its job
    node.start()
    node.replies.wait("running", "waiting")
    end = node.replies.end("waiting")
    assert end["finish_reason"] == "cancelled"
    assert end["usage"]["completion_tokens"] == 0
    assert node.replies.end("running")["finish_reason"] == "stop"
    assert len(node.engine.samplers) == 1  # the cancelled job never got one


def test_cancelling_a_running_job_ends_it_before_the_next_step(make: Make) -> None:
    node = make(slots=2)
    node.engine.reply = "x" * 100
    cancelled_at: list[int] = []

    def cancel_at_step_5(step: int) -> None:
        if step == 5:
            assert node.scheduler.cancel("dev1", "long")
            cancelled_at.append(step)

    node.engine.on_decode = cancel_at_step_5
    node.submit("long")
    node.start()
    node.replies.wait("long")
    end = node.replies.end("long")
    assert end["finish_reason"] == "cancelled"
    # Step 0 reads the prompt and samples; steps 1-5 evaluate a token each and sample the next.
    assert end["usage"]["completion_tokens"] == 6
    assert node.replies.text("long") == "x" * 6
    assert len(node.engine.steps) == 6  # no step after the cancel
    node.wait_idle()
    assert node.scheduler.cancel("dev1", "long") is False  # ended: nothing left to cancel
    assert node.store.get(("dev1", "default")).turns == [("hi", "x" * 6)]


# -- batching ----------------------------------------------------------------------------------


def test_a_step_carries_generating_slots_first_then_prompt_chunks_within_n_batch(
    make: Make,
) -> None:
    node = make(slots=3, n_batch=32)
    node.engine.reply = "abcdefgh"
    node.submit("a")  # a 20-token prompt: one step, then a token a step

    def arrive(step: int) -> None:
        if step == 1:
            node.submit("b", "b" * 40, conversation_id="b")
            node.submit("c", "c" * 10, conversation_id="c")

    node.engine.on_decode = arrive
    node.start()
    node.replies.wait("a", "b", "c")
    b_len = len(node.engine.chat_prompt([{"role": "user", "content": "b" * 40}]))
    c_len = len(node.engine.chat_prompt([{"role": "user", "content": "c" * 10}]))
    shapes = [[(r.seq, len(r.tokens), r.logits) for r in rows] for rows in node.engine.steps]
    assert shapes[0] == [(0, 20, True)]
    assert shapes[1] == [(0, 1, True)]  # b and c arrived while this step was decoding
    assert shapes[2] == [(0, 1, True), (1, 31, False)]  # c waits: no room left
    left = b_len - 31
    assert shapes[3] == [(0, 1, True), (1, left, True), (2, 31 - left, False)]
    assert shapes[4] == [(0, 1, True), (1, 1, True), (2, c_len - (31 - left), True)]
    assert [node.replies.text(r) for r in "abc"] == ["abcdefgh"] * 3


def test_a_follow_up_reuses_the_kv_its_conversation_left_in_the_slot(make: Make) -> None:
    node = make(slots=2)
    node.ask("t1", "hi")
    end = node.ask("t2", "more")
    # The KV holds the first prompt and the reply's tokens up to the last one sampled.
    assert end["usage"]["cached_tokens"] == len(b"user: hi\nassistant: hello")
    assert end["usage"]["prompt_tokens"] == len(
        b"user: hi\nassistant: hello\nuser: more\nassistant: "
    )


def test_a_conversation_that_lost_its_slot_gets_its_kv_back_from_the_store(make: Make) -> None:
    node = make(slots=1, kv_keep_bytes=1 << 20)
    long = "a long message that fills more than the sixty-four tokens worth saving, surely"
    node.ask("t1", long)
    node.ask("o1", "hi", conversation_id="other")  # takes the slot: t1's KV is saved
    end = node.ask("t2", "more")
    assert end["usage"]["cached_tokens"] == len(f"user: {long}\nassistant: hello".encode())


def test_another_client_reuses_only_the_public_prefix_of_a_slot(make: Make) -> None:
    node = make(slots=1, system="Be brief.")
    public = len(b"system: Be brief.\nuser: ")
    node.ask("a1", "secret plan", client="alice")
    # Alice's words stay hers: Bob's prompt shares "secret pl" with them, but reuses only what
    # no client wrote, or his cached_tokens and first-chunk delay would tell him how far it did.
    end = node.ask("b1", "secret plot", client="bob")
    assert end["usage"]["cached_tokens"] == public


def test_one_client_reuses_its_own_prefix_across_conversations(make: Make) -> None:
    node = make(slots=1, system="Be brief.")
    node.ask("a1", "secret plan")
    end = node.ask("a2", "secret plot", conversation_id="c2")
    assert end["usage"]["cached_tokens"] == len(b"system: Be brief.\nuser: secret pl")


# -- failures ----------------------------------------------------------------------------------


def test_a_failed_decode_ends_the_stepped_requests_internal_and_the_loop_goes_on(
    make: Make,
) -> None:
    node = make(slots=2, n_batch=20)  # the first step holds only the first prompt
    node.engine.fail_decode = 1
    kv_after: list[list[int]] = []
    node.engine.on_decode = lambda step: kv_after.append(list(node.engine.kv[0]))
    node.submit("stepped")
    node.submit("next", conversation_id="other")
    node.start()
    node.replies.wait("stepped", "next")
    node.submit("later", conversation_id="later")
    node.replies.wait("later")
    failed = node.replies.end("stepped")
    assert (failed["code"], failed["message"]) == ("internal", "the model failed to decode")
    assert node.replies.end("next")["finish_reason"] == "stop"
    assert node.replies.end("later")["finish_reason"] == "stop"
    # The cells the failed step wrote are forgotten before the next step, and no turn is kept.
    assert kv_after[1] == []
    assert node.store.get(("dev1", "default")).turns == []


def test_a_fault_in_the_loop_ends_the_running_requests_internal_and_the_loop_goes_on(
    make: Make,
) -> None:
    node = make(slots=2)
    node.engine.fail_piece = RuntimeError("a bug")
    node.submit("one")
    node.submit("two", conversation_id="two")
    node.start()
    node.replies.wait("one", "two")
    node.submit("three", conversation_id="three")
    node.replies.wait("three")
    for request_id in ("one", "two"):
        end = node.replies.end(request_id)
        assert (end["code"], end["message"]) == ("internal", "internal error in the model loop")
    assert node.replies.text("three") == "hello"


def test_an_exception_starting_a_request_ends_it_internal(make: Make) -> None:
    node = make(slots=1)
    node.engine.fail_sampler = RuntimeError("a bug")
    node.submit("broken")
    node.submit("fine", conversation_id="fine")
    node.start()
    node.replies.wait("broken", "fine")
    broken = node.replies.end("broken")
    assert (broken["code"], broken["message"]) == ("internal", "internal error")
    assert node.replies.text("fine") == "hello"


def test_a_grammar_the_engine_refuses_is_a_bad_request(make: Make) -> None:
    end = make().ask("r", format="json")
    assert end["code"] == "bad_request" and end["message"].startswith("format: ")


def test_a_prompt_that_cannot_fit_is_a_context_overflow(make: Make) -> None:
    end = make(n_ctx_seq=64).ask("r", "x" * 100)
    assert end["code"] == "context_overflow"


# -- stop and drain ----------------------------------------------------------------------------


def test_stop_lets_running_requests_finish_and_ends_waiting_ones_shutting_down(make: Make) -> None:
    node = make(slots=1)
    node.engine.reply = "a longer reply"

    def stop_at_step_2(step: int) -> None:
        if step == 2:
            node.scheduler.stop(WAIT)

    node.engine.on_decode = stop_at_step_2
    node.submit("running")
    node.submit("waiting", conversation_id="other")
    node.scheduler.run()
    assert node.replies.end("running")["finish_reason"] == "stop"
    assert node.replies.text("running") == "a longer reply"
    assert node.replies.end("waiting")["code"] == "shutting_down"


def test_past_the_drain_timeout_running_requests_end_cancelled(make: Make) -> None:
    node = make(slots=1)
    node.engine.reply = "x" * 100

    def stop_at_step_2(step: int) -> None:
        if step == 2:
            node.scheduler.stop(0)  # no time to drain

    node.engine.on_decode = stop_at_step_2
    node.submit("running")
    node.scheduler.run()
    end = node.replies.end("running")
    assert end["finish_reason"] == "cancelled"
    assert end["usage"]["completion_tokens"] == 3


# -- the reply's text --------------------------------------------------------------------------


def test_a_stop_string_ends_the_reply_before_it_and_the_history_keeps_the_cut_text(
    make: Make,
) -> None:
    node = make()
    node.engine.reply = "one two STOP three"
    end = node.ask("r", stop=["STOP"])
    assert end["finish_reason"] == "stop"
    assert node.replies.text("r") == "one two "
    assert node.store.get(("dev1", "default")).turns == [("hi", "one two ")]


def test_max_tokens_ends_the_reply_with_length(make: Make) -> None:
    node = make()
    node.engine.reply = "abcdefgh"
    end = node.ask("r", max_tokens=3)
    assert (end["finish_reason"], node.replies.text("r")) == ("length", "abc")


def test_a_full_context_ends_the_reply_with_length(make: Make) -> None:
    node = make(n_ctx_seq=40)
    node.engine.reply = "x" * 100
    end = node.ask("r")
    assert end["finish_reason"] == "length"
    assert end["usage"]["prompt_tokens"] + end["usage"]["completion_tokens"] == 40


def test_characters_split_across_tokens_arrive_whole(make: Make) -> None:
    node = make()
    node.engine.reply = "héllo ✓ 🙂"  # two, three and four bytes: one token each
    node.ask("r")
    assert node.replies.text("r") == "héllo ✓ 🙂"


def test_chunk_ms_joins_the_text_between_chunks(make: Make) -> None:
    node = make()
    node.engine.reply = "abcdefgh"
    node.ask("r", chunk_ms=2000)
    # The first piece goes at once; the rest waits for the pace, and goes before done.
    assert node.replies.chunks("r") == ["a", "bcdefgh"]


def test_every_request_gets_exactly_one_end_and_a_closed_sampler(make: Make) -> None:
    """Ten requests through two slots, with a cancel, a failed decode and a refused start."""
    node = make(slots=2, queue_size=8)
    node.engine.reply = "some words"
    node.engine.fail_sampler = RuntimeError("a bug")

    def chaos(step: int) -> None:
        if step == 3:
            node.scheduler.cancel("dev1", "r4")
        if step == 6:
            node.engine.fail_decode = 1

    node.engine.on_decode = chaos
    ids = [f"r{i}" for i in range(10)]
    for i, request_id in enumerate(ids):
        node.submit(request_id, conversation_id=f"c{i % 3}")
    node.start()
    node.replies.wait(*ids)
    assert sorted(node.replies.ended) == sorted(ids)
    for request_id in ids:
        node.replies.end(request_id)
    node.wait_idle()


def test_follow_ups_reuse_all_their_kv_through_evictions_and_restores(make: Make) -> None:
    """Three conversations taking turns in two slots: each follow-up finds its KV, in its
    slot or restored from the store. (The fake checks that every row starts where its
    sequence's KV ends.)"""
    node = make(slots=2, kv_keep_bytes=1 << 20)
    node.engine.reply = "a reply long enough to be worth keeping in the store"
    last: dict[str, dict[str, Any]] = {}
    for turn in range(3):
        for conversation in ("a", "b", "c"):
            end = node.ask(f"{conversation}{turn}", f"turn {turn}", conversation_id=conversation)
            usage = end["usage"]
            if turn:
                before = last[conversation]
                assert (
                    usage["cached_tokens"] == before["prompt_tokens"] + before["completion_tokens"]
                )
            last[conversation] = usage


def test_a_new_conversation_takes_an_empty_slot_rather_than_evict_a_long_history(
    make: Make,
) -> None:
    """With no room to keep evicted KV, sharing a few template tokens is not worth a whole
    history read again: the follow-up still finds all of its KV."""
    node = make(slots=2, kv_keep_bytes=0)
    history = "notes: " + "apples, pears, plums. " * 5
    first = node.ask("a1", history, conversation_id="a")
    node.ask("b1", "hi", conversation_id="b")
    end = node.ask("a2", "which fruits?", conversation_id="a")
    usage = first["usage"]
    assert end["usage"]["cached_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


# -- fair shares: the queue across clients -----------------------------------------------------


def test_a_freed_slot_goes_to_the_next_client_in_turn_not_the_oldest_job(make: Make) -> None:
    node = make(slots=1, queue_size=10)
    flood = [f"f{i}" for i in range(6)]
    for rid in flood:
        node.submit(rid, client="flood", conversation_id="one")
    node.submit("o1", client="other")
    node.start()
    node.replies.wait(*flood, "o1")
    assert node.replies.ended[:3] == ["f0", "o1", "f1"]


def test_a_client_holds_at_most_its_share_of_the_queue(make: Make) -> None:
    node = make(slots=1, queue_size=10, limits=LimitSettings(max_queued_per_client=2))
    node.submit("f0", client="flood")
    node.submit("f1", client="flood")
    assert node.scheduler.submit(node.job("f2", client="flood")) is ErrorCode.BUSY
    node.submit("o1", client="other")
    assert node.scheduler.load == (0, 3)


def test_a_full_queue_gives_a_newcomer_the_newest_place_of_the_client_holding_most(
    make: Make,
) -> None:
    node = make(slots=1, queue_size=3)  # 1 free slot + 3 places
    for i in range(4):
        node.submit(f"f{i}", client="flood")
    assert node.scheduler.submit(node.job("f4", client="flood")) is ErrorCode.BUSY
    node.submit("o1", client="other")  # takes f3's place
    node.submit("o2", client="other")  # takes f2's (flood 3, other 1)
    assert node.scheduler.submit(node.job("o3", client="other")) is ErrorCode.BUSY  # 2 and 2
    for rid in ("f3", "f2"):
        end = node.replies.end(rid)
        assert (end["code"], end["seq"]) == ("busy", 0) and "held the most" in end["message"]
    node.start()
    node.replies.wait("f0", "f1", "o1", "o2")
    assert node.replies.ended[2:] == ["f0", "o1", "f1", "o2"]


# -- format: compiled off the loop, paced by its share -----------------------------------------


class HeldGrammars:
    """A GrammarSource whose compiles finish when the test says so."""

    def __init__(self) -> None:
        self.pending: list[Callable[[Compiled], None]] = []
        self.closed = False

    def request(self, fmt: Any, done: Callable[[Compiled], None], **kw: Any) -> None:
        self.pending.append(done)

    def close(self) -> None:
        self.closed = True


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


def test_a_request_waits_for_its_grammar_without_holding_back_others(make: Make) -> None:
    grammars = HeldGrammars()
    node = make(slots=1, grammars=grammars)
    node.engine.grammar_cost = 0.0
    node.submit("schema", client="a", format=SCHEMA)
    node.submit("bad", client="a", format=SCHEMA, conversation_id="c2")
    node.submit("plain", client="b")
    node.start()
    node.replies.wait("plain")  # served while a's format compiles
    assert "schema" not in node.replies.messages and node.scheduler.load[1] == 2
    grammars.pending[1](Compiled(None, "the schema has more than 500 parts"))
    node.replies.wait("bad")  # refused at once, without a slot and without start
    end = node.replies.end("bad")
    assert (end["code"], end["seq"], end["message"]) == (
        "bad_request",
        0,
        "format: the schema has more than 500 parts",
    )
    grammars.pending[0](Compiled("root ::= [0-9]"))
    node.replies.wait("schema")
    assert node.replies.end("schema")["finish_reason"] == "stop"
    node.close()
    assert grammars.closed  # the loop stops its compiler


def test_a_grammar_over_its_share_sits_out_while_others_generate(make: Make) -> None:
    node = make(slots=2, limits=LimitSettings(grammar_share=0.1, grammar_step_ms=5000))
    node.engine.reply = "a long plain reply"
    node.engine.grammar_cost = 1.0  # a second of grammar work per token, as the fake says
    node.submit("graded", client="a", format="json")
    node.submit("plain", client="b")
    node.start()
    node.replies.wait("graded", "plain")
    order = node.replies.order
    plain_done = order.index(("plain", "done"))
    # The graded request sampled once (a second of debt), then sat out every step the plain
    # one took; alone, it runs again (nobody waits on it).
    assert order[:plain_done].count(("graded", "chunk")) <= 1
    assert node.replies.text("graded") == node.replies.text("plain")


def test_one_tokens_grammar_past_the_step_limit_ends_the_request(make: Make) -> None:
    node = make(slots=2, limits=LimitSettings(grammar_step_ms=1000))
    node.engine.grammar_cost = 2.0
    node.submit("graded", client="a", format="json")
    node.submit("plain", client="b")
    node.start()
    node.replies.wait("graded", "plain")
    end = node.replies.end("graded")
    assert end["code"] == "bad_request" and "limits.grammar_step_ms" in end["message"]
    assert node.replies.end("plain")["finish_reason"] == "stop"
