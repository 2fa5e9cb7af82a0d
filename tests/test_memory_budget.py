"""model.memory_mb: what a node runs within a memory budget (qwen_edge/node/budget.py), and a real
daemon that honours it."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devtools.harness import QWEN_TINY, Broker, Daemon
from qwen_edge.node.budget import (
    MIB,
    MIN_CTX,
    RUNTIME_OVERHEAD,
    BudgetError,
    kv_cache_bytes,
    plan_memory,
)
from qwen_edge.settings import ModelSettings
from qwen_edge.tools.doctor import ModelFacts, check_memory, meminfo

from .test_doctor import doctor

# Qwen2.5-0.5B-Instruct Q4_K_M: 379 MB, 24 layers x 2 KV heads x 64 dims, K and V.
QWEN_05B_BYTES = 379 * 1000 * 1000
QWEN_05B_KV = 2 * 24 * 2 * 64


def test_without_a_budget_the_settings_are_used_as_they_are() -> None:
    settings = ModelSettings(slots=4, n_ctx=4096, kv_cache_type="f16", kv_keep_mb=64)
    p = plan_memory(settings, QWEN_05B_BYTES, QWEN_05B_KV, 64)
    assert (p.slots, p.n_ctx, p.kv_cache_type, p.kv_keep_mb) == (4, 4096, "f16", 64)
    assert p.budget_mb is None
    # 12 KiB a token in F16: 4 x 4,096 tokens are 192 MiB.
    assert p.kv_bytes == 192 * MIB
    assert p.need_bytes == QWEN_05B_BYTES + 192 * MIB + 64 * MIB + RUNTIME_OVERHEAD


def test_a_budget_that_holds_the_settings_changes_nothing() -> None:
    settings = ModelSettings(slots=4, kv_cache_type="f16", kv_keep_mb=64, memory_mb=2000)
    p = plan_memory(settings, QWEN_05B_BYTES, QWEN_05B_KV, 64)
    assert (p.slots, p.n_ctx, p.kv_cache_type, p.kv_keep_mb) == (4, 4096, "f16", 64)
    assert p.budget_mb == 2000


def test_a_tighter_budget_gives_up_kv_precision_first() -> None:
    settings = ModelSettings(slots=4, kv_cache_type="f16", kv_keep_mb=64, memory_mb=700)
    p = plan_memory(settings, QWEN_05B_BYTES, QWEN_05B_KV, 64)
    assert (p.slots, p.n_ctx, p.kv_cache_type, p.kv_keep_mb) == (4, 4096, "q8_0", 64)
    assert p.kv_bytes == kv_cache_bytes(QWEN_05B_KV, "q8_0", 4, 4096) == 102 * MIB


def test_then_the_kept_kv_store_then_slots_then_context() -> None:
    model = QWEN_05B_BYTES / MIB  # ~361 MiB
    runtime = RUNTIME_OVERHEAD / MIB
    q8_4x4096 = 102
    # Room for the q8_0 KV cache of 4 slots and 20 MiB of kept KV.
    p = plan_memory(
        ModelSettings(slots=4, memory_mb=int(model + runtime + q8_4x4096 + 21)),
        QWEN_05B_BYTES,
        QWEN_05B_KV,
        64,
    )
    assert (p.slots, p.n_ctx, p.kv_cache_type) == (4, 4096, "q8_0")
    assert 19 <= p.kv_keep_mb <= 21
    # Less than the KV cache of 4 slots: 3 slots, whatever is left kept.
    p = plan_memory(
        ModelSettings(slots=4, memory_mb=int(model + runtime + q8_4x4096 - 5)),
        QWEN_05B_BYTES,
        QWEN_05B_KV,
        64,
    )
    assert (p.slots, p.n_ctx, p.kv_cache_type) == (3, 4096, "q8_0")
    assert 0 < p.kv_keep_mb < 64
    # Not even one slot of 4,096 tokens: a smaller window.
    p = plan_memory(
        ModelSettings(slots=4, memory_mb=int(model + runtime + 20)), QWEN_05B_BYTES, QWEN_05B_KV, 64
    )
    assert (p.slots, p.n_ctx, p.kv_cache_type) == (1, 2048, "q8_0")


def test_without_flash_attention_the_kv_cache_stays_f16() -> None:
    # llama.cpp cannot quantise V without flash attention, so slots give way instead.
    settings = ModelSettings(slots=4, kv_keep_mb=64, memory_mb=650, flash_attn=False)
    p = plan_memory(settings, QWEN_05B_BYTES, QWEN_05B_KV, 64)
    assert (p.slots, p.kv_cache_type) == (2, "f16")
    assert 0 < p.kv_keep_mb < 64
    # Nor can it quantise heads whose width 32 does not divide; without a budget either.
    assert plan_memory(ModelSettings(), QWEN_05B_BYTES, QWEN_05B_KV, 80).kv_cache_type == "f16"


def test_a_budget_too_small_for_the_model_names_the_setting() -> None:
    with pytest.raises(BudgetError, match="QWEN_EDGE_MODEL__MEMORY_MB: 400 MiB") as err:
        plan_memory(ModelSettings(memory_mb=400), QWEN_05B_BYTES, QWEN_05B_KV, 64)
    assert f"1 slot x {MIN_CTX} tokens" in str(err.value)


def test_a_2_gb_pi_runs_four_slots_of_the_real_model_in_1200_mb() -> None:
    p = plan_memory(ModelSettings(slots=4, memory_mb=1200), QWEN_05B_BYTES, QWEN_05B_KV, 64)
    assert (p.slots, p.n_ctx, p.kv_cache_type, p.kv_keep_mb) == (4, 4096, "q8_0", 24)
    assert p.need_bytes <= 1200 * MIB


@given(
    budget=st.integers(64, 8000),
    slots=st.integers(1, 16),
    n_ctx=st.integers(256, 32768),
    keep=st.integers(0, 4096),
    q8=st.booleans(),
    fa=st.booleans(),
    model_mb=st.integers(1, 4000),
    kv_per_token=st.integers(1, 400_000),
    head_dim=st.sampled_from([16, 32, 64, 80, 128, 256]),
)
def test_a_plan_always_fits_its_budget_and_never_exceeds_the_settings(
    *,
    budget: int,
    slots: int,
    n_ctx: int,
    keep: int,
    q8: bool,
    fa: bool,
    model_mb: int,
    kv_per_token: int,
    head_dim: int,
) -> None:
    settings = ModelSettings(
        slots=slots,
        n_ctx=n_ctx,
        kv_keep_mb=keep,
        kv_cache_type="q8_0" if q8 and fa else "f16",
        flash_attn=fa,
        memory_mb=budget,
    )
    try:
        p = plan_memory(settings, model_mb * MIB, kv_per_token, head_dim)
    except BudgetError:
        # Only when not even the smallest configuration fits.
        smallest = plan_memory(
            settings.model_copy(
                update={
                    "slots": 1,
                    "n_ctx": min(n_ctx, MIN_CTX),
                    "kv_keep_mb": 0,
                    "kv_cache_type": "q8_0" if fa and head_dim % 32 == 0 else "f16",
                    "memory_mb": None,
                }
            ),
            model_mb * MIB,
            kv_per_token,
            head_dim,
        )
        assert smallest.need_bytes > budget * MIB
        return
    assert p.need_bytes <= budget * MIB
    assert 1 <= p.slots <= slots
    assert min(n_ctx, MIN_CTX) <= p.n_ctx <= n_ctx
    assert 0 <= p.kv_keep_mb <= keep
    if not q8 and (not fa or head_dim % 32):  # llama.cpp could not quantise this cache
        assert p.kv_cache_type == "f16"


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
