"""A tool conversation's turns in the chat template's roles: the results a request brings (in
the `tool` role, answering the calls of the conversation's last reply), and the assistant's
answer (its text, or its `tool_calls`). Called by the scheduler once per request."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..protocol import ChatRequest
from ..toolcalls import ToolCall
from .conversations import Message

if TYPE_CHECKING:  # the engine module loads llama.cpp; this one stays free of it
    from .decoder import EngineLike


class UnknownResult(ValueError):
    """A tool result that answers no call of the conversation's last reply."""


def results_messages(req: ChatRequest, pending: dict[str, str]) -> list[Message]:
    """The new turn's messages for a request with tool_results: each result in the `tool`
    role, then the user's message if any. `pending`: the calls ({id: name}) the
    conversation's last reply ended with. Raises UnknownResult."""
    assert req.tool_results is not None
    seen: set[str] = set()
    messages: list[Message] = []
    for result in req.tool_results:
        call_id = result.tool_call_id
        name = pending.get(call_id)
        if name is None:
            raise UnknownResult(
                f"tool_results: tool_call_id {call_id!r} is no call of this conversation's "
                "last reply"
            )
        if call_id in seen:
            raise UnknownResult(f"tool_results: tool_call_id {call_id!r} is answered twice")
        seen.add(call_id)
        messages.append(
            {"role": "tool", "tool_call_id": call_id, "name": name, "content": result.content}
        )
    if req.message is not None:
        messages.append({"role": "user", "content": req.message})
    return messages


def answer(reply: str, calls: list[ToolCall] | None) -> Message:
    """The assistant's message: its text, or (with no text) the calls it made."""
    if calls is None:
        return {"role": "assistant", "content": reply}
    return {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            }
            for c in calls
        ],
    }


def renderer(engine: EngineLike, req: ChatRequest) -> Callable[[list[Message]], list[int]]:
    """The prompt renderer for a request: with its tools shown when the model may call them
    (not under tool_choice none), else the engine's plain one."""
    if req.tools is None or req.tool_choice == "none":
        return engine.chat_prompt
    return functools.partial(engine.chat_prompt, tools=[t.wire() for t in req.tools])
