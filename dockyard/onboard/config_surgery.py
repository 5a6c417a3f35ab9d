"""Config surgery: the edits onboarding makes to a raw config dict before running it.

Three users, one place. The equivalence gate runs :func:`shrink_config` (toy sizes, every
architectural flag kept and kept live); the features gate's engine trials run
:func:`trial_config` (the same, with head counts picked for a two-rank split); the dummy gate
(and the compile trial) cut a config to what fits in memory with :func:`with_layers`,
:func:`with_vocab` and :func:`with_width`, editing the language model's part in place of a
multimodal wrapper's (:func:`text_config`). All of them take and return plain dicts: what comes
out is a config.json that ``ModelSpec`` and HF transformers read as they read a published one.
"""

from __future__ import annotations

import copy
from typing import Any

from dockyard.spec import is_number, language_model_config

SEQ_LEN = 40  # tokens the equivalence check runs (prefill + decode)
SHRUNK_WINDOW = 8  # below SEQ_LEN, so the sliding window changes the result
SHRUNK_VOCAB = 1000
SHRUNK_HEAD_DIM = 16
SHRUNK_INTERMEDIATE = 128
MAX_EXPERTS = 4
# Grouped routing (DeepSeek): 4 groups of 2 experts, the best 2 groups kept, 3 experts chosen among their 4, so
# the group choice decides which experts can win.
GROUPED_EXPERTS, GROUPED_N_GROUP, GROUPED_TOPK_GROUP, GROUPED_TOP_K = 8, 4, 2, 3
# Soft-caps at the size of the shrunken model's attention scores and logits (a few units), so tanh bends them.
SHRUNK_ATTN_SOFTCAP = 2.0
SHRUNK_FINAL_SOFTCAP = 1.0
SHRUNK_SWIGLU_LIMIT = 1.0  # gpt-oss's clamp, at the size of the shrunken gate/up activations
# Rope scalings that depend on the original context (llama3, yarn, longrope) get one shorter than the first
# prefill chunk, so every forward runs past it.
SHRUNK_ROPE_ORIGINAL = 16
# The context the shrunken model declares where its rope does not depend on it (every type but longrope, yarn and
# dynamic): the rotary tables are built for it, once per model the mutation check loads.
SHRUNK_MAX_POSITIONS = 1024
# A special token id past the shrunken vocabulary becomes this one (HF refuses ids outside it).
SPECIAL_TOKEN_REPLACEMENTS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "decoder_start_token_id": 0}
TRIAL_PARALLEL_SIZE = 2  # ranks the features gate splits its trial model over


# ---------------------------------------------------------------- shrinking the config
def _text_part(config: dict[str, Any]) -> dict[str, Any]:
    return dict(language_model_config(config))


def _int(value: Any) -> int | None:
    return int(value) if is_number(value) else None


