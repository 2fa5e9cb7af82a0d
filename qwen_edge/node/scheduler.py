"""Slots, a bounded wait queue shared fairly across clients, cancellation, and the inference loop
that decodes them together.

Continuous batching: each decode step carries one token of every generating slot plus prompt
chunks of slots still reading their prompt, so a new request starts at the next step instead of
waiting for others to finish. The loop runs on one thread that owns the Engine; other threads
only call submit(), cancel() and stop().

Fair shares: the queue holds each client's waiting jobs in arrival order, and a freed slot goes
to the next client in turn (the one holding the fewest slots first), not to the oldest job; a
client may hold at most `max_queued_per_client` waiting places, and when the queue is full a
newcomer takes the newest place of the client holding the most. A job with a `format` waits for
its grammar (compiled on the grammar thread) before a slot takes it; while others generate, a
request's grammar work may take only `grammar_share` of the loop's time (docs/protocol.md).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import structlog

from ..protocol import ChatRequest, ErrorCode, FinishReason, RequestError
from ..settings import GenerationSettings, LimitSettings
from ..toolcalls import ToolGrammar
from .conversations import (
    ContextOverflow,
    ConversationKey,
    ConversationStore,
    Message,
    ToolTurn,
    Turn,
    fit_prompt,
)
from .decoder import (
    Compiled,
    DecodeError,
    EngineLike,
    GrammarError,
    GrammarSource,
    GrammarSpec,
    Row,
    SamplingParams,
)
from .generation import Generation, ToolGeneration
from .kvstore import Slot, Slots
from .pacing import GrammarPacer
from .replies import ReplyStream
from .toolturns import UnknownResult, answer, renderer, results_messages
from .waitqueue import WaitQueue

log = structlog.get_logger("qwen_edge.node.scheduler")

IDLE_WAIT = 0.5  # seconds the idle loop sleeps between heartbeats
DISPLACED = "the queue is full and this client held the most of it; retry later"


@dataclass(slots=True)
class Job:
    """An accepted request, from intake to its done/error."""

    client_id: str
    request: ChatRequest
    stream: ReplyStream
    received: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    # Send `start` on acceptance, not when a slot takes it: a pooled request is then known to
    # the fleet (and ended by it if this node vanishes) even while it waits in the queue.
    announce: bool = False
    # Its format's (or tools') grammar, once compiled; a slot takes the job only when `ready`.
    grammar: str | None = None
    # False: a format the node built itself (the Wyoming adapter's), not held to the schema
    # bounds; its grammar's work is paced all the same.
    bounded: bool = True
    format_error: str | None = None  # why its format has no grammar
    ready: bool = True
    # What its grammar is made from: the request's format, or its tools (None: no grammar).
    spec: GrammarSpec | None = None
    # A request with tool_results: the messages its turn adds before the reply.
    turn_inputs: list[Message] | None = None

    @property
    def spec_field(self) -> str:
        """The request field a grammar refusal names."""
        return "tools" if isinstance(self.spec, ToolGrammar) else "format"

    @property
    def refusal(self) -> str:
        """Why its format (or tools) has no grammar, naming the field."""
        return f"{self.spec_field}: {self.format_error}"

    @property
    def key(self) -> tuple[str, str]:
        return (self.client_id, self.request.request_id)

    @property
    def conversation(self) -> ConversationKey:
        return (self.client_id, self.request.conversation_id)


class Scheduler:
    def __init__(
        self,
        engine: EngineLike,
        *,
        store: ConversationStore,
        generation: GenerationSettings,
        queue_size: int,
        kv_keep_bytes: int,
        node: str,
        model_name: str,
        grammars: GrammarSource,
        limits: LimitSettings | None = None,
    ) -> None:
        # grammars: where formats' grammars come from (grammar.GrammarCompiler; injected, so that
        # the scheduler imports nothing of llama.cpp), closed when run() returns. limits None:
        # LimitSettings' grammar budget, no per-client queue cap.
        limits = limits or LimitSettings(max_queued_per_client=0)
        self._pacer = GrammarPacer(limits.grammar_share, limits.grammar_step_ms / 1000)
        self._grammars = grammars
        self._engine = engine
        self._store = store
        self._gen = generation
        self._queue_size = queue_size
        self._node = node
        self._model_name = model_name
        self._slots = Slots(engine, kv_keep_bytes, generation.system)
        self._waiting = WaitQueue[Job](limits.max_queued_per_client)
        self._jobs: dict[tuple[str, str], Job] = {}  # every accepted, unfinished job
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closing = False
        self._starting = 0  # jobs taken off the queue whose slot is not assigned yet
        self._drain_deadline = float("inf")
        self.heartbeat = time.monotonic()
        # Read by the stats publisher without locking; plain counters, nothing per token.
        self.tokens_generated = 0
        self.requests_done = 0

    # -- called from other threads -------------------------------------------------------------

    def submit(self, job: Job) -> ErrorCode | None:
        """Accept a job, or say why not (busy, shutting down). A duplicate of a job still in
        flight (a QoS 1 redelivery) is dropped: the original stream answers it."""
        with self._lock:
            if self._closing:
                return ErrorCode.SHUTTING_DOWN
            if job.key in self._jobs:
                return ErrorCode.DUPLICATE
            if not self._waiting.has_share(job.client_id):
                return ErrorCode.BUSY
            # A job being started has left the queue but not yet taken its slot: without
            # counting it, a burst arriving meanwhile would overfill the queue by one.
            free = sum(1 for s in self._slots.all if s.gen is None) - self._starting
            displaced = None
            if len(self._waiting) >= self._queue_size + free:
                displaced = self._waiting.displace(job.client_id, holding(self._slots.all))
                if displaced is None:
                    return ErrorCode.BUSY
                self._jobs.pop(displaced.key, None)
            self._jobs[job.key] = job
            req = job.request
            job.spec = req.format if req.format is not None else req.tool_grammar()
            job.ready = job.spec is None
            if job.announce:  # before the loop can see the job, so start stays seq 0
                job.stream.start(self._node, self._model_name)
            self._waiting.add(job)
            self._wake.notify()
        if displaced is not None:
            log.info("request_displaced", client_id=displaced.client_id)
            self._end_with_error(displaced, ErrorCode.BUSY, DISPLACED)
        if job.spec is not None:  # maybe at once, on this thread: lock released
            self._grammars.request(
                job.spec, lambda done: self._compiled(job, done), bounded=job.bounded
            )
        return None

    def _compiled(self, job: Job, compiled: Compiled) -> None:
        """A waiting job's grammar (from the grammar thread, or submit's when known); a refused
        format ends the job now, freeing its place."""
        with self._lock:
            job.grammar, job.format_error = compiled.grammar, compiled.error
            job.ready = True
            refused = compiled.grammar is None and self._waiting.remove(job)
            self._wake.notify()
        if refused:
            self._end_with_error(job, ErrorCode.BAD_REQUEST, f"{job.spec_field}: {compiled.error}")

    def cancel(self, client_id: str, request_id: str) -> bool:
        """Ask the loop to end a client's job; takes effect before the next decode step."""
        with self._lock:
            job = self._jobs.get((client_id, request_id))
            if job is None:
                return False
            job.cancelled = True
            self._wake.notify()
        return True

    def stop(self, drain_timeout: float) -> None:
        """Refuse new jobs; let running ones finish for up to `drain_timeout` seconds."""
        with self._lock:
            self._closing = True
            self._drain_deadline = time.monotonic() + drain_timeout
            self._wake.notify()

    @property
    def load(self) -> tuple[int, int]:
        """(active slots, waiting jobs), read without locking for status reports."""
        return sum(1 for s in self._slots.all if s.gen is not None), len(self._waiting)

    # -- the inference thread ------------------------------------------------------------------

    def run(self) -> None:
        """The inference loop. An unexpected fault ends the jobs it touched with `internal`
        and the loop goes on."""
        while True:
            try:
                if self._iterate():
                    self._grammars.close()
                    return
            except Exception:
                log.exception("inference_fault")
                for slot in self._slots.all:
                    if slot.gen is not None:
                        self._fail(slot, ErrorCode.INTERNAL, "internal error in the model loop")

    def _iterate(self) -> bool:
        """One pass: admit, cancel, decode a step. True when stopped and drained."""
        self.heartbeat = time.monotonic()
        self._admit()
        active = [s for s in self._slots.all if s.gen is not None]
        if self._closing and self.heartbeat >= self._drain_deadline:
            for slot in active:
                assert slot.gen is not None
                slot.gen.job.cancelled = True
        for slot in active:
            assert slot.gen is not None
            if slot.gen.job.cancelled:
                self._finish(slot, FinishReason.CANCELLED)
        active = [s for s in active if s.gen is not None]
        if not active:
            with self._lock:
                if self._closing and not self._waiting:
                    return True
                # What still waits (if anything) waits for its grammar, which wakes the loop.
                if not self._waiting.any_ready():
                    self._wake.wait(IDLE_WAIT)
            return False
        self._step(active)
        return False

    def _admit(self) -> None:
        while True:
            with self._lock:
                free = [s for s in self._slots.all if s.gen is None]
                if not (free or self._closing):
                    return
                job = self._waiting.next(holding(self._slots.all), any_job=self._closing)
                if job is None:
                    return
                closing = self._closing
                if not closing:
                    self._starting += 1
            if closing:
                self._end_with_error(job, ErrorCode.SHUTTING_DOWN, "the node is stopping")
                continue
            try:
                self._start(job, free)
            except Exception:  # _start gives a slot its Generation last: none has this job
                log.exception("start_failed", request_id=job.request.request_id)
                self._end_with_error(job, ErrorCode.INTERNAL, "internal error")
            finally:
                with self._lock:
                    self._starting -= 1

    def _start(self, job: Job, free: list[Slot]) -> None:
        req = job.request
        if job.spec is not None and job.grammar is None and not job.cancelled:
            self._end_with_error(job, ErrorCode.BAD_REQUEST, job.refusal)
            return
        new = new_turn(self._store, job)
        if isinstance(new, RequestError):
            self._end_with_error(job, new.code, new.message)
            return
        job.stream.start(self._node, self._model_name)
        if job.cancelled:
            self._end(job)
            job.stream.done(FinishReason.CANCELLED, 0, 0, None, None)
            return
        max_tokens = min(req.max_tokens or self._gen.max_tokens, self._gen.max_tokens_limit)
        conversation = self._store.get(job.conversation, reset=req.reset)
        system = req.system if req.system is not None else conversation.system
        prompt_system = self._gen.system if system is None else system
        fitted = fit(
            self._engine, job, prompt_system, conversation.turns, new=new, limit=max_tokens
        )
        if isinstance(fitted, RequestError):
            self._end_with_error(job, fitted.code, fitted.message)
            return
        prompt, dropped = fitted
        slot, keep = self._slots.take(
            job.conversation, prompt, free, client_system=system is not None
        )
        try:
            sampler = self._engine.new_sampler(sampling(self._gen, req, job.grammar))
        except GrammarError as exc:  # intake converted the format; llama.cpp may still refuse
            self._end_with_error(job, ErrorCode.BAD_REQUEST, f"{job.spec_field}: {exc}")
            return
        if req.chunk_ms:
            job.stream.pace(req.chunk_ms)
        slot.gen = ToolGeneration.kind(job.spec)(
            job, prompt, sampler, reused=keep, max_tokens=max_tokens, system=system, dropped=dropped
        )
        if job.grammar is not None:
            self._pacer.graded += 1

    def _step(self, active: list[Slot]) -> None:
        graded = self._pacer.graded  # requests without a grammar pay nothing of what follows
        began = 0.0
        if graded:
            active = self._pacer.pace(active)
            began = time.perf_counter()
        rows, stepped = batch(active, self._engine.n_batch)
        try:
            indices = self._engine.decode(rows)
        except DecodeError as exc:
            log.error("decode_failed", error=str(exc), rows=len(rows))
            for slot in stepped:
                self._fail(slot, ErrorCode.INTERNAL, "the model failed to decode")
            return
        for slot, row, index in zip(stepped, rows, indices, strict=True):
            slot.cached.extend(row.tokens)
            gen = slot.gen
            assert gen is not None
            if gen.next_token < 0:
                gen.fed += len(row.tokens)
            if index >= 0:
                self._advance(slot, gen, index)
        if graded:
            for slot, why in self._pacer.settle(self._slots.all, time.perf_counter() - began):
                self._fail(slot, ErrorCode.BAD_REQUEST, why)

    def _advance(self, slot: Slot, gen: Generation, index: int) -> None:
        """Sample the slot's next token and publish whatever complete text it yields."""
        token = gen.sampler.sample(index)
        if gen.first_token_at is None:
            gen.first_token_at = time.monotonic()
        engine = self._engine
        if engine.is_end(token):
            self._finish(slot, FinishReason.STOP)
            return
        self.tokens_generated += 1
        if gen.emit(engine.piece(token)):  # a stop string ended the reply
            self._finish(slot, FinishReason.STOP)
        elif gen.generated >= gen.max_tokens or len(slot.cached) + 1 >= engine.n_ctx_seq:
            self._finish(slot, FinishReason.LENGTH)
        else:
            gen.next_token = token

    def _finish(self, slot: Slot, reason: FinishReason) -> None:
        gen = slot.gen
        assert gen is not None
        reply = gen.finish()
        self.requests_done += 1
        job = gen.job
        if isinstance(gen, ToolGeneration) or job.request.tool_results is not None:
            finish_tools(self._store, gen, reason, reply)
        else:
            if reply or reason is not FinishReason.CANCELLED:  # cancelled unseen: no turn
                message = job.request.message
                assert message is not None
                self._store.record(job.conversation, gen.system, gen.dropped, message, reply)
            gen.done(reason)
        self._release(slot)

    def _fail(self, slot: Slot, code: ErrorCode, message: str) -> None:
        """End the slot's request with an error and forget its KV, which may be half written."""
        assert slot.gen is not None
        report_error(slot.gen.job, code, message)
        self._slots.forget(slot)
        self._release(slot)

    def _release(self, slot: Slot) -> None:
        """The one way a request leaves its slot, however it ended."""
        gen = slot.gen
        assert gen is not None
        self._end(gen.job)  # first: a node whose slots are free has no job left to cancel
        if gen.job.grammar is not None:
            self._pacer.graded -= 1
        slot.gen = None
        gen.close()

    def _end_with_error(self, job: Job, code: ErrorCode, message: str) -> None:
        """End a job that holds no slot with an error."""
        report_error(job, code, message)
        self._end(job)

    def _end(self, job: Job) -> None:
        with self._lock:
            self._jobs.pop(job.key, None)


