"""ModelSpec: the one normalized, validated description of a model.

Built from an HF ``config.json`` dict (GGUF metadata is first turned into such a dict by
``dockyard.weights.gguf_metadata``). Every architecture quirk the code branches on is a named field
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

from dockyard.dtypes import DTYPE_ALIASES, dtype_name
from dockyard.errors import AbsurdConfigError, ConfigError, InvalidModelFileError, ModelNotFoundError

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
# The hidden_act values dockyard.ops.activation implements. Listed here, not imported from there, so that
# reading and validating a config never imports torch (`dockyard inspect` refuses absurd configs at once).
ACTIVATION_NAMES = ("silu", "relu", "gelu", "gelu_pytorch_tanh", "gelu_new")

# Architecture facts that configs do not spell out as fields: fixed by the model_type.
# (dockyard.onboard.config_features reads these too, so each fact lives here only.)
QK_NORM_HEAD_TYPES = frozenset({"qwen3", "qwen3_moe", "gemma3", "gemma3_text", "cohere2", "chameleon", "olmoe"})
QK_NORM_FULL_TYPES = frozenset({"olmo2"})  # one RMSNorm over the whole q (or k) projection
QKV_BIAS_TYPES = frozenset({"qwen2", "qwen2_moe", "qwen2_vl", "qwen2_5_vl"})
SANDWICH_NORM_TYPES = frozenset({"gemma2", "gemma3", "gemma3_text"})  # pre- and post-norm around each block
POST_NORM_TYPES = frozenset({"olmo2"})  # norm on each block's output only
GEMMA_TYPES = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text"})  # (1 + w) RMSNorm, embeddings × √hidden
LAYERNORM_TYPES = frozenset({"phimoe", "phi", "phi3small", "starcoder2", "stablelm", "gpt_neox", "falcon", "gpt2",
                             "gpt_bigcode", "opt", "bloom", "mpt", "cohere"})
ATTENTION_SINK_TYPES = frozenset({"gpt_oss"})
LAYER_TYPES = ("full_attention", "sliding_attention")
MAX_SANE_POSITIONS = 10_000_000
# Published decoders have at most a few hundred layers; per-layer fields are tuples of this length.
MAX_SANE_LAYERS = 65_536
# The fields that hold one entry per layer: the only way two layers of one model can differ.
PER_LAYER_FIELDS = ("layer_types", "moe_layers")

# Every config.json key ModelSpec.from_hf_config reads (directly or through the helpers below). The inspect
# gate treats a key outside this set, outside config_features' detection and outside its list of keys that
# do not change the computation as unrecognised: dockyard cannot tell what it does.
SPEC_CONFIG_KEYS = frozenset({
    "architectures", "model_type", "text_config", "_name_or_path", "torch_dtype", "dtype",
    "bos_token_id", "eos_token_id", "pad_token_id",
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "max_position_embeddings", "rms_norm_eps", "layer_norm_epsilon", "hidden_act",
    "hidden_activation", "tie_word_embeddings", "attention_bias", "mlp_bias",
    "rope_theta", "rope_scaling", "rope_parameters", "original_max_position_embeddings", "rope_local_base_freq",
    "partial_rotary_factor", "rope_interleave",
    "sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "sliding_window_pattern",
    "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "swiglu_limit",
    "embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling",
    "num_experts", "n_routed_experts", "num_local_experts", "num_experts_per_tok", "experts_per_token",
    "moe_intermediate_size", "norm_topk_prob", "scoring_func", "topk_method", "n_group", "topk_group",
    "routed_scaling_factor", "n_shared_experts", "shared_expert_intermediate_size", "first_k_dense_replace",
    "moe_layer_freq", "mlp_only_layers", "decoder_sparse_step",
    "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "num_nextn_predict_layers",
})

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
    # longrope (Phi-3 "su"): per-frequency factors below / past original_max_position_embeddings.
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None


@dataclass(frozen=True)
class MoESpec:
    """Mixture-of-experts MLP: router, experts and shared experts (names follow HF configs)."""

    num_experts: int
    top_k: int
    intermediate_size: int  # per expert
    norm_topk_prob: bool = False  # renormalize the top-k weights to sum to 1
    scoring_func: str = "softmax"  # softmax | sigmoid
    topk_method: str = "greedy"  # greedy | group_limited_greedy | noaux_tc
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    num_shared_experts: int = 0  # DeepSeek: shared MLP of num_shared_experts × intermediate_size
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: shared MLP with a sigmoid gate
    router_bias: bool = False  # gpt-oss
    router_fp32: bool = False  # router logits in float32 (DeepSeek; grouped or sigmoid routing everywhere)


@dataclass(frozen=True)
class MLASpec:
    """Multi-head latent attention (DeepSeek-V2/V3): low-rank q and a cached kv latent."""

    q_lora_rank: int | None  # None: q is a plain projection (V2-Lite)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


@dataclass(frozen=True)
class ModelSpec:
    """Normalized description of a decoder-only language model.

    Every architectural quirk a model class branches on is a field here, with a default that
    means "as Llama does it".
    """

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
    # Per-layer attention kind ("full_attention" | "sliding_attention"); empty: every layer uses
    # sliding_window if set. Layers of kind full ignore the window.
    layer_types: tuple[str, ...] = ()
    qkv_bias: bool = False  # bias on q/k/v but not o (Qwen2)
    qk_norm: str | None = None  # "head": RMSNorm per head (Qwen3, Gemma3) | "full": over the projection (OLMo2)
    norm_type: str = "rms"  # "rms" | "rms_one_plus" (Gemma: × (1 + w)) | "layernorm"
    norm_placement: str = "pre"  # "pre" | "sandwich" (Gemma 2/3) | "post" (OLMo2)
    embedding_multiplier: float = 1.0  # Gemma: √hidden; Granite: embedding_multiplier
    round_embedding_multiplier: bool = False  # Gemma: the multiplier rounded to the activation dtype first
    residual_multiplier: float = 1.0  # Granite: each block's output is scaled before the residual add
    attention_scale: float | None = None  # None: head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5)
    logits_scale: float = 1.0  # Granite: 1 / logits_scaling
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    rope_local_theta: float | None = None  # Gemma 3: rope base of sliding layers
    partial_rotary_factor: float = 1.0  # fraction of head_dim that is rotated
    attention_sinks: bool = False  # gpt-oss: a learned per-head logit in every softmax
    swiglu_limit: float | None = None  # gpt-oss: clamped SwiGLU
    moe: MoESpec | None = None
    moe_layers: tuple[bool, ...] = ()  # per layer: MoE (True) or dense MLP (False); empty when no MoE
    mla: MLASpec | None = None
    rope_interleave: bool = True  # MLA: the rope dims come in interleaved pairs (DeepSeek), de-interleaved first
    # DeepSeek-V3 multi-token prediction: layers num_hidden_layers .. + num_nextn_predict_layers - 1 of the
    # checkpoint (models/deepseek_mtp.py), and per such layer whether its MLP is an MoE.
    num_nextn_predict_layers: int = 0
    nextn_moe_layers: tuple[bool, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    torch_dtype: str = "float32"
    name: str = "model"
    # The generic path (dockyard.models.generic): the config.json handed whole to transformers (JSON text, so
    # the spec stays hashable), and the directory of its remote modeling code when --trust-remote-code let it
    # run. Set, only the sizes and token ids above are meaningful: transformers' classes do the rest.
    transformers_config: str | None = None
    remote_code_dir: str | None = None

    # ---- derived sizes (one source of truth for every shape) ----
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def model_impl(self) -> str:
        """Which implementation runs this spec: ``"dockyard"`` (a native family) or ``"transformers"``."""
        return "dockyard" if self.transformers_config is None else "transformers"

    @property
    def max_model_len(self) -> int:
        return self.max_position_embeddings

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that rotary embeddings rotate (MLA: the decoupled rope dims)."""
        if self.mla is not None:
            return self.mla.qk_rope_head_dim
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def v_head_dim(self) -> int:
        return self.mla.v_head_dim if self.mla is not None else self.head_dim

    @property
    def kv_cache_layout(self) -> tuple[int, int, int]:
        """(entries, heads, dim) the paged KV cache stores per token and layer.

        Keys and values: (2, num_kv_heads, head_dim). MLA stores one latent per token:
        (1, 1, kv_lora_rank + qk_rope_head_dim), MLA's memory saving.
        """
        if self.mla is not None:
            return (1, 1, self.mla.kv_lora_rank + self.mla.qk_rope_head_dim)
        return (2, self.num_key_value_heads, self.head_dim)

    def layer_sliding_window(self, layer: int) -> int | None:
        """The sliding window of layer ``layer`` (None: full attention)."""
        if self.layer_types:
            return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None
        return self.sliding_window

    def is_moe_layer(self, layer: int) -> bool:
        """Whether layer ``layer``'s MLP is an MoE (past the decoder's layers: an MTP layer's)."""
        if layer >= self.num_hidden_layers:
            return bool(self.nextn_moe_layers) and self.nextn_moe_layers[layer - self.num_hidden_layers]
        return bool(self.moe_layers) and self.moe_layers[layer]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view (used by ``dockyard inspect --json``)."""
        out = dataclasses.asdict(self)
        out["eos_token_ids"] = list(self.eos_token_ids)
        out["layer_types"] = list(self.layer_types)
        out["moe_layers"] = list(self.moe_layers)
        out["nextn_moe_layers"] = list(self.nextn_moe_layers)
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
        config = language_model_config(config)
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
        model_type = str(get("model_type", ""))
        num_layers = _req_int(config, "num_hidden_layers")
        _check_layer_count(num_layers)  # before per-layer tuples are built from it
        mla = _mla_from_config(config)
        if mla is not None:  # queries and keys carry the no-rope and the rope part of each head
            head_dim = mla.qk_nope_head_dim + mla.qk_rope_head_dim
        nextn = _as_int("num_nextn_predict_layers", get("num_nextn_predict_layers") or 0)
        if nextn < 0:
            raise ConfigError(f"num_nextn_predict_layers={nextn} must be 0 or more (MTP layers in the checkpoint)")
        _check_layer_count(num_layers + nextn)
        # The MTP layers follow the decoder's and take their MLP kind from the same rule.
        moe, moe_layers = _moe_from_config(config, model_type, num_layers + nextn)
        moe_layers, nextn_moe_layers = moe_layers[:num_layers], moe_layers[num_layers:]
        intermediate = get("intermediate_size")
        if intermediate is None and moe is not None:
            intermediate = moe.intermediate_size
        eos = get("eos_token_id")
        eos_ids: tuple[int, ...] = ()
        if isinstance(eos, int):
            eos_ids = (eos,)
        elif isinstance(eos, list):
            eos_ids = tuple(int(e) for e in eos)
        dtype = get("torch_dtype") or get("dtype") or "float32"
        dtype = DTYPE_ALIASES.get(dtype_name(dtype), "float32")
        spec = cls(
            architecture=str(archs[0]),
            model_type=model_type,
            vocab_size=_req_int(config, "vocab_size"),
            hidden_size=hidden,
            num_hidden_layers=num_layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=_as_int("intermediate_size", intermediate) if intermediate is not None
            else _req_int(config, "intermediate_size"),
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
            layer_types=_layer_types(config, model_type, num_layers),
            moe=moe,
            moe_layers=moe_layers,
            mla=mla,
            num_nextn_predict_layers=nextn,
            nextn_moe_layers=nextn_moe_layers,
            **_family_fields(config, model_type, hidden),
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
        _check_layer_count(self.num_hidden_layers)
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_key_value_heads={self.num_key_value_heads}; grouped-query attention needs "
                "each KV head shared by a whole number of query heads"
            )
        if self.max_position_embeddings > MAX_SANE_POSITIONS:
            raise AbsurdConfigError(
                f"max_position_embeddings={self.max_position_embeddings} is absurd "
                f"(> {MAX_SANE_POSITIONS:,}); fix config.json"
            )
        if self.transformers_config is not None:  # the family fields below are transformers' business here
            return
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
        if self.layer_types:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ConfigError(f"layer_types has {len(self.layer_types)} entries for "
                                  f"num_hidden_layers={self.num_hidden_layers}; give one per layer")
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if bad:
                raise ConfigError(f"layer_types has unknown kind(s) {bad}; supported: {', '.join(LAYER_TYPES)}")
        if not 0.0 < self.partial_rotary_factor <= 1.0 or self.rotary_dim % 2:
            raise ConfigError(f"partial_rotary_factor={self.partial_rotary_factor} must give an even rotary "
                              f"dimension in (0, head_dim={self.head_dim}]")
        if self.moe is not None:
            m = self.moe
            if not 0 < m.top_k <= m.num_experts:
                raise ConfigError(f"num_experts_per_tok={m.top_k} must be in [1, num_experts={m.num_experts}]")
            if m.scoring_func not in ("softmax", "sigmoid"):
                raise ConfigError(f"scoring_func={m.scoring_func!r} is not supported; supported: softmax, sigmoid")
            if m.topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
                raise ConfigError(f"topk_method={m.topk_method!r} is not supported; supported: greedy, "
                                  "group_limited_greedy, noaux_tc")
            if m.num_experts % m.n_group or not 0 < m.topk_group <= m.n_group:
                raise ConfigError(f"n_group={m.n_group}, topk_group={m.topk_group} do not divide "
                                  f"n_routed_experts={m.num_experts} into groups")
            if len(self.moe_layers) != self.num_hidden_layers:
                raise ConfigError("moe_layers must have one entry per layer")
            if len(self.nextn_moe_layers) != self.num_nextn_predict_layers:
                raise ConfigError("nextn_moe_layers must have one entry per MTP layer")


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


def language_model_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's config: a multimodal wrapper's ``text_config`` (with the wrapper's architectures,
    model_type when the text part has none, and token ids), else the config itself; either way with the
    fields it omits filled from its transformers config class's defaults (:func:`with_hf_defaults`)."""
    text = config.get("text_config")
    if isinstance(text, dict) and "hidden_size" not in config:
        # A text_config relies on its class's defaults for everything it leaves out.
        merged = {**text, "model_type": text.get("model_type") or config.get("model_type")}
        merged = with_hf_defaults(merged, fill_required=True)
        merged["architectures"] = config.get("architectures")
        for key in ("eos_token_id", "bos_token_id", "pad_token_id", "torch_dtype", "dtype"):
            if key in config and key not in text:
                merged[key] = config[key]
        return merged
    return with_hf_defaults(config, fill_required=False)


