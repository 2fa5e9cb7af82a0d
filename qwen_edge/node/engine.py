"""llama.cpp via llama-cpp-python's low-level API: load, chat template, batched decode, sampling.

One Engine owns one model and one context with a sequence per slot. It is not thread-safe: only
the inference thread calls it. The token path avoids Python-side allocation: the batch lives in
preallocated numpy buffers, pieces of text are cached per token, and sampling runs in llama.cpp's
sampler chain.
"""

from __future__ import annotations

import ctypes
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Final

import jinja2
import jinja2.meta
import llama_cpp
import numpy as np
import structlog
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from ..settings import ModelSettings
from ..toolcalls import fallback_messages
from .budget import MIB, BudgetError, MemoryPlan, plan_memory
from .decoder import DecodeError, GrammarError, Row, SamplingParams
from .modelfile import ModelError

log = structlog.get_logger("qwen_edge.node.engine")

# Qwen2.5's own template, used only when a GGUF file carries none.
CHATML_TEMPLATE: Final = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def template_takes_tools(template: str) -> bool:
    """Whether a chat template shows `tools` itself (Qwen2.5's does; SmolLM2's does not)."""
    try:
        ast = jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError:
        return False  # the formatter will say so when it renders
    return "tools" in jinja2.meta.find_undeclared_variables(ast)


def _has_tool_messages(messages: list[dict[str, Any]]) -> bool:
    return any(m["role"] == "tool" or m.get("tool_calls") for m in messages)


class Sampler:
    """A llama.cpp sampler chain for one request, on the logits of context `ctx`. Call close()
    when the request ends."""

    __slots__ = ("_chain", "_ctx")
    grammar_seconds = 0.0  # a plain chain has no grammar

    def __init__(self, params: SamplingParams, n_vocab: int, ctx: Any) -> None:
        self._ctx = ctx
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = llama_cpp.llama_sampler_chain_add
        if params.temperature == 0:
            # Plain greedy: no penalties, no filters; identical to llama-cpp-python's temp=0 path.
            add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            if params.repeat_penalty != 1.0 and params.repeat_last_n > 0:
                add(
                    chain,
                    llama_cpp.llama_sampler_init_penalties(
                        n_vocab, params.repeat_last_n, params.repeat_penalty, 0.0, 0.0
                    ),
                )
            if params.top_k > 0:
                add(chain, llama_cpp.llama_sampler_init_top_k(params.top_k))
            add(chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
            if params.min_p > 0:
                add(chain, llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
            add(chain, llama_cpp.llama_sampler_init_temp(params.temperature))
            add(chain, llama_cpp.llama_sampler_init_dist(params.seed))
        self._chain = chain

    def sample(self, index: int) -> int:
        """Sample (and accept) the next token from the logits of batch row `index`."""
        return int(llama_cpp.llama_sampler_sample(self._chain, self._ctx, index))

    def close(self) -> None:
        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None


class GreedySampler(Sampler):
    """Temperature 0 without a grammar: the first of the highest logits, read in place from
    llama.cpp's logits with numpy's argmax. That is the token llama.cpp's greedy sampler picks
    (it keeps the first maximum too), without the 151,936-entry candidate array it fills for
    Qwen at every token: 9 us instead of 103 us on one EPYC core (docs/performance.md)."""

    __slots__ = ("_n_vocab",)

    def __init__(self, n_vocab: int, ctx: Any) -> None:
        self._ctx = ctx
        self._chain = None  # nothing to free
        self._n_vocab = n_vocab

    def sample(self, index: int) -> int:
        logits = llama_cpp.llama_get_logits_ith(self._ctx, index)
        return int(np.ctypeslib.as_array(logits, shape=(self._n_vocab,)).argmax())


# llama_token_data as numpy sees it: the candidates of one sampling step.
_TOKEN_DATA: Final = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class GrammarSampler(Sampler):
    """A sampler chain whose every token also satisfies a grammar.

    Applying a grammar checks each of the vocabulary's tokens against it (49k for SmolLM2, 152k
    for Qwen), which can cost more than the decode. So, as llama.cpp's own server does, the
    chain picks a token first and the grammar checks only that one; only when it refuses is the
    grammar applied to the whole vocabulary and the token picked again. In a JSON reply the
    model's own choice mostly fits.
    """

    __slots__ = ("_candidates", "_grammar", "_ids", "_one", "_single", "grammar_seconds")

    def __init__(self, params: SamplingParams, n_vocab: int, ctx: Any, vocab: Any) -> None:
        assert params.grammar is not None
        super().__init__(params, n_vocab, ctx)
        grammar = llama_cpp.llama_sampler_init_grammar(
            vocab, params.grammar.encode("utf-8"), b"root"
        )
        if not grammar:
            self.close()
            raise GrammarError("llama.cpp could not read the grammar made for this format")
        self._grammar = grammar
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._candidates = np.zeros(n_vocab, dtype=_TOKEN_DATA)
        self._single = np.zeros(1, dtype=_TOKEN_DATA)
        self._one = _token_array(self._single)
        self.grammar_seconds = 0.0  # the check, the re-pick and the accept: what the grammar adds

    def sample(self, index: int) -> int:
        logits = np.ctypeslib.as_array(
            llama_cpp.llama_get_logits_ith(self._ctx, index), shape=(len(self._ids),)
        )
        token = self._pick(logits, constrained=False)
        began = time.perf_counter()
        single = self._single
        single["id"] = token
        single["logit"] = 0.0
        self._one.size = 1
        self._one.selected = -1
        self._one.sorted = False
        llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(self._one))
        if single["logit"][0] == -np.inf:  # refused: pick again among what the grammar allows
            token = self._pick(logits, constrained=True)
        llama_cpp.llama_sampler_accept(self._grammar, token)
        self.grammar_seconds += time.perf_counter() - began
        llama_cpp.llama_sampler_accept(self._chain, token)
        return token

    def _pick(self, logits: np.ndarray[Any, Any], *, constrained: bool) -> int:
        """The chain's choice among all tokens (`constrained`: those the grammar allows)."""
        candidates = self._candidates
        candidates["id"] = self._ids
        candidates["logit"] = logits
        candidates["p"] = 0.0
        array = _token_array(candidates)
        if constrained:
            llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(array))
        llama_cpp.llama_sampler_apply(self._chain, ctypes.byref(array))
        if not 0 <= array.selected < array.size:  # never with a chain that ends in a pick
            raise RuntimeError(f"the sampler chain selected {array.selected}")
        return int(array.data[array.selected].id)

    def close(self) -> None:
        super().close()
        if getattr(self, "_grammar", None) is not None:
            llama_cpp.llama_sampler_free(self._grammar)
            self._grammar = None


