"""What every tool-call parser returns, and the streamer that turns successive parses into OpenAI deltas.

A parser reads the text a model generated and splits it into ``content`` (what the user should see)
and tool calls (a name and the arguments' JSON text). It is called on the whole text so far, again
after every new piece, with ``final`` saying whether generation has ended. While not final it must
be *monotonic*: the content it reports and each call's arguments only ever grow (text that could
still turn out to start a tool call is held back), and a call's name is reported only once complete.
:class:`ToolCallStreamer` relies on that to send only what is new (OpenAI's shape: a call's ``id``
and ``name`` first, then its arguments in pieces), so the deltas of a stream add up to what a
non-streamed parse of the same text returns.

The arguments text is the span of the model's own output that holds them (valid JSON once the call
is complete), not a re-serialisation: that is what makes the streamed pieces add up.
"""

from __future__ import annotations

import json
import secrets
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

_decoder = json.JSONDecoder()
_WHITESPACE = " \t\r\n"


@dataclass
class ParsedCall:
    """One tool call as far as the text shows it."""

    name: str | None = None  # None until the whole name has been generated
    arguments: str = ""  # the arguments' JSON text so far
    complete: bool = False


@dataclass
class ParsedOutput:
    """A parse of the generated text: the content and the tool calls in order."""

    content: str = ""
    calls: list[ParsedCall] = field(default_factory=list)


def random_call_id() -> str:
    """A tool-call id in vLLM's form."""
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def mistral_call_id() -> str:
    """Mistral's tokenizers accept only 9 alphanumeric characters as a tool-call id."""
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))


class ToolParser:
    """Base class: ``parse(text, final)`` → :class:`ParsedOutput` (see the module docstring).

    ``needs_special_tokens``: the format's markers are special tokens, so the text must be detokenized
    with them (``skip_special_tokens=False``). ``reads_raw_output``: the parser reads the whole output,
    reasoning included (harmony), rather than the content a reasoning parser leaves.
    """

    name: str = ""
    needs_special_tokens: bool = False
    reads_raw_output: bool = False
    make_call_id: Callable[[], str] = staticmethod(random_call_id)

    def parse(self, text: str, final: bool) -> ParsedOutput:
        raise NotImplementedError


def held_back(text: str, marker: str) -> int:
    """How many trailing characters of ``text`` could be the start of ``marker`` (kept back while streaming)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WHITESPACE:
        i += 1
    return i


def json_value_end(text: str, i: int) -> int | None:
    """The end of the JSON value starting at ``text[i]``, or None if it is not (yet) a whole value."""
    try:
        return _decoder.raw_decode(text, i)[1]
    except json.JSONDecodeError:
        return None


@dataclass
class ScannedObject:
    """A ``{"name": ..., "arguments": {...}}`` object read from some offset of a text."""

    call: ParsedCall
    end: int | None  # the index after its closing brace; None while it is incomplete
    valid: bool = True  # False: this is not a tool-call object (only decided on complete text)


def scan_call_object(text: str, start: int, arg_keys: tuple[str, ...] = ("arguments", "parameters")) -> ScannedObject:
    """Read the call object whose ``{`` is at ``text[start]``: its name and the raw text of its arguments.

    Incomplete text yields what is known so far (the arguments' text up to the end when they are
    being generated). The name must be a string and the arguments an object for the call to be valid.
    """
    call = ParsedCall()
    have_args = False
    i = start + 1
    n = len(text)
    while True:
        i = skip_ws(text, i)
        if i >= n:
            return ScannedObject(call, None)
        if text[i] == "}":
            ok = call.name is not None and have_args
            call.complete = ok
            return ScannedObject(call, i + 1, ok)
        if text[i] == ",":
            i += 1
            continue
        if text[i] != '"':
            return ScannedObject(call, None, False)
        key_end = json_value_end(text, i)
        if key_end is None:
            return ScannedObject(call, None)
        key = json.loads(text[i:key_end])
        i = skip_ws(text, key_end)
        if i >= n:
            return ScannedObject(call, None)
        if text[i] != ":":
            return ScannedObject(call, None, False)
        i = skip_ws(text, i + 1)
        if i >= n:
            return ScannedObject(call, None)
        end = json_value_end(text, i)
        if end is None:
            if key in arg_keys and text[i] == "{":
                call.arguments = text[i:]
            return ScannedObject(call, None)
        if key == "name":
            value = json.loads(text[i:end])
            if not isinstance(value, str):
                return ScannedObject(call, None, False)
            call.name = value
        elif key in arg_keys:
            if text[i] != "{":
                return ScannedObject(call, None, False)
            call.arguments = text[i:end]
            have_args = True
        i = end


@dataclass
class DeltaCall:
    """One tool call's piece in a streamed chunk (OpenAI's ``delta.tool_calls[i]``)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class _SentCall:
    id: str
    arguments: int  # characters of the arguments sent


class ToolCallStreamer:
    """Feeds a parser the growing text and says what to send: the new content and the new call pieces."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.content_sent = 0
        self.sent: list[_SentCall] = []

    @property
    def called(self) -> bool:
        """Whether any tool call has been sent."""
        return bool(self.sent)

    def update(self, text: str, final: bool) -> tuple[str, list[DeltaCall]]:
        """The content delta and the call deltas for the text so far."""
        parsed = self.parser.parse(text, final)
        content = parsed.content[self.content_sent:]
        self.content_sent = max(self.content_sent, len(parsed.content))
        deltas: list[DeltaCall] = []
        for index, call in enumerate(parsed.calls):
            if call.name is None:
                break  # a call's name goes out first, and calls go out in order
            if index == len(self.sent):
                self.sent.append(_SentCall(self.parser.make_call_id(), len(call.arguments)))
                deltas.append(DeltaCall(index, self.sent[index].id, call.name, call.arguments))
                continue
            sent = self.sent[index]
            if len(call.arguments) > sent.arguments:
                deltas.append(DeltaCall(index, arguments=call.arguments[sent.arguments:]))
                sent.arguments = len(call.arguments)
        return content, deltas