def shrink_config(config: dict[str, Any], seq_len: int = SEQ_LEN) -> tuple[dict[str, Any], list[str]]:
    """A toy-sized copy of ``config`` with every architectural flag kept; and notes on what changed."""
    cfg = copy.deepcopy(_text_part(config))
    notes: list[str] = []
    for key in ("architectures", "_name_or_path", "auto_map", "transformers_version", "torch_dtype", "dtype",
                "transformers.js_config"):
        cfg.pop(key, None)
    if cfg.pop("quantization_config", None) is not None:
        notes.append("quantization_config dropped: the unquantized architecture is compared")
    cfg["torch_dtype"] = "float32"

    heads = _int(cfg.get("num_attention_heads")) or 4
    kv_heads = _int(cfg.get("num_key_value_heads")) or heads
    ratio = max(1, heads // max(kv_heads, 1))
    small_kv = 2 if ratio <= 4 else 1
    small_heads = small_kv * ratio
    if small_heads < 4:  # plain multi-head attention: a few heads, kv == q
        small_kv = small_heads = 4
    hidden = _int(cfg.get("hidden_size")) or 64
    explicit_head_dim = _int(cfg.get("head_dim"))
    decoupled = explicit_head_dim is not None and explicit_head_dim * heads != hidden
    cfg["num_attention_heads"] = small_heads
    cfg["num_key_value_heads"] = small_kv
    if decoupled:  # keep "q size != hidden size", as the real config has it
        cfg["hidden_size"], cfg["head_dim"] = 64, SHRUNK_HEAD_DIM
        if small_heads * SHRUNK_HEAD_DIM == 64:
            cfg["hidden_size"] = 96
    else:
        cfg["hidden_size"] = small_heads * SHRUNK_HEAD_DIM
        if explicit_head_dim is not None:
            cfg["head_dim"] = SHRUNK_HEAD_DIM
    _shrink_rope_lists(cfg, (explicit_head_dim or hidden // max(heads, 1)),
                       cfg.get("head_dim") or cfg["hidden_size"] // small_heads)
    notes.append(f"heads {heads}/{kv_heads} → {small_heads}/{small_kv} (q/kv ratio {ratio} kept), "
                 f"head_dim {SHRUNK_HEAD_DIM}, hidden {hidden} → {cfg['hidden_size']}")

    # Layers: enough to cover every layer type (and the dense/MoE split) twice over at most.
    layer_types = cfg.get("layer_types")
    kinds = list(dict.fromkeys(layer_types)) if isinstance(layer_types, list) else []
    num_layers = 4 if len(kinds) > 1 or _int(cfg.get("first_k_dense_replace")) or cfg.get("mlp_only_layers") else 2
    cfg["num_hidden_layers"] = num_layers
    if kinds:
        cfg["layer_types"] = [kinds[i % len(kinds)] for i in range(num_layers)]
    if _int(cfg.get("sliding_window_pattern")):
        cfg["sliding_window_pattern"] = 2
    for key in ("max_window_layers",):
        if _int(cfg.get(key)) is not None:
            cfg[key] = min(int(cfg[key]), num_layers)
    if _int(cfg.get("first_k_dense_replace")):
        cfg["first_k_dense_replace"] = 1
    if isinstance(cfg.get("mlp_only_layers"), list) and cfg["mlp_only_layers"]:
        cfg["mlp_only_layers"] = [0]

    for key, size in (("intermediate_size", SHRUNK_INTERMEDIATE), ("moe_intermediate_size", 32),
                      ("shared_expert_intermediate_size", 64), ("ffn_hidden_size", SHRUNK_INTERMEDIATE)):
        if _int(cfg.get(key)):
            cfg[key] = size
    for key in ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts"):
        if _int(cfg.get(key)):
            cfg[key] = min(int(cfg[key]), MAX_EXPERTS)
    experts = min((int(cfg[k]) for k in ("num_experts", "n_routed_experts", "num_local_experts")
                   if _int(cfg.get(k))), default=None)
    for key in ("num_experts_per_tok", "experts_per_token"):
        if _int(cfg.get(key)) and experts:
            cfg[key] = min(int(cfg[key]), 2, experts)
    if (_int(cfg.get("n_group")) or 1) > 1 and experts:
        cfg.update(n_group=GROUPED_N_GROUP, topk_group=GROUPED_TOPK_GROUP, num_experts_per_tok=GROUPED_TOP_K)
        for key in ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts"):
            if _int(cfg.get(key)):
                cfg[key] = GROUPED_EXPERTS
        notes.append(f"grouped routing: {GROUPED_EXPERTS} experts in {GROUPED_N_GROUP} groups, best "
                     f"{GROUPED_TOPK_GROUP} groups kept, top-{GROUPED_TOP_K}")
    else:
        for key in ("n_group", "topk_group"):
            if _int(cfg.get(key)):
                cfg[key] = 1
    if _int(cfg.get("kv_lora_rank")):
        cfg.update(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
        if "head_dim" in cfg:  # transformers' MLA configs define head_dim as the rope dims
            cfg["head_dim"] = 8
        if cfg.get("q_lora_rank") is not None:
            cfg["q_lora_rank"] = 48

    vocab = _int(cfg.get("vocab_size")) or SHRUNK_VOCAB
    cfg["vocab_size"] = SHRUNK_VOCAB
    if "padded_vocab_size" in cfg:
        cfg["padded_vocab_size"] = SHRUNK_VOCAB
    for key, replacement in SPECIAL_TOKEN_REPLACEMENTS.items():
        value = cfg.get(key)
        if isinstance(value, list):
            kept = [v for v in value if isinstance(v, int) and v < SHRUNK_VOCAB]
            cfg[key] = kept or [replacement]
        elif isinstance(value, int) and value >= SHRUNK_VOCAB:
            cfg[key] = replacement
    notes.append(f"vocab {vocab} → {SHRUNK_VOCAB}, {num_layers} layers, intermediate {SHRUNK_INTERMEDIATE}")

    window = _int(cfg.get("sliding_window"))
    if window and cfg.get("use_sliding_window") is not False and window >= seq_len:
        cfg["sliding_window"] = SHRUNK_WINDOW
        notes.append(f"sliding window {window} → {SHRUNK_WINDOW} (below the test length {seq_len}, so it matters)")
    _make_features_bind(cfg, notes)
    max_pos = _int(cfg.get("max_position_embeddings"))
    if max_pos is not None and max_pos < seq_len:
        notes.append(f"max_position_embeddings {max_pos} < test length; sequences shortened to it")
    return cfg, notes


def _number(value: Any) -> float | None:
    return float(value) if is_number(value) else None


def _rope_dicts(rope: Any) -> list[dict[str, Any]]:
    """A rope_scaling / rope_parameters value and its per-layer-type parts (transformers v5), as dicts."""
    if not isinstance(rope, dict):
        return []
    return [rope] + [v for v in rope.values() if isinstance(v, dict)]


def _make_features_bind(cfg: dict[str, Any], notes: list[str]) -> None:
    """Move the features whose effect depends on magnitudes into the regime where they change the output on
    the test inputs: soft-caps and clamps at the size of the toy model's values, rope scaling past its
    original context, an attention scale unlike the default one, multipliers other than 1."""
    for key, cap in (("attn_logit_softcapping", SHRUNK_ATTN_SOFTCAP), ("final_logit_softcapping", SHRUNK_FINAL_SOFTCAP),
                     ("swiglu_limit", SHRUNK_SWIGLU_LIMIT)):
        if _number(cfg.get(key)):
            notes.append(f"{key} {cfg[key]} → {cap} (binds on the toy model's values)")
            cfg[key] = cap
    head_dim = _int(cfg.get("head_dim")) or cfg["hidden_size"] // cfg["num_attention_heads"]
    if _number(cfg.get("query_pre_attn_scalar")) == head_dim:
        cfg["query_pre_attn_scalar"] = 4 * head_dim
    for key in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
        if _number(cfg.get(key)) == 1.0:
            cfg[key] = 0.5
    for key in ("rope_scaling", "rope_parameters"):
        for scaling in _rope_dicts(cfg.get(key)):
            kind = scaling.get("rope_type") or scaling.get("type")
            if kind in ("llama3", "yarn", "longrope", "su"):
                old = scaling.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
                scaling["original_max_position_embeddings"] = SHRUNK_ROPE_ORIGINAL
                if kind == "yarn" and _number(scaling.get("factor")):  # keep factor = max / original, as yarn means
                    cfg["max_position_embeddings"] = int(scaling["factor"] * SHRUNK_ROPE_ORIGINAL)
                notes.append(f"{kind} rope: original context {old} → {SHRUNK_ROPE_ORIGINAL} (the test runs past it)")
    if _int(cfg.get("original_max_position_embeddings")):
        cfg["original_max_position_embeddings"] = SHRUNK_ROPE_ORIGINAL
    kinds = {str(r.get("rope_type") or r.get("type")) for key in ("rope_scaling", "rope_parameters")
             for r in _rope_dicts(cfg.get(key))}
    max_pos = _int(cfg.get("max_position_embeddings"))
    if max_pos and max_pos > SHRUNK_MAX_POSITIONS and not kinds & {"longrope", "su", "dynamic", "yarn"}:
        cfg["max_position_embeddings"] = SHRUNK_MAX_POSITIONS
        notes.append(f"max_position_embeddings {max_pos} → {SHRUNK_MAX_POSITIONS} (its rope does not depend on it)")


def _shrink_rope_lists(cfg: dict[str, Any], old_head_dim: int, new_head_dim: int) -> None:
    """Per-frequency lists (longrope's short/long factors) resampled to the new rotary size."""
    partial = cfg.get("partial_rotary_factor")
    factor = float(partial) if is_number(partial) else 1.0
    old_half, new_half = int(old_head_dim * factor) // 2, int(new_head_dim * factor) // 2
    for key in ("rope_scaling", "rope_parameters"):
        rope = cfg.get(key)
        if not isinstance(rope, dict):
            continue
        for name, value in list(rope.items()):
            if isinstance(value, list) and len(value) == old_half and old_half > new_half > 0:
                step = old_half / new_half
                rope[name] = [value[int(i * step)] for i in range(new_half)]


# ---------------------------------------------------------------- the features gate's trial model
def _positive_int(value: Any) -> int | None:
    return int(value) if is_number(value) and value > 0 else None


def trial_config(raw_config: dict[str, Any],
                 parallel_size: int = TRIAL_PARALLEL_SIZE) -> tuple[dict[str, Any], list[str]]:
    """The config.json the engine trials run, and notes on how it differs from ``raw_config``.

    It is the equivalence gate's shrunken copy (every architectural flag kept, toy sizes) with its
    ``architectures``, and with head counts re-picked (q/kv ratio kept) so that a split over
    ``parallel_size`` ranks meets the case the real model meets: KV heads divided among the ranks
    when the real model has at least as many KV heads as ranks, one KV head replicated on several
    ranks when it has fewer. (The real config's own divisibility is checked on the real config.)
    """
    cfg, notes = shrink_config(raw_config)
    real = language_model_config(raw_config)
    cfg["architectures"] = real.get("architectures") or raw_config.get("architectures")
    heads = _positive_int(real.get("num_attention_heads"))
    kv = _positive_int(real.get("num_key_value_heads")) or heads
    if heads and kv and not cfg.get("kv_lora_rank"):  # MLA has no KV heads to split (nor TP yet)
        ratio = max(1, heads // kv)
        new_kv = parallel_size if kv >= parallel_size else kv
        new_heads = new_kv * ratio
        old_heads, old_kv = int(cfg["num_attention_heads"]), int(cfg["num_key_value_heads"])
        if (new_heads, new_kv) != (old_heads, old_kv):
            hidden = int(cfg["hidden_size"])
            head_dim = int(cfg.get("head_dim") or hidden // old_heads)
            if hidden == old_heads * head_dim:  # q width equals hidden, as in the real config: keep it so
                cfg["hidden_size"] = new_heads * head_dim
            elif hidden == new_heads * head_dim:  # and unequal when the real config has them unequal
                cfg["hidden_size"] = hidden + 32
            cfg["num_attention_heads"], cfg["num_key_value_heads"] = new_heads, new_kv
            case = (f"{new_kv} KV head{'s' if new_kv > 1 else ''} replicated over {parallel_size} ranks"
                    if new_kv < parallel_size else f"KV heads split over {parallel_size} ranks")
            notes.append(f"heads {old_heads}/{old_kv} → {new_heads}/{new_kv} for the parallel trials ({case}, "
                         f"as the real {heads}/{kv} would be)")
    return cfg, notes


# ---------------------------------------------------------------- fitting the dummy gate's memory
def text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The dict holding the language model's sizes (text_config of multimodal wrappers)."""
    text = cfg.get("text_config")
    if isinstance(text, dict) and "hidden_size" not in cfg:
        # Its class defaults are part of a text_config's meaning: make them explicit before editing sizes.
        full = language_model_config(cfg)
        text.update({k: v for k, v in full.items() if k not in text and k != "architectures"})
        return text
    return cfg


def with_layers(cfg: dict[str, Any], layers: int) -> dict[str, Any]:
    """A copy of ``cfg`` with its first ``layers`` layers."""
    out = copy.deepcopy(cfg)
    t = text_config(out)
    t["num_hidden_layers"] = layers
    if isinstance(t.get("layer_types"), list):
        t["layer_types"] = t["layer_types"][:layers]
    return out


def with_vocab(cfg: dict[str, Any], vocab: int) -> dict[str, Any]:
    """A copy of ``cfg`` with ``vocab`` tokens; special token ids past it are dropped."""
    out = copy.deepcopy(cfg)
    t = text_config(out)
    t["vocab_size"] = vocab
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = t.get(key)
        if isinstance(value, list):
            t[key] = [v for v in value if isinstance(v, int) and v < vocab] or None
        elif isinstance(value, int) and value >= vocab:
            t[key] = None
    return out


def with_width(cfg: dict[str, Any], divisor: int) -> dict[str, Any]:
    """Narrower layers: KV heads (and with them query heads, q/kv ratio kept), hidden and MLP ÷ divisor."""
    out = copy.deepcopy(cfg)
    t = text_config(out)
    heads = int(t["num_attention_heads"])
    kv = int(t.get("num_key_value_heads") or heads)
    head_dim = int(t.get("head_dim") or t["hidden_size"] // heads)
    ratio = max(1, heads // kv)
    new_kv = max(1, kv // divisor)
    new_heads = new_kv * ratio
    if new_heads == heads:  # a single KV head already: fewer query heads instead
        new_heads = max(1, heads // divisor)
        new_kv = new_heads if kv == heads else 1
    t.update(num_attention_heads=new_heads, num_key_value_heads=new_kv, head_dim=head_dim,
             hidden_size=max(64, int(t["hidden_size"]) // divisor // 8 * 8),
             intermediate_size=max(64, int(t["intermediate_size"]) // divisor // 8 * 8))
    return out
