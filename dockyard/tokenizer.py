"""Load the HF tokenizer of a model directory or of a GGUF file (with a conversion cache).

transformers builds a GGUF file's tokenizer from its metadata, which takes seconds. The result is
saved with ``save_pretrained`` under ``$DOCKYARD_CACHE/tokenizers/<key>/`` (default cache:
``~/.cache/dockyard``), where the key derives from the file's header (its metadata and tensor table: all the
tokenizer is built from, so a reinstalled or copied file hits the same entry) and the transformers version,
so a later load takes a fraction of a second. Entries are written to a temporary
directory and renamed into place, so a crash cannot leave a half-written entry; an entry that fails to
load is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from dockyard.errors import InvalidModelFileError, ModelNotFoundError
from dockyard.weights.gguf_header import read_header
from dockyard.weights.gguf_metadata import GGUF_MAGIC

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
CACHE_ENV = "DOCKYARD_CACHE"
_MARKER = "dockyard_tokenizer_cache.json"  # written last: its presence marks a complete entry


def cache_root() -> Path:
    """The dockyard cache directory: ``$DOCKYARD_CACHE`` or ``~/.cache/dockyard``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dockyard"


def load_tokenizer(model_path: str | Path, gguf_file: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of an HF model directory, or of ``gguf_file`` (a path, or a name inside ``model_path``).

    ``model_path`` may also be a ``.gguf`` file itself.
    """
    model_path = Path(model_path).expanduser()
    if gguf_file is None and model_path.suffix == ".gguf" and not model_path.is_dir():
        return _load_gguf_tokenizer(model_path)
    if gguf_file is not None:
        gguf_path = Path(gguf_file).expanduser()
        return _load_gguf_tokenizer(gguf_path if gguf_path.is_absolute() else model_path / gguf_path)
    return _load_dir_tokenizer(model_path)


def _load_dir_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    if not model_dir.is_dir():
        raise ModelNotFoundError(f"model directory not found: {model_dir}; check the path")
    if not any((model_dir / f).exists() for f in TOKENIZER_FILES):
        raise ModelNotFoundError(
            f"tokenizer files are missing in {model_dir}: looked for {', '.join(TOKENIZER_FILES)}; "
            "copy the tokenizer files of the model there, or pass prompts as token ids"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:  # transformers raises many types for broken tokenizer files
        raise InvalidModelFileError(
            f"cannot load the tokenizer in {model_dir} ({type(exc).__name__}: {exc}); "
            "check that its tokenizer files are complete"
        ) from exc


def _cache_key(path: Path) -> str:
    import transformers

    try:
        header = read_header(path)
    except Exception as exc:  # the header parser fails in many ways (ValueError, struct.error, ...) on bad input
        raise InvalidModelFileError(
            f"{path} is not a valid GGUF file ({type(exc).__name__}: {exc}); it may be truncated or corrupt: "
            "download it again"
        ) from exc
    digest = hashlib.sha256(header.header_bytes())
    digest.update(f"|transformers={transformers.__version__}".encode())
    return f"{path.stem}-{digest.hexdigest()[:16]}"


def _load_cached(entry: Path) -> PreTrainedTokenizerBase | None:
    """The tokenizer in cache ``entry``, or None if it is absent or broken (a broken one is removed)."""
    marker = entry / _MARKER
    if not marker.exists():
        if entry.exists():
            shutil.rmtree(entry, ignore_errors=True)
        return None
    from transformers import AutoTokenizer

    try:
        info = json.loads(marker.read_text())
        tok = AutoTokenizer.from_pretrained(str(entry), local_files_only=True)
        if info.get("has_chat_template") and not tok.chat_template:
            raise ValueError("chat template lost")
        return tok
    except Exception as exc:  # any failure means a corrupt entry: rebuild it
        logger.warning("tokenizer cache entry %s is broken (%s); rebuilding it", entry, exc)
        shutil.rmtree(entry, ignore_errors=True)
        return None


def _convert_gguf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The slow path: transformers builds the tokenizer from the GGUF metadata."""
    from transformers import AutoTokenizer

    try:
        with open(path, "rb") as fh:
            magic = fh.read(len(GGUF_MAGIC))
    except OSError as exc:
        raise InvalidModelFileError(f"cannot read {path} ({exc}); check its permissions") from exc
    if magic != GGUF_MAGIC:
        raise InvalidModelFileError(
            f"{path} is not a valid GGUF file (it does not start with the GGUF magic bytes); "
            "pass a .gguf file written by llama.cpp's converter"
        )
    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except Exception as exc:  # transformers' GGUF parsing and conversion fail in many ways
        raise InvalidModelFileError(
            f"cannot build a tokenizer from {path} ({type(exc).__name__}: {exc}); it may be truncated "
            "(download it again) or carry no tokenizer metadata (pass prompts as token ids)"
        ) from exc


def _save_entry(tok: PreTrainedTokenizerBase, source: Path, entry: Path) -> None:
    """Write ``tok`` to cache ``entry`` atomically; a failure only costs the next load some seconds."""
    tmp: Path | None = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
        tok.save_pretrained(str(tmp))
        info = {"source": str(source.resolve()), "has_chat_template": bool(tok.chat_template)}
        (tmp / _MARKER).write_text(json.dumps(info))
        try:
            os.rename(tmp, entry)
            tmp = None
        except OSError:  # another process wrote the entry first: keep theirs
            pass
    except Exception as exc:  # caching is an optimization: never fail the load over it
        logger.warning("cannot cache the tokenizer of %s under %s (%s)", source, entry, exc)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# How many of a vocabulary's whole-word tokens the round-trip check encodes, and the share that must come back
# as themselves (a working tokenizer returns all of them; a broken conversion splits them into pieces).
ROUND_TRIP_SAMPLE = 200
ROUND_TRIP_MIN_SHARE = 0.8


def whole_word_round_trip(tok: PreTrainedTokenizerBase) -> tuple[int, int, str]:
    """(how many sampled tokens encode back to themselves, how many were sampled, one that did not, or "").

    The sample: up to :data:`ROUND_TRIP_SAMPLE` ids spread over the vocabulary whose text is an ASCII word of
    three or more letters, with or without a leading space. Encoding that text alone must give the token
    itself in any BPE or SentencePiece vocabulary built from its own merges or scores."""
    special = set(tok.all_special_ids)
    vocab = len(tok)
    words = []
    for i in range(0, vocab, max(1, vocab // (20 * ROUND_TRIP_SAMPLE))):
        text = tok.decode([i])
        word = text.strip()
        if i not in special and len(word) >= 3 and word.isascii() and word.isalpha() and text in (word, " " + word):
            words.append((i, text))
    sample = words[:: max(1, len(words) // ROUND_TRIP_SAMPLE)][:ROUND_TRIP_SAMPLE]
    ok, bad = 0, ""
    for i, text in sample:
        ids = tok.encode(text, add_special_tokens=False)
        if ids == [i]:
            ok += 1
        elif not bad:
            bad = f"{text!r} (token {i}) -> {ids}"
    return ok, len(sample), bad


def _round_trips(tok: PreTrainedTokenizerBase) -> tuple[bool, str]:
    ok, n, bad = whole_word_round_trip(tok)
    why = f"{ok} of {n} sampled whole-word tokens encode to themselves, e.g. {bad}"
    return n == 0 or ok >= ROUND_TRIP_MIN_SHARE * n, why


def _load_gguf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The GGUF's tokenizer, cached; checked to encode its own vocabulary's words back to themselves, since some
    transformers versions convert some GGUF vocabularies (Gemma-3's under 5.17) into a tokenizer that splits
    every word, which would silently change every prompt."""
    if not path.is_file():
        raise ModelNotFoundError(f"GGUF file not found: {path}; check the path")
    entry = cache_root() / "tokenizers" / _cache_key(path)
    tok = _load_cached(entry)
    if tok is not None:
        good, _ = _round_trips(tok)
        if good:
            return tok
        logger.warning("tokenizer cache entry %s does not round-trip its vocabulary; rebuilding it", entry)
        shutil.rmtree(entry, ignore_errors=True)
    tok = _convert_gguf_tokenizer(path)
    good, why = _round_trips(tok)
    if not good:
        import transformers

        raise InvalidModelFileError(
            f"the tokenizer transformers {transformers.__version__} builds from {path} does not tokenize its own "
            f"vocabulary ({why}): this transformers version converts this GGUF's tokenizer wrongly. Upgrade "
            "transformers, or pass --tokenizer with the model's Hugging Face tokenizer directory"
        )
    _save_entry(tok, path, entry)
    return tok