# Fields a config.json must give itself: a default for these would hide a broken file.
_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")


def with_hf_defaults(config: dict[str, Any], fill_required: bool) -> dict[str, Any]:
    """``config`` with the fields it omits filled from its transformers config class's defaults.

    A published config.json means "the class defaults" for every field it leaves out (Gemma's
    tie_word_embeddings, a multimodal text_config's vocab_size and rope bases). Unknown model types,
    or a config transformers rejects, are returned unchanged, and their own fields are never replaced.
    """
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        return config
    layers = config.get("num_hidden_layers")
    if isinstance(layers, int) and layers > MAX_SANE_LAYERS:
        return config  # transformers would build per-layer lists that long; our validation refuses it
    try:
        from transformers import AutoConfig
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    except ImportError:
        return config
    if model_type not in CONFIG_MAPPING_NAMES:
        return config
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its notes on old-style fields are not for our users
    try:
        kwargs = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "auto_map")}
        defaults = AutoConfig.for_model(model_type, **kwargs).to_dict()
    except Exception:  # noqa: BLE001 - a config transformers rejects is validated by us, as given
        return config
    finally:
        hf_logging.set_verbosity(verbosity)
    # rope_parameters (transformers v5) is the config's own rope_theta / rope_scaling normalized.
    skip = set() if fill_required else set(_REQUIRED)
    out = dict(config)
    vocab = config.get("vocab_size", defaults.get("vocab_size"))
    for key, value in defaults.items():
        if key in out or key in skip:
            continue
        if key.endswith("token_id") and isinstance(value, int) and isinstance(vocab, int) and value >= vocab:
            continue  # a class default past this (possibly shrunken) vocabulary cannot be this model's token
        out[key] = value
    return out


