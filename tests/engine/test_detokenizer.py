"""Incremental detokenization (engine/detokenizer.py) against the full decode, token by token.

The reference is always ``tokenizer.decode(ids[:n], skip_special_tokens=...)`` of the whole output,
for three tokenizers: the bundled SmolLM2 (GPT-2 style byte-level BPE) and two SentencePiece-style
BPE tokenizers built here with byte fallback (Llama's Replace/ByteFallback/Fuse/Strip decoder, and a
Metaspace decoder), whose small alphabets send emoji, CJK and most accented letters to byte pieces.
Stop-string and EOS handling go through the scheduler's ``check_stop`` (stop tokens, length) and
``LLMEngine._check_stop_strings`` as a step runs them, and are compared with the engine's
previous rule (full decode, every stop string searched in the whole text), replayed here, with one
change: a stop string must end in text produced from ``min_tokens`` on; and every step's text goes
through the server's streaming cursor, whose deltas must add up to the final text.
"""

from __future__ import annotations

import random
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest

from dockyard import SamplingParams
from dockyard.engine.detokenizer import DetokenizerState, IncrementalDetokenizer, find_stop_string
from dockyard.engine.llm_engine import LLMEngine
from dockyard.engine.scheduler import check_stop
from dockyard.engine.sequence import Sequence

TEXTS = [
    "Hello, world! Ça va? Naïve café, déjà vu — Größe, ñandú, Ελληνικά, русский язык.",
    "日本語のテキストと中文字符，한국어 문장. 東京タワー🗼は高い！",
    "Emoji 😀🎉👍🏽 family 👨‍👩‍👧, heart ❤️, flag 🇯🇵; math ∑∫≠≤ and money €£¥.",
    "def f(x):\n    if x  >  0:\n\t\treturn  x ** 2   # square\n\n\n    return -x\n\n",
    "    indented\n        more    spaces\n\n\n\nend  .  , ! ? do n't it 's",
]
CORPUS = ["The quick brown fox jumps over the lazy dog. " * 3, "Hello, world! Naïve café déjà vu.",
          "def main():\n    return 0\n", "Streaming text token by token is what servers do."] * 5


def _learn_merges(words: list[str], alphabet: set[str], num_merges: int) -> list[tuple[str, str]]:
    """Plain BPE merges over ``words`` (ties broken by the pair itself, so the result is deterministic,
    unlike the tokenizers trainer); characters outside ``alphabet`` are never merged."""
    counts = Counter(tuple(w) for w in words)
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, c in counts.items():
            for a, b in zip(word, word[1:]):
                if a[-1] in alphabet and b[0] in alphabet:
                    pairs[a, b] += c
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, c in counts.items():
            out, k = [], 0
            while k < len(word):
                if k + 1 < len(word) and (word[k], word[k + 1]) == best:
                    out.append(word[k] + word[k + 1])
                    k += 2
                else:
                    out.append(word[k])
                    k += 1
            merged[tuple(out)] += c
        counts = merged
    return merges


def _sentencepiece_style(style: str, clean_up: bool = False) -> Any:
    """A small SentencePiece-style BPE tokenizer with byte-fallback pieces ``<0x00>``..``<0xFF>``: its
    alphabet is the corpus's 40 most frequent characters, so emoji, CJK and most accented letters
    (and some punctuation) are byte pieces."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    words = ["▁" + w for text in CORPUS for w in text.split(" ")]
    freq = Counter(ch for w in words for ch in w)
    alphabet = {ch for ch, _ in sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))[:40]}
    merges = _learn_merges(words, alphabet, 120)
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"<0x{b:02X}>": len(specials) + b for b in range(256)})
    for t in sorted(alphabet) + [a + b for a, b in merges]:
        vocab.setdefault(t, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if style == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Sequence([decoders.ByteFallback(),
                                         decoders.Metaspace(replacement="▁", prepend_scheme="first")])
    else:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=clean_up)


@pytest.fixture(scope="module", params=["smollm2", "llama-sp", "metaspace-sp"])
def tokenizer(request) -> Any:
    if request.param == "smollm2":
        from dockyard.tokenizer import load_tokenizer

        return load_tokenizer(request.getfixturevalue("bundled_gguf"))
    return _sentencepiece_style("metaspace" if request.param == "metaspace-sp" else "llama")


class _CountingTokenizer:
    """Wraps a tokenizer, recording the length of every decoded id list."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.lengths: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tok, name)

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        self.lengths.append(len(ids))
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def _special_ids(tok: Any) -> list[int]:
    return sorted(set(tok.all_special_ids))