def new_turn(store: ConversationStore, job: Job) -> str | list[Message] | RequestError:
    """What the request adds to the conversation: its message, or (with tool_results) the
    results in the `tool` role and its message; an error if a result answers no call."""
    req = job.request
    if req.tool_results is None or job.cancelled:
        return req.message or ""
    pending = {} if req.reset else store.pending_calls(job.conversation)
    try:
        job.turn_inputs = results_messages(req, pending)
    except UnknownResult as exc:
        return RequestError(ErrorCode.BAD_REQUEST, str(exc))
    return job.turn_inputs


def fit(
    engine: EngineLike,
    job: Job,
    system: str | None,
    turns: list[Turn],
    *,
    new: str | list[Message],
    limit: int,
) -> tuple[list[int], int] | RequestError:
    """The prompt and the old turns it leaves out (room kept for `limit` tokens of reply),
    or why it cannot be built."""
    req = job.request
    reserve = min(limit, engine.n_ctx_seq // 4)
    try:
        return fit_prompt(system, turns, new, renderer(engine, req), engine.n_ctx_seq - reserve)
    except ContextOverflow as exc:
        return RequestError(ErrorCode.CONTEXT_OVERFLOW, str(exc))
    except Exception as exc:  # a template that refuses the messages, for instance
        log.exception("prompt_failed", request_id=req.request_id)
        return RequestError(ErrorCode.INTERNAL, f"could not build the prompt: {exc}")


def finish_tools(
    store: ConversationStore, gen: Generation, reason: FinishReason, reply: str
) -> None:
    """End a reply that may hold calls, or follows tool results: `done` with the calls,
    and a turn in the template's roles."""
    calls = gen.calls(reply) if isinstance(gen, ToolGeneration) else None
    if calls is not None:
        reason = FinishReason.TOOL_CALLS
    elif isinstance(gen, ToolGeneration) and gen.calling:
        reply = ""  # calls cut short: nothing of them was shown, nothing is kept
    if reply or reason is not FinishReason.CANCELLED:
        job = gen.job
        inputs = job.turn_inputs or [{"role": "user", "content": job.request.message}]
        turn = ToolTurn((*inputs, answer(reply, calls)))
        store.record(job.conversation, gen.system, gen.dropped, turn)
    gen.done(reason, [c.wire() for c in calls] if calls is not None else None)


def sampling(gen: GenerationSettings, req: ChatRequest, grammar: str | None) -> SamplingParams:
    """A request's sampling: its own fields, else the node's [generation] settings."""
    return SamplingParams(
        temperature=gen.temperature if req.temperature is None else req.temperature,
        top_p=gen.top_p if req.top_p is None else req.top_p,
        top_k=gen.top_k if req.top_k is None else req.top_k,
        min_p=gen.min_p,
        repeat_penalty=gen.repeat_penalty,
        repeat_last_n=gen.repeat_last_n,
        seed=random.getrandbits(32) if req.seed is None else req.seed,
        grammar=grammar,
    )


def holding(slots: list[Slot]) -> Counter[str]:
    """Slots each client holds now."""
    return Counter(s.gen.job.client_id for s in slots if s.gen is not None)


def report_error(job: Job, code: ErrorCode, message: str) -> None:
    job.stream.error(code, message)
    log.info(
        "request_failed",
        request_id=job.request.request_id,
        client_id=job.client_id,
        code=code.value,
        error=message,
    )


def batch(active: list[Slot], n_batch: int) -> tuple[list[Row], list[Slot]]:
    """One decode step's rows (at most n_batch tokens), and the slot of each."""
    budget = n_batch
    rows: list[Row] = []
    stepped: list[Slot] = []
    for slot in active:  # generating slots first: one token each keeps streams flowing
        gen = slot.gen
        assert gen is not None
        if gen.next_token >= 0:
            rows.append(Row(slot.seq, (gen.next_token,), len(slot.cached), True))
            stepped.append(slot)
            budget -= 1
    for slot in active:
        gen = slot.gen
        assert gen is not None
        if gen.next_token < 0 and budget > 0:
            chunk = gen.prompt[gen.fed : gen.fed + budget]
            last = gen.fed + len(chunk) == len(gen.prompt)
            rows.append(Row(slot.seq, chunk, gen.fed, last))
            stepped.append(slot)
            budget -= len(chunk)
    return rows, stepped
