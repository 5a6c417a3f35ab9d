"""``generation_config.json``: the publisher's sampling defaults and end-of-sequence ids.

vLLM's ``--generation-config`` semantics:

- ``auto`` (default): the model directory's ``generation_config.json``, read with transformers'
  ``GenerationConfig``; the values it sets (``to_diff_dict``) for temperature, top_p, top_k, min_p,
  repetition_penalty and max_new_tokens (as ``max_tokens``) become the defaults of requests that do not
  set them.
- ``vllm``: vLLM's own defaults (``SamplingParams()``'s); the file's end-of-sequence ids still apply.
- a folder holding a ``generation_config.json`` (or the file itself): that file, as under ``auto``.

Its ``eos_token_id`` (an id or a list) adds to ``config.json``'s: generation stops at any of them
(gpt-oss lists 199999 only there). That is how transformers' ``generate`` reads it too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dockyard.errors import ConfigError

logger = logging.getLogger(__name__)

FILE_NAME = "generation_config.json"
MODES = ("auto", "vllm")
# generation_config key -> SamplingParams field (the keys vLLM takes from the file).
SAMPLING_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                 "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


@dataclass(frozen=True)
class GenerationDefaults:
    """What a generation config contributes: request defaults and extra end-of-sequence ids."""

    source: str = "none"  # the file read, "vllm", or "none"
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingParams field -> default
    eos_token_ids: tuple[int, ...] = ()

    def describe(self) -> str:
        """One line for logs: where the defaults come from and what they are."""
        values = ", ".join(f"{k}={v}" for k, v in self.sampling.items()) or "vLLM's defaults"
        eos = f"; end-of-sequence ids {list(self.eos_token_ids)}" if self.eos_token_ids else ""
        return f"sampling defaults from {self.source}: {values}{eos}"


def _read(path: Path) -> dict[str, Any]:
    """The values ``path`` (a generation_config.json) sets, as transformers reads them."""
    from transformers import GenerationConfig  # heavy: imported only when a file is there to read

    try:
        config = GenerationConfig.from_pretrained(str(path.parent), config_file_name=path.name,
                                                  local_files_only=True)
    except Exception as exc:  # transformers raises many types for a malformed file
        raise ConfigError(f"cannot read {path} ({type(exc).__name__}: {exc}); fix the file, or pass "
                          "--generation-config vllm to ignore it") from None
    return config.to_diff_dict()


def _eos_ids(values: dict[str, Any], path: Path) -> tuple[int, ...]:
    eos = values.get("eos_token_id")
    if eos is None:
        return ()
    items = [eos] if isinstance(eos, int) else eos
    if not isinstance(items, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                              for t in items):
        raise ConfigError(f"{path}: eos_token_id must be a token id or a list of them, got {eos!r}")
    return tuple(dict.fromkeys(items))


def load_generation_config(mode: str, model_dir: Path | None) -> GenerationDefaults:
    """The generation defaults for ``--generation-config mode`` of the model in ``model_dir`` (None: a
    GGUF or a bare config, which ship no generation_config.json beside them)."""
    if mode in MODES:
        path = model_dir / FILE_NAME if model_dir is not None else None
        if path is None or not path.is_file():
            return GenerationDefaults("vllm" if mode == "vllm" else "none")
    else:
        given = Path(mode).expanduser()
        path = given / FILE_NAME if given.is_dir() else given
        if not path.is_file():
            raise ConfigError(f"--generation-config {mode}: no {FILE_NAME} there; give auto, vllm, or a folder "
                              f"holding a {FILE_NAME}")
    values = _read(path)
    eos = _eos_ids(values, path)
    if mode == "vllm":
        return GenerationDefaults("vllm", {}, eos)
    sampling = {dst: values[src] for src, dst in SAMPLING_KEYS.items() if values.get(src) is not None}
    return GenerationDefaults(str(path), sampling, eos)