def _check_layer_count(num_layers: int) -> None:
    if num_layers > MAX_SANE_LAYERS:
        raise AbsurdConfigError(f"num_hidden_layers={num_layers:,} is absurd (> {MAX_SANE_LAYERS:,}; published models "
                          "have a few hundred at most); fix config.json")


def is_number(value: Any) -> bool:
    """An int or float of a raw config, not a bool (JSON's true/false are ints to Python)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_int(name: str, value: Any) -> int:
    if not is_number(value) or (isinstance(value, float) and not value.is_integer()):
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


def _num(config: dict[str, Any], key: str) -> float | None:
    value = config.get(key)
    return float(value) if is_number(value) else None


def _layer_types(config: dict[str, Any], model_type: str, num_layers: int) -> tuple[str, ...]:
    """Per-layer attention kinds: the config's ``layer_types``, else derived as transformers does."""
    given = config.get("layer_types")
    if isinstance(given, list):
        return tuple(str(t) for t in given)
    if model_type == "gemma2":
        return tuple("sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers))
    if model_type in ("gemma3", "gemma3_text"):
        pattern = _as_int("sliding_window_pattern", config.get("sliding_window_pattern", 6))
        return tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers))
    if model_type in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe") and config.get("use_sliding_window"):
        first = _as_int("max_window_layers", config.get("max_window_layers", 0))
        return tuple("sliding_attention" if i >= first else "full_attention" for i in range(num_layers))
    return ()


