"""Benchmark qwen-edge against a plain llama.cpp loop and llama.cpp's own llama-server.

  scripts/bench              3 interleaved rounds on the Qwen2.5-0.5B proxy (built if missing),
                             llama-server built from the same llama.cpp if missing
  scripts/bench --quick      the same with short replies (still 3 rounds)
  scripts/bench --fleet      1, 4 and 16 nodes on a fake engine behind one mosquitto: what each
                             node receives and spends while its slots stream
  scripts/bench --quants     Q4_0 vs Q4_K_M vs Q8_0 of the proxy: size, peak RSS, prefill, decode
  scripts/bench --grammar    one device's plain stream beside another's request with the worst
                             `format` schema within the bounds, against beside a plain one
                             (target: >= 0.8x); --quick for short replies

A single absolute figure means nothing across machines, and one sample per figure cannot resolve
a 3 % target on a shared machine. So every target is a ratio between figures of the same run, and
each round measures the ceiling (llama.cpp's low-level API, no server), qwen-edge and the peer
(llama-server) in turn; the report gives medians over the rounds with their range (min-max), and
each ratio is the median of the per-round ratios, so slow drift of the machine cancels out.

The default model has Qwen2.5-0.5B-Instruct's exact shape with random weights, Q4_K_M
(scripts/make-model --shape qwen2.5-0.5b): its speed and memory are the real model's; its text is
noise. scripts/bench runs main(); the functions are importable (tests/integration/test_bench.py).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from qwen_edge.mqttclient import no_delay

from .harness import (
    PREFIX,
    ROOT,
    Broker,
    Daemon,
    free_port,
    proc_status_kb,
    proxy_model,
)

NODE = "bench"
BENCH_CONF = ROOT / "tests" / "broker" / "bench.conf"
SHORT_PROMPT = "Tell me about the sea."
N_CTX = 4096  # per slot, as the memory target asks
SLOTS = 4
N_BATCH = 128  # the daemon's default
HISTORY_TOKENS = 1500
SIMD_FLAGS = (
    # x86 ("pni" is SSE3)
    *("pni", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw"),
    *("avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8"),
    # arm64
    *("asimd", "asimdhp", "asimddp", "fphp", "i8mm", "bf16", "sve", "sve2"),
)


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# -- the machine ----------------------------------------------------------------------------------


def cpu_info() -> dict[str, Any]:
    """The CPU's model and SIMD features (/proc/cpuinfo) and what llama.cpp was built to use."""
    names: list[str] = []
    flags: set[str] = set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model"):  # x86 and most ARM kernels; a Pi says "Model"
                names.append(value.strip())
            elif key in ("flags", "Features"):
                flags.update(value.split())
    import llama_cpp

    system_info = llama_cpp.llama_print_system_info()
    return {
        "cpu": names[0] if names else platform.processor() or "unknown",
        "simd": [f for f in SIMD_FLAGS if f in flags],
        "cores": len(os.sched_getaffinity(0)),
        "arch": platform.machine(),
        "llama_cpp": system_info.decode() if isinstance(system_info, bytes) else str(system_info),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


# -- 1. ceiling: llama.cpp's low-level API with the daemon's context ------------------------------


class Ceiling:
    """The model in this process through llama.cpp's low-level API, in a context shaped as the
    daemon's (SLOTS sequences of N_CTX, flash attention, n_batch 128, non-unified q8_0 KV): the
    speed qwen-edge would have with no overhead of its own. Greedy sampling, no server, no
    Python per token beyond the loop itself."""

    def __init__(self, model: Path, threads: int) -> None:
        import llama_cpp

        from qwen_edge.node.engine import quiet_llama_logs

        self.ll = llama_cpp
        quiet_llama_logs()
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(
            str(model).encode(), llama_cpp.llama_model_default_params()
        )
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {model}")
        p = llama_cpp.llama_context_default_params()
        p.n_ctx = N_CTX * SLOTS
        p.n_batch = p.n_ubatch = N_BATCH
        p.n_seq_max = SLOTS
        p.n_outputs_max = SLOTS
        p.n_outputs_max_per_seq = 1
        p.kv_unified = False
        p.n_threads = p.n_threads_batch = threads
        p.no_perf = True
        p.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        # The daemon's KV cache: q8_0 (model.kv_cache_type), or F16 where llama.cpp cannot
        # quantise it (heads not a multiple of 32 wide: the tiny test model), as it falls back.
        self.kv_type = "q8_0"
        p.type_k = p.type_v = llama_cpp.GGML_TYPE_Q8_0
        self.ctx = llama_cpp.llama_init_from_model(self.model, p)
        if not self.ctx:
            self.kv_type = "f16"
            p.type_k = p.type_v = llama_cpp.GGML_TYPE_F16
            self.ctx = llama_cpp.llama_init_from_model(self.model, p)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not make a context for {model}")
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.smpl = llama_cpp.llama_sampler_chain_init(
            llama_cpp.llama_sampler_chain_default_params()
        )
        llama_cpp.llama_sampler_chain_add(self.smpl, llama_cpp.llama_sampler_init_greedy())
        self.batch = llama_cpp.llama_batch_init(N_BATCH, 0, 1)

    def _decode(self, rows: Sequence[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (seq, token, pos, logits) rows."""
        b = self.batch
        for i, (seq, token, pos, logits) in enumerate(rows):
            b.token[i] = token
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = logits
        b.n_tokens = len(rows)
        if self.ll.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def _prompt(self, seq: int, tokens: list[int], pos: int = 0) -> int:
        """Evaluate `tokens` into `seq` from position `pos` (what follows is dropped first) in
        n_batch chunks; the token sampled after them."""
        self.ll.llama_memory_seq_rm(self.mem, seq, pos, -1)
        for start in range(0, len(tokens), N_BATCH):
            chunk = tokens[start : start + N_BATCH]
            last = start + len(chunk) == len(tokens)
            self._decode(
                [
                    (seq, t, pos + start + i, last and i == len(chunk) - 1)
                    for i, t in enumerate(chunk)
                ]
            )
        return int(self.ll.llama_sampler_sample(self.smpl, self.ctx, -1))

    @staticmethod
    def filler(n: int, offset: int = 0) -> list[int]:
        return [1000 + offset + i for i in range(n)]

    def prefill(self, n: int = 512) -> float:
        """Prompt evaluation, tokens/s."""
        t0 = time.perf_counter()
        self._prompt(0, self.filler(n))
        return n / (time.perf_counter() - t0)

    def single(self, prompt_tokens: int, decode_tokens: int) -> dict[str, float]:
        """One sequence: first token (prompt + sample) and decode speed, as one stream."""
        t0 = time.perf_counter()
        token = self._prompt(0, self.filler(prompt_tokens))
        first_s = time.perf_counter() - t0
        decode, sample = self.ll.llama_decode, self.ll.llama_sampler_sample
        ctx, smpl, b = self.ctx, self.smpl, self.batch
        self._decode([(0, token, prompt_tokens, True)])
        t0 = time.perf_counter()
        for pos in range(prompt_tokens + 1, prompt_tokens + decode_tokens):
            b.token[0] = sample(smpl, ctx, 0)
            b.pos[0] = pos
            if decode(ctx, b) != 0:
                raise RuntimeError("llama_decode failed")
        decode_s = time.perf_counter() - t0
        return {
            "first_token_ms": first_s * 1000,
            "decode_tokens_per_s": (decode_tokens - 1) / decode_s,
        }

    def follow_up(self, kept: int, new: int) -> float:
        """A follow-up turn as llama.cpp itself pays it: `new` tokens evaluated on a sequence
        that already holds `kept` (not timed), and one token sampled; ms."""
        self._prompt(0, self.filler(kept))
        t0 = time.perf_counter()
        self._prompt(0, self.filler(new, 5000), pos=kept)
        return (time.perf_counter() - t0) * 1000

    def batched(self, n: int, prompt_tokens: int, decode_tokens: int) -> dict[str, float]:
        """`n` sequences decoded together, one llama_batch of n rows per step: the raw
        batched ceiling for n streams. Aggregate tokens/s."""
        firsts = [self._prompt(s, self.filler(prompt_tokens, 100 * s)) for s in range(n)]
        self._decode([(s, firsts[s], prompt_tokens, True) for s in range(n)])
        decode, sample = self.ll.llama_decode, self.ll.llama_sampler_sample
        ctx, smpl, b = self.ctx, self.smpl, self.batch
        t0 = time.perf_counter()
        for pos in range(prompt_tokens + 1, prompt_tokens + decode_tokens):
            for s in range(n):
                b.token[s] = sample(smpl, ctx, s)
                b.pos[s] = pos
            if decode(ctx, b) != 0:
                raise RuntimeError("llama_decode failed")
        wall = time.perf_counter() - t0
        return {"aggregate_tokens_per_s": n * (decode_tokens - 1) / wall}

    def close(self) -> None:
        self.ll.llama_batch_free(self.batch)
        self.ll.llama_sampler_free(self.smpl)
        self.ll.llama_free(self.ctx)
        self.ll.llama_model_free(self.model)


# -- 2. qwen-edge, as a subscriber sees it --------------------------------------------------------


@dataclass
class Stream:
    request_id: str
    sent: float = 0.0
    first: float | None = None
    done: float | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    chunks: list[float] = field(default_factory=list)  # arrival time of each chunk
    finished: threading.Event = field(default_factory=threading.Event)

    @property
    def ttft_ms(self) -> float:
        assert self.first is not None
        return (self.first - self.sent) * 1000

    @property
    def decode_tps(self) -> float:
        assert self.first is not None and self.done is not None
        return (self.completion_tokens - 1) / max(self.done - self.first, 1e-9)


class Client:
    """A device: publishes requests and timestamps each reply as its messages arrive (in paho's
    callback, not when a reader gets to them)."""

    def __init__(self, port: int, client_id: str = "bench") -> None:
        self.client_id = client_id
        self.streams: dict[str, Stream] = {}
        self._sub = threading.Event()
        self.c = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"{client_id}-{uuid.uuid4().hex[:6]}"
        )
        self.c.on_message = self._on_message
        self.c.on_subscribe = lambda *a: self._sub.set()
        self.c.on_socket_open = no_delay  # as the client library's devices (else +40 ms a request)
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        self.c.subscribe(f"{PREFIX}/{NODE}/reply/{client_id}/#", qos=1)
        self._sub.wait(10)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        now = time.perf_counter()
        data = json.loads(msg.payload)
        stream = self.streams.get(data["request_id"])
        if stream is None:
            return
        kind = data["type"]
        if kind == "chunk":
            stream.chunks.append(now)
            if stream.first is None:
                stream.first = now
        elif kind in ("done", "error"):
            if kind == "error":
                log(f"error reply: {data}")
            stream.done = now
            usage = data.get("usage", {})
            stream.completion_tokens = usage.get("completion_tokens", 0)
            stream.cached_tokens = usage.get("cached_tokens", 0)
            stream.prompt_tokens = usage.get("prompt_tokens", 0)
            stream.finished.set()

    def send_cold(self, message: str, max_tokens: int) -> Stream:
        """A request whose prompt shares nothing with earlier ones past its first tokens (a
        system prompt of its own), so nothing of it can come from a KV cache."""
        tag = uuid.uuid4().hex[:8]
        return self.send(message, f"cold-{tag}", max_tokens, system=f"Session {tag}. Be brief.")

    def send(self, message: str, conversation: str, max_tokens: int, **kw: Any) -> Stream:
        rid = uuid.uuid4().hex[:12]
        stream = Stream(rid)
        self.streams[rid] = stream
        body = {
            "request_id": rid,
            "conversation_id": conversation,
            "message": message,
            "max_tokens": max_tokens,
            "temperature": 0,
            **kw,
        }
        stream.sent = time.perf_counter()
        self.c.publish(f"{PREFIX}/{NODE}/request/{self.client_id}", json.dumps(body), qos=1)
        return stream

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def wait_all(streams: Sequence[Stream], timeout: float = 900) -> None:
    for s in streams:
        if not s.finished.wait(timeout):
            raise TimeoutError(f"no done for {s.request_id}")


def aggregate_tps(streams: Sequence[Stream]) -> float:
    """Tokens of all streams over the time from the first first chunk to the last done."""
    start = min(s.first for s in streams if s.first is not None)
    end = max(s.done for s in streams if s.done is not None)
    return sum(s.completion_tokens for s in streams) / (end - start)


def steady_tps(runs: Sequence[tuple[Sequence[float], int]]) -> float | None:
    """Tokens/s of streams while every one of them is streaming, from (chunk arrival times,
    completion tokens) per stream: the chunks that arrive after the last stream's first chunk
    and up to the first stream's last, each counted as its stream's tokens per chunk (a chunk
    carries two tokens' text where the first ended inside a character). The whole-run figure
    also counts the ramp, while prompts are evaluated and fewer streams decode."""
    if not runs or any(not chunks for chunks, _ in runs):
        return None
    start = max(chunks[0] for chunks, _ in runs)
    end = min(chunks[-1] for chunks, _ in runs)
    if end <= start:
        return None
    tokens = sum(sum(1 for t in chunks if start < t <= end) * n / len(chunks) for chunks, n in runs)
    return tokens / (end - start)


def steady_figure(runs: Sequence[tuple[Sequence[float], int]]) -> dict[str, float]:
    """{"streams4_steady_tokens_per_s": ...}, or nothing when no moment had all streaming."""
    steady = steady_tps(runs)
    return {} if steady is None else {"streams4_steady_tokens_per_s": steady}


def history_message(tokens: int, owner: str = "") -> str:
    """A user message of about `tokens` Qwen tokens (2.5 characters a token: numbers are one
    token a digit), its first words `owner`'s own."""
    notes = " ".join(f"Note {i}: the {i}th item is a blue marble." for i in range(tokens // 4))
    return (f"{owner} " + notes)[: tokens * 5 // 2]


class QwenEdge:
    """The daemon with SLOTS slots of N_CTX, kept across rounds; one device sends the cold
    requests, another holds the conversations with history (a device's own new conversations
    would push its oldest out of conversations.max_per_client)."""

    def __init__(self, broker: Broker, workdir: Path, model: Path, threads: int) -> None:
        self.daemon = Daemon(
            workdir,
            broker,
            model,
            None,
            QWEN_EDGE_NODE_ID=NODE,
            QWEN_EDGE_MODEL__THREADS=str(threads),
            QWEN_EDGE_MODEL__SLOTS=str(SLOTS),
            QWEN_EDGE_MODEL__N_CTX=str(N_CTX),
            QWEN_EDGE_MODEL__QUEUE_SIZE="64",
            QWEN_EDGE_GENERATION__MAX_TOKENS_LIMIT="4096",
        )
        self.daemon.start(ready_timeout=600)
        self.client = Client(broker.port)
        self.client.send("warm up", "warm", 4).finished.wait(300)
        self.history = Client(broker.port, "bench-history")
        self.conversations = ["hist-0", "hist-1"]

    def seed_history(self, tokens: int) -> None:
        """The conversations with ~`tokens` of history each, for the follow-up turns. Each
        history is its own from the first token: with the same text, a conversation's follow-up
        would reuse another's KV (one client may share its own prefixes), not its own history."""
        wait_all([self.history.send(history_message(tokens, c), c, 4) for c in self.conversations])

    def round(self, decode_n: int, rnd: int) -> dict[str, float]:
        c = self.client
        single = c.send_cold(SHORT_PROMPT, decode_n)
        wait_all([single])
        four = [c.send_cold(SHORT_PROMPT, decode_n) for _ in range(4)]
        wait_all(four)
        # Each history conversation's next turn after the cold requests above took every slot
        # (its KV comes back from the keep store, or is read again once the store dropped it:
        # "returning"), then two more turns back to back, as a person at a kiosk chats: the
        # ~1,500-token history stays in its slot and each turn evaluates only its own tokens.
        returning, follow, fresh = [], [], []
        for conv in self.conversations:
            returning.append(self.history.send(f"Which item is number {rnd}?", conv, 4))
            wait_all(returning[-1:])
            for turn in (1, 2):
                follow.append(self.history.send(f"And number {rnd + 10 * turn}?", conv, 4))
                wait_all(follow[-1:])
            fresh.append(c.send_cold(SHORT_PROMPT, 4))
            wait_all(fresh[-1:])
        # A newcomer while 3 others stream, against the same request alone.
        alone = c.send_cold(SHORT_PROMPT, 8)
        wait_all([alone])
        busy = [c.send_cold(SHORT_PROMPT, decode_n * 2) for _ in range(3)]
        while any(s.first is None for s in busy):
            time.sleep(0.005)
        time.sleep(0.2)
        late = c.send_cold(SHORT_PROMPT, 8)
        wait_all([late, *busy])
        return {
            "single_decode_tokens_per_s": single.decode_tps,
            "single_first_chunk_ms": single.ttft_ms,
            "prompt_tokens": single.prompt_tokens,
            "streams4_aggregate_tokens_per_s": aggregate_tps(four),
            **steady_figure([(s.chunks, s.completion_tokens) for s in four]),
            "follow_up_first_chunk_ms": statistics.median(s.ttft_ms for s in follow),
            "fresh_first_chunk_ms": statistics.median(s.ttft_ms for s in fresh),
            "follow_up_cached_tokens": statistics.median(s.cached_tokens for s in follow),
            "follow_up_prompt_tokens": statistics.median(s.prompt_tokens for s in follow),
            "follow_up_new_tokens": statistics.median(
                s.prompt_tokens - s.cached_tokens for s in follow
            ),
            "returning_first_chunk_ms": statistics.median(s.ttft_ms for s in returning),
            "returning_cached_tokens": statistics.median(s.cached_tokens for s in returning),
            "first_chunk_alone_ms": alone.ttft_ms,
            "first_chunk_while_3_stream_ms": late.ttft_ms,
        }

    def close(self) -> float:
        """Stops the daemon; its peak RSS, MiB."""
        peak = self.daemon.peak_rss_mb()
        self.client.close()
        self.history.close()
        self.daemon.stop()
        return peak


# -- 3. the peer: llama-server from the same llama.cpp --------------------------------------------


def llama_server_binary(build: bool) -> Path | None:
    binary = ROOT / ".cache" / "llama-server" / "bin" / "llama-server"
    if not binary.exists() and build:
        log("building llama-server from the same llama.cpp (minutes; cached afterwards)")
        subprocess.run(
            [str(ROOT / "scripts" / "build-llama-server")], check=True, stdout=subprocess.DEVNULL
        )
    return binary if binary.exists() else None


def sse_stream(port: int, prompt: str, max_tokens: int, result: dict[str, Any]) -> None:
    """One streaming chat completion; fills `result` with sent/first/done times and tokens."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps(
        {
            "messages": [
                {"role": "system", "content": f"Session {uuid.uuid4().hex[:8]}. Be brief."},
                {"role": "user", "content": prompt},
            ],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    first = None
    chunks: list[float] = []
    tokens = 0
    for raw in resp:
        line = raw.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        data = json.loads(line[6:])
        if data.get("usage"):
            tokens = data["usage"].get("completion_tokens", tokens)
        for choice in data.get("choices", []):
            if choice.get("delta", {}).get("content"):
                chunks.append(time.perf_counter())
                first = chunks[0]
    end = time.perf_counter()
    conn.close()
    result.update(sent=t0, first=first, done=end, tokens=tokens, chunks=chunks)


class Peer:
    """`llama-server --parallel 4` on the same model, threads and context per slot."""

    def __init__(self, binary: Path, model: Path, threads: int, kv_type: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                *(str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port)),
                *("--parallel", str(SLOTS), "-c", str(N_CTX * SLOTS), "-b", str(N_BATCH)),
                *("-t", str(threads), "-tb", str(threads), "--flash-attn", "on", "--no-webui"),
                *("--cache-type-k", kv_type, "--cache-type-v", kv_type),  # the daemon's KV
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 600
        while True:
            with contextlib.suppress(OSError):
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("llama-server did not start")
            time.sleep(0.2)
        sse_stream(self.port, "warm up", 4, {})

    def streams(self, n: int, max_tokens: int) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = [{} for _ in range(n)]
        threads = [
            threading.Thread(target=sse_stream, args=(self.port, SHORT_PROMPT, max_tokens, r))
            for r in results
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results

    def round(self, decode_n: int) -> dict[str, float]:
        (one,) = self.streams(1, decode_n)
        four = self.streams(4, decode_n)
        start = min(r["first"] for r in four)
        end = max(r["done"] for r in four)
        return {
            "single_decode_tokens_per_s": (one["tokens"] - 1) / (one["done"] - one["first"]),
            "single_first_chunk_ms": (one["first"] - one["sent"]) * 1000,
            "streams4_aggregate_tokens_per_s": sum(r["tokens"] for r in four) / (end - start),
            **steady_figure([(r["chunks"], r["tokens"]) for r in four]),
        }

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


# -- rounds and the report ------------------------------------------------------------------------


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median and range of one figure over the rounds."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


@dataclass(frozen=True)
class Target:
    """One row of the issue's table: `value` against `reference`, as a ratio per round."""

    name: str
    value: str  # (section, figure) keys into the rounds
    reference: str
    limit: float | None  # None: shown beside a target row, no target of its own
    higher_is_better: bool
    unit: str


TARGETS = (
    Target(
        "single-stream decode vs low-level loop",
        "edge.single_decode_tokens_per_s",
        "ceiling.single_decode_tokens_per_s",
        0.98,
        True,
        "tok/s",
    ),
    Target(
        "single stream vs llama-server stream",
        "edge.single_decode_tokens_per_s",
        "peer.single_decode_tokens_per_s",
        1.0,
        True,
        "tok/s",
    ),
    Target(
        "4 streams, all decoding, vs raw batched N=4",
        "edge.streams4_steady_tokens_per_s",
        "ceiling.batched4_aggregate_tokens_per_s",
        0.97,
        True,
        "tok/s",
    ),
    Target(
        "  whole run (with prompts) vs raw batched N=4",
        "edge.streams4_aggregate_tokens_per_s",
        "ceiling.batched4_aggregate_tokens_per_s",
        None,
        True,
        "tok/s",
    ),
    Target(
        "4 streams, all decoding, vs llama-server -np 4",
        "edge.streams4_steady_tokens_per_s",
        "peer.streams4_steady_tokens_per_s",
        1.05,
        True,
        "tok/s",
    ),
    Target(
        "  whole run vs llama-server --parallel 4",
        "edge.streams4_aggregate_tokens_per_s",
        "peer.streams4_aggregate_tokens_per_s",
        None,
        True,
        "tok/s",
    ),
    Target(
        "follow-up 1st chunk vs llama.cpp on kept KV",
        "edge.follow_up_first_chunk_ms",
        "ceiling.follow_up_first_token_ms",
        1.10,
        False,
        "ms",
    ),
    Target(
        "follow-up with history vs fresh, 1st chunk",
        "edge.follow_up_first_chunk_ms",
        "edge.fresh_first_chunk_ms",
        1.5,
        False,
        "ms",
    ),
    Target(
        "  its 1st turn after 12 others' requests",
        "edge.returning_first_chunk_ms",
        "edge.fresh_first_chunk_ms",
        None,
        False,
        "ms",
    ),
    Target(
        "newcomer's 1st chunk while 3 stream vs alone",
        "edge.first_chunk_while_3_stream_ms",
        "edge.first_chunk_alone_ms",
        2.0,
        False,
        "ms",
    ),
)


def figure(round_: dict[str, dict[str, float]], key: str) -> float | None:
    section, name = key.split(".")
    return round_.get(section, {}).get(name)


def evaluate(rounds: list[dict[str, dict[str, float]]]) -> list[dict[str, Any]]:
    """Each target's figures over the rounds: medians, ranges, per-round ratios."""
    rows = []
    for t in TARGETS:
        pairs = [(figure(r, t.value), figure(r, t.reference)) for r in rounds]
        both = [(v, ref) for v, ref in pairs if v is not None and ref is not None and ref > 0]
        if not both:
            continue
        ratios = [v / ref for v, ref in both]
        ratio = statistics.median(ratios)
        met = None
        if t.limit is not None:
            met = ratio >= t.limit if t.higher_is_better else ratio <= t.limit
        rows.append(
            {
                "name": t.name,
                "unit": t.unit,
                "value": summary([v for v, _ in both]),
                "reference": summary([ref for _, ref in both]),
                "ratio": summary(ratios),
                "target": ""
                if t.limit is None
                else f"{'>=' if t.higher_is_better else '<='} {t.limit:g}",
                "met": met,
            }
        )
    return rows


def rounds_summary(rounds: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, Any]]:
    """Every figure of every section: median and range over the rounds."""
    out: dict[str, dict[str, Any]] = {}
    for section in sorted({s for r in rounds for s in r}):
        names = sorted({n for r in rounds for n in r.get(section, {})})
        out[section] = {n: summary([r[section][n] for r in rounds if n in r.get(section, {})])
                        for n in names}  # fmt: skip
    return out


def fmt(s: dict[str, float], digits: int = 1) -> str:
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def run(args: argparse.Namespace) -> dict[str, Any]:
    model = args.model or proxy_model("Q4_K_M")
    model_mb = model.stat().st_size / 2**20
    decode_n = 32 if args.quick else 128
    # The figure is at ~1,500 tokens; --quick only shows the measurement works.
    history_tokens = 400 if args.quick else HISTORY_TOKENS
    machine = cpu_info()
    log(f"{machine['cpu']}; SIMD {' '.join(machine['simd'])}; load {machine['load_average']}")
    log(f"model {model.name} ({model_mb:.0f} MB), {args.threads} threads, {args.rounds} rounds")
    binary = None if args.no_peer else llama_server_binary(build=not args.quick)
    if binary is None and not args.no_peer:
        log("no llama-server (scripts/build-llama-server builds it): no peer figures")
    ceiling = Ceiling(model, args.threads)
    rounds: list[dict[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="qwen-edge-bench-") as tmp:
        broker = Broker(Path(tmp) / "broker", BENCH_CONF)
        broker.start()
        edge = peer = None
        try:
            edge = QwenEdge(broker, Path(tmp) / "daemon", model, args.threads)
            ready_s = edge.daemon.ready_s
            edge.seed_history(history_tokens)
            peer = None
            if binary is not None:
                peer = Peer(binary, model, args.threads, ceiling.kv_type)
            prefill = ceiling.prefill(128 if args.quick else 512)
            for rnd in range(args.rounds):
                r: dict[str, dict[str, float]] = {}
                prompt_tokens = int(rounds[-1]["edge"]["prompt_tokens"]) if rounds else 33
                one = ceiling.single(prompt_tokens, decode_n)
                r["ceiling"] = {
                    "single_decode_tokens_per_s": one["decode_tokens_per_s"],
                    "single_first_token_ms": one["first_token_ms"],
                    "batched4_aggregate_tokens_per_s": ceiling.batched(4, prompt_tokens, decode_n)[
                        "aggregate_tokens_per_s"
                    ],
                }
                r["edge"] = edge.round(decode_n, rnd)
                # The same new tokens on a KV of the same length, in llama.cpp alone.
                kept, new = r["edge"]["follow_up_cached_tokens"], r["edge"]["follow_up_new_tokens"]
                if new > 0:
                    r["ceiling"]["follow_up_first_token_ms"] = ceiling.follow_up(
                        int(kept), int(new)
                    )
                if peer is not None:
                    r["peer"] = peer.round(decode_n)
                log(f"round {rnd + 1}/{args.rounds}: {json.dumps(r)}")
                rounds.append(r)
        finally:
            ceiling.close()
            if peer is not None:
                peer.close()
            peak_rss = edge.close() if edge is not None else float("nan")
            broker.stop()
    return {
        "machine": machine,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "model": model.name,
        "model_mb": round(model_mb, 1),
        "threads": args.threads,
        "slots": SLOTS,
        "n_ctx": N_CTX,
        "decode_tokens": decode_n,
        "history_tokens": history_tokens,
        "quick": args.quick,
        "daemon_ready_s": round(ready_s, 2),
        "ceiling_prefill_tokens_per_s": round(prefill, 1),
        "rounds": rounds,
        "figures": rounds_summary(rounds),
        "targets": evaluate(rounds),
        "peak_rss_mb": round(peak_rss, 1),
        "peak_rss_over_model_mb": round(peak_rss - model_mb, 1),
        "peak_rss_met": peak_rss - model_mb <= 300,
    }


def print_report(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(
        f"\nqwen-edge bench: {result['model']} ({result['model_mb']:.0f} MB), "
        f"{result['threads']} threads, {len(result['rounds'])} interleaved rounds"
        f"{' (quick)' if result['quick'] else ''}"
    )
    print(f"CPU: {m['cpu']} ({m['arch']}, {m['cores']} cores); SIMD: {' '.join(m['simd'])}")
    print(f"llama.cpp: {m['llama_cpp']}")
    print(f"load average: {m['load_average']} before, {result['load_average_after']} after")
    print("median [min-max] over the rounds; ratio = median of the per-round ratios\n")
    print(f"{'measure':46} {'qwen-edge':>22} {'reference':>22} {'ratio':>18} {'target':>7}  met")
    for row in result["targets"]:
        digits = 0 if row["unit"] == "ms" else 1
        print(
            f"{row['name']:46} {fmt(row['value'], digits) + ' ' + row['unit']:>22} "
            f"{fmt(row['reference'], digits) + ' ' + row['unit']:>22} "
            f"{fmt(row['ratio'], 2):>18} {row['target']:>7}  "
            f"{'' if row['met'] is None else 'yes' if row['met'] else 'NO'}"
        )
    over = result["peak_rss_over_model_mb"]
    print(
        f"{'peak RSS, 4 slots x 4,096 ctx vs model file':46} {result['peak_rss_mb']:>19.0f} MB "
        f"{result['model_mb']:>19.0f} MB {over:>+15.0f} MB {'<= +300':>7}  "
        f"{'yes' if result['peak_rss_met'] else 'NO'}"
    )
    f = result["figures"]
    c = f["ceiling"]
    gain = (
        c["batched4_aggregate_tokens_per_s"]["median"] / c["single_decode_tokens_per_s"]["median"]
    )
    print(
        f"\nceiling: prefill {result['ceiling_prefill_tokens_per_s']} tok/s; first token "
        f"{fmt(c['single_first_token_ms'])} ms; raw batched N=4 is {gain:.2f}x one sequence here"
    )
    e = f["edge"]
    print(
        f"qwen-edge: READY in {result['daemon_ready_s']} s; first chunk "
        f"{fmt(e['single_first_chunk_ms'])} ms; follow-up reused "
        f"{e['follow_up_cached_tokens']['median']:.0f} of "
        f"{e['follow_up_prompt_tokens']['median']:.0f} prompt tokens, evaluated "
        f"{e['follow_up_new_tokens']['median']:.0f}; after others' requests "
        f"{e['returning_cached_tokens']['median']:.0f} reused (history asked: "
        f"~{result['history_tokens']})"
    )
    if "peer" in f:
        print(f"llama-server: first chunk {fmt(f['peer']['single_first_chunk_ms'])} ms")


# -- fleet: what a node pays for the size of its pool ---------------------------------------------

POOL = "pool"


class PoolWatcher:
    """Subscribes exactly as a node's pool link does, minus the shared request subscription
    (which would take a share of the requests): it receives what each node receives. Counts
    the replies each node holds from their `start`s or the nodes' claims, whichever it sees."""

    def __init__(self, port: int, subscriptions: Sequence[str]) -> None:
        self.count = 0
        self.started: Counter[str] = Counter()  # node -> replies it started
        self._subs = threading.Semaphore(0)
        self.c = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"watcher-{uuid.uuid4().hex[:6]}"
        )
        self.c.on_message = self._on_message
        self.c.on_subscribe = lambda *a: self._subs.release()
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        for topic in subscriptions:
            self.c.subscribe(topic, qos=1)
            if not self._subs.acquire(timeout=10):
                raise TimeoutError(f"no SUBACK for {topic}")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self.count += 1
        if b'"type":"start"' in msg.payload:  # nodes that watch one another's replies
            self.started[json.loads(msg.payload).get("node", "?")] += 1
        elif "/claims/" in msg.topic and msg.payload:  # nodes that announce what they hold
            claims = json.loads(msg.payload)
            self.started[claims["node"]] = len(claims["replies"])

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


class BrokerCounter:
    """mosquitto's count of PUBLISH packets it has sent to all clients ($SYS, every second), on a
    connection of its own, so that a watcher falling behind the flood does not delay it."""

    TOPIC = "$SYS/broker/publish/messages/sent"

    def __init__(self, port: int) -> None:
        self.samples: list[tuple[float, int]] = []  # (arrival, count)
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"sys-{uuid.uuid4().hex[:6]}")
        self.c.on_message = lambda c, u, msg: self.samples.append(
            (time.monotonic(), int(msg.payload))
        )
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        self.c.subscribe(self.TOPIC)

    def rate(self, since: float, until: float) -> float | None:
        """PUBLISH packets sent per second between two moments (samples inside them)."""
        inside = [s for s in self.samples if since <= s[0] <= until]
        if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
            return None
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def fleet_size(n: int, slots: int, interval_ms: int, window: float, tmp: Path) -> dict[str, Any]:
    """`n` fake-engine nodes in one pool, each with `slots` replies streaming: per node, the
    messages it receives per second and its CPU time over `window` seconds."""
    from qwen_edge.topics import FleetTopics

    broker = Broker(tmp / f"broker-{n}", BENCH_CONF)
    broker.start()
    tokens = int((window + 30) * 1000 / interval_ms)  # outlasts start-up and the window
    nodes = [
        Daemon(
            tmp / f"n{n}-node{i}",
            broker,
            Path(f"fake://{interval_ms}ms"),
            None,
            QWEN_EDGE_NODE_ID=f"node-{i:02d}",
            QWEN_EDGE_MODEL__SLOTS=str(slots),
            QWEN_EDGE_MODEL__N_CTX=str(tokens + 512),
            QWEN_EDGE_GENERATION__MAX_TOKENS_LIMIT=str(tokens),
            QWEN_EDGE_SERVICE__DRAIN_TIMEOUT="1",
        )
        for i in range(n)
    ]
    watcher = device = counter = None
    try:
        for d in nodes:
            d.start(wait_ready=False)
        for d in nodes:
            assert d.notify is not None
            d.notify.wait_for("READY=1", 600)
        subs = FleetTopics.of(PREFIX, "watcher", POOL).subscriptions[1:]
        watcher = PoolWatcher(broker.port, subs)
        counter = BrokerCounter(broker.port)
        device = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"load-{uuid.uuid4().hex[:6]}")
        device.connect("127.0.0.1", broker.port)
        device.loop_start()
        for i in range(n * slots):
            body: dict[str, Any] = {"request_id": f"r{i}", "conversation_id": f"c{i}"}
            body.update(message="Go on.", max_tokens=tokens)
            device.publish(f"{PREFIX}/{POOL}/request/load", json.dumps(body), qos=1)
        deadline = time.monotonic() + 120
        while sum(watcher.started.values()) < n * slots and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2.0)  # every slot streaming
        cpu0 = [d.cpu_seconds() for d in nodes]
        count0, t0 = watcher.count, time.monotonic()
        time.sleep(window)
        cpu1 = [d.cpu_seconds() for d in nodes]
        received = (watcher.count - count0) / (time.monotonic() - t0)
        wall = time.monotonic() - t0
        cpu = [(b - a) / wall * 100 for a, b in zip(cpu0, cpu1, strict=True)]
        # Every node and the watcher hold the same pool subscriptions; the load device none.
        sent = counter.rate(t0, t0 + wall)
        return {
            "nodes": n,
            "slots_per_node": slots,
            "busy_slots": dict(sorted(watcher.started.items())),
            "received_per_node_per_s": round(received, 1),
            "expected_per_node_per_s": round(n * slots * 1000 / interval_ms, 1),
            "cpu_percent_per_node": summary(cpu),
            "broker_out_per_s": None if sent is None else round(sent, 1),
            "broker_out_per_subscriber_per_s": None if sent is None else round(sent / (n + 1), 1),
        }
    finally:
        if device is not None:
            device.disconnect()
            device.loop_stop()
        for client in (watcher, counter):
            if client is not None:
                client.close()
        for d in nodes:
            if d.proc is not None and d.proc.poll() is None:
                d.proc.send_signal(signal.SIGTERM)
        for d in nodes:
            with contextlib.suppress(Exception):
                d.stop(timeout=60)
        broker.stop()


def fleet(args: argparse.Namespace) -> dict[str, Any]:
    machine = cpu_info()
    log(
        f"fleet: {args.fleet_sizes} nodes x {args.fleet_slots} slots, a token every "
        f"{args.fleet_interval} ms, {args.fleet_window} s each; load {machine['load_average']}"
    )
    sizes = []
    with tempfile.TemporaryDirectory(prefix="qwen-edge-fleet-") as tmp:
        for n in args.fleet_sizes:
            sizes.append(
                fleet_size(n, args.fleet_slots, args.fleet_interval, args.fleet_window, Path(tmp))
            )
            log(f"{n} nodes: {json.dumps(sizes[-1])}")
    return {"machine": machine, "load_average_after": list(os.getloadavg()), "sizes": sizes}


def print_fleet(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(f"\nqwen-edge fleet bench: fake engine, {m['cpu']}, {m['cores']} cores")
    print(f"load average: {m['load_average']} before, {result['load_average_after']} after")
    print(
        f"{'nodes':>5} {'slots busy':>12} {'msgs in/node/s':>15} {'(N*S*rate)':>11} "
        f"{'CPU %/node median [min-max]':>28} {'broker out/s':>13} {'(per subscriber)':>17}"
    )
    for s in result["sizes"]:
        busy = sum(s["busy_slots"].values())
        print(
            f"{s['nodes']:>5} {busy:>5}/{s['nodes'] * s['slots_per_node']:<6} "
            f"{s['received_per_node_per_s']:>15} {s['expected_per_node_per_s']:>11} "
            f"{fmt(s['cpu_percent_per_node']):>28} {s['broker_out_per_s']!s:>13} "
            f"{s['broker_out_per_subscriber_per_s']!s:>17}"
        )
    print(
        "msgs in/node/s: counted by a client with a node's pool subscriptions; (N*S*rate): what "
        "the nodes would send at full pace; broker out/s: mosquitto's own count ($SYS), shared "
        "by the N nodes and that client. A node or client short of CPU falls behind both."
    )


# -- quantisations --------------------------------------------------------------------------------

QUANTS = ("Q4_0", "Q4_K_M", "Q8_0")


def ceiling_child(model: Path, threads: int, decode_tokens: int) -> None:
    """One ceiling run in this (fresh) process; prints JSON with the process's peak RSS."""
    import resource

    t0 = time.perf_counter()
    c = Ceiling(model, threads)
    r: dict[str, Any] = {"prefill_tokens_per_s": round(c.prefill(), 1)}
    r.update({k: round(v, 2) for k, v in c.single(33, decode_tokens).items()})
    r["wall_s"] = round(time.perf_counter() - t0, 2)
    # While the model is loaded and has worked: anonymous pages must stay in RAM, file-backed
    # ones (the mapped model) the kernel may drop and read again.
    for key in ("RssAnon", "RssFile"):
        r[f"rss_{key[3:].lower()}_mb"] = round(proc_status_kb(os.getpid(), key) / 1024, 1)
    r["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    c.close()
    print(json.dumps(r))


def quant_runs(threads: int, rounds: int, decode_tokens: int) -> dict[str, Any]:
    """Every quantisation, in interleaved rounds (A B C A B C ...) of fresh processes, so that
    drift on a shared machine spreads over all of them; medians per quantisation."""
    models = {q: proxy_model(q) for q in QUANTS}
    runs: dict[str, list[dict[str, Any]]] = {q: [] for q in QUANTS}
    for i in range(rounds):
        for q, path in models.items():
            out = subprocess.run(
                [
                    *(sys.executable, str(ROOT / "scripts" / "bench"), "--ceiling-child"),
                    *(str(path), "--threads", str(threads), "--decode-tokens", str(decode_tokens)),
                ],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            runs[q].append(json.loads(out.strip().splitlines()[-1]))
            log(f"round {i + 1}/{rounds} {q}: {runs[q][-1]}")
    keys = (
        *("prefill_tokens_per_s", "decode_tokens_per_s", "first_token_ms"),
        *("peak_rss_mb", "rss_anon_mb", "rss_file_mb"),
    )
    result: dict[str, Any] = {}
    for q, path in models.items():
        result[q] = {"file_mb": round(path.stat().st_size / 2**20, 1), "runs": runs[q]}
        result[q].update({k: round(statistics.median(r[k] for r in runs[q]), 2) for k in keys})
    base = result["Q4_K_M"]["decode_tokens_per_s"]
    for q in QUANTS:
        result[q]["decode_vs_q4_k_m"] = round(result[q]["decode_tokens_per_s"] / base, 2)
    return result


def print_quants(quants: dict[str, Any], threads: int) -> None:
    print(f"\nquantisations of the Qwen2.5-0.5B proxy, {threads} threads, {cpu_info()['cpu']}")
    print(
        f"{'quant':8} {'file MB':>8} {'peak RSS':>9} {'anon':>6} {'mapped':>7} "
        f"{'prefill t/s':>12} {'decode t/s':>11} "
        f"{'decode vs Q4_K_M':>17}"
    )
    for q in QUANTS:
        r = quants[q]
        print(
            f"{q:8} {r['file_mb']:>8} {r['peak_rss_mb']:>9} {r['rss_anon_mb']:>6} "
            f"{r['rss_file_mb']:>7} {r['prefill_tokens_per_s']:>12} "
            f"{r['decode_tokens_per_s']:>11} {r['decode_vs_q4_k_m']:>17}"
        )


# -- grammar: one request's schema against another's speed (issue 18) ---------------------------

# The worst schema found within the `format` bounds (docs/protocol.md): 256 picks from 127
# strings of 58 characters sharing a 55-character prefix (7.8 KB of the 8 KB allowed). With
# temperature 5 and top_k 0 the model's pick is refused at nearly every token, and each refusal
# checks the whole vocabulary against every string still open (SmolLM2's 49k tokens: ~24 ms a
# token, against ~9 ms for "json"; the 2,400 strings, now refused: 360-540 ms).
WORST_PREFIX = "a" * 55
WORST_SCHEMA: dict[str, Any] = {
    "type": "array",
    "minItems": 256,
    "maxItems": 256,
    "items": {"enum": [f"{WORST_PREFIX}{i:03d}" for i in range(127)]},
}
HOG = {"temperature": 5, "top_k": 0}  # sampling that makes the grammar refuse the most


def beside(plain: Client, second: Client, decode_n: int, fmt: Any) -> dict[str, float]:
    """Device `plain`'s decode rate while device `second` streams a request with `fmt` (None:
    the same request without a format)."""
    extra = {} if fmt is None else {"format": fmt}
    hog = second.send(
        "List words as JSON.", f"hog-{uuid.uuid4().hex[:6]}", 4 * decode_n, **HOG, **extra
    )
    while hog.first is None and not hog.finished.is_set():
        time.sleep(0.005)
    a = plain.send_cold(SHORT_PROMPT, decode_n)
    wait_all([a])
    streaming = not hog.finished.is_set()
    second.c.publish(
        f"{PREFIX}/{NODE}/cancel/{second.client_id}",
        json.dumps({"request_id": hog.request_id}),
        qos=1,
    )
    wait_all([hog])
    return {
        "tokens_per_s": a.decode_tps,
        "second_tokens": hog.completion_tokens,
        "second_streamed_throughout": float(streaming),
    }


def grammar_bench(args: argparse.Namespace) -> dict[str, Any]:
    model = args.model or proxy_model("Q4_K_M")
    decode_n = 32 if args.quick else 128
    machine = cpu_info()
    log(f"grammar: model {model.name}, {args.threads} threads, {args.rounds} rounds")
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="qwen-edge-bench-") as tmp:
        broker = Broker(Path(tmp) / "broker", BENCH_CONF)
        broker.start()
        daemon = Daemon(
            Path(tmp) / "daemon",
            broker,
            model,
            None,
            QWEN_EDGE_NODE_ID=NODE,
            QWEN_EDGE_MODEL__THREADS=str(args.threads),
            QWEN_EDGE_MODEL__SLOTS="2",
            QWEN_EDGE_MODEL__N_CTX="2048",
            QWEN_EDGE_LIMITS__REQUESTS_PER_MINUTE="0",
            QWEN_EDGE_FLEET__ENABLED="false",
        )
        try:
            daemon.start(ready_timeout=600)
            plain, second = Client(broker.port, "plain"), Client(broker.port, "second")
            plain.send("warm up", "warm", 4).finished.wait(300)
            for rnd in range(args.rounds):  # interleaved: drift of the machine cancels out
                r: dict[str, Any] = {
                    "beside_plain": beside(plain, second, decode_n, None),
                    "beside_schema": beside(plain, second, decode_n, WORST_SCHEMA),
                }
                r["ratio"] = r["beside_schema"]["tokens_per_s"] / r["beside_plain"]["tokens_per_s"]
                log(f"round {rnd + 1}/{args.rounds}: {json.dumps(r)}")
                rounds.append(r)
            plain.close()
            second.close()
        finally:
            daemon.stop()
            broker.stop()
    ratio = statistics.median(r["ratio"] for r in rounds)
    return {
        "machine": machine,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "model": model.name,
        "threads": args.threads,
        "decode_tokens": decode_n,
        "sampling_of_the_second": HOG,
        "schema": WORST_SCHEMA,
        "rounds": rounds,
        "beside_plain_tokens_per_s": summary([r["beside_plain"]["tokens_per_s"] for r in rounds]),
        "beside_schema_tokens_per_s": summary([r["beside_schema"]["tokens_per_s"] for r in rounds]),
        "ratio": round(ratio, 3),
        "ratio_met": ratio >= 0.8,
    }


def print_grammar(result: dict[str, Any]) -> None:
    print(
        f"\nqwen-edge grammar bench: {result['model']}, {result['threads']} threads, "
        f"{len(result['rounds'])} interleaved rounds, {result['decode_tokens']} tokens"
    )
    print(
        f"load average: {result['machine']['load_average']} before, "
        f"{result['load_average_after']} after"
    )
    print(f"device A (plain, temperature 0) beside device B ({json.dumps(HOG)}):")
    print(f"  beside B's plain request:      {fmt(result['beside_plain_tokens_per_s'])} tokens/s")
    print(f"  beside B's worst schema:       {fmt(result['beside_schema_tokens_per_s'])} tokens/s")
    met = "met" if result["ratio_met"] else "NOT met"
    print(f"  ratio (median of rounds):      {result['ratio']:.2f}x  (target >= 0.8x: {met})")
    kept = [r["beside_schema"]["second_streamed_throughout"] for r in result["rounds"]]
    print(f"  B still streaming when A ended: {sum(kept):.0f} of {len(kept)} rounds")
    text = json.dumps(result["schema"])
    print(f"  schema ({len(text)} bytes): {text[:160]}...")


# -- the command ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="scripts/bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", type=Path, help="GGUF model (default: the Qwen2.5-0.5B proxy)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (at least 3)")
    p.add_argument("--quick", action="store_true", help="short replies; still every figure")
    p.add_argument("--no-peer", action="store_true", help="skip llama-server")
    p.add_argument("--out", type=Path, default=ROOT / "bench-results" / "bench.json")
    p.add_argument("--fleet", action="store_true", help="fleet cost on a fake engine (see above)")
    p.add_argument("--fleet-sizes", type=int, nargs="+", default=[1, 4, 16], metavar="N")
    p.add_argument("--fleet-slots", type=int, default=4, help="--fleet: busy slots per node")
    p.add_argument("--fleet-interval", type=int, default=40, help="--fleet: ms per token")
    p.add_argument("--fleet-window", type=float, default=20.0, help="--fleet: seconds measured")
    p.add_argument("--quants", action="store_true", help="compare quantisations (see above)")
    p.add_argument("--grammar", action="store_true", help="worst format schema (see above)")
    p.add_argument("--decode-tokens", type=int, default=128, help=argparse.SUPPRESS)
    p.add_argument("--ceiling-child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.ceiling_child is not None:
        ceiling_child(args.ceiling_child, args.threads, args.decode_tokens)
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    show: Callable[[], None]
    if args.quants:
        result = quant_runs(args.threads, args.rounds, args.decode_tokens)
        args.out = args.out.with_name("quants.json")
        show = lambda: print_quants(result, args.threads)  # noqa: E731
    elif args.grammar:
        result = grammar_bench(args)
        args.out = args.out.with_name("grammar.json")
        show = lambda: print_grammar(result)  # noqa: E731
    elif args.fleet:
        result = fleet(args)
        args.out = args.out.with_name("fleet.json")
        show = lambda: print_fleet(result)  # noqa: E731
    else:
        if args.rounds < 3:
            p.error("--rounds: at least 3 (a median of fewer says little on a shared machine)")
        result = run(args)
        show = lambda: print_report(result)  # noqa: E731
    args.out.write_text(json.dumps(result, indent=2))
    show()
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
