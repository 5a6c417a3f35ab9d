"""Tool-call parsers: the formats in which the model families dockyard runs write tool calls.

``--tool-call-parser NAME`` picks one of :data:`TOOL_PARSERS` (vLLM's names); the server uses it for
``tool_choice: "auto"``. ``required`` and named choices need no parser: a grammar makes the model
write a format the server knows (:class:`RequiredToolParser`, :class:`NamedToolParser`).
"""

from __future__ import annotations

from dockyard.errors import ConfigError
from dockyard.tool_parsers.base import DeltaCall, ParsedCall, ParsedOutput, ToolCallStreamer, ToolParser
from dockyard.tool_parsers.harmony import OpenAIToolParser
from dockyard.tool_parsers.json_formats import (
    DeepSeekV3ToolParser,
    HermesToolParser,
    Llama3JsonToolParser,
    MistralToolParser,
    NamedToolParser,
    RequiredToolParser,
    named_call_schema,
    required_calls_schema,
)
from dockyard.tool_parsers.pythonic import PythonicToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {cls.name: cls for cls in (
    HermesToolParser, Llama3JsonToolParser, MistralToolParser, DeepSeekV3ToolParser, OpenAIToolParser,
    PythonicToolParser)}


def get_tool_parser(name: str) -> ToolParser:
    """The parser registered as ``name``; a ConfigError listing the known names otherwise."""
    cls = TOOL_PARSERS.get(name)
    if cls is None:
        raise ConfigError(f"--tool-call-parser {name!r} is not a known tool-call parser; use one of "
                          f"{', '.join(sorted(TOOL_PARSERS))}")
    return cls()


__all__ = ["TOOL_PARSERS", "DeltaCall", "NamedToolParser", "ParsedCall", "ParsedOutput", "RequiredToolParser",
           "ToolCallStreamer", "ToolParser", "get_tool_parser", "named_call_schema", "required_calls_schema"]
