"""Tool-call formats whose arguments are JSON objects: hermes, llama3_json, mistral, deepseek_v3, and the
two formats the server itself imposes with a grammar (``tool_choice: "required"`` and a named function).

The formats, as the families' published chat templates and docs define them:

- ``hermes`` (Hermes-2-Pro, Qwen2.5, Qwen3): ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``,
  one block per call.
- ``llama3_json`` (Llama 3.1 / 3.2 JSON tool calling): the whole answer is ``{"name": ..., "parameters":
  {...}}`` (``arguments`` also accepted), several separated by ``;``, optionally after ``<|python_tag|>``.
- ``mistral``: ``[TOOL_CALLS]`` then a JSON array of ``{"name", "arguments"}`` objects (tokenizer v3), or
  ``[TOOL_CALLS]name[ARGS]{...}`` per call (tokenizer v11 and later).
- ``deepseek_v3``: ``<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n{...}\\n```
  <｜tool▁call▁end｜>...<｜tool▁calls▁end｜>`` (DeepSeek-V3); ``NAME<｜tool▁sep｜>{...}`` between the call
  markers is read too (DeepSeek-V3.1).

Text before the first tool call is the content; text between and after calls is dropped. A call that
is broken or cut off (``max_tokens``) is left as content when the output ends.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dockyard.tool_parsers.base import (
    ParsedCall,
    ParsedOutput,
    ScannedObject,
    ToolParser,
    held_back,
    json_value_end,
    mistral_call_id,
    scan_call_object,
    skip_ws,
)

Scan = Callable[[str, int], ScannedObject]


def parse_marked_calls(text: str, final: bool, content_end: str, call_marker: str, scan: Scan) -> ParsedOutput:
    """Content up to ``content_end``, then a call after each ``call_marker``, read by ``scan``."""
    first = text.find(content_end)
    if first < 0:
        return ParsedOutput(text if final else text[:len(text) - held_back(text, content_end)])
    out = ParsedOutput(text[:first])
    pos = text.find(call_marker, first)
    while pos >= 0:
        scanned = scan(text, pos + len(call_marker))
        if not scanned.valid or (final and scanned.end is None):
            if final:
                out.content += text[pos:]  # a broken or cut-off call stays as text
            return out
        out.calls.append(scanned.call)
        if scanned.end is None:
            return out
        pos = text.find(call_marker, scanned.end)
    if final and not out.calls:
        out.content = text
    return out


def scan_object_at(text: str, i: int, arg_keys: tuple[str, ...] = ("arguments", "parameters")) -> ScannedObject:
    """A call object after optional whitespace at ``text[i]``."""
    j = skip_ws(text, i)
    if j >= len(text):
        return ScannedObject(ParsedCall(), None)
    if text[j] != "{":
        return ScannedObject(ParsedCall(), None, False)
    return scan_call_object(text, j, arg_keys)


def scan_call_array(text: str, i: int) -> tuple[list[ParsedCall], int | None, bool]:
    """A JSON array of call objects at ``text[i]`` (after whitespace): (calls so far, end or None, valid)."""
    calls: list[ParsedCall] = []
    i = skip_ws(text, i)
    if i >= len(text):
        return calls, None, True
    if text[i] != "[":
        return calls, None, False
    i += 1
    while True:
        i = skip_ws(text, i)
        if i >= len(text):
            return calls, None, True
        if text[i] == "]":
            return calls, i + 1, bool(calls)
        if text[i] == "," and calls:
            i += 1
            continue
        scanned = scan_object_at(text, i)
        if not scanned.valid:
            return calls, None, False
        calls.append(scanned.call)
        if scanned.end is None:
            return calls, None, True
        i = scanned.end


class HermesToolParser(ToolParser):
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (Hermes, Qwen2.5, Qwen3)."""

    name = "hermes"
    needs_special_tokens = True  # some Hermes-format tokenizers mark <tool_call> special

    def parse(self, text: str, final: bool) -> ParsedOutput:
        return parse_marked_calls(text, final, "<tool_call>", "<tool_call>", scan_object_at)


class Llama3JsonToolParser(ToolParser):
    """The whole answer is ``{"name": ..., "parameters": {...}}``, several joined by ``;`` (Llama 3.1/3.2)."""

    name = "llama3_json"
    PYTHON_TAG = "<|python_tag|>"

    def parse(self, text: str, final: bool) -> ParsedOutput:
        start = skip_ws(text, 0)
        if text.startswith(self.PYTHON_TAG, start):
            start = skip_ws(text, start + len(self.PYTHON_TAG))
        elif not final and self.PYTHON_TAG.startswith(text[start:]):
            return ParsedOutput()  # nothing yet, or the start of the tag
        if start >= len(text):
            return ParsedOutput(text if final else "")
        if text[start] != "{":
            return ParsedOutput(text)
        out = ParsedOutput()
        i = start
        while True:
            scanned = scan_call_object(text, i)
            if not scanned.valid or (final and scanned.end is None):
                return ParsedOutput(text) if final else out  # not a tool call after all: all of it is content
            out.calls.append(scanned.call)
            if scanned.end is None:
                return out
            i = skip_ws(text, scanned.end)
            if i < len(text) and text[i] == ";":
                i = skip_ws(text, i + 1)
            if i >= len(text) or text[i] != "{":
                return out


