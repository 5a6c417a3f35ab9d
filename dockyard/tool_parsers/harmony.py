"""OpenAI's harmony format (gpt-oss): the reasoning channel, the final answer and tool calls.

After a prompt that ends in ``<|start|>assistant``, gpt-oss writes messages of the form
``<|channel|>CHANNEL[ to=RECIPIENT][ <|constrain|>json]<|message|>BODY`` ended by ``<|end|>``, ``<|call|>``
(a tool call) or ``<|return|>`` (the last), each later one opened by ``<|start|>assistant``; a
recipient may also follow the role. Channel ``analysis`` is the reasoning, ``final`` the answer,
``commentary`` with ``to=functions.NAME`` a call of NAME whose arguments are the body, and
``commentary`` without a recipient a preamble shown as content.

openai-harmony's own parser works on token ids of its ``o200k_harmony`` encoding, whose vocabulary
file it downloads on first use; this reader works on the detokenized text (special tokens kept) of
whichever tokenizer the checkpoint ships, so it runs offline and on every gpt-oss checkpoint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dockyard.tool_parsers.base import ParsedCall, ParsedOutput, ToolParser, held_back

START, CHANNEL, MESSAGE = "<|start|>", "<|channel|>", "<|message|>"
ENDS = ("<|end|>", "<|call|>", "<|return|>")
_RECIPIENT = re.compile(r"\bto=(\S+?)(?=\s|<\||$)")
_CHANNEL = re.compile(re.escape(CHANNEL) + r"\s*(\w+)")
FUNCTIONS = "functions."


@dataclass
class HarmonyMessage:
    """One message of the output; ``channel`` None while its header is still being generated."""

    channel: str | None
    recipient: str | None
    body: str
    complete: bool


def read_messages(text: str, final: bool) -> list[HarmonyMessage]:
    """The messages in ``text``; while not final, a body's tail that may start an end marker is held back."""
    messages: list[HarmonyMessage] = []
    for segment in text.split(START):
        if not segment and not messages:
            continue
        head, sep, body = segment.partition(MESSAGE)
        if not sep:
            messages.append(HarmonyMessage(None, None, "", False))
            break
        channel = _CHANNEL.search(head)
        recipient = _RECIPIENT.search(head)
        ends = [body.find(e) for e in ENDS if e in body]
        complete = bool(ends)
        if complete:
            body = body[:min(ends)]
        elif not final:
            body = body[:len(body) - max(held_back(body, e) for e in ENDS)]
        messages.append(HarmonyMessage(channel.group(1) if channel else "", recipient.group(1) if recipient else None,
                                       body, complete))
    return messages


def is_harmony(text: str) -> bool:
    """Whether the text is in harmony's format at all (its first message header is there or on its way)."""
    stripped = text.lstrip()
    return stripped.startswith(CHANNEL) or CHANNEL.startswith(stripped) or (MESSAGE in text and CHANNEL in text)


def content_of(messages: list[HarmonyMessage]) -> str:
    """The text the user sees: final answers and commentary preambles (messages to no one)."""
    return "".join(m.body for m in messages
                   if m.channel == "final" or (m.channel == "commentary" and m.recipient is None))


class OpenAIToolParser(ToolParser):
    """gpt-oss tool calls: harmony ``commentary`` messages to ``functions.NAME``."""

    name = "openai"
    needs_special_tokens = True
    reads_raw_output = True

    def parse(self, text: str, final: bool) -> ParsedOutput:
        if not is_harmony(text):
            return ParsedOutput(text)
        messages = read_messages(text, final)
        out = ParsedOutput(content_of(messages))
        for m in messages:
            if m.channel is None or m.recipient is None or not m.recipient.startswith(FUNCTIONS):
                continue
            out.calls.append(ParsedCall(m.recipient[len(FUNCTIONS):], m.body, m.complete))
        return out
