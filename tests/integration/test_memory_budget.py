"""model.memory_mb: what a node runs within a memory budget (qwen_edge/node/budget.py), and a real
daemon that honours it."""

from __future__ import annotations

from pathlib import Path

from devtools.harness import QWEN_TINY, Broker, Daemon
from qwen_edge.node.budget import (
    MIB,
    RUNTIME_OVERHEAD,
    plan_memory,
)
from qwen_edge.settings import ModelSettings
from qwen_edge.tools.doctor import ModelFacts, check_memory, meminfo

from .test_doctor import doctor

# Qwen2.5-0.5B-Instruct Q4_K_M: 379 MB, 24 layers x 2 KV heads x 64 dims, K and V.
QWEN_05B_BYTES = 379 * 1000 * 1000
QWEN_05B_KV = 2 * 24 * 2 * 64


def test_doctor_says_what_the_budget_chose() -> None:
    facts = ModelFacts(size=QWEN_05B_BYTES, kv_elements_per_token=QWEN_05B_KV, head_dim=64)
    mem = meminfo("MemTotal: 1900000 kB\nMemAvailable: 1500000 kB\n")
    check = check_memory(ModelSettings(slots=4, memory_mb=700), facts, mem)
    assert check.detail.startswith(
        "memory_mb 700 -> 4 slots x 4096 tokens, KV q8_0, kept KV 24 MiB; needs ~"
    )
    assert "KV cache 102 for 4 x 4096 tokens q8_0" in check.detail
    too_small = check_memory(ModelSettings(memory_mb=300), facts, mem)
    assert "QWEN_EDGE_MODEL__MEMORY_MB" in too_small.detail
    assert too_small.fix == "raise [model] memory_mb"


def test_the_daemon_runs_what_memory_mb_lets_it(broker: Broker, tmp_path: Path) -> None:
    # The tiny Qwen model: 24 MiB, 2 layers x 2 KV heads x 16 dims, so 256 bytes of F16 KV a
    # token (its 16-wide heads cannot be q8_0). 8 slots x 32,768 tokens would need 64 MiB of KV;
    # a budget of model + runtime + 20 MiB holds fewer slots.
    budget = int(QWEN_TINY.stat().st_size / MIB + RUNTIME_OVERHEAD / MIB + 20)
    settings = {
        "QWEN_EDGE_MODEL__SLOTS": "8",
        "QWEN_EDGE_MODEL__N_CTX": "32768",
        "QWEN_EDGE_MODEL__MEMORY_MB": str(budget),
    }
    d = Daemon(tmp_path / "node", broker, QWEN_TINY, **settings)
    d.start()
    try:
        events = d.log_events()
        _, checks, _ = doctor(broker.port, QWEN_EDGE_MODEL__PATH=str(QWEN_TINY), **settings)
    finally:
        d.stop()
    chosen = next(e for e in events if e.get("event") == "memory_plan")
    expected = plan_memory(
        ModelSettings(path=QWEN_TINY, slots=8, n_ctx=32768, memory_mb=budget),
        QWEN_TINY.stat().st_size,
        2 * 2 * (16 + 16),
        16,
    )
    assert expected.slots < 8
    assert chosen == {
        "event": "memory_plan",
        "budget_mb": budget,
        "slots": expected.slots,
        "n_ctx": expected.n_ctx,
        "kv_cache_type": "f16",
        "kv_keep_mb": expected.kv_keep_mb,
        "need_mb": round(expected.need_bytes / MIB),
        "level": "info",
        "timestamp": chosen["timestamp"],
    }
    loaded = next(e for e in events if e.get("event") == "model_loaded")
    assert loaded["slots"] == expected.slots
    assert loaded["n_ctx_seq"] == expected.n_ctx
    # doctor reads the same file and says the same.
    assert checks["memory"]["detail"].startswith(
        f"memory_mb {budget} -> {expected.slots} slots x {expected.n_ctx} tokens, KV f16, "
        f"kept KV {expected.kv_keep_mb} MiB; needs ~{round(expected.need_bytes / MIB)} MiB"
    )
