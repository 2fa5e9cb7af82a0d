"""Slots, a bounded wait queue, cancellation, and the inference loop that decodes them together.

Continuous batching: each decode step carries one token of every generating slot plus prompt
chunks of slots still reading their prompt, so a new request starts at the next step instead of
waiting for others to finish. The loop runs on one thread that owns the Engine; other threads
only call submit(), cancel() and stop().
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import structlog

from .conversations import (
    ContextOverflow,
    ConversationKey,
    ConversationStore,
    build_messages,
    common_prefix,
    fit_prompt,
    shared_start,
)
from .engine import (
    DecodeError,
    Engine,
    GrammarError,
    Row,
    Sampler,
    SamplingParams,
    StopStrings,
    TextAssembler,
    new_sampler,
)
from .grammar import grammar_for
from .kvstore import KvStore, SavedSequence
from .protocol import ChatRequest, ErrorCode, FinishReason
from .replies import ReplyStream
from .settings import GenerationSettings

log = structlog.get_logger("qwen_edge.scheduler")

IDLE_WAIT = 0.5  # seconds the idle loop sleeps between heartbeats
KV_SAVE_MIN_TOKENS = 64  # shorter sequences are cheaper to recompute than to keep


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

    @property
    def key(self) -> tuple[str, str]:
        return (self.client_id, self.request.request_id)

    @property
    def conversation(self) -> ConversationKey:
        return (self.client_id, self.request.conversation_id)


@dataclass(slots=True)
class Slot:
    """One KV sequence of the context and the request decoding in it."""

    seq: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV the sequence holds
    owner: ConversationKey | None = None  # the conversation those tokens belong to
    public: int = 0  # leading tokens of `cached` that hold no client's content
    job: Job | None = None
    prompt: list[int] = field(default_factory=list)
    fed: int = 0  # prompt tokens evaluated so far
    next_token: int = -1  # sampled, not yet evaluated
    sampler: Sampler | None = None
    text: TextAssembler | None = None
    stops: StopStrings | None = None  # None: the request has no stop strings
    reply: list[str] = field(default_factory=list)
    generated: int = 0
    max_tokens: int = 0
    reused: int = 0
    system: str | None = None
    dropped: int = 0
    first_token_at: float | None = None


class Scheduler:
    def __init__(
        self,
        engine: Engine,
        *,
        store: ConversationStore,
        generation: GenerationSettings,
        queue_size: int,
        kv_keep_bytes: int,
        node: str,
        model_name: str,
    ) -> None:
        self._engine = engine
        self._store = store
        self._gen = generation
        self._queue_size = queue_size
        self._node = node
        self._model_name = model_name
        self._slots = [Slot(seq=i) for i in range(engine.slots)]
        # Leading tokens no client chose, of prompts with the node's system prompt (False) and
        # with a client's own (True); rendered once, on first use.
        self._leads: dict[bool, list[int]] = {}
        self._kv = KvStore(kv_keep_bytes)
        self._waiting: deque[Job] = deque()
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
            # A job being started has left the queue but not yet taken its slot: without
            # counting it, a burst arriving meanwhile would overfill the queue by one.
            free = sum(1 for s in self._slots if s.job is None) - self._starting
            if len(self._waiting) >= self._queue_size + free:
                return ErrorCode.BUSY
            self._jobs[job.key] = job
            if job.announce:  # before the loop can see the job, so start stays seq 0
                job.stream.start(self._node, self._model_name)
            self._waiting.append(job)
            self._wake.notify()
        return None

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
        return sum(1 for s in self._slots if s.job is not None), len(self._waiting)

    # -- the inference thread ------------------------------------------------------------------

    def run(self) -> None:
        """The inference loop. An unexpected fault ends the jobs it touched with `internal`
        and the loop goes on."""
        while True:
            try:
                if self._iterate():
                    return
            except Exception:
                log.exception("inference_fault")
                for slot in self._slots:
                    if slot.job is not None:
                        self._fail(slot, ErrorCode.INTERNAL, "internal error in the model loop")

    def _iterate(self) -> bool:
        """One pass: admit, cancel, decode a step. True when stopped and drained."""
        self.heartbeat = time.monotonic()
        self._admit()
        active = [s for s in self._slots if s.job is not None]
        if self._closing and self.heartbeat >= self._drain_deadline:
            for slot in active:
                assert slot.job is not None
                slot.job.cancelled = True
        for slot in active:
            assert slot.job is not None
            if slot.job.cancelled:
                self._finish(slot, FinishReason.CANCELLED)
        active = [s for s in active if s.job is not None]
        if not active:
            with self._lock:
                if self._closing and not self._waiting:
                    return True
                if not self._waiting:
                    self._wake.wait(IDLE_WAIT)
            return False
        self._step(active)
        return False

    def _admit(self) -> None:
        while True:
            with self._lock:
                free = [s for s in self._slots if s.job is None]
                if not self._waiting or not (free or self._closing):
                    return
                job = self._waiting.popleft()
                closing = self._closing
                if not closing:
                    self._starting += 1
            if closing:
                self._end_with_error(job, ErrorCode.SHUTTING_DOWN, "the node is stopping")
                continue
            try:
                self._start(job, free)
            except Exception:
                log.exception("start_failed", request_id=job.request.request_id)
                slot = next((s for s in self._slots if s.job is job), None)
                if slot is not None:
                    self._fail(slot, ErrorCode.INTERNAL, "internal error starting the reply")
                else:
                    self._end_with_error(job, ErrorCode.INTERNAL, "internal error")
            finally:
                with self._lock:
                    self._starting -= 1

    def _start(self, job: Job, free: list[Slot]) -> None:
        req = job.request
        job.stream.start(self._node, self._model_name)
        if job.cancelled:
            self._end(job)
            job.stream.done(FinishReason.CANCELLED, 0, 0, None, None)
            return
        max_tokens = min(req.max_tokens or self._gen.max_tokens, self._gen.max_tokens_limit)
        conversation = self._store.get(job.conversation, reset=req.reset)
        system = req.system if req.system is not None else conversation.system
        reserve = min(max_tokens, self._engine.n_ctx_seq // 4)
        try:
            prompt, dropped = fit_prompt(
                self._gen.system if system is None else system,
                conversation.turns,
                req.message,
                self._engine.chat_prompt,
                self._engine.n_ctx_seq - reserve,
            )
        except ContextOverflow as exc:
            self._end_with_error(job, ErrorCode.CONTEXT_OVERFLOW, str(exc))
            return
        except Exception as exc:  # a template that refuses the messages, for instance
            log.exception("prompt_failed", request_id=req.request_id)
            self._end_with_error(job, ErrorCode.INTERNAL, f"could not build the prompt: {exc}")
            return

        public = common_prefix(prompt, self._lead(client_system=system is not None))
        slot, reusable = self._take_slot(job.conversation, prompt, public, free)
        # At least one token must be evaluated for logits.
        keep = min(reusable, len(prompt) - 1)
        self._engine.forget(slot.seq, keep)
        del slot.cached[keep:]

        temperature = self._gen.temperature if req.temperature is None else req.temperature
        try:
            slot.sampler = new_sampler(
                SamplingParams(
                    temperature=temperature,
                    top_p=self._gen.top_p if req.top_p is None else req.top_p,
                    top_k=self._gen.top_k if req.top_k is None else req.top_k,
                    min_p=self._gen.min_p,
                    repeat_penalty=self._gen.repeat_penalty,
                    repeat_last_n=self._gen.repeat_last_n,
                    seed=random.getrandbits(32) if req.seed is None else req.seed,
                    grammar=None if req.format is None else grammar_for(req.format),
                ),
                self._engine.n_vocab,
                self._engine.vocab,
            )
        except GrammarError as exc:  # intake converted the format; llama.cpp may still refuse
            self._end_with_error(job, ErrorCode.BAD_REQUEST, f"format: {exc}")
            return
        if req.chunk_ms:
            job.stream.pace(req.chunk_ms)
        slot.job = job
        slot.prompt = prompt
        slot.public = public
        slot.fed = keep
        slot.reused = keep
        slot.next_token = -1
        slot.text = TextAssembler()
        slot.stops = StopStrings(req.stop) if req.stop else None
        slot.reply = []
        slot.generated = 0
        slot.max_tokens = max_tokens
        slot.system = system
        slot.dropped = dropped
        slot.first_token_at = None

    def _take_slot(
        self, key: ConversationKey, prompt: list[int], public: int, free: list[Slot]
    ) -> tuple[Slot, int]:
        """A free slot for conversation `key`, holding as much of its KV as can be had, and
        how many leading tokens of `prompt` it holds (`public`: how many hold no client content).

        Best: the slot that still holds this conversation. Else its saved KV is restored into a
        free slot, or, with none saved, the slot with the most reusable prefix is used (see
        _reusable). The KV of the conversation that held the slot before is saved first.
        """
        for slot in free:
            if slot.owner == key:
                return slot, common_prefix(slot.cached, prompt)
        saved = self._kv.take(key)  # only ever this very conversation's
        reusable = 0
        if saved is None:
            slot = max(
                free, key=lambda s: (self._reusable(s, key[0], prompt, public), s.owner is None)
            )
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
            if self._engine.restore_seq(slot.seq, saved.state):
                slot.cached = list(saved.tokens)
                reusable = common_prefix(slot.cached, prompt)
            else:
                log.warning("kv_restore_failed", conversation_id=key[1])
                slot.cached = []
        return slot, reusable

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
            node = self._gen.system
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

    def _step(self, active: list[Slot]) -> None:
        budget = self._engine.n_batch
        rows: list[Row] = []
        stepped: list[Slot] = []
        for slot in active:  # generating slots first: one token each keeps streams flowing
            if slot.next_token >= 0:
                rows.append(Row(slot.seq, (slot.next_token,), len(slot.cached), True))
                stepped.append(slot)
                budget -= 1
        for slot in active:
            if slot.next_token < 0 and budget > 0:
                chunk = slot.prompt[slot.fed : slot.fed + budget]
                last = slot.fed + len(chunk) == len(slot.prompt)
                rows.append(Row(slot.seq, chunk, slot.fed, last))
                stepped.append(slot)
                budget -= len(chunk)
        try:
            indices = self._engine.decode(rows)
        except DecodeError as exc:
            log.error("decode_failed", error=str(exc), rows=len(rows))
            for slot in stepped:
                self._fail(slot, ErrorCode.INTERNAL, "the model failed to decode")
            return
        for slot, row, index in zip(stepped, rows, indices, strict=True):
            slot.cached.extend(row.tokens)
            if slot.next_token < 0:
                slot.fed += len(row.tokens)
            if index >= 0:
                self._advance(slot, index)

    def _advance(self, slot: Slot, index: int) -> None:
        """Sample the slot's next token and publish whatever complete text it yields."""
        assert slot.sampler is not None and slot.text is not None and slot.job is not None
        token = slot.sampler.sample(self._engine.ctx, index)
        if slot.first_token_at is None:
            slot.first_token_at = time.monotonic()
        if self._engine.is_end(token):
            self._finish(slot, FinishReason.STOP)
            return
        slot.generated += 1
        self.tokens_generated += 1
        text = slot.text.push(self._engine.piece(token))
        stops = slot.stops
        if stops is not None and text:
            text = stops.push(text)
        if text:
            slot.reply.append(text)
            slot.job.stream.chunk(text)
        if stops is not None and stops.hit:
            self._finish(slot, FinishReason.STOP)
        elif slot.generated >= slot.max_tokens or len(slot.cached) + 1 >= self._engine.n_ctx_seq:
            self._finish(slot, FinishReason.LENGTH)
        else:
            slot.next_token = token

    def _finish(self, slot: Slot, reason: FinishReason) -> None:
        job = slot.job
        assert job is not None and slot.text is not None
        tail = slot.text.flush()
        if slot.stops is not None:
            tail = slot.stops.flush(tail)
        if tail:
            slot.reply.append(tail)
            job.stream.chunk(tail)
        now = time.monotonic()
        ttft_ms = (slot.first_token_at - job.received) * 1000 if slot.first_token_at else None
        decode_s = now - slot.first_token_at if slot.first_token_at else 0.0
        tokens_per_s = (slot.generated - 1) / decode_s if slot.generated > 1 and decode_s else None
        self.requests_done += 1
        reply = "".join(slot.reply)
        if reply or reason is not FinishReason.CANCELLED:  # a turn cancelled unseen is no turn
            self._store.record(
                job.conversation, slot.system, slot.dropped, job.request.message, reply
            )
        job.stream.done(
            reason,
            len(slot.prompt),
            slot.generated,
            ttft_ms,
            tokens_per_s,
            cached_tokens=slot.reused,
        )
        log.info(
            "request_done",
            request_id=job.request.request_id,
            client_id=job.client_id,
            conversation_id=job.request.conversation_id,
            finish_reason=reason.value,
            prompt_tokens=len(slot.prompt),
            reused_tokens=slot.reused,
            completion_tokens=slot.generated,
            ttft_ms=None if ttft_ms is None else round(ttft_ms, 1),
            tokens_per_s=None if tokens_per_s is None else round(tokens_per_s, 1),
        )
        self._release(slot)

    def _fail(self, slot: Slot, code: ErrorCode, message: str) -> None:
        assert slot.job is not None
        self._end_with_error(slot.job, code, message)
        self._engine.forget(slot.seq)
        slot.cached.clear()
        slot.public = 0
        slot.owner = None
        self._release(slot)

    def _release(self, slot: Slot) -> None:
        if slot.sampler is not None:
            slot.sampler.close()
        if slot.job is not None:
            self._end(slot.job)
        slot.job = None
        slot.sampler = None
        slot.text = None
        slot.stops = None
        slot.next_token = -1

    def _end_with_error(self, job: Job, code: ErrorCode, message: str) -> None:
        job.stream.error(code, message)
        log.info(
            "request_failed",
            request_id=job.request.request_id,
            client_id=job.client_id,
            code=code.value,
            error=message,
        )
        self._end(job)

    def _end(self, job: Job) -> None:
        with self._lock:
            self._jobs.pop(job.key, None)
