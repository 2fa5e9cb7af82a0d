"""The engine's greedy sampler against llama.cpp's own, on real models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from devtools.harness import QWEN_TINY, SMOLLM
from qwen_edge.node.decoder import Row, SamplingParams
from qwen_edge.node.engine import Engine, GreedySampler, Sampler
from qwen_edge.settings import ModelSettings

GREEDY = SamplingParams(0, 1, 0, 0, 1, 0, 0)
PROMPTS = ["What is the capital of France?", "Count from one to ten.", "用中文说你好。"]


@pytest.fixture(scope="module", params=[SMOLLM, QWEN_TINY], ids=["smollm2", "qwen2-vocab"])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    path: Path = request.param
    engine = Engine(ModelSettings(path=path, n_ctx=512, slots=3, threads=1))
    yield engine
    engine.close()


def test_temperature_zero_gets_the_argmax_sampler(engine: Engine) -> None:
    assert isinstance(engine.new_sampler(GREEDY), GreedySampler)
    warm = engine.new_sampler(SamplingParams(0.7, 0.9, 40, 0.05, 1.1, 64, 1))
    assert type(warm) is Sampler
    warm.close()


def test_greedy_picks_what_llama_cpps_greedy_sampler_picks(engine: Engine) -> None:
    """Three sequences decoded side by side (so the logits rows are not the batch's last), each
    step's pick compared with llama.cpp's greedy chain on the same logits."""
    ours = engine.new_sampler(GREEDY)
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
    try:
        prompts = [engine.chat_prompt([{"role": "user", "content": p}]) for p in PROMPTS]
        for seq in range(len(prompts)):
            engine.forget(seq)
        rows = [Row(seq, p, 0, True) for seq, p in enumerate(prompts)]
        positions = [len(p) for p in prompts]
        steps = 0
        for _ in range(40):
            indices = engine.decode(rows)
            rows = []
            for seq, index in enumerate(indices):
                token = ours.sample(index)
                assert token == llama_cpp.llama_sampler_sample(chain, engine.ctx, index)
                rows.append(Row(seq, (token,), positions[seq], True))
                positions[seq] += 1
                steps += 1
        assert steps == 120
    finally:
        ours.close()
        llama_cpp.llama_sampler_free(chain)


def test_a_tie_goes_to_the_lowest_token_id_as_in_llama_cpp(engine: Engine) -> None:
    engine.forget(0)
    index = engine.decode([Row(0, (1, 2, 3), 0, True)])[0]
    logits = np.ctypeslib.as_array(
        llama_cpp.llama_get_logits_ith(engine.ctx, index), shape=(engine.n_vocab,)
    )
    logits[:] = -1.0
    logits[[7, 500, 3000]] = 5.0
    assert engine.new_sampler(GREEDY).sample(index) == 7
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
    assert llama_cpp.llama_sampler_sample(chain, engine.ctx, index) == 7
    llama_cpp.llama_sampler_free(chain)
