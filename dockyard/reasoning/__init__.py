"""Reasoning parsers: split what a thinking model writes into ``reasoning_content`` and ``content``.

``--reasoning-parser NAME`` picks one of :data:`REASONING_PARSERS` (vLLM's names). A parser is called,
like a tool-call parser, on the whole text so far with ``final`` saying whether generation has ended;
while not final both parts only grow (a tail that may be the start of a marker is held back), so the
streamed deltas add up to the non-streamed split.

- ``deepseek_r1``: ``<think>`` ... ``</think>`` then the answer. The output starts inside the reasoning
  (R1's template opens ``<think>`` in the prompt, and a ``<think>`` the model writes itself is dropped);
  an output without ``</think>`` is all reasoning.
- ``qwen3``: the same markers, but the output starts inside the reasoning only when the prompt left a
  ``<think>`` open or the output opens one; otherwise (``enable_thinking: false``, whose template
  closes an empty think block in the prompt) the whole output is content.
- ``openai``: gpt-oss's harmony channels: ``analysis`` is the reasoning, ``final`` the content.
"""

from __future__ import annotations

from dataclasses import dataclass

from dockyard.errors import ConfigError
from dockyard.tool_parsers.base import held_back
from dockyard.tool_parsers.harmony import content_of, is_harmony, read_messages


@dataclass
class ReasoningSplit:
    """The reasoning and the content of an output so far; ``ended``: the reasoning section is over."""

    reasoning: str
    content: str
    ended: bool


class ReasoningParser:
    """Base class: ``split(text, final)`` → :class:`ReasoningSplit`; made per request with its prompt.

    ``START`` / ``END``: the text that opens and the text that ends the reasoning section. A constrained
    request gets their token ids (``StructuredOutputsParams.reasoning_*_token_ids``), so that its grammar
    starts where the reasoning ends."""

    name: str = ""
    needs_special_tokens: bool = False
    START: str | None = None
    END: str = ""

    def __init__(self, prompt: str = "") -> None:
        self.prompt = prompt

    def split(self, text: str, final: bool) -> ReasoningSplit:
        raise NotImplementedError


class ThinkTagReasoningParser(ReasoningParser):
    """``<think>reasoning</think>content`` (DeepSeek-R1 and the models trained like it)."""

    name = "deepseek_r1"
    START, END = "<think>", "</think>"

    def starts_in_reasoning(self, text: str, final: bool) -> bool | None:
        """Whether the output begins inside the reasoning (None: cannot tell yet)."""
        return True

    def split(self, text: str, final: bool) -> ReasoningSplit:
        inside = self.starts_in_reasoning(text, final)
        if inside is None:
            return ReasoningSplit("", "", False)
        if not inside:
            return ReasoningSplit("", text, True)
        head = text.lstrip()
        if not final and head and len(head) < len(self.START) and self.START.startswith(head):
            return ReasoningSplit("", "", False)  # the opening tag may be on its way
        body = head[len(self.START):] if head.startswith(self.START) else text
        end = body.find(self.END)
        if end >= 0:
            return ReasoningSplit(body[:end], body[end + len(self.END):], True)
        if final:
            return ReasoningSplit(body, "", False)
        return ReasoningSplit(body[:len(body) - held_back(body, self.END)], "", False)


class Qwen3ReasoningParser(ThinkTagReasoningParser):
    """Qwen3: think tags, reasoning only when a think block is open (``enable_thinking`` decides)."""

    name = "qwen3"

    def starts_in_reasoning(self, text: str, final: bool) -> bool | None:
        if self.prompt.rfind(self.START) > self.prompt.rfind(self.END):
            return True  # the template opened the think block
        head = text.lstrip()
        if head.startswith(self.START):
            return True
        if not final and self.START.startswith(head):
            return None
        return False


class HarmonyReasoningParser(ReasoningParser):
    """gpt-oss: the ``analysis`` channel is the reasoning, the ``final`` channel the content."""

    name = "openai"
    needs_special_tokens = True
    # An assistant turn begins in the prompt; its final channel is the answer.
    START, END = "<|start|>assistant", "<|channel|>final<|message|>"

    def split(self, text: str, final: bool) -> ReasoningSplit:
        if not is_harmony(text):
            return ReasoningSplit("", text, True)
        messages = read_messages(text, final)
        reasoning = "".join(m.body for m in messages if m.channel == "analysis")
        ended = any(m.channel not in (None, "analysis") for m in messages)
        return ReasoningSplit(reasoning, content_of(messages), ended)


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {cls.name: cls for cls in (
    ThinkTagReasoningParser, Qwen3ReasoningParser, HarmonyReasoningParser)}


def reasoning_parser_class(name: str) -> type[ReasoningParser]:
    """The parser class registered as ``name``; a ConfigError listing the known names otherwise."""
    cls = REASONING_PARSERS.get(name)
    if cls is None:
        raise ConfigError(f"--reasoning-parser {name!r} is not a known reasoning parser; use one of "
                          f"{', '.join(sorted(REASONING_PARSERS))}")
    return cls
