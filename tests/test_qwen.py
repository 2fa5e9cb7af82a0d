"""Qwen's tokenizer and chat template through the daemon: a tiny random-weight qwen2 model built
around the real Qwen2 vocabulary (scripts/make-model --shape tiny). Its text is noise, but its
tokens are Qwen's: byte-level BPE pieces, whole CJK characters and split ones."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.harness import QWEN_TINY, Broker, Daemon, Probe, reply_text


@pytest.fixture(scope="module")
def qwen(module_broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Probe]:
    d = Daemon(tmp_path_factory.mktemp("qwen"), module_broker, QWEN_TINY)
    d.start()
    probe = Probe(module_broker, "kiosk")
    probe.subscribe(probe.reply_topic("zh"), probe.reply_topic("default"))
    yield probe
    probe.close()
    d.stop()


@pytest.fixture(scope="module")
def reference() -> Any:
    from llama_cpp import Llama

    return Llama(model_path=str(QWEN_TINY), n_ctx=2048, flash_attn=True, verbose=False)


@pytest.mark.smoke
@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "你好，请介绍一下你自己。"}],
        [
            {"role": "system", "content": "你是一个乐于助人的助手。"},
            {"role": "user", "content": "上海的天气怎么样？"},
        ],
        [{"role": "user", "content": "Mixed 中文 and English, emoji 🚀 too."}],
    ],
)
def test_greedy_reply_equals_create_chat_completion_on_qwen(
    qwen: Probe, reference: Any, messages: list[dict[str, str]]
) -> None:
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    rid = qwen.request(
        messages[-1]["content"],
        conversation_id="zh",
        reset=True,
        max_tokens=40,
        temperature=0,
        **({"system": system} if system else {}),
    )
    ours = qwen.collect(rid)
    ref = reference.create_chat_completion(messages=messages, temperature=0, max_tokens=40)
    assert reply_text(ours) == ref["choices"][0]["message"]["content"]
    assert ours[-1]["usage"]["prompt_tokens"] == ref["usage"]["prompt_tokens"]
    assert ours[-1]["usage"]["completion_tokens"] == ref["usage"]["completion_tokens"]


def test_qwen_chat_template_wraps_the_prompt_in_chatml(qwen: Probe, reference: Any) -> None:
    """Without a system prompt the model's own template supplies its default system turn."""
    rid = qwen.request("你好", conversation_id="zh", reset=True, max_tokens=1, temperature=0)
    prompt_tokens = qwen.collect(rid)[-1]["usage"]["prompt_tokens"]
    rendered = reference.tokenize(
        b"<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
        b"<|im_start|>user\n\xe4\xbd\xa0\xe5\xa5\xbd<|im_end|>\n<|im_start|>assistant\n",
        add_bos=False,
        special=True,
    )
    assert prompt_tokens == len(rendered)


@pytest.mark.smoke
def test_sampled_chinese_stream_is_whole_characters(qwen: Probe, tmp_path: Path) -> None:
    """High-temperature sampling over Qwen's 151k tokens emits partial-character byte tokens;
    every chunk must still be complete UTF-8 characters, never U+FFFD."""
    chunks: list[str] = []
    for seed in range(3):
        rid = qwen.request(
            "写一首关于春天的诗。",
            conversation_id="zh",
            reset=True,
            max_tokens=120,
            temperature=1.5,
            top_k=0,
            top_p=1.0,
            seed=seed,
        )
        msgs = qwen.collect(rid)
        assert msgs[-1]["type"] == "done"
        chunks += [m["text"] for m in msgs if m["type"] == "chunk"]
    text = "".join(chunks)
    assert "\ufffd" not in text
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text)
    for chunk in chunks:
        assert chunk == chunk.encode("utf-8").decode("utf-8")
        assert not any("\ud800" <= ch <= "\udfff" for ch in chunk)
    # On the wire too: every payload is valid UTF-8 JSON.
    for _, payload in qwen.raw:
        json.loads(payload.decode("utf-8"))