def _stream(detok: IncrementalDetokenizer, ids: list[int], skip: bool) -> list[tuple[str, str]]:
    """(stable text, unsettled tail) after each token."""
    state, text, steps = detok.new_state(), "", []
    for n in range(1, len(ids) + 1):
        text = detok.update(state, text, ids, n, skip)
        steps.append((text, state.tail))
    return steps


def _check_stream(tok: Any, detok: IncrementalDetokenizer, ids: list[int], skip: bool) -> str:
    """Every step's stable text plus tail is the full decode of the ids so far; with incremental
    decoding, stable texts only grow, each a prefix of the final text. Returns the final text, which
    must be the full decode of all ids."""
    steps = _stream(detok, ids, skip)
    final = tok.decode(ids, skip_special_tokens=skip)
    prev = ""
    for n, (text, tail) in enumerate(steps, 1):
        assert text + tail == tok.decode(ids[:n], skip_special_tokens=skip), (n, ids[:n])
        if detok.incremental:
            assert text.startswith(prev) and final.startswith(text), (n, ids[:n])
        prev = text
    assert steps[-1][0] + steps[-1][1] == final
    return final


def _token_ids(tok: Any, text: str) -> list[int]:
    return list(tok.encode(text, add_special_tokens=False))


def test_tokenizers_are_incremental(tokenizer):
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.incremental, detok.fallback_reason
    # the SentencePiece-style ones really carry byte pieces, and the texts use them
    if "<0x41>" in tokenizer.get_vocab():
        assert len(detok.byte_piece_ids) == 256
        assert set(_token_ids(tokenizer, TEXTS[2])) & detok.byte_piece_ids


@pytest.mark.parametrize("skip", [True, False])
def test_texts_token_by_token(tokenizer, skip):
    detok = IncrementalDetokenizer(tokenizer)
    for text in TEXTS:
        ids = _token_ids(tokenizer, text)
        _check_stream(tokenizer, detok, ids, skip)
        # commits keep up: the stable text lags only over an incomplete character or a byte-piece run
        for n, (t, tail) in enumerate(_stream(detok, ids, skip), 1):
            if not (t + tail).endswith("\ufffd") and ids[n - 1] not in detok.byte_piece_ids:
                assert tail == "", (n, t)


def test_windows_stay_short(tokenizer):
    """Each token decodes a few tokens, not the whole output (the point of the exercise); a window
    is the last committed chunk plus the new tokens, and a chunk spans a whole run of byte pieces (which
    must be decoded together) plus a few tokens."""
    counting = _CountingTokenizer(tokenizer)
    detok = IncrementalDetokenizer(counting, probe=False)
    ids = [i for t in TEXTS for i in _token_ids(tokenizer, t)] * 4
    longest_run = run = 0
    for i in ids:
        run = run + 1 if i in detok.byte_piece_ids else 0
        longest_run = max(longest_run, run)
    counting.lengths.clear()
    _check_stream(tokenizer, detok, ids, True)
    assert len(ids) > 300
    assert max(counting.lengths) <= 2 * longest_run + 6
    assert len(counting.lengths) <= 2 * len(ids)


@pytest.mark.parametrize("seed", range(4))
def test_random_ids(tokenizer, seed):
    """Random ids over the whole vocabulary (special and byte pieces included), mixed with runs of
    real text, and runs of byte pieces that form invalid UTF-8."""
    rng = random.Random(seed)
    detok = IncrementalDetokenizer(tokenizer)
    specials = _special_ids(tokenizer)
    byte_pieces = sorted(detok.byte_piece_ids) or [i for i in range(len(tokenizer)) if i not in specials][:300]
    ids: list[int] = []
    while len(ids) < 240:
        kind = rng.random()
        if kind < 0.3:
            t = rng.choice(TEXTS)
            a = rng.randrange(len(t))
            ids += _token_ids(tokenizer, t[a:a + rng.randrange(1, 30)])
        elif kind < 0.6:
            ids += [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 6))]
        elif kind < 0.8:
            ids += [rng.choice(byte_pieces) for _ in range(rng.randrange(1, 5))]
        else:
            ids.append(rng.choice(specials))
    for skip in (True, False):
        _check_stream(tokenizer, detok, ids, skip)


def test_special_tokens_skipped_or_kept(tokenizer):
    detok = IncrementalDetokenizer(tokenizer)
    specials = _special_ids(tokenizer)
    words = _token_ids(tokenizer, " one two three")
    ids = specials[:2] + words[:1] + specials + words[1:] + specials[-1:]
    skipped = _check_stream(tokenizer, detok, ids, True)
    kept = _check_stream(tokenizer, detok, ids, False)
    assert "two" in skipped and "two" in kept
    assert all(tokenizer.convert_ids_to_tokens(s) in kept for s in specials)
    assert not any(tokenizer.convert_ids_to_tokens(s) in skipped for s in specials)


