"""The intake in-process: from a delivered message to a job or an error reply, with a link that
records what it publishes, a scheduler that records what it is handed, the real limiter and the
real journal on an in-memory state store. No broker, no model, no subprocess: the end-to-end
tests against the real parts (test_boundary, test_durability, test_limits) stay beside these."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qwen_edge.node.intake import Intake
from qwen_edge.node.journal import RequestJournal
from qwen_edge.node.limits import ClientLimits
from qwen_edge.node.link import Inbound
from qwen_edge.node.scheduler import Job
from qwen_edge.node.statestore import StateStore
from qwen_edge.protocol import ErrorCode, FinishReason
from qwen_edge.settings import LimitSettings
from qwen_edge.topics import Topics

TOPICS = Topics("edge", "pi")
MAX_PAYLOAD = 4096


class Link:
    """Records every publish: (topic, payload, correlation)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes | None]] = []

    def publish(self, topic: str, payload: bytes, correlation: bytes | None = None) -> None:
        self.sent.append((topic, payload, correlation))

    def messages(self, topic: str) -> list[dict[str, Any]]:
        return [json.loads(payload) for t, payload, _ in self.sent if t == topic]


class Scheduler:
    """Takes jobs like the real one: `busy` beyond `room`, DUPLICATE for a key it holds."""

    def __init__(self, room: int = 100) -> None:
        self.room = room
        self.jobs: list[Job] = []
        self.cancelled: list[tuple[str, str]] = []

    def submit(self, job: Job) -> ErrorCode | None:
        if any(j.key == job.key and not j.stream.ended for j in self.jobs):
            return ErrorCode.DUPLICATE
        if len([j for j in self.jobs if not j.stream.ended]) >= self.room:
            return ErrorCode.BUSY
        self.jobs.append(job)
        return None

    def cancel(self, client_id: str, request_id: str) -> bool:
        self.cancelled.append((client_id, request_id))
        return any(j.key == (client_id, request_id) for j in self.jobs)

    def finish(self, job: Job, text: str = "Hi") -> None:
        job.stream.start("pi", "m")
        job.stream.chunk(text)
        job.stream.done(FinishReason.STOP, 3, 1, 10.0, 5.0)


def intake(
    store: StateStore | None = None,
    *,
    rpm: float = 0,
    burst: int = 10,
    conversations: int = 0,
    keep_max: int = 4,
) -> tuple[Intake, Link, StateStore]:
    link = Link()
    store = store or StateStore(None)
    limits = LimitSettings(
        requests_per_minute=rpm, burst=burst, max_conversations_per_client=conversations
    )
    made = Intake(
        TOPICS,
        link.publish,
        RequestJournal(store),
        ClientLimits(limits),
        max_payload=MAX_PAYLOAD,
        keep_max=keep_max,
    )
    return made, link, store


def opened(**kw: Any) -> tuple[Intake, Link, Scheduler, StateStore]:
    made, link, store = intake(**kw)
    scheduler = Scheduler()
    made.open(scheduler)
    return made, link, scheduler, store


def request(rid: str, client: str = "dev1", conversation: str | None = None, **msg: Any) -> Inbound:
    body: dict[str, Any] = {"request_id": rid, "message": "Hello"}
    if conversation is not None:
        body["conversation_id"] = conversation
    return Inbound(
        TOPICS.request(client),
        json.dumps(body).encode(),
        msg.get("response_topic"),
        msg.get("correlation"),
        msg.get("retained", False),
    )


def errors(link: Link, topic: str) -> list[str]:
    return [m["code"] for m in link.messages(topic) if m["type"] == "error"]


# -- admission -------------------------------------------------------------------------------


def test_jobs_reach_the_scheduler_in_arrival_order_and_wait_in_the_inbox() -> None:
    made, _, scheduler, store = opened()
    for rid in ("a", "b", "c"):
        made.on_message(request(rid))
    assert [j.request.request_id for j in scheduler.jobs] == ["a", "b", "c"]
    queued, _ = store.recover()
    assert len(queued) == 3  # kept until their reply ends


