"""What a node's memory goes to, and what it runs within a budget (`model.memory_mb`).

A pure function of the settings and two facts of the model file (its size, and how many K and V
values one token holds in the cache), so that the daemon and `qwen-edge doctor` make the same
choice and tests can check it without a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from ..settings import ModelSettings

MIB: Final = 1024 * 1024
# What the daemon holds beyond the model file, the KV cache and the kept-KV store, measured on the
# Qwen2.5-0.5B Q4_K_M proxy, 4 slots, n_batch 128 (docs/performance.md, "Memory"): llama.cpp's
# vocabulary (~46 MiB for Qwen's 151,936 tokens), Python and its libraries (~36 MiB), their
# shared libraries' pages (~28 MiB), the repacked copy of some weights (~28 MiB), compute and
# output buffers (~12 MiB). Rounded up: a budget is a ceiling.
RUNTIME_OVERHEAD: Final = 150 * MIB
# Bytes per KV cache element: q8_0 is 32 values in 34 bytes.
KV_ELEMENT_BYTES: Final[dict[str, float]] = {"f16": 2.0, "q8_0": 34 / 32}
# q8_0 blocks of 32 values must divide a K/V head's width.
Q8_0_BLOCK: Final = 32
# The smallest context a budget may shrink a conversation's window to (tokens).
MIN_CTX: Final = 512

KvType = Literal["f16", "q8_0"]


class BudgetError(ValueError):
    """Nothing fits the budget; the message names the setting and what would fit."""


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    """Slots, context, KV precision and kept-KV store the node runs with, and what they cost."""

    slots: int
    n_ctx: int  # tokens per conversation
    kv_cache_type: KvType
    kv_keep_mb: int
    model_bytes: int
    kv_bytes: int  # the KV cache of every slot
    budget_mb: int | None  # model.memory_mb, None: the settings as they are

    @property
    def need_bytes(self) -> int:
        return self.model_bytes + self.kv_bytes + self.kv_keep_mb * MIB + RUNTIME_OVERHEAD

    def apply(self, model: ModelSettings) -> ModelSettings:
        """`model` with what this plan chose."""
        return model.model_copy(
            update={
                "slots": self.slots,
                "n_ctx": self.n_ctx,
                "kv_cache_type": self.kv_cache_type,
                "kv_keep_mb": self.kv_keep_mb,
            }
        )


def kv_cache_bytes(kv_elements_per_token: int, kv_type: str, slots: int, n_ctx: int) -> int:
    return int(slots * n_ctx * kv_elements_per_token * KV_ELEMENT_BYTES[kv_type])


def plan_memory(
    model: ModelSettings, model_bytes: int, kv_elements_per_token: int, head_dim: int
) -> MemoryPlan:
    """The settings as they are without `memory_mb` (a q8_0 KV cache llama.cpp cannot make
    becomes f16); with it, the most of them that fits.

    `kv_elements_per_token`: K and V values of every layer for one token; `head_dim`: the width
    of a K or V head (q8_0 needs a multiple of 32).

    slots, n_ctx and kv_keep_mb are then upper bounds. What gives way first costs least: the KV
    cache goes to q8_0 (half the memory, a few per cent of decode speed; needs flash attention),
    then the kept-KV store shrinks to what is left (follow-up turns of conversations that lost
    their slot re-read their history), then slots go (fewer concurrent replies), and last the
    context window halves, down to MIN_CTX tokens.
    """

    def make(kv_type: KvType, slots: int, n_ctx: int, keep_mb: int) -> MemoryPlan:
        kv = kv_cache_bytes(kv_elements_per_token, kv_type, slots, n_ctx)
        return MemoryPlan(slots, n_ctx, kv_type, keep_mb, model_bytes, kv, model.memory_mb)

    # llama.cpp quantises V only with flash attention, and K and V by whole blocks of a head.
    q8_possible = model.flash_attn and head_dim % Q8_0_BLOCK == 0
    wanted_type: KvType = model.kv_cache_type if q8_possible else "f16"
    wanted = make(wanted_type, model.slots, model.n_ctx, model.kv_keep_mb)
    if model.memory_mb is None:
        return wanted
    budget = model.memory_mb * MIB
    if wanted.need_bytes <= budget:
        return wanted

    kv_type: KvType = "q8_0" if q8_possible else "f16"
    q8 = make(kv_type, model.slots, model.n_ctx, model.kv_keep_mb)
    if q8.need_bytes <= budget:
        return q8
    # From here the kept-KV store gets whatever is left, up to kv_keep_mb.
    n_ctx = model.n_ctx
    candidates = [(slots, n_ctx) for slots in range(model.slots, 0, -1)]
    while n_ctx > MIN_CTX:
        n_ctx = max(MIN_CTX, n_ctx // 2)
        candidates.append((1, n_ctx))
    for slots, ctx in candidates:
        bare = make(kv_type, slots, ctx, 0)
        spare_mb = (budget - bare.need_bytes) // MIB
        if spare_mb >= 0:
            return make(kv_type, slots, ctx, min(model.kv_keep_mb, spare_mb))
    smallest = make(kv_type, 1, min(model.n_ctx, MIN_CTX), 0)
    raise BudgetError(
        f"invalid setting QWEN_EDGE_MODEL__MEMORY_MB: {model.memory_mb} MiB does not hold "
        f"{model.path.name} with even 1 slot x {smallest.n_ctx} tokens (needs "
        f"~{-(-smallest.need_bytes // MIB)} MiB); raise it or use a smaller model"
    )