def test_clean_up_tokenizer_falls_back_to_full_decode():
    """clean_up_tokenization_spaces removes a space before punctuation that an earlier window has
    already committed: a tokenizer whose decode really cleans up is decoded in full each time, and
    stays exact; one that only carries the flag (transformers 5 ignores it for BPE) stays incremental."""
    tok = _sentencepiece_style("llama", clean_up=True)
    ids = _token_ids(tok, "a . b , do n't")
    cleans = tok.decode(ids) != "a . b , do n't"
    assert IncrementalDetokenizer(tok).incremental is not cleans
    tok.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True  # transformers 5
    assert tok.decode(ids) != "a . b , do n't"  # now it does clean up
    detok = IncrementalDetokenizer(tok)
    assert not detok.incremental and "clean" in (detok.fallback_reason or "")
    assert _check_stream(tok, detok, ids, True) == tok.decode(ids, skip_special_tokens=True)
    # and the incremental path alone would get it wrong (which is why it is not used)
    forced = IncrementalDetokenizer(tok, probe=False)
    forced.fallback_reason = None
    state, text = forced.new_state(), ""
    for n in range(1, len(ids) + 1):
        text = forced.update(state, text, ids, n, True)
    assert state.full or text + state.tail != tok.decode(ids, skip_special_tokens=True)


def test_find_stop_string_searches_only_the_new_end():
    assert find_stop_string("abc STOP", ["STOP"], 0) == ("STOP", 4)
    assert find_stop_string("abc STOP", ["STOP"], 5) == ("STOP", 4)  # straddles the searched mark
    assert find_stop_string("STOP abc", ["STOP"], 5) is None  # wholly inside the searched text
    assert find_stop_string("xx ab yy", ["yy", "ab"], 0) == ("yy", 6)  # list order, as before


# ---- the engine's stop checks ----

def _engine(tok: Any, eos: list[int]) -> LLMEngine:
    """An LLMEngine shell with only what ``_check_stop_strings`` uses."""
    engine = object.__new__(LLMEngine)
    engine.tokenizer, engine.spec, engine._detokenizer = tok, SimpleNamespace(eos_token_ids=eos), None
    return engine


def _run_engine(engine: LLMEngine, ids: list[int], params: SamplingParams, check: bool = True) -> Sequence:
    """Feed ``ids`` one by one through the stop checks until the sequence finishes; with ``check``,
    each step's text is also put through the server's streaming cursor, whose deltas must add up."""
    from dockyard.server.serving import _hold_back, _TextCursor

    seq = Sequence(0, "r", 0, [1], params, max_total_len=1 + min(len(ids), params.max_tokens or len(ids)))
    cursor, streamed = _TextCursor(_hold_back(params)), ""
    for token in ids:
        seq.output_token_ids.append(token)
        check_stop(seq, engine.spec.eos_token_ids)
        engine._check_stop_strings(seq)
        if check:
            streamed += cursor.text_delta(seq.output_text, seq.finish_reason is not None)
        if seq.finish_reason is not None:
            break
    if check:
        assert streamed == seq.output_text
    return seq


def _reference(tok: Any, eos: list[int], ids: list[int], params: SamplingParams) -> tuple[list[int], str, Any, Any]:
    """The engine's previous rule (full decode after every token, every stop string searched in the
    whole text), except that a stop string must end in text produced from ``min_tokens`` on."""
    out: list[int] = []
    text, reason, stop_reason, base = "", None, None, 0
    for token in ids:
        out.append(token)
        dec = out[:-1] if (not params.ignore_eos and out[-1] in eos) else out
        text = tok.decode(dec, skip_special_tokens=params.skip_special_tokens)
        if len(out) < params.min_tokens:
            base = len(text)
        else:
            if not params.ignore_eos and token in eos:
                return out, text, "stop", None
            if token in (params.stop_token_ids or ()):
                return out, text, "stop", token
            for stop in params.stop or ():
                idx = text.find(stop, max(0, base - len(stop) + 1))
                if idx >= 0:
                    end = idx + len(stop) if params.include_stop_str_in_output else idx
                    return out, text[:end], "stop", stop
        if len(out) >= min(params.max_tokens or len(ids), len(ids)):  # as _run_engine's max_total_len
            return out, text, "length", None
    return out, text, reason, stop_reason


def _assert_same(tok: Any, ids: list[int], params: SamplingParams, eos: list[int]) -> Sequence:
    seq = _run_engine(_engine(tok, eos), ids, params)
    ref = _reference(tok, eos, ids, params)
    assert (seq.output_token_ids, seq.output_text, seq.finish_reason, seq.stop_reason) == ref
    return seq