def test_a_refused_request_leaves_the_inbox_and_its_reply_ends_with_the_refusal() -> None:
    made, link, scheduler, store = opened()
    scheduler.room = 1
    made.on_message(request("a"))
    made.on_message(request("b"))
    assert errors(link, TOPICS.reply("dev1", "default")) == ["busy"]
    queued, _ = store.recover()
    assert [json.loads(e.payload)["request_id"] for e in queued] == ["a"]


def test_the_rate_limit_refuses_with_a_retry_hint_before_the_inbox() -> None:
    made, link, scheduler, store = opened(rpm=6, burst=2)
    for rid in ("a", "b", "c"):
        made.on_message(request(rid))
    assert [j.request.request_id for j in scheduler.jobs] == ["a", "b"]
    refusal = link.messages(TOPICS.reply("dev1", "default"))[-1]
    assert refusal["code"] == "rate_limited" and refusal["request_id"] == "c"
    assert refusal["retry_after"] == pytest.approx(10.0, abs=0.2)
    made.on_message(request("x", client="dev2"))  # another client has its own bucket
    assert scheduler.jobs[-1].key == ("dev2", "x")
    assert len(store.recover()[0]) == 3


def test_a_refused_response_topic_costs_no_rate_token() -> None:
    made, link, scheduler, _ = opened(rpm=1, burst=1)
    made.on_message(request("a", response_topic="edge/pi/reply/dev2/x"))
    assert errors(link, TOPICS.reply("dev1", "default")) == ["forbidden"]
    made.on_message(request("b", response_topic="edge/pi/reply/dev1/mine", correlation=b"c1"))
    assert [j.request.request_id for j in scheduler.jobs] == ["b"]
    assert scheduler.jobs[0].stream.topic == "edge/pi/reply/dev1/mine"


@pytest.mark.parametrize(
    ("payload", "code", "topic"),
    [
        (b"not json", "bad_request", TOPICS.error("dev1")),
        (b'{"message": "no id"}', "bad_request", TOPICS.error("dev1")),
        (b"x" * (MAX_PAYLOAD + 1), "too_large", TOPICS.error("dev1")),
        # Its ids are readable: the error goes where its reply would have gone.
        (b'{"request_id": "r", "conversation_id": "c"}', "bad_request", TOPICS.reply("dev1", "c")),
    ],
)
def test_a_bad_payload_gets_an_error_and_never_a_job(payload: bytes, code: str, topic: str) -> None:
    made, link, scheduler, store = opened()
    made.on_message(Inbound(TOPICS.request("dev1"), payload, None, None))
    assert errors(link, topic) == [code]
    assert scheduler.jobs == [] and store.recover() == ([], [])


def test_a_bad_cancel_is_answered_on_the_error_topic() -> None:
    made, link, scheduler, _ = opened()
    made.on_message(Inbound(TOPICS.cancel("dev1"), b"{}", None, None))
    assert errors(link, TOPICS.error("dev1")) == ["bad_request"]
    made.on_message(Inbound(TOPICS.cancel("dev1"), b'{"request_id": "a"}', None, None))
    assert scheduler.cancelled == [("dev1", "a")]


def test_a_retained_request_or_cancel_is_dropped() -> None:
    made, link, scheduler, store = opened()
    made.on_message(request("a", retained=True))
    made.on_message(Inbound(TOPICS.cancel("dev1"), b'{"request_id": "a"}', None, None, True))
    assert link.sent == [] and scheduler.jobs == [] and scheduler.cancelled == []
    assert store.recover() == ([], [])


# -- duplicates ------------------------------------------------------------------------------


def test_a_duplicate_in_flight_is_ignored_and_takes_no_conversation() -> None:
    made, link, scheduler, store = opened(conversations=1)
    made.on_message(request("a", conversation="one"))
    made.on_message(request("a", conversation="one"))  # a QoS 1 redelivery
    assert len(scheduler.jobs) == 1 and link.sent == []
    assert len(store.recover()[0]) == 1  # the duplicate's inbox entry is gone
    made.on_message(request("b", conversation="two"))  # one conversation is the cap
    assert errors(link, TOPICS.reply("dev1", "two")) == ["too_many_conversations"]
    scheduler.finish(scheduler.jobs[0])  # releases the count the original took, once
    made.on_message(request("c", conversation="two"))
    assert scheduler.jobs[-1].request.request_id == "c"
    made.on_message(request("d", conversation="three"))
    assert errors(link, TOPICS.reply("dev1", "three")) == ["too_many_conversations"]


