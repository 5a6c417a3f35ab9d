"""Incremental detokenization: a sequence's text grows by decoding a short window of recent tokens.

Decoding all output ids after every token (and searching every stop string in the whole text) costs
O(n) host work per token, O(n²) per request. Instead each sequence keeps two token offsets, as
vLLM/SGLang do: ``prefix`` (where the decode window starts) and ``read`` (the tokens whose text is
committed). A new token decodes ``ids[prefix:read]`` and ``ids[prefix:n]``; the difference is the new
text. Decoding a few tokens *before* the new ones keeps the tokenizer's context: a SentencePiece
decoder strips the leading space of the first token of whatever it decodes (``▁world`` alone gives
``world``), and that token is in both decodes, so the difference keeps the space.

The difference is committed (the offsets move on: ``prefix = read``, ``read = n``) only when it is
non-empty, does not end in U+FFFD (an incomplete UTF-8 character whose remaining bytes come with
later tokens) and the last token is not a byte-fallback piece (``<0xE2>``: SentencePiece's
``ByteFallback`` decodes a whole run of byte pieces at once, turning *every* byte of an invalid run,
even an ASCII one, into U+FFFD, so a run must never be split between windows; skipped special
tokens inside a run do not end it). Until then the new text is a *tentative* ``tail`` that may
still change. ``Sequence.output_text`` is the *stable* text while the sequence runs (it never
changes once reported, so streamed deltas always add up) and the stable text plus the tail, i.e.
exactly the full decode, once it finishes; stop strings are searched in the stable text plus the tail.

Stop strings are searched only where they can newly end: from ``searched - len(stop) + 1``, where
``searched`` is the text already searched (a stop string inside it would have been found).

Tokenizers whose decode cannot be split into windows fall back to a full decode per token (the old
behaviour, exact by construction, but then the running text may change as before): those that clean
up tokenization spaces (``" ."`` → ``"."``, ``" n't"`` → ``"n't"``: the space to remove may already
be committed; transformers' ``clean_up_tokenization_spaces`` where its decode really applies it,
which transformers 5 does not for BPE tokenizers, or a WordPiece decoder's ``cleanup``), and any
tokenizer that fails a start-up probe (texts with emoji, CJK, accents, code and special tokens decoded
token by token must give the full decode at every step, and every stable text must be a prefix of
the final one). The bundled SmolLM2 tokenizer (byte-level BPE, no clean-up) is incremental. Should a
window ever decode inconsistently at run time (its text not starting with the previous window's),
that sequence switches to full decoding, so the final text always equals
``tokenizer.decode(ids, skip_special_tokens=...)``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_PROBE_TEXTS = (
    "Hello, world! Ça va? Naïve café — déjà vu. Größe, ñandú, Ελληνικά, русский.",
    "日本語のテキストと中文字符，한국어 문장도 있습니다。",
    "Emoji: 😀🎉👍🏽 👨‍👩‍👧 ❤️ 🇫🇷 and symbols ∑ ∫ ≠ ≤ € £ ¥ ™.",
    "def f(x):\n    if x  >  0:\n\t\treturn  x ** 2\n\n\n    return -x  # trailing   spaces   \n",
    "  leading spaces, a . spaced ! mark , and do n't it 's ? ok  ",
)


@dataclass(slots=True)
class DetokenizerState:
    """A sequence's incremental-detokenization offsets (the text itself is ``Sequence.output_text``)."""

    prefix: int = 0  # first token of the decode window
    read: int = 0  # tokens whose text is committed (the stable text)
    stable: int = 0  # characters of the stable text, which can no longer change
    tail: str = ""  # the text of tokens read..n, not committed yet: it may still change
    searched: int = 0  # characters of the text already searched for stop strings
    full: bool = False  # decode everything every time (the tokenizer or this sequence needs it)