def _token_array(data: np.ndarray[Any, Any]) -> Any:
    return llama_cpp.llama_token_data_array(
        data=data.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)),
        size=len(data),
        selected=-1,
        sorted=False,
    )


_LOG_LEVEL_ERROR: Final = 4  # GGML_LOG_LEVEL_ERROR


def _to_stderr(text: bytes) -> None:
    os.write(2, text)


_error_sink: Callable[[bytes], None] = _to_stderr


@llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
def _llama_log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    # llama.cpp is chatty on stderr; keep only its errors.
    if level == _LOG_LEVEL_ERROR:
        _error_sink(text)


def quiet_llama_logs() -> None:
    """Route llama.cpp's log through a filter that keeps only its errors."""
    llama_cpp.llama_log_set(_llama_log, ctypes.c_void_p(0))


@contextmanager
def llama_errors() -> Iterator[list[str]]:
    """llama.cpp's errors logged within the block, one line each, collected instead of written
    to stderr (doctor shows why a model would not load)."""
    global _error_sink
    errors: list[str] = []

    def collect(text: bytes) -> None:
        errors.append(text.decode(errors="replace").strip())

    _error_sink = collect
    quiet_llama_logs()
    try:
        yield errors
    finally:
        _error_sink = _to_stderr


def _kv_shape(model: Any) -> tuple[int, int]:
    """(K and V values one token holds in the cache over every layer, K/V head width), from the
    GGUF metadata; the width is the gcd of K's and V's should they differ."""
    layers = int(llama_cpp.llama_model_n_layer(model))
    heads = int(llama_cpp.llama_model_n_head(model))
    kv_heads = int(llama_cpp.llama_model_n_head_kv(model)) or heads
    width = int(llama_cpp.llama_model_n_embd(model))
    arch = _meta(model, "general.architecture") or ""

    def head_dim(key: str) -> int:
        # Most models' heads are width / heads wide; a few (Gemma, Qwen3) say otherwise.
        value = _meta(model, f"{arch}.attention.{key}")
        return int(value) if value and value.isdigit() else width // max(heads, 1)

    k, v = head_dim("key_length"), head_dim("value_length")
    return layers * kv_heads * (k + v), math.gcd(k, v)