def _moe_from_config(config: dict[str, Any], model_type: str, num_layers: int) -> tuple[
    MoESpec | None, tuple[bool, ...]
]:
    get = config.get
    experts = next((get(k) for k in ("num_experts", "n_routed_experts", "num_local_experts")
                    if isinstance(get(k), int) and get(k) > 0), None)
    if experts is None:
        return None, ()
    top_k = get("num_experts_per_tok", get("experts_per_token"))
    if top_k is None:
        raise ConfigError("an MoE config needs num_experts_per_tok (experts each token is routed to)")
    size = get("moe_intermediate_size", get("intermediate_size"))
    if size is None:
        raise ConfigError("an MoE config needs moe_intermediate_size (or intermediate_size) for its experts")
    # Mixtral and gpt-oss always renormalize the chosen experts' weights; the others say so in the config.
    norm = True if model_type in ("mixtral", "gpt_oss") else bool(get("norm_topk_prob", False))
    # DeepSeek-V3's architecture is sigmoid scoring with noaux_tc routing (transformers' class fixes it so).
    v3 = model_type in ("deepseek_v3", "kimi_k2")
    scoring = str(get("scoring_func") or ("sigmoid" if v3 else "softmax"))
    topk_method = str(get("topk_method") or ("noaux_tc" if v3 else "greedy"))
    moe = MoESpec(
        num_experts=_as_int("num_experts", experts),
        top_k=_as_int("num_experts_per_tok", top_k),
        intermediate_size=_as_int("moe_intermediate_size", size),
        norm_topk_prob=norm,
        scoring_func=scoring,
        topk_method=topk_method,
        n_group=_as_int("n_group", get("n_group") or 1),
        topk_group=_as_int("topk_group", get("topk_group") or 1),
        routed_scaling_factor=float(get("routed_scaling_factor") or 1.0),
        num_shared_experts=_as_int("n_shared_experts", get("n_shared_experts") or 0),
        shared_expert_intermediate_size=_as_int("shared_expert_intermediate_size",
                                                get("shared_expert_intermediate_size") or 0),
        router_bias=model_type == "gpt_oss",
        # HF computes DeepSeek's gate in float32 always, and every router whose choice grouping or sigmoid
        # scores make sensitive to rounding.
        router_fp32=model_type.startswith("deepseek") or topk_method != "greedy" or scoring == "sigmoid",
    )
    if model_type in ("deepseek_v2", "deepseek_v3", "kimi_k2"):
        first_dense = _as_int("first_k_dense_replace", get("first_k_dense_replace") or 0)
        freq = _as_int("moe_layer_freq", get("moe_layer_freq") or 1)
        layers = tuple(i >= first_dense and i % freq == 0 for i in range(num_layers))
    else:
        dense = set(get("mlp_only_layers") or ())
        step = _as_int("decoder_sparse_step", get("decoder_sparse_step") or 1)
        layers = tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers))
    return moe, layers


