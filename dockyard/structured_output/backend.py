"""The grammar backend: xgrammar, wrapped to the few calls the engine makes.

xgrammar was chosen over llguidance by measurement (``benchmarks/grammar_engines.py``, figures in
``benchmarks/RESULTS.md``): its per-step mask fill is several times faster on both a 49k and a 262k
vocabulary, which the engine pays every step for every constrained row, while its larger compile time is
paid once per distinct grammar, off the step and cached. It is also what vLLM and SGLang use by default.

:class:`GrammarBackend` holds the tokenizer's view (``xgrammar.TokenizerInfo``: the model's logits width as
the vocabulary, the model's EOS ids as stop tokens) and compiles a :class:`StructuredOutputsParams` into a
:class:`CompiledGrammar`; a compile error becomes an :class:`~dockyard.errors.InvalidRequestError` naming
the field. :class:`GrammarMatcher` is one sample's state in the grammar: fill its row of a token bitmask,
accept a token, roll back ``k`` tokens (speculative decoding), and say whether it has terminated.
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch
import xgrammar as xgr

from dockyard.errors import InvalidRequestError
from dockyard.structured_output.params import PARAM, StructuredOutputsParams
from dockyard.structured_output.reasoning_gate import ReasoningGate

CompiledGrammar = xgr.CompiledGrammar
# xgrammar prefixes its C++ errors with "[time] /path/file.cc:line: ": the message is what follows.
_CPP_PREFIX = re.compile(r"^\s*\[[0-9:]+\]\s+\S+:\d+:\s*")


def bitmask_width(vocab_size: int) -> int:
    """int32 words per row of a token bitmask (bit ``t % 32`` of word ``t // 32`` is token ``t``)."""
    return (vocab_size + 31) // 32


def _message(exc: BaseException) -> str:
    return _CPP_PREFIX.sub("", str(exc)).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def choice_ebnf(choices: list[str]) -> str:
    """The EBNF grammar whose language is exactly ``choices`` (JSON string escapes are xgrammar's too)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class GrammarMatcher:
    """One sample's position in its grammar (xgrammar's matcher, unlimited rollback). With a ``gate``
    (a reasoning model's request), the grammar applies only once the gate is open: tokens before that are
    free and not fed to the grammar."""

    _batch: xgr.BatchGrammarMatcher | None = None  # fills many rows on xgrammar's own threads

    def __init__(self, compiled: CompiledGrammar, gate: ReasoningGate | None = None) -> None:
        self._matcher = xgr.GrammarMatcher(compiled)
        self.gate = gate

    @property
    def active(self) -> bool:
        """Whether the grammar constrains the next token (False while the sample is still reasoning)."""
        return self.gate is None or self.gate.open

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into row ``row`` of ``bitmask`` (int32 [B, words], on the CPU)."""
        self._matcher.fill_next_token_bitmask(bitmask, row)

    @classmethod
    def fill_rows(cls, matchers: list[GrammarMatcher], bitmask: torch.Tensor, rows: list[int]) -> None:
        """``matchers[i].fill_bitmask(bitmask, rows[i])`` for every i; several at once on xgrammar's threads
        (a row's fill is independent of the others)."""
        if len(matchers) == 1:
            matchers[0].fill_bitmask(bitmask, rows[0])
            return
        if cls._batch is None:
            cls._batch = xgr.BatchGrammarMatcher()
        cls._batch.batch_fill_next_token_bitmask([m._matcher for m in matchers], bitmask, rows)

    def accept(self, token_id: int) -> bool:
        """Advance by ``token_id``; False (state unchanged) when the grammar does not allow it (a token
        before the gate opens is always taken)."""
        if self.active and not self._matcher.accept_token(token_id):
            return False
        if self.gate is not None:
            self.gate.push(token_id)
        return True

    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` accepted tokens (speculative decoding's rejected drafts)."""
        constrained = num_tokens if self.gate is None else self.gate.rollback(num_tokens)
        self._matcher.rollback(constrained)

    @property
    def is_terminated(self) -> bool:
        """Whether the grammar has ended (it accepted a stop token): nothing more may be generated."""
        return self._matcher.is_terminated()


class GrammarBackend:
    """Compiles structured-output constraints for one tokenizer and vocabulary (thread-safe: xgrammar's
    compiler may be called from several threads)."""

    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: list[int]) -> None:
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=list(eos_token_ids) or None)
        self._compiler = xgr.GrammarCompiler(info)

    def compile(self, params: StructuredOutputsParams) -> CompiledGrammar:
        """The compiled grammar of ``params``; InvalidRequestError naming the field when it does not compile."""
        kind = params.kind
        any_whitespace = not params.disable_any_whitespace
        try:
            if kind == "json":
                return self._compiler.compile_json_schema(json.dumps(params.schema), any_whitespace=any_whitespace)
            if kind == "json_object":
                return self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=any_whitespace)
            if kind == "regex":
                return self._compiler.compile_regex(params.regex)
            if kind == "choice":
                return self._compiler.compile_grammar(choice_ebnf(params.choice))
            if kind == "grammar":
                return self._compiler.compile_grammar(params.grammar)
            return self._compile_structural_tag(params.structural_tag)
        except InvalidRequestError:
            raise
        except (RuntimeError, ValueError, TypeError, KeyError) as exc:
            what = {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regular expression",
                    "choice": "choice list", "grammar": "EBNF grammar", "structural_tag": "structural tag"}[kind]
            raise InvalidRequestError(f"{PARAM}.{kind}: the {what} cannot be used: {_message(exc)}",
                                      param=f"{PARAM}.{kind}") from None

    def _compile_structural_tag(self, text: str) -> CompiledGrammar:
        try:
            tag = json.loads(text)
        except ValueError as exc:
            raise InvalidRequestError(f"{PARAM}.structural_tag is not valid JSON: {exc}",
                                      param=f"{PARAM}.structural_tag") from None
        if isinstance(tag, dict) and "structures" in tag:
            # vLLM's first form: {"structures": [{"begin", "schema", "end"}], "triggers": [...]}.
            items = [xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s["schema"]), end=s["end"])
                     for s in tag["structures"]]
            return self._compiler.compile_structural_tag(items, tag["triggers"])
        return self._compiler.compile_structural_tag(text)
