"""ModelSpec: the one normalized, validated description of a model.

Built from an HF ``config.json`` dict (GGUF metadata is first turned into such a dict by
``dockyard.weights.gguf``). Every architecture quirk the code branches on is a named field
here; nothing past this module reads raw config dicts. Validation fails early with a
message that names the field and the value.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dockyard.errors import ConfigError, InvalidModelFileError, ModelNotFoundError
from dockyard.ops.activation import ACTIVATION_NAMES

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
MAX_SANE_POSITIONS = 10_000_000

_DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}


@dataclass(frozen=True)
class RopeSpec:
    """Rotary position embedding: type, base and the scaling parameters each type uses.

    Parameter names follow HF's ``rope_scaling`` / ``rope_parameters`` keys.
    """

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    # llama3, yarn, dynamic: the context length the model was pre-trained with.
    original_max_position_embeddings: int | None = None
    # llama3
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    # yarn
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool | None = None


@dataclass(frozen=True)
class ModelSpec:
    """Normalized description of a decoder-only language model (Llama family today)."""

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    hidden_act: str
    rope: RopeSpec
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # each token attends to the last sliding_window tokens only
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    torch_dtype: str = "float32"
    name: str = "model"

    # ---- derived sizes (one source of truth for every shape) ----
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def max_model_len(self) -> int:
        return self.max_position_embeddings

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view (used by ``dockyard inspect --json``)."""
        out = dataclasses.asdict(self)
        out["eos_token_ids"] = list(self.eos_token_ids)
        return out

    def replace(self, **changes: Any) -> ModelSpec:
        """A copy with some fields changed, validated again."""
        new = dataclasses.replace(self, **changes)
        new.validate()
        return new

    # ---- construction ----
    @classmethod
    def from_hf_config(cls, config: dict[str, Any], name: str | None = None) -> ModelSpec:
        """Build and validate a spec from an HF ``config.json`` dict."""
        if not isinstance(config, dict):
            raise ConfigError(f"config must be a JSON object, got {type(config).__name__}")
        archs = config.get("architectures") or []
        if not archs:
            raise ConfigError(
                "config has no 'architectures' list; dockyard picks the model class from "
                "architectures[0] (e.g. 'LlamaForCausalLM')"
            )
        text = config.get("text_config")
        if isinstance(text, dict) and "hidden_size" not in config:
            # Multimodal wrappers keep the language model's numbers in text_config.
            merged = {**text, "architectures": archs}
            config = merged
        get = config.get
        hidden = _req_int(config, "hidden_size")
        heads = _req_int(config, "num_attention_heads")
        kv_heads = get("num_key_value_heads")
        kv_heads = heads if kv_heads is None else _as_int("num_key_value_heads", kv_heads)
        head_dim = get("head_dim")
        if head_dim is None:
            if heads > 0 and hidden % heads != 0:
                raise ConfigError(
                    f"hidden_size={hidden} is not divisible by num_attention_heads={heads} "
                    "and the config gives no head_dim; add head_dim to config.json"
                )
            head_dim = hidden // heads if heads > 0 else 0
        head_dim = _as_int("head_dim", head_dim)
        eos = get("eos_token_id")
        eos_ids: tuple[int, ...] = ()
        if isinstance(eos, int):
            eos_ids = (eos,)
        elif isinstance(eos, list):
            eos_ids = tuple(int(e) for e in eos)
        dtype = get("torch_dtype") or get("dtype") or "float32"
        dtype = _DTYPES.get(str(dtype).replace("torch.", ""), "float32")
        spec = cls(
            architecture=str(archs[0]),
            model_type=str(get("model_type", "")),
            vocab_size=_req_int(config, "vocab_size"),
            hidden_size=hidden,
            num_hidden_layers=_req_int(config, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=_req_int(config, "intermediate_size"),
            max_position_embeddings=_as_int(
                "max_position_embeddings", get("max_position_embeddings", 2048)
            ),
            rms_norm_eps=float(get("rms_norm_eps", get("layer_norm_epsilon", 1e-6))),
            hidden_act=str(get("hidden_act", get("hidden_activation", "silu"))),
            rope=_rope_from_config(config),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            attention_bias=bool(get("attention_bias", False)),
            mlp_bias=bool(get("mlp_bias", False)),
            sliding_window=_sliding_window(config),
            bos_token_id=get("bos_token_id") if isinstance(get("bos_token_id"), int) else None,
            eos_token_ids=eos_ids,
            pad_token_id=get("pad_token_id") if isinstance(get("pad_token_id"), int) else None,
            torch_dtype=dtype,
            name=name or str(get("_name_or_path") or archs[0]),
        )
        spec.validate()
        return spec

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelSpec:
        """Build a spec from a ``config.json`` path, with errors that name the file."""
        return cls.from_hf_config(read_config_json(path), name=Path(path).resolve().parent.name)

    # ---- validation ----
    def validate(self) -> None:
        """Raise ConfigError naming the first field whose value cannot be right."""
        for fname in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "head_dim", "intermediate_size",
                      "max_position_embeddings"):
            value = getattr(self, fname)
            if value <= 0:
                raise ConfigError(f"{fname}={value} must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_key_value_heads={self.num_key_value_heads}; grouped-query attention needs "
                "each KV head shared by a whole number of query heads"
            )
        if self.max_position_embeddings > MAX_SANE_POSITIONS:
            raise ConfigError(
                f"max_position_embeddings={self.max_position_embeddings} is absurd "
                f"(> {MAX_SANE_POSITIONS:,}); fix config.json"
            )
        if self.head_dim % 2 != 0:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if not (0.0 < self.rms_norm_eps < 1.0):
            raise ConfigError(f"rms_norm_eps={self.rms_norm_eps} must be in (0, 1)")
        if self.hidden_act not in ACTIVATION_NAMES:
            raise ConfigError(
                f"hidden_act={self.hidden_act!r} is not supported; supported: {', '.join(ACTIVATION_NAMES)}"
            )
        for tok_field in ("bos_token_id", "pad_token_id"):
            tok = getattr(self, tok_field)
            if tok is not None and not (0 <= tok < self.vocab_size):
                raise ConfigError(f"{tok_field}={tok} is outside the vocabulary [0, {self.vocab_size})")
        for tok in self.eos_token_ids:
            if not (0 <= tok < self.vocab_size):
                raise ConfigError(f"eos_token_id={tok} is outside the vocabulary [0, {self.vocab_size})")
        _validate_rope(self.rope)