def _mla_from_config(config: dict[str, Any]) -> MLASpec | None:
    if not config.get("kv_lora_rank"):
        return None
    q_rank = config.get("q_lora_rank")
    return MLASpec(
        q_lora_rank=None if q_rank is None else _as_int("q_lora_rank", q_rank),
        kv_lora_rank=_req_int(config, "kv_lora_rank"),
        qk_nope_head_dim=_req_int(config, "qk_nope_head_dim"),
        qk_rope_head_dim=_req_int(config, "qk_rope_head_dim"),
        v_head_dim=_req_int(config, "v_head_dim"),
    )


def _family_fields(config: dict[str, Any], model_type: str, hidden: int) -> dict[str, Any]:
    """The ModelSpec fields that depend on the family's conventions more than on plain numbers."""
    get = config.get
    out: dict[str, Any] = {}
    if model_type in QKV_BIAS_TYPES:
        out["qkv_bias"] = True
    if model_type in QK_NORM_HEAD_TYPES:
        out["qk_norm"] = "head"
    elif model_type in QK_NORM_FULL_TYPES:
        out["qk_norm"] = "full"
    if model_type in GEMMA_TYPES:
        out["norm_type"] = "rms_one_plus"
        out["embedding_multiplier"] = math.sqrt(hidden)
        out["round_embedding_multiplier"] = True  # Granite's multiplier, below, is applied unrounded
    elif model_type in LAYERNORM_TYPES:
        out["norm_type"] = "layernorm"
    if model_type in SANDWICH_NORM_TYPES:
        out["norm_placement"] = "sandwich"
    elif model_type in POST_NORM_TYPES:
        out["norm_placement"] = "post"
    if _num(config, "query_pre_attn_scalar"):
        out["attention_scale"] = float(get("query_pre_attn_scalar")) ** -0.5
    # Granite's muP-style multipliers.
    if _num(config, "embedding_multiplier") is not None:
        out["embedding_multiplier"] = float(get("embedding_multiplier"))
    if _num(config, "residual_multiplier") is not None:
        out["residual_multiplier"] = float(get("residual_multiplier"))
    if _num(config, "attention_multiplier") is not None:
        out["attention_scale"] = float(get("attention_multiplier"))
    if _num(config, "logits_scaling"):
        out["logits_scale"] = 1.0 / float(get("logits_scaling"))
    for key in ("attn_logit_softcapping", "final_logit_softcapping", "swiglu_limit"):
        if _num(config, key):
            out[key] = float(get(key))
    local = _num(config, "rope_local_base_freq")
    params = get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get("sliding_attention"), dict):
        local = float(params["sliding_attention"].get("rope_theta") or 10000.0)
    if local is not None:
        out["rope_local_theta"] = local
    partial = _num(config, "partial_rotary_factor")
    if partial is None and isinstance(params, dict):
        partial = _num(params, "partial_rotary_factor")
    if partial is not None:
        out["partial_rotary_factor"] = partial
    if model_type in ATTENTION_SINK_TYPES:
        out["attention_sinks"] = True
    if get("rope_interleave") is False:
        out["rope_interleave"] = False
    return out


