"""What a model's raw ``config.json`` asks of an implementation, and what no dockyard class covers.

``ModelSpec`` validates only what dockyard implements, so it rejects (rightly) configs that need
more. The inspect gate needs the other view: read the raw dict, name every architectural feature
it asks for (MoE, MLA, qk-norm, soft-capping, longrope, ...), and compare that with what each
registered family declares in ``dockyard.registry``. Detection never raises on a strange config:
every reader tolerates missing or ill-typed fields.

Feature kinds: ``arch`` features change the computation and must be implemented for the model to
run; ``checkpoint`` features (quantization, MTP heads) are properties of the weights, checked by the
features gate; ``info`` features are worth knowing but change nothing here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from dockyard.registry import MODEL_REGISTRY
from dockyard.spec import (
    ATTENTION_SINK_TYPES,
    GEMMA_TYPES,
    LAYERNORM_TYPES,
    QK_NORM_FULL_TYPES,
    QK_NORM_HEAD_TYPES,
    QKV_BIAS_TYPES,
    SANDWICH_NORM_TYPES,
    SPEC_CONFIG_KEYS,
    language_model_config,
)
from dockyard.spec import POST_NORM_TYPES as POST_NORM_ONLY_TYPES

# model_type → property that is not spelled out as a config field but fixed by the architecture
# (the facts ModelSpec also uses live in dockyard.spec).
QK_NORM_TYPES = QK_NORM_HEAD_TYPES | QK_NORM_FULL_TYPES
POST_NORM_TYPES = SANDWICH_NORM_TYPES | POST_NORM_ONLY_TYPES
FUSED_QKV_TYPES = {"phi3", "phi3small", "chatglm", "glm", "dbrx"}  # [q | k | v] side by side
GROUPED_QKV_TYPES = {"internlm2", "gpt_neox", "falcon"}  # fused, but grouped per (KV) head
PLAIN_MLP_TYPES = {"starcoder2", "gpt2", "gpt_bigcode", "gpt_neox", "falcon", "phi", "opt", "bloom", "mpt"}
MUP_KEYS = ("mup_attn_multiplier", "mup_embedding_multiplier", "mup_width_multiplier")
EMBED_SCALE_TYPES = GEMMA_TYPES
BLOCKSPARSE_TYPES = {"phi3small"}


# Keys that do not change what a forward pass computes (training-only settings, bookkeeping, token ids of
# towers dockyard does not run). Together with spec.SPEC_CONFIG_KEYS and the keys detect_features reads,
# they are every key inspect recognises; any other key is reported as unrecognised.
NON_COMPUTE_KEYS = frozenset({
    "transformers_version", "transformers.js_config", "use_cache", "initializer_range", "attn_implementation",
    "cache_implementation", "pretraining_tp",  # v4 Llama's pretraining_tp splits the same matmuls in slices
    "router_aux_loss_coef", "aux_loss_alpha", "seq_aux", "output_router_logits", "router_jitter_noise",
    "input_jitter_noise", "ep_size", "is_llama_config", "attention_softmax_in_fp32",
    "initial_context_length",  # gpt-oss: repeats rope_scaling's original_max_position_embeddings
    "image_token_index", "boi_token_index", "eoi_token_index", "mm_tokens_per_image", "unk_token_id",
    "sep_token_id", "decoder_start_token_id", "tokenizer_class",
    "image_token_id", "boi_token_id", "eoi_token_id",  # transformers 5's names of the three above
    "_sliding_window_pattern",  # transformers 5 saves it beside layer_types, which decides each layer's kind
})
_NON_COMPUTE_SUFFIXES = ("dropout", "_pdrop", "dropout_prob")  # inference runs without dropout
# Keys whose value here is the computation dockyard does anyway (any other value is unrecognised).
NEUTRAL_VALUES: dict[str, object] = {"rope_interleaved": False, "interpolate_factor": 1, "rope_position_scale": 1.0,
                                     "full_attn_mod": 1, "use_bidirectional_attention": False}
# Keys detect_features reads beyond the spec's (each either names a feature or is checked for its neutral value).
DETECTED_KEYS = frozenset({
    "n_head", "num_heads", "multi_query_group_num", "num_kv_heads", "multi_query_attention", "bias",
    "add_bias_linear", "add_qkv_bias", "use_bias", "rotary_pct", "use_mrope", "original_rope", "rope_embedding_base",
    "rmsnorm", "norm_type", "mlp_type", "lm_head_bias", "scale_emb", "dim_model_base", "scale_depth", "logit_scale",
    "use_qk_norm",
    "mup_use_scaling", *MUP_KEYS, "moe_num_experts", "moe_top_k", "num_shared_experts", "vision_config",
    "audio_config", "quantization_config", "num_nextn_predict_layers", "auto_map",
})


def unrecognised_keys(config: dict[str, Any]) -> list[str]:
    """Keys of ``config`` (and of its ``text_config``, as ``text_config.KEY``) that dockyard does not know: not
    read by the spec, not read by feature detection, not known to leave the computation unchanged."""
    if not isinstance(config, dict):
        return []

    def unknown(key: str, value: object) -> bool:
        if key in SPEC_CONFIG_KEYS or key in DETECTED_KEYS or key in NON_COMPUTE_KEYS:
            return False
        if key.startswith("blocksparse") or key.endswith(_NON_COMPUTE_SUFFIXES):
            return False
        return not (key in NEUTRAL_VALUES and value == NEUTRAL_VALUES[key])

    found = [k for k, v in config.items() if unknown(str(k), v)]
    text = config.get("text_config")
    if isinstance(text, dict):
        found += [f"text_config.{k}" for k, v in text.items() if unknown(str(k), v)]
    return found


@dataclass(frozen=True)
class Feature:
    """One thing the config asks for: a stable key, a label for people, and the evidence."""

    key: str
    label: str
    detail: str = ""
    kind: str = "arch"  # arch | checkpoint | info

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's fields: ``text_config`` of multimodal wrappers, else the config itself."""
    try:
        return language_model_config(config)
    except Exception:  # noqa: BLE001 - detection never raises on a strange config
        return config