def _meta(model: Any, key: str) -> str | None:
    buf = ctypes.create_string_buffer(128)
    n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode() if n >= 0 else None


def _load_model(settings: ModelSettings) -> Any:
    mparams = llama_cpp.llama_model_default_params()
    # Mapped, so the kernel may drop (and re-read) weight pages under memory pressure, and
    # several processes share one copy; mlock pins them.
    mparams.load_mode = (
        llama_cpp.LLAMA_LOAD_MODE_MMAP_MLOCK
        if settings.use_mlock
        else llama_cpp.LLAMA_LOAD_MODE_MMAP
    )
    model = llama_cpp.llama_model_load_from_file(str(settings.path).encode(), mparams)
    if not model:
        raise ModelError(f"model file {settings.path}: llama.cpp could not load it")
    return model


def _context_params(settings: ModelSettings, plan: MemoryPlan, threads: int) -> Any:
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = plan.n_ctx * plan.slots
    cparams.n_batch = settings.n_batch
    cparams.n_ubatch = settings.n_batch
    cparams.n_seq_max = plan.slots
    # A decode step wants logits for at most one token per slot. Without this bound llama.cpp
    # sizes its output and compute buffers for n_batch rows of logits: with Qwen's 151,936-
    # token vocabulary that is ~300 MB at n_batch 512, more than the model itself.
    cparams.n_outputs_max = plan.slots
    cparams.n_outputs_max_per_seq = 1
    cparams.n_threads = threads
    cparams.n_threads_batch = threads
    cparams.kv_unified = False
    cparams.no_perf = True
    # Measured on the Qwen2.5-0.5B proxy, 2 x86 cores: 5% slower for one stream, 22% faster
    # for four, and no n_kv x n_tokens attention matrix in the compute buffer.
    cparams.flash_attn_type = (
        llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        if settings.flash_attn
        else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )
    if plan.kv_cache_type == "q8_0":
        cparams.type_k = cparams.type_v = llama_cpp.GGML_TYPE_Q8_0
    return cparams