def _rope_from_config(config: dict[str, Any]) -> RopeSpec:
    # transformers v5 writes rope_parameters (theta inside); v4 configs use rope_theta + rope_scaling.
    params = config.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get("full_attention"), dict):
        params = params["full_attention"]  # v5 per-layer-type parameters (Gemma 3): global layers'
    scaling = dict(params) if isinstance(params, dict) else dict(config.get("rope_scaling") or {})
    theta = scaling.pop("rope_theta", None) or config.get("rope_theta", 10000.0)
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    if rope_type == "su":  # old Phi-3 spelling
        rope_type = "longrope"
    known = {f.name for f in dataclasses.fields(RopeSpec)} - {"rope_type", "theta"}
    kwargs = {k: v for k, v in scaling.items() if k in known and v is not None}
    for key in ("short_factor", "long_factor"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(float(v) for v in kwargs[key])
    if rope_type in ("llama3", "yarn", "dynamic", "longrope") and "original_max_position_embeddings" not in kwargs:
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
    if rope.rope_type == "longrope":  # lengths are checked by RotaryEmbedding, which knows rotary_dim
        for name in ("short_factor", "long_factor"):
            values = getattr(rope, name)
            if not isinstance(values, (tuple, list)) or not values:
                raise ConfigError(f"rope_scaling.{name} (a list of numbers) is required for rope_type='longrope'")
            bad = [v for v in values if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v))]
            if bad:
                raise ConfigError(f"rope_scaling.{name} must hold positive numbers; it has {bad[0]!r}")