def _num(config: dict[str, Any], *keys: str) -> float | None:
    """The first of ``keys`` holding a number (bools excluded), else None."""
    for key in keys:
        value = config.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _rope_type(config: dict[str, Any]) -> str:
    params = config.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get("full_attention"), dict):
        params = params["full_attention"]  # per layer type (Gemma 3): the global layers' scaling
    scaling = params if isinstance(params, dict) else config.get("rope_scaling")
    if not isinstance(scaling, dict):
        return "default"
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    return "longrope" if kind == "su" else str(kind)


def _activation(config: dict[str, Any]) -> str | None:
    value = config.get("hidden_act") or config.get("hidden_activation")
    return str(value) if isinstance(value, str) else None


def detect_features(config: dict[str, Any]) -> list[Feature]:
    """Every feature ``config`` asks for, in a stable order."""
    if not isinstance(config, dict):
        return []
    cfg = _text_config(config)
    model_type = str(cfg.get("model_type") or config.get("model_type") or "")
    found: list[Feature] = []

    def add(key: str, label: str, detail: str = "", kind: str = "arch") -> None:
        found.append(Feature(key, label, detail, kind))

    # ---- attention ----
    heads = _num(cfg, "num_attention_heads", "n_head", "num_heads")
    kv_heads = _num(cfg, "num_key_value_heads", "multi_query_group_num", "num_kv_heads")
    if kv_heads is None and cfg.get("multi_query_attention") is True:
        kv_heads = 1.0
    if heads and not _num(cfg, "kv_lora_rank"):  # MLA's keys and values come per head from one latent
        kv = kv_heads if kv_heads else heads
        if kv == heads:
            add("mha", "multi-head attention", f"{int(heads)} heads")
        elif kv == 1:
            add("mqa", "multi-query attention", f"{int(heads)} query heads, 1 KV head")
        else:
            add("gqa", "grouped-query attention", f"{int(heads)} query heads, {int(kv)} KV heads")
    if _num(cfg, "kv_lora_rank"):
        add("mla", "MLA attention (multi-head latent attention)",
            f"kv_lora_rank={int(_num(cfg, 'kv_lora_rank') or 0)}, q_lora_rank={cfg.get('q_lora_rank')}")
    layer_types = cfg.get("layer_types")
    kinds = set(layer_types) if isinstance(layer_types, list) else set()
    window = _num(cfg, "sliding_window")
    interleaved = len(kinds) > 1 or model_type in {"gemma2", "gemma3", "gemma3_text", "cohere2"} or (
        _num(cfg, "sliding_window_pattern") not in (None, 0, 1))
    if window and cfg.get("use_sliding_window") is not False:
        if interleaved:
            add("interleaved_sliding_window", "sliding window on some layers only (local/global attention)",
                f"window {int(window)}" + (f", layer types {sorted(kinds)}" if kinds else ""))
        else:
            add("sliding_window", "sliding-window attention", f"window {int(window)}")
    if any(cfg.get(k) is True for k in ("attention_bias", "bias", "add_bias_linear", "use_bias")):
        add("attention_bias", "bias on q/k/v/o projections")
    elif model_type in QKV_BIAS_TYPES or cfg.get("add_qkv_bias") is True:
        add("qkv_bias", "bias on q/k/v projections only")
    if model_type in QK_NORM_TYPES or cfg.get("use_qk_norm") is True:
        add("qk_norm", "qk-norm (RMSNorm on queries and keys)", f"model_type {model_type}")
    if _num(cfg, "attn_logit_softcapping"):
        add("attn_softcap", "attention logit soft-capping", f"cap {_num(cfg, 'attn_logit_softcapping')}")
    if _num(cfg, "query_pre_attn_scalar"):
        add("query_pre_attn_scalar", "attention scale from query_pre_attn_scalar",
            f"{_num(cfg, 'query_pre_attn_scalar')}")
    if model_type in ATTENTION_SINK_TYPES:
        add("attention_sinks", "learned attention sinks", f"model_type {model_type}")
    if model_type in BLOCKSPARSE_TYPES or any(str(k).startswith("blocksparse") for k in cfg):
        add("blocksparse_attention", "block-sparse attention")
    if model_type in FUSED_QKV_TYPES:
        add("fused_qkv", "fused q/k/v and gate/up projections in the checkpoint", f"model_type {model_type}")
    elif model_type in GROUPED_QKV_TYPES:
        add("fused_qkv_grouped", "fused qkv projection laid out per KV head group (q…q k v, repeated)",
            f"model_type {model_type}")

    # ---- position ----
    rope = _rope_type(cfg)
    if model_type in {"chatglm", "glm"}:
        rope = "glm_2d" if cfg.get("original_rope") is False else "default"
    add(f"rope:{rope}", f"RoPE type '{rope}'", f"theta {cfg.get('rope_theta', cfg.get('rope_embedding_base'))}")
    partial = _num(cfg, "partial_rotary_factor", "rotary_pct")
    if partial is not None and partial < 1.0:
        add("partial_rotary", "partial rotary embedding", f"factor {partial}")
    if cfg.get("use_mrope") is True or rope == "mrope":
        add("mrope", "multimodal RoPE sections (mrope)")
    params = cfg.get("rope_parameters")
    local = params.get("sliding_attention") if isinstance(params, dict) else None
    local_base = _num(cfg, "rope_local_base_freq") or (_num(local, "rope_theta") if isinstance(local, dict) else None)
    if local_base:
        add("local_rope_base", "separate RoPE base for local layers", f"{local_base}")

    # ---- norms, MLP, embeddings ----
    if model_type in POST_NORM_TYPES:
        add("post_norms", "norms after attention/MLP outputs (sandwich / post-norm)", f"model_type {model_type}")
    if model_type in LAYERNORM_TYPES or cfg.get("rmsnorm") is False or cfg.get("norm_type") == "layer_norm":
        with_bias = cfg.get("use_bias") is True or cfg.get("bias") is True
        add("layernorm", "LayerNorm (not RMSNorm)", f"model_type {model_type}" + (", with bias" if with_bias else ""))
    if model_type in PLAIN_MLP_TYPES or cfg.get("mlp_type") == "default":
        add("plain_mlp", "plain MLP, down(act(up(x))), not gated", f"model_type {model_type}")
    act = _activation(cfg)
    if _num(cfg, "swiglu_limit"):  # gpt-oss: its own SwiGLU (σ(1.702·x)), hidden_act is not read
        add("clamped_swiglu", "clamped SwiGLU", f"limit {_num(cfg, 'swiglu_limit')}")
    elif act:
        add(f"activation:{act}", f"activation '{act}'")
    if cfg.get("mlp_bias") is True or cfg.get("use_bias") is True:
        add("mlp_bias", "bias on MLP projections")
    if cfg.get("lm_head_bias") is True:
        add("lm_head_bias", "bias on the LM head")
    if cfg.get("tie_word_embeddings") is True or (model_type in EMBED_SCALE_TYPES and
                                                   cfg.get("tie_word_embeddings") is not False):
        add("tied_embeddings", "tied input/output embeddings")
    if model_type in EMBED_SCALE_TYPES:
        add("embedding_scale", "embeddings scaled by √hidden", f"model_type {model_type}")
    if _num(cfg, "scale_emb") not in (None, 1.0):
        add("scale_emb", "embeddings scaled by scale_emb", f"{_num(cfg, 'scale_emb')}")
    if _num(cfg, "logit_scale") not in (None, 1.0):
        add("logit_scale", "logits multiplied by logit_scale", f"{_num(cfg, 'logit_scale')}")
    if _num(cfg, "dim_model_base"):
        add("logit_scale_dim_model_base", "hidden states scaled by dim_model_base / hidden before the LM head",
            f"dim_model_base {_num(cfg, 'dim_model_base')}")
    if cfg.get("mup_use_scaling") or any(_num(cfg, k) not in (None, 1.0) for k in MUP_KEYS):
        add("mup_scaling", "muP attention / embedding / width multipliers", ", ".join(
            k for k in MUP_KEYS if _num(cfg, k) is not None))
    granite = [k for k in ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")
               if _num(cfg, k) is not None]
    if granite:
        add("granite_multipliers", "embedding / residual / attention / logit multipliers", ", ".join(granite))
    if _num(cfg, "scale_depth") not in (None, 1.0):
        add("residual_scale", "scaled residual branches (scale_depth)", f"{_num(cfg, 'scale_depth')}")
    if _num(cfg, "final_logit_softcapping"):
        add("final_softcap", "final logit soft-capping", f"cap {_num(cfg, 'final_logit_softcapping')}")

    # ---- mixture of experts ----
    experts = _num(cfg, "num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")
    if experts and experts > 1:
        top_k = _num(cfg, "num_experts_per_tok", "experts_per_token", "moe_top_k")
        add("moe", "MoE (mixture of experts)", f"{int(experts)} experts, top-{int(top_k or 0)}")
        shared = _num(cfg, "n_shared_experts", "shared_expert_intermediate_size", "num_shared_experts")
        if shared:
            add("moe_shared_experts", "MoE with shared experts", f"{shared:g}")
        dense = cfg.get("mlp_only_layers")
        if _num(cfg, "first_k_dense_replace") or (isinstance(dense, list) and dense) or (
                _num(cfg, "decoder_sparse_step") not in (None, 1.0)) or (
                _num(cfg, "moe_layer_freq") not in (None, 1.0)):
            add("moe_dense_layers", "dense MLP on some layers, MoE on others")
        if (_num(cfg, "n_group") or 1) > 1 or cfg.get("topk_method") == "noaux_tc":
            add("moe_grouped_routing", "grouped top-k expert routing",
                f"n_group {cfg.get('n_group')}, topk_method {cfg.get('topk_method')}")
        if cfg.get("scoring_func") == "sigmoid":
            add("moe_sigmoid_scoring", "sigmoid router scoring")

    # ---- beyond the text decoder ----
    if isinstance(config.get("vision_config"), dict) or isinstance(config.get("audio_config"), dict):
        # A property of the checkpoint: its language model runs from text_config; the features gate
        # records the vision/audio part as unsupported.
        add("multimodal", "multimodal (vision tower)", str((config.get("vision_config") or {}).get("model_type")),
            kind="checkpoint")
    quant = config.get("quantization_config")
    if isinstance(quant, dict):
        method = str(quant.get("quant_method") or quant.get("fmt") or "unknown")
        add(f"quantized:{method}", f"quantized checkpoint ({method})", quantization_scheme(quant), kind="checkpoint")
    if _num(cfg, "num_nextn_predict_layers"):
        add("mtp", "multi-token prediction (MTP) layers", f"{int(_num(cfg, 'num_nextn_predict_layers') or 0)}",
            kind="checkpoint")
    if isinstance(config.get("auto_map"), dict):
        add("custom_code", "reference code ships with the checkpoint (auto_map / trust_remote_code)", kind="info")
    return found