def test_a_duplicate_of_a_finished_request_gets_its_reply_again_byte_for_byte() -> None:
    made, link, scheduler, store = opened(conversations=1)
    made.on_message(request("a", response_topic="edge/pi/reply/dev1/r", correlation=b"k"))
    scheduler.finish(scheduler.jobs[0], "Hello there")
    first = list(link.sent)
    assert [json.loads(p)["type"] for _, p, _ in first] == ["start", "chunk", "done"]
    made.on_message(request("a", response_topic="edge/pi/reply/dev1/r", correlation=b"k"))
    assert link.sent[len(first) :] == first  # same topic, payloads and correlation
    assert len(scheduler.jobs) == 1 and store.recover() == ([], [])
    made.on_message(request("b", conversation="other"))  # the replay held no count
    assert scheduler.jobs[-1].request.request_id == "b"


def test_a_refusal_is_not_replayed_to_a_duplicate() -> None:
    made, link, scheduler, _ = opened()
    scheduler.room = 0
    made.on_message(request("a"))
    scheduler.room = 1
    made.on_message(request("a"))  # `busy` asks for the same request again: served now
    assert errors(link, TOPICS.reply("dev1", "default")) == ["busy"]
    assert [j.request.request_id for j in scheduler.jobs] == ["a"]


# -- while the model loads, and after a restart ----------------------------------------------


def test_requests_are_kept_while_loading_up_to_the_bound_then_served_in_order() -> None:
    made, link, store = intake(keep_max=2)
    made.on_message(request("a"))
    made.on_message(request("b"))
    made.on_message(request("c"))  # beyond what the scheduler takes at once
    made.on_message(Inbound(TOPICS.cancel("dev1"), b'{"request_id": "b"}', None, None))
    assert errors(link, TOPICS.reply("dev1", "default")) == ["busy"]
    assert len(store.recover()[0]) == 2  # in the inbox: a crash now would not lose them
    scheduler = Scheduler()
    made.open(scheduler)
    assert [j.request.request_id for j in scheduler.jobs] == ["a", "b"]
    assert scheduler.cancelled == [("dev1", "b")]  # after the request it cancels
    made.on_message(request("d"))  # straight through now
    assert scheduler.jobs[-1].request.request_id == "d"


def test_a_request_kept_while_loading_was_charged_once() -> None:
    made, link, _ = intake(rpm=1, burst=1)
    made.on_message(request("a"))
    made.on_message(request("b"))
    assert errors(link, TOPICS.reply("dev1", "default")) == ["rate_limited"]
    scheduler = Scheduler()
    made.open(scheduler)  # "a" is not charged a second time
    assert [j.request.request_id for j in scheduler.jobs] == ["a"]


def test_the_inbox_of_a_previous_run_is_served_and_interrupted_ones_are_not(
    tmp_path: Path,
) -> None:
    before = StateStore(tmp_path)
    journal = RequestJournal(before)
    for rid in ("a", "b"):
        msg = request(rid)
        journal.accept(msg.topic, msg.payload, msg.response_topic, msg.correlation)
    queued, _ = journal.recover()
    journal.started(queued[0].id)  # "a" had begun its reply when the node died
    before.close()
    made, _, store = intake(StateStore(tmp_path))
    scheduler = Scheduler()
    made.open(scheduler)
    assert [j.request.request_id for j in scheduler.jobs] == ["b"]
    store.close()


def test_a_too_large_error_names_the_refused_size_in_a_field() -> None:
    # The client tells which of its requests a too_large answers by this field, not by the text.
    made, link, _, _ = opened()
    made.on_message(Inbound(TOPICS.request("dev1"), b"x" * (MAX_PAYLOAD + 7), None, None))
    [error] = link.messages(TOPICS.error("dev1"))
    assert error["code"] == "too_large" and error["size"] == MAX_PAYLOAD + 7