class MistralToolParser(ToolParser):
    """``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` or ``[TOOL_CALLS]name[ARGS]{...}`` (Mistral)."""

    name = "mistral"
    needs_special_tokens = True  # [TOOL_CALLS] and [ARGS] are control tokens
    make_call_id = staticmethod(mistral_call_id)
    MARKER = "[TOOL_CALLS]"

    def parse(self, text: str, final: bool) -> ParsedOutput:
        first = text.find(self.MARKER)
        after = skip_ws(text, first + len(self.MARKER)) if first >= 0 else 0
        if first >= 0 and after < len(text) and text[after] == "[":
            calls, end, valid = scan_call_array(text, after)
            if final and (not valid or end is None):
                return ParsedOutput(text)
            return ParsedOutput(text[:first], calls if valid else [])
        if first >= 0 and after >= len(text) and not final:
            return ParsedOutput(text[:first])
        return parse_marked_calls(text, final, self.MARKER, self.MARKER, _scan_name_args)


def _scan_name_args(text: str, i: int) -> ScannedObject:
    """``name[ARGS]{...}`` (Mistral tokenizer v11+; a ``[CALL_ID]id`` after the name is skipped)."""
    k = text.find("[ARGS]", i)
    if k < 0:
        return ScannedObject(ParsedCall(), None)
    name = text[i:k].split("[CALL_ID]")[0].strip()
    if not name:
        return ScannedObject(ParsedCall(), None, False)
    return _args_object(text, k + len("[ARGS]"), name)


def _args_object(text: str, i: int, name: str) -> ScannedObject:
    """A call named ``name`` whose arguments object starts after whitespace at ``text[i]``."""
    j = skip_ws(text, i)
    call = ParsedCall(name=name)
    if j >= len(text):
        return ScannedObject(call, None)
    if text[j] != "{":
        return ScannedObject(call, None, False)
    end = json_value_end(text, j)
    if end is None:
        call.arguments = text[j:]
        return ScannedObject(call, None)
    call.arguments = text[j:end]
    call.complete = True
    return ScannedObject(call, end)


class DeepSeekV3ToolParser(ToolParser):
    """DeepSeek-V3's ``<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n{...}\\n```<｜tool▁call▁end｜>``."""

    name = "deepseek_v3"
    needs_special_tokens = True
    CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
    CALL_BEGIN = "<｜tool▁call▁begin｜>"
    SEP = "<｜tool▁sep｜>"
    JSON_FENCE = "```json"

    def parse(self, text: str, final: bool) -> ParsedOutput:
        return parse_marked_calls(text, final, self.CALLS_BEGIN, self.CALL_BEGIN, self._scan)

    def _scan(self, text: str, i: int) -> ScannedObject:
        sep = text.find(self.SEP, i)
        if sep < 0:
            return ScannedObject(ParsedCall(), None)
        kind = text[i:sep].strip()
        body = sep + len(self.SEP)
        if kind != "function":  # DeepSeek-V3.1: the name before the separator, the arguments after it
            return _args_object(text, body, kind) if kind else ScannedObject(ParsedCall(), None, False)
        fence = text.find(self.JSON_FENCE, body)
        if fence < 0:
            return ScannedObject(ParsedCall(), None)
        name = text[body:fence].strip()
        if not name:
            return ScannedObject(ParsedCall(), None, False)
        return _args_object(text, fence + len(self.JSON_FENCE), name)


class RequiredToolParser(ToolParser):
    """``tool_choice: "required"``: the grammar makes the whole output a JSON array of
    ``{"name": ..., "parameters": {...}}`` objects (vLLM's format for it)."""

    name = "required"

    def parse(self, text: str, final: bool) -> ParsedOutput:
        calls, end, valid = scan_call_array(text, 0)
        if final and (not valid or end is None):
            return ParsedOutput(text)
        return ParsedOutput("", calls if valid else [])


class NamedToolParser(ToolParser):
    """A named ``tool_choice``: the grammar makes the whole output the arguments of that function."""

    def __init__(self, function: str) -> None:
        self.name = function

    def parse(self, text: str, final: bool) -> ParsedOutput:
        return ParsedOutput("", [ParsedCall(self.name, text, final)])


def _arguments_schema(parameters: dict[str, Any] | None) -> dict[str, Any]:
    """A function's arguments schema (a function without ``parameters`` takes an object of anything)."""
    return parameters if parameters else {"type": "object"}


def required_calls_schema(functions: list[tuple[str, dict[str, Any] | None]], parallel: bool) -> dict[str, Any]:
    """The JSON schema ``tool_choice: "required"`` holds the output to: a non-empty array of calls of the
    given (name, parameters schema) functions, one call only unless ``parallel``."""
    call = {"anyOf": [{"type": "object", "properties": {"name": {"type": "string", "enum": [name]},
                                                       "parameters": _arguments_schema(parameters)},
                       "required": ["name", "parameters"], "additionalProperties": False}
                      for name, parameters in functions]}
    return {"type": "array", "items": call, "minItems": 1, **({} if parallel else {"maxItems": 1})}


def named_call_schema(parameters: dict[str, Any] | None) -> dict[str, Any]:
    """The JSON schema a named ``tool_choice`` holds the output to: the function's arguments."""
    return _arguments_schema(parameters)