def quantization_scheme(quant: dict[str, Any]) -> str:
    """A ``quantization_config`` in words: method, bits, grouping, zero points, ordering (what the report names)."""
    method = str(quant.get("quant_method") or quant.get("fmt") or "unknown")
    bits, group = quant.get("bits") or quant.get("w_bit"), quant.get("group_size") or quant.get("q_group_size")
    grouping = f"group size {group}" if group not in (None, -1) else "per output channel"
    if method == "fp8":
        block = quant.get("weight_block_size")
        scales = f"per {'x'.join(map(str, block))} block" if block else "per tensor"
        return (f"FP8 {quant.get('fmt', 'e4m3')} weights, scales {scales}, "
                f"{quant.get('activation_scheme', 'dynamic')} activation scales")
    if method == "awq":
        zeros = "zero points" if quant.get("zero_point", True) else "symmetric"
        return f"AWQ int{bits or 4}, {grouping}, {zeros} ({quant.get('version', 'gemm')} packing)"
    if method == "gptq":
        zeros = "symmetric" if quant.get("sym", True) else "zero points"
        order = ", desc_act (act-order permutation)" if quant.get("desc_act") else ""
        return f"GPTQ int{bits or 4}, {grouping}, {zeros}{order}"
    if method == "compressed-tensors":
        groups = quant.get("config_groups") or {}
        parts = []
        for group_cfg in groups.values() if isinstance(groups, dict) else []:
            weights = group_cfg.get("weights") or {} if isinstance(group_cfg, dict) else {}
            size = weights.get("group_size")
            parts.append(f"{weights.get('type', 'int')}{weights.get('num_bits', '?')} {weights.get('strategy', '?')}"
                         + (f" {size}" if size else "")
                         + (", symmetric" if weights.get("symmetric", True) else ", zero points"))
        return f"compressed-tensors {quant.get('format', '?')}: {'; '.join(parts) or 'no config_groups'}"
    if method == "mxfp4":
        return "MXFP4 (4-bit e2m1 values, one e8m0 scale per 32) MoE experts"
    if method == "bitsandbytes":
        return "bitsandbytes " + ("4-bit" if quant.get("load_in_4bit") else
                                  "8-bit" if quant.get("load_in_8bit") else "(bits not stated)")
    return method


