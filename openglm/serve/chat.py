"""Chat prompts for `/v1/chat/completions`: a conversation becomes one completion prompt.

A ChatGLM-6B checkpoint (its tokenizer has ChatGLM's `prompt_layout`) gets ChatGLM-6B's own
template, as its `chat()` builds it: the first question alone, else every earlier exchange as
`[Round i]\\n问：{question}\\n答：{answer}\\n` (i from 0) and then `[Round n]\\n问：{question}\\n答：`.
Every other model gets `User: {question}\\nAssistant: {answer}\\n` per exchange and then
`User: {question}\\nAssistant:`. ChatGLM-6B has no system role: system messages (only before the
first user message) are joined by newlines and put before the conversation with a blank line
(`"{system}\\n\\n"`) in both templates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class TemplateError(ValueError):
    """A conversation no template can lay out; `param` names the message at fault."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _exchanges(messages: Sequence[ChatMessage]) -> tuple[str, list[tuple[str, str]], str]:
    """System text, the earlier (question, answer) pairs, the last question."""
    system: list[str] = []
    turns: list[str] = []
    for i, message in enumerate(messages):
        if message.role == "system":
            if turns:
                raise TemplateError(
                    f"messages[{i}]: a system message must come before the first user message", f"messages[{i}].role"
                )
            system.append(message.content)
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if message.role != expected:
            raise TemplateError(
                f"messages[{i}]: expected a {expected} message (user and assistant take turns), got {message.role}",
                f"messages[{i}].role",
            )
        turns.append(message.content)
    if len(turns) % 2 == 0:
        raise TemplateError("messages must end with a user message", "messages")
    pairs = [(turns[k], turns[k + 1]) for k in range(0, len(turns) - 1, 2)]
    return "\n".join(system), pairs, turns[-1]


def chat_prompt(messages: Sequence[ChatMessage], chatglm: bool) -> str:
    """The completion prompt of a conversation (see the module docstring)."""
    system, pairs, question = _exchanges(messages)
    if chatglm:
        if pairs:
            history = "".join(f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(pairs))
            conversation = f"{history}[Round {len(pairs)}]\n问：{question}\n答："
        else:
            conversation = question
    else:
        conversation = "".join(f"User: {q}\nAssistant: {a}\n" for q, a in pairs) + f"User: {question}\nAssistant:"
    return f"{system}\n\n{conversation}" if system else conversation