def _boundaries(tok: Any, ids: list[int]) -> list[int]:
    """Character offsets in the decoded text where one token's text ends and the next begins."""
    return [len(tok.decode(ids[:n])) for n in range(1, len(ids))]


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_straddling_tokens(tokenizer, include):
    text = TEXTS[0] + " " + TEXTS[3]
    ids = _token_ids(tokenizer, text)
    full = tokenizer.decode(ids)
    cut = [b for b in _boundaries(tokenizer, ids) if 30 < b < len(full) - 5][0]
    stop = full[cut - 3:cut + 2]  # three characters of one token's text, two of the next
    seq = _assert_same(tokenizer, ids, SamplingParams(max_tokens=1000, stop=[stop],
                                                      include_stop_str_in_output=include), [])
    assert seq.finish_reason == "stop" and seq.stop_reason == stop
    assert seq.output_text == full[:full.index(stop) + (len(stop) if include else 0)]
    assert len(seq.output_token_ids) < len(ids)


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_at_the_very_start(tokenizer, include):
    ids = _token_ids(tokenizer, TEXTS[1])
    full = tokenizer.decode(ids)
    seq = _assert_same(tokenizer, ids, SamplingParams(max_tokens=1000, stop=["zzz", full[:2]],
                                                      include_stop_str_in_output=include), [])
    assert seq.stop_reason == full[:2] and seq.output_text == (full[:2] if include else "")


@pytest.mark.parametrize("seed", range(6))
def test_random_stop_strings_match_the_previous_rule(tokenizer, seed):
    rng = random.Random(seed)
    text = rng.choice(TEXTS) + rng.choice(TEXTS)
    ids = _token_ids(tokenizer, text)
    full = tokenizer.decode(ids)
    stops = []
    for _ in range(rng.randrange(1, 4)):
        a = rng.randrange(len(full))
        stops.append(full[a:a + rng.randrange(1, 8)])
    stops.append("never-in-the-text")
    params = SamplingParams(max_tokens=rng.choice([1000, len(ids) // 2]), stop=stops,
                            include_stop_str_in_output=rng.random() < 0.5,
                            min_tokens=rng.choice([0, 0, len(ids) // 3]))
    _assert_same(tokenizer, ids, params, [])


def test_stop_strings_and_min_tokens(tokenizer):
    """A stop string ending before the min_tokens-th token's text does not count (the server may have
    streamed that text already); one straddling it does."""
    ids = _token_ids(tokenizer, TEXTS[0])
    full = tokenizer.decode(ids)
    params = SamplingParams(max_tokens=1000, stop=[full[:4]], min_tokens=8)
    seq = _assert_same(tokenizer, ids, params, [])
    assert seq.finish_reason == "length" and seq.output_text == full
    before = len(tokenizer.decode(ids[:7]))
    stop = full[before - 2:before + 1]
    seq = _assert_same(tokenizer, ids, SamplingParams(max_tokens=1000, stop=[stop], min_tokens=8), [])
    assert seq.stop_reason == stop and seq.output_text == full[:before - 2]
    assert len(seq.output_token_ids) >= 8  # more when the stop's last character is a byte-piece run


@pytest.mark.parametrize("skip", [True, False])
def test_eos_handling(tokenizer, skip):
    eos = tokenizer.eos_token_id
    words = _token_ids(tokenizer, "Yes, " + TEXTS[1][:6])
    ids = words + [eos] + words
    for params in (SamplingParams(max_tokens=100, skip_special_tokens=skip),  # stops at EOS: not in the text
                   SamplingParams(max_tokens=100, skip_special_tokens=skip, ignore_eos=True),  # kept unless skipped
                   SamplingParams(max_tokens=100, skip_special_tokens=skip, min_tokens=len(words) + 3)):
        seq = _assert_same(tokenizer, ids, params, [eos])
        assert seq.output_text.startswith(tokenizer.decode(words))
    seq = _run_engine(_engine(tokenizer, [eos]), ids, SamplingParams(max_tokens=100, skip_special_tokens=skip))
    assert seq.output_token_ids[-1] == eos and seq.output_text == tokenizer.decode(words)
    seq = _run_engine(_engine(tokenizer, [eos]), ids,
                      SamplingParams(max_tokens=100, skip_special_tokens=skip, ignore_eos=True))
    assert (tokenizer.eos_token in seq.output_text) is not skip


def test_stop_search_is_bounded(tokenizer):
    """After a commit the search covers only the new text plus len(stop) - 1 characters."""
    engine = _engine(tokenizer, [])
    ids = _token_ids(tokenizer, TEXTS[0] * 3)
    seq = _run_engine(engine, ids, SamplingParams(max_tokens=1000, stop=["@@@@"]))
    assert seq.finish_reason == "length" and seq.output_text == tokenizer.decode(ids)
    state = seq.detok
    assert isinstance(state, DetokenizerState) and state.searched == state.stable == len(seq.output_text)
