"""The ``pythonic`` tool-call format (Llama 3.2 / Llama 4, ToolACE): the answer is a Python list of calls,
``[get_weather(city="Paris", unit="celsius"), get_time()]``, with keyword arguments that are Python
literals, optionally between ``<|python_start|>`` and ``<|python_end|>``.

The arguments are not JSON in the text, so each call's arguments are sent (as ``json.dumps`` of the
literals) in one piece once its closing parenthesis has been generated; the name goes out as soon as
its ``(`` has.
"""

from __future__ import annotations

import ast
import json

from dockyard.tool_parsers.base import ParsedCall, ParsedOutput, ToolParser, skip_ws

_START, _END = "<|python_start|>", "<|python_end|>"


def _call_of(source: str) -> ParsedCall | None:
    """``name(k=literal, ...)`` → the call, or None if ``source`` is not such a call."""
    try:
        node = ast.parse(source.strip(), mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
        return None
    try:
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg is not None}
    except ValueError:
        return None
    if len(kwargs) != len(node.keywords):
        return None  # **kwargs is not a literal
    return ParsedCall(node.func.id, json.dumps(kwargs, ensure_ascii=False), True)


def _split_calls(text: str, start: int) -> tuple[list[str], str | None, bool, bool]:
    """The list body after ``[`` at ``start``: (complete call sources, the partial last one or None,
    the list is closed, the text is well formed so far)."""
    calls: list[str] = []
    depth, quote, escaped, begin = 0, "", False, start + 1
    for i in range(start + 1, len(text)):
        c = text[i]
        if quote:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == quote:
                quote = ""
            continue
        if c in "\"'":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            if depth == 0:
                if c != "]":
                    return calls, None, False, False
                tail = text[begin:i].strip()
                if tail:
                    calls.append(tail)
                return calls, None, True, True
            depth -= 1
        elif c == "," and depth == 0:
            calls.append(text[begin:i].strip())
            begin = i + 1
    return calls, text[begin:].strip() or None, False, True


class PythonicToolParser(ToolParser):
    """``[f(a=1), g(b="x")]`` (Llama 3.2 / Llama 4 pythonic tool calling)."""

    name = "pythonic"

    def parse(self, text: str, final: bool) -> ParsedOutput:
        start = skip_ws(text, 0)
        if text.startswith(_START, start):
            start = skip_ws(text, start + len(_START))
        elif not final and _START.startswith(text[start:]):
            return ParsedOutput()
        if start >= len(text):
            return ParsedOutput(text if final else "")
        if text[start] != "[":
            return ParsedOutput(text)
        sources, partial, closed, ok = _split_calls(text, start)
        calls = [_call_of(s) for s in sources]
        if final:
            rest = text[text.rfind("]") + 1:].replace(_END, "").strip() if closed else "?"
            if not ok or not closed or rest or not calls or any(c is None for c in calls):
                return ParsedOutput(text)
            return ParsedOutput("", calls)  # type: ignore[arg-type]
        out = ParsedOutput()
        if not ok:
            return out
        for call in calls:
            if call is None:
                return out
            out.calls.append(call)
        if partial is not None and "(" in partial:
            name = partial.split("(", 1)[0].strip()
            if name.isidentifier():
                out.calls.append(ParsedCall(name))
        return out
