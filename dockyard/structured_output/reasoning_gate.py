"""Where a sample's structured-output constraint starts when the model reasons first.

A reasoning model (``--reasoning-parser``) writes its thinking freely and only then the answer the
constraint is about. :class:`ReasoningGate` says, from the tokens alone, whether the sample is past its
reasoning section: the constraint applies from the token after the first time the output holds the
reasoning's end sequence (``StructuredOutputsParams.reasoning_end_token_ids``: ``</think>``'s ids, or
harmony's ``<|channel|>final<|message|>``), or from the first token when the prompt already closed the
reasoning: its last end sequence comes after its last start sequence
(``reasoning_start_token_ids``; e.g. Qwen3's template with ``enable_thinking: false`` writes an empty
``<think></think>`` block). Its state is a function of the tokens it has seen, so a rollback (speculative
decoding's rejected drafts) gives the state those tokens would have given. No grammar library is
imported here.
"""

from __future__ import annotations

from collections.abc import Sequence


def last_index(tokens: Sequence[int], pattern: Sequence[int]) -> int:
    """The start of the last occurrence of ``pattern`` in ``tokens`` (-1 when there is none or it is empty)."""
    n = len(pattern)
    if n == 0:
        return -1
    pattern = list(pattern)
    for i in range(len(tokens) - n, -1, -1):
        if tokens[i] == pattern[0] and list(tokens[i:i + n]) == pattern:
            return i
    return -1


def prompt_closed_reasoning(prompt_token_ids: Sequence[int], end: Sequence[int],
                            start: Sequence[int] | None) -> bool:
    """Whether the prompt ends outside a reasoning section: its last ``end`` comes after its last ``start``
    (without a ``start`` sequence, whether it holds ``end`` at all)."""
    last_end = last_index(prompt_token_ids, end)
    return last_end >= 0 and last_end > (last_index(prompt_token_ids, start) if start else -1)


class ReasoningGate:
    """One sample's reasoning section: ``open`` once the constraint applies (see the module docstring)."""

    def __init__(self, end: Sequence[int], start: Sequence[int] | None = None,
                 prompt_token_ids: Sequence[int] = ()) -> None:
        if not end:
            raise ValueError("a reasoning gate needs a non-empty end sequence")
        self.end = list(end)
        self.tokens: list[int] = []  # the output tokens seen
        # How many output tokens precede the constraint's first one (None: still reasoning).
        self.opened_at: int | None = 0 if prompt_closed_reasoning(prompt_token_ids, end, start) else None

    @property
    def open(self) -> bool:
        """Whether the constraint applies to the next token."""
        return self.opened_at is not None

    @property
    def constrained_tokens(self) -> int:
        """How many of the tokens seen the constraint applied to."""
        return 0 if self.opened_at is None else len(self.tokens) - self.opened_at

    def push(self, token_id: int) -> None:
        """See the next output token (before the gate opens, it may complete the end sequence)."""
        self.tokens.append(token_id)
        if self.opened_at is None and self.tokens[-len(self.end):] == self.end:
            self.opened_at = len(self.tokens)

    def rollback(self, num_tokens: int) -> int:
        """Forget the last ``num_tokens`` tokens; how many of them the constraint had applied to."""
        if not 0 <= num_tokens <= len(self.tokens):
            raise ValueError(f"cannot roll back {num_tokens} of {len(self.tokens)} tokens")
        before = self.constrained_tokens
        del self.tokens[len(self.tokens) - num_tokens:]
        if self.opened_at is not None and len(self.tokens) < self.opened_at:
            self.opened_at = None  # the end sequence was among them (it first occurred there)
        return before - self.constrained_tokens
