"""``speculative_config``: which proposer speculative decoding uses and how many tokens it proposes.

vLLM's shape (``{"method": "ngram" | "draft_model" | "mtp", "num_speculative_tokens": k, ...}``),
checked when it is made; kept free of torch so that the command-line parsers can build it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dockyard.errors import ConfigError

SPECULATIVE_METHODS = ("ngram", "draft_model", "mtp")


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's ``speculative_config``: ``method``, ``num_speculative_tokens`` and the method's own keys
    (``prompt_lookup_min`` / ``prompt_lookup_max`` for ngram, ``model`` for draft_model; mtp reads the target's
    own checkpoint)."""

    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    model: str | None = None

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise ConfigError(f"speculative_config method={self.method!r} is not one of "
                              f"{', '.join(SPECULATIVE_METHODS)}")
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
                raise ConfigError(f"speculative_config {name}={value!r} must be a whole number in [1, 64]")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ConfigError(f"speculative_config prompt_lookup_min={self.prompt_lookup_min} exceeds "
                              f"prompt_lookup_max={self.prompt_lookup_max}")
        if self.method == "draft_model" and not self.model:
            raise ConfigError("speculative_config method='draft_model' needs \"model\": the draft checkpoint "
                              "(a path or hub id of a model with the same tokenizer)")

    @classmethod
    def parse(cls, value: str | Mapping[str, Any] | SpeculativeConfig | None) -> SpeculativeConfig | None:
        """The config from a JSON string (the ``--speculative-config`` flag), a dict or itself."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"speculative_config {value!r} is not JSON ({exc}); give e.g. "
                                  '\'{"method": "ngram", "num_speculative_tokens": 3}\'') from exc
        if not isinstance(value, Mapping):
            raise ConfigError(f"speculative_config must be a JSON object, got {type(value).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"speculative_config keys {unknown} are not understood; known keys: {sorted(known)}")
        if "method" not in value or "num_speculative_tokens" not in value:
            raise ConfigError("speculative_config needs \"method\" and \"num_speculative_tokens\"")
        return cls(**value)
