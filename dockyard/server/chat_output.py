"""One chat choice's generated text → ``reasoning_content``, ``content`` and ``tool_calls``.

The reasoning parser (``--reasoning-parser``) takes the reasoning out first; the tool-call parser reads
what is left (or the whole output, for harmony, where calls and reasoning are channels of one format).
Both are fed the whole text so far each time, so a streamed choice and a non-streamed one go through
the same code: a non-streamed answer is a single update with ``final=True``, assembled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dockyard.reasoning import ReasoningParser
from dockyard.server.protocol import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall
from dockyard.tool_parsers import DeltaCall, ToolCallStreamer, ToolParser


@dataclass
class ChoiceDelta:
    """What an update adds to a choice."""

    reasoning: str = ""
    content: str = ""
    calls: list[DeltaCall] = field(default_factory=list)

    def tool_call_deltas(self) -> list[DeltaToolCall] | None:
        """The call pieces in OpenAI's streamed shape (None when there are none)."""
        if not self.calls:
            return None
        return [DeltaToolCall(index=d.index, id=d.id, type="function" if d.id else None,
                              function=DeltaFunctionCall(name=d.name, arguments=d.arguments))
                for d in self.calls]

    def tool_calls(self) -> list[ToolCall] | None:
        """The calls of a whole answer (a single final update) as ``message.tool_calls``."""
        calls: list[ToolCall] = []
        for d in self.calls:
            if d.id is not None:
                calls.append(ToolCall(id=d.id, function=FunctionCall(name=d.name or "", arguments=d.arguments)))
            else:
                calls[d.index].function.arguments += d.arguments
        return calls or None


class ChoiceOutputParser:
    """The reasoning and tool-call parsing of one choice; ``parallel=False`` keeps the first call only."""

    def __init__(self, reasoning: ReasoningParser | None, tools: ToolParser | None, parallel: bool = True) -> None:
        self.reasoning = reasoning
        self.tools = ToolCallStreamer(tools) if tools is not None else None
        self.parallel = parallel
        self.reasoning_sent = 0
        self.content_sent = 0
        self.reasoning_ended = reasoning is None

    @property
    def called(self) -> bool:
        """Whether the choice has made a tool call."""
        return self.tools is not None and self.tools.called

    def update(self, text: str, final: bool) -> ChoiceDelta:
        """What is new in ``text`` (the choice's whole text so far)."""
        out = ChoiceDelta()
        content = text
        if self.reasoning is not None:
            split = self.reasoning.split(text, final)
            out.reasoning = split.reasoning[self.reasoning_sent:]
            self.reasoning_sent = max(self.reasoning_sent, len(split.reasoning))
            self.reasoning_ended = split.ended
            content = split.content
        if self.tools is not None:
            tool_text = text if self.tools.parser.reads_raw_output else content
            out.content, calls = self.tools.update(tool_text, final)
            out.calls = calls if self.parallel else [d for d in calls if d.index == 0]
        else:
            out.content = content[self.content_sent:]
            self.content_sent = max(self.content_sent, len(content))
        return out