class Engine:
    """A loaded model and a context with one KV sequence per slot."""

    def __init__(self, settings: ModelSettings) -> None:
        quiet_llama_logs()
        llama_cpp.llama_backend_init()
        self._model = _load_model(settings)
        try:
            self.plan = plan_memory(settings, settings.path.stat().st_size, *_kv_shape(self._model))
        except (BudgetError, OSError) as exc:
            llama_cpp.llama_model_free(self._model)
            raise ModelError(str(exc)) from None
        log.info(
            "memory_plan",
            budget_mb=self.plan.budget_mb,
            slots=self.plan.slots,
            n_ctx=self.plan.n_ctx,
            kv_cache_type=self.plan.kv_cache_type,
            kv_keep_mb=self.plan.kv_keep_mb,
            need_mb=round(self.plan.need_bytes / MIB),
        )
        self.vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.slots = self.plan.slots
        self.n_batch = settings.n_batch
        self.threads = settings.threads or len(os.sched_getaffinity(0))
        cparams = _context_params(settings, self.plan, self.threads)
        ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not ctx:
            llama_cpp.llama_model_free(self._model)
            raise ModelError(
                f"model {settings.path}: could not create a context of {cparams.n_ctx} tokens"
            )
        self.ctx = ctx
        self._memory = llama_cpp.llama_get_memory(ctx)
        self.n_ctx_seq = int(llama_cpp.llama_n_ctx_seq(ctx))

        template = self._chat_template()
        self.template_tools = template_takes_tools(template)
        self._formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=self._token_text(llama_cpp.llama_vocab_eos(self.vocab)),
            bos_token=self._token_text(llama_cpp.llama_vocab_bos(self.vocab)),
            add_generation_prompt=True,
        )
        self._pieces: dict[int, bytes] = {}
        self._piece_buf = ctypes.create_string_buffer(256)
        self._init_batch(settings.n_batch)

    # -- batch buffers -------------------------------------------------------------------------

    def _init_batch(self, capacity: int) -> None:
        self._b_token = np.zeros(capacity, dtype=np.int32)
        self._b_pos = np.zeros(capacity, dtype=np.int32)
        self._b_nseq = np.ones(capacity, dtype=np.int32)
        self._b_seq = np.zeros(capacity, dtype=np.int32)
        self._b_logits = np.zeros(capacity, dtype=np.int8)
        seq_base = self._b_seq.ctypes.data
        self._b_seq_ptrs = (ctypes.POINTER(ctypes.c_int32) * capacity)(
            *(
                ctypes.cast(seq_base + 4 * i, ctypes.POINTER(ctypes.c_int32))
                for i in range(capacity)
            )
        )
        self._batch = llama_cpp.llama_batch(
            n_tokens=0,
            token=self._b_token.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            embd=None,
            pos=self._b_pos.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            n_seq_id=self._b_nseq.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            seq_id=self._b_seq_ptrs,
            logits=self._b_logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )

    def decode(self, rows: Sequence[Row]) -> list[int]:
        """Evaluate the rows in one llama_decode; returns each row's logits index (-1: none)."""
        n = 0
        out: list[int] = []
        for row in rows:
            k = len(row.tokens)
            end = n + k
            self._b_token[n:end] = row.tokens
            self._b_pos[n:end] = np.arange(row.pos, row.pos + k, dtype=np.int32)
            self._b_seq[n:end] = row.seq
            self._b_logits[n:end] = 0
            if row.logits:
                self._b_logits[end - 1] = 1
                out.append(end - 1)
            else:
                out.append(-1)
            n = end
        self._batch.n_tokens = n
        rc = llama_cpp.llama_decode(self.ctx, self._batch)
        if rc != 0:
            raise DecodeError(rc)
        return out

    # -- KV sequences ----------------------------------------------------------------------------

    def forget(self, seq: int, keep: int = 0) -> None:
        """Drop KV cells of `seq` from position `keep` on."""
        llama_cpp.llama_memory_seq_rm(self._memory, seq, keep, -1)

    def seq_state_size(self, seq: int) -> int:
        return int(llama_cpp.llama_state_seq_get_size(self.ctx, seq))

    def save_seq(self, seq: int) -> ctypes.Array[ctypes.c_uint8]:
        """A copy of one sequence's KV cells (no logits: a few MB, not hundreds)."""
        size = self.seq_state_size(seq)
        buf = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data(self.ctx, buf, size, seq)
        if written != size:
            raise RuntimeError(f"llama_state_seq_get_data wrote {written} of {size} bytes")
        return buf

    def restore_seq(self, seq: int, state: ctypes.Array[ctypes.c_uint8]) -> bool:
        """Load a saved sequence into `seq` (emptied first); False if llama.cpp refused it."""
        self.forget(seq)
        ok = llama_cpp.llama_state_seq_set_data(self.ctx, state, len(state), seq) > 0
        if not ok:
            self.forget(seq)
        return bool(ok)

    # -- text ------------------------------------------------------------------------------------

    def _chat_template(self) -> str:
        raw = llama_cpp.llama_model_chat_template(self._model, None)
        return raw.decode("utf-8") if raw else CHATML_TEMPLATE

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        raw = llama_cpp.llama_vocab_get_text(self.vocab, token)
        return raw.decode("utf-8", "replace") if raw else ""

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buf = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, capacity, False, special)
        if n < 0:  # pragma: no cover - a token per byte plus specials always fits
            capacity = -n
            buf = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, capacity, False, special)
        return list(buf[:n])

    def chat_prompt(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """Tokens of the chat template applied to `messages`, ready for the assistant's turn.

        Rendered and tokenised exactly as llama-cpp-python's create_chat_completion does. A
        template that takes `tools` gets them and the messages with tool calls and results as
        they are; for another, toolcalls.fallback_messages writes both into plain messages
        (only when there is something of tools to write: plain prompts stay as they were).
        """
        if not self.template_tools and (tools or _has_tool_messages(messages)):
            messages = list(fallback_messages(messages, tools))
            tools = None
        rendered = self._formatter(messages=messages, tools=tools)  # type: ignore[arg-type]
        return self.tokenize(rendered.prompt, special=True)

    def new_sampler(self, params: SamplingParams) -> Sampler:
        """The sampler for one request: with a grammar only when it has one, so that the others
        do no grammar work at all."""
        if params.grammar is None:
            if params.temperature == 0:
                return GreedySampler(self.n_vocab, self.ctx)
            return Sampler(params, self.n_vocab, self.ctx)
        return GrammarSampler(params, self.n_vocab, self.ctx, self.vocab)

    def piece(self, token: int) -> bytes:
        """The bytes a generated token stands for (special tokens render as nothing)."""
        cached = self._pieces.get(token)
        if cached is None:
            n = llama_cpp.llama_token_to_piece(self.vocab, token, self._piece_buf, 256, 0, False)
            cached = self._piece_buf.raw[: max(n, 0)]
            self._pieces[token] = cached
        return cached

    def is_end(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def close(self) -> None:
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None