def read_config_json(path: str | Path) -> dict[str, Any]:
    """Read a config.json, turning every way it can fail into a message naming the path."""
    p = Path(path)
    if not p.exists():
        raise ModelNotFoundError(f"config file not found: {p}")
    try:
        data = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidModelFileError(f"{p} is not valid JSON ({exc}); is it really a config.json?") from exc
    if not isinstance(data, dict):
        raise InvalidModelFileError(f"{p} must hold a JSON object, found {type(data).__name__}")
    return data


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
        isinstance(value, float) and not value.is_integer()
    ):
        raise ConfigError(f"{name}={value!r} must be an integer")
    return int(value)


def _req_int(config: dict[str, Any], name: str) -> int:
    if name not in config or config[name] is None:
        raise ConfigError(f"config is missing required field {name!r}")
    return _as_int(name, config[name])


def _sliding_window(config: dict[str, Any]) -> int | None:
    window = config.get("sliding_window")
    if window is None or config.get("use_sliding_window") is False:
        return None
    window = _as_int("sliding_window", window)
    if window <= 0:
        raise ConfigError(f"sliding_window={window} must be a positive integer or null")
    return window


def _rope_from_config(config: dict[str, Any]) -> RopeSpec:
    # transformers v5 writes rope_parameters (theta inside); v4 configs use rope_theta + rope_scaling.
    params = config.get("rope_parameters")
    scaling = dict(params) if isinstance(params, dict) else dict(config.get("rope_scaling") or {})
    theta = scaling.pop("rope_theta", None) or config.get("rope_theta", 10000.0)
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    if rope_type == "su":  # old Phi-3 spelling
        rope_type = "longrope"
    known = {f.name for f in dataclasses.fields(RopeSpec)} - {"rope_type", "theta"}
    kwargs = {k: v for k, v in scaling.items() if k in known and v is not None}
    if rope_type in ("llama3", "yarn", "dynamic") and "original_max_position_embeddings" not in kwargs:
        omax = config.get("original_max_position_embeddings") or config.get("max_position_embeddings")
        if omax is not None:
            kwargs["original_max_position_embeddings"] = int(omax)
    if "factor" in kwargs:
        kwargs["factor"] = float(kwargs["factor"])
    return RopeSpec(rope_type=str(rope_type), theta=float(theta), **kwargs)


def _validate_rope(rope: RopeSpec) -> None:
    if rope.rope_type not in ROPE_TYPES:
        raise ConfigError(
            f"rope_scaling.rope_type={rope.rope_type!r} is not supported; "
            f"supported: {', '.join(ROPE_TYPES)}"
        )
    if not (rope.theta > 0 and math.isfinite(rope.theta)):
        raise ConfigError(f"rope_theta={rope.theta} must be a positive number")
    if rope.rope_type != "default" and not rope.factor > 0:
        raise ConfigError(f"rope_scaling.factor={rope.factor} must be > 0 for rope_type={rope.rope_type!r}")
    if rope.rope_type == "llama3":
        for name in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if getattr(rope, name) is None:
                raise ConfigError(f"rope_scaling.{name} is required for rope_type='llama3'")
        if rope.high_freq_factor <= rope.low_freq_factor:  # type: ignore[operator]
            raise ConfigError(
                f"rope_scaling.high_freq_factor={rope.high_freq_factor} must exceed "
                f"low_freq_factor={rope.low_freq_factor}"
            )
