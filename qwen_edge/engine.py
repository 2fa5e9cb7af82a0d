"""llama.cpp via llama-cpp-python's low-level API: load, chat template, batched decode, sampling.

One Engine owns one model and one context with a sequence per slot. It is not thread-safe: only
the inference thread calls it. The token path avoids Python-side allocation: the batch lives in
preallocated numpy buffers, pieces of text are cached per token, and sampling runs in llama.cpp's
sampler chain.
"""

from __future__ import annotations

import codecs
import ctypes
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final

import llama_cpp
import numpy as np
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from .modelfile import ModelError
from .settings import ModelSettings

# Qwen2.5's own template, used only when a GGUF file carries none.
CHATML_TEMPLATE: Final = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class DecodeError(Exception):
    """llama_decode failed (1: the KV cache had no room for the batch)."""

    def __init__(self, code: int) -> None:
        super().__init__(f"llama_decode returned {code}")


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repeat_penalty: float
    repeat_last_n: int
    seed: int


class Sampler:
    """A llama.cpp sampler chain for one request. Call close() when the request ends."""

    __slots__ = ("_chain",)

    def __init__(self, params: SamplingParams, n_vocab: int) -> None:
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

    def sample(self, ctx: Any, index: int) -> int:
        """Sample (and accept) the next token from the logits of batch row `index`."""
        return int(llama_cpp.llama_sampler_sample(self._chain, ctx, index))

    def close(self) -> None:
        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None


class TextAssembler:
    """Turns token pieces into text that never splits a UTF-8 character.

    Bytes of a character split across tokens wait until the character is complete; bytes that can
    never form a character (a model may emit them) are dropped, as llama-cpp-python does.
    """

    __slots__ = ("_decode",)

    def __init__(self) -> None:
        self._decode = codecs.getincrementaldecoder("utf-8")("ignore").decode

    def push(self, piece: bytes) -> str:
        return self._decode(piece)

    def flush(self) -> str:
        return self._decode(b"", True)


@dataclass(frozen=True, slots=True)
class Row:
    """One sequence's share of a decode batch: tokens at positions pos.. for seq; `logits` marks
    whether the last token's logits are wanted."""

    seq: int
    tokens: Sequence[int]
    pos: int
    logits: bool


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


class Engine:
    """A loaded model and a context with one KV sequence per slot."""

    def __init__(self, settings: ModelSettings) -> None:
        quiet_llama_logs()
        llama_cpp.llama_backend_init()

        mparams = llama_cpp.llama_model_default_params()
        mparams.use_mmap = True
        mparams.use_mlock = settings.use_mlock
        model = llama_cpp.llama_model_load_from_file(str(settings.path).encode(), mparams)
        if not model:
            raise ModelError(f"model file {settings.path}: llama.cpp could not load it")
        self._model = model
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.slots = settings.slots
        self.n_batch = settings.n_batch

        threads = settings.threads or len(os.sched_getaffinity(0))
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = settings.n_ctx * settings.slots
        cparams.n_batch = settings.n_batch
        cparams.n_ubatch = settings.n_batch
        cparams.n_seq_max = settings.slots
        # A decode step wants logits for at most one token per slot. Without this bound llama.cpp
        # sizes its output and compute buffers for n_batch rows of logits: with Qwen's 151,936-
        # token vocabulary that is ~300 MB at n_batch 512, more than the model itself.
        cparams.n_outputs_max = settings.slots
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
        if settings.kv_cache_type == "q8_0":
            cparams.type_k = cparams.type_v = llama_cpp.GGML_TYPE_Q8_0
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            llama_cpp.llama_model_free(model)
            raise ModelError(
                f"model {settings.path}: could not create a context of {cparams.n_ctx} tokens"
            )
        self.ctx = ctx
        self._memory = llama_cpp.llama_get_memory(ctx)
        self.n_ctx_seq = int(llama_cpp.llama_n_ctx_seq(ctx))
        self.threads = threads

        self._formatter = Jinja2ChatFormatter(
            template=self._chat_template(),
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

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Tokens of the chat template applied to `messages`, ready for the assistant's turn.

        Rendered and tokenised exactly as llama-cpp-python's create_chat_completion does.
        """
        rendered = self._formatter(messages=messages)  # type: ignore[arg-type]
        return self.tokenize(rendered.prompt, special=True)

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