def _decoder_config(tokenizer: Any) -> dict[str, Any] | None:
    """The fast tokenizer's decoder as JSON, or None (a slow tokenizer, or none set)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        return json.loads(backend.to_str()).get("decoder")
    except Exception:  # noqa: BLE001 - an unreadable config only loses an optimization
        return None


def _walk(node: Any) -> list[dict[str, Any]]:
    """Every decoder in a (possibly nested ``Sequence``) decoder config."""
    if not isinstance(node, dict):
        return []
    found = [node]
    for child in node.get("decoders") or ():
        found.extend(_walk(child))
    return found


def _cleans_up_spaces(tokenizer: Any) -> bool:
    """Whether ``decode`` really applies ``clean_up_tokenization_spaces`` (transformers 5 ignores the
    flag for BPE tokenizers unless told otherwise, so the flag alone does not say)."""
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return False
    try:
        ids = list(tokenizer.encode(" a . b , c ! d ? e n't f 's g 've h 're i 'm", add_special_tokens=False))
        raw = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return tokenizer.decode(ids, skip_special_tokens=False) != raw
    except Exception:  # noqa: BLE001 - cannot tell: assume it does, and stay exact
        return True


class IncrementalDetokenizer:
    """Turns a sequence's output ids into text a token at a time; see the module docstring."""

    def __init__(self, tokenizer: Any, probe: bool = True) -> None:
        """``tokenizer``: an HF tokenizer (``decode(ids, skip_special_tokens=)``). ``probe``: check at
        start-up that incremental decoding reproduces the full decode (else decode in full)."""
        self.tokenizer = tokenizer
        decoders = _walk(_decoder_config(tokenizer))
        self.byte_piece_ids: frozenset[int] = frozenset()
        self.special_ids: frozenset[int] = frozenset()  # what skip_special_tokens drops (byte-piece runs join over it)
        if any(d.get("type") == "ByteFallback" for d in decoders):
            vocab = tokenizer.get_vocab()
            self.byte_piece_ids = frozenset(i for t, i in vocab.items() if _BYTE_PIECE.fullmatch(t))
            added = getattr(tokenizer, "added_tokens_decoder", None) or {}
            self.special_ids = frozenset(
                {i for i, t in added.items() if getattr(t, "special", False)}
                | set(getattr(tokenizer, "all_special_ids", None) or ()))
        self.fallback_reason: str | None = None
        if _cleans_up_spaces(tokenizer):
            self.fallback_reason = "its decode cleans up tokenization spaces"
        elif any(d.get("cleanup") for d in decoders):
            self.fallback_reason = "its decoder cleans up tokenization spaces"
        elif probe:
            self.fallback_reason = self._probe()
        if self.fallback_reason is not None:
            logger.info("tokenizer %s: full decode per token (%s)", type(tokenizer).__name__, self.fallback_reason)

    @property
    def incremental(self) -> bool:
        """Whether sequences are decoded incrementally (False: a full decode per token)."""
        return self.fallback_reason is None

    def new_state(self) -> DetokenizerState:
        """Fresh state for a sequence."""
        return DetokenizerState(full=not self.incremental)

    def decode(self, ids: Seq[int], skip_special_tokens: bool) -> str:
        """The tokenizer's decode of ``ids``."""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def update(self, state: DetokenizerState, text: str, ids: Seq[int], n: int, skip_special_tokens: bool) -> str:
        """The stable text of ``ids[:n]``, given ``text``, the stable text returned by the previous call
        (``n`` never decreases between calls); updates ``state``. The stable text followed by
        ``state.tail`` equals ``decode(ids[:n])``; in full-decode mode the whole decode is returned
        (and ``tail`` is empty)."""
        if state.full:
            return self.decode(ids[:n], skip_special_tokens)
        prefix, read = state.prefix, state.read
        if n <= read:
            state.tail = ""
            return text
        prefix_text = self.decode(ids[prefix:read], skip_special_tokens) if read > prefix else ""
        window = self.decode(ids[prefix:n], skip_special_tokens)
        if not window.startswith(prefix_text):  # a tokenizer quirk the probe missed: stay exact
            logger.debug("incremental detokenization diverged; decoding this sequence in full")
            state.full, state.stable, state.tail = True, 0, ""
            return self.decode(ids[:n], skip_special_tokens)
        tail = window[len(prefix_text):]
        if tail and tail[-1] != "\ufffd" and not self._in_byte_run(ids, n, skip_special_tokens):
            text += tail
            state.prefix, state.read, state.stable, state.tail = read, n, len(text), ""
        else:
            state.tail = tail
        return text

    def _in_byte_run(self, ids: Seq[int], n: int, skip_special_tokens: bool) -> bool:
        """Whether ``ids[:n]`` ends in a run of byte-fallback pieces that a later byte piece may still
        join (skipped special tokens in between do not end a run: the decoder never sees them)."""
        if not self.byte_piece_ids:
            return False
        i = n - 1
        if skip_special_tokens:
            while i >= 0 and ids[i] in self.special_ids:
                i -= 1
        return i >= 0 and ids[i] in self.byte_piece_ids

    def _probe(self) -> str | None:
        """Why incremental decoding fails on sample texts (token by token), or None when it matches."""
        tok = self.tokenizer
        try:
            specials = [i for i in (getattr(tok, "all_special_ids", None) or []) if isinstance(i, int)][:3]
            cases = [list(tok.encode(t, add_special_tokens=False)) for t in _PROBE_TEXTS]
            joined = [i for c in cases for i in c[:12] + specials[:1]]
            cases.append(specials + joined + specials)
        except Exception as exc:  # noqa: BLE001 - a tokenizer that cannot even encode: be exact
            return f"the probe could not encode ({type(exc).__name__}: {exc})"
        for ids in cases:
            for skip in (True, False):
                state, text = DetokenizerState(), ""
                full = self.decode(ids, skip)
                for n in range(1, len(ids) + 1):
                    text = self.update(state, text, ids, n, skip)
                    if state.full or text + state.tail != self.decode(ids[:n], skip) or not full.startswith(text):
                        return "incremental decoding of a probe text diverged from the full decode"
        return None


def find_stop_string(text: str, stops: Seq[str], searched: int) -> tuple[str, int] | None:
    """The first of ``stops`` (in list order) occurring in ``text`` and its index, searching each only
    where it can end after ``text[:searched]`` (already searched); None when none occurs."""
    for stop in stops:
        idx = text.find(stop, max(0, searched - len(stop) + 1))
        if idx >= 0:
            return stop, idx
    return None