def is_moe(features: list[Feature]) -> bool:
    return any(f.key == "moe" for f in features)


@dataclass(frozen=True)
class Coverage:
    """How well one registered family covers a config's features."""

    family: str
    architectures: list[str]
    covered: list[Feature]
    missing: list[Feature]

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "architectures": self.architectures,
                "covered": [f.key for f in self.covered], "missing": [f.label for f in self.missing]}


def coverage(features: list[Feature], architecture: str) -> Coverage:
    """Which of ``features`` (arch kind only) the registered ``architecture`` implements."""
    entry = MODEL_REGISTRY[architecture]
    arch_features = [f for f in features if f.kind == "arch"]
    covered = [f for f in arch_features if f.key in entry.features]
    missing = [f for f in arch_features if f.key not in entry.features]
    return Coverage(entry.family, [architecture], covered, missing)


def nearest_family(features: list[Feature], model_type: str = "") -> Coverage | None:
    """The registered architecture covering the most of ``features``, among those of the same model_type if any.

    Ties go to the structurally closest: the largest share of the candidate's own features that the config
    asks for (a family built around what the config does not use is further away), then the one claiming
    fewer features, then registry order. Names never decide.
    """
    if not MODEL_REGISTRY:
        return None
    wanted = {f.key for f in features if f.kind == "arch"}
    order = [a for a, e in MODEL_REGISTRY.items() if model_type and model_type in e.model_types] or list(MODEL_REGISTRY)

    def closeness(arch: str) -> tuple[int, float, int, int]:
        claimed = MODEL_REGISTRY[arch].features
        shared = len(wanted & claimed)
        return (-shared, -shared / max(len(wanted | claimed), 1), len(claimed), order.index(arch))

    return coverage(features, min(order, key=closeness))
