"""Numerical equivalence with HF transformers on a shrunken copy of a model's config.

:func:`shrink_config` keeps every architectural flag of the real config (rope type and scaling,
q/kv head ratio, biases, tied embeddings, sliding window, layer types, expert routing) at toy
sizes. :func:`check_equivalence` builds the HF reference for it (fp32, seeded, weights at
unit scale so attention is sharp and every block matters, norms and biases perturbed so they
are tested), saves it with ``save_pretrained`` and loads that directory through dockyard's own
loader, so the checkpoint-name mapping is part of what is compared. It then compares, in order:

1. each block of the first layer of every layer type (input norm, attention, MLP), fed the same
   random hidden states; HF's blocks get the rotary ``position_embeddings`` and attention mask that
   its own model computes (captured by hooks during a full forward);
2. each layer type (a whole decoder layer);
3. the full model's prefill logits;
4. chunked prefill and decode steps through the paged KV cache against HF's full recompute.

Error metric: rmse(ours − ref) / rmse(ref) per level. The first level over its tolerance is the
verdict's ``first_failure`` (e.g. "attention of layer 0"), which says where to look.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dockyard.errors import DockyardError
from dockyard.model_impl import choose_model_impl
from dockyard.ops.attention import Attention, AttentionMetadata, forward_context
from dockyard.spec import language_model_config

if TYPE_CHECKING:
    from dockyard.onboard.ablations import Ablation

logger = logging.getLogger(__name__)

SEQ_LEN = 40
DECODE_STEPS = 4
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
# rmse(ours − ref) / rmse(ref) allowed per level. fp32 must agree to rounding; the bf16 bars are
# the usual ones for comparing a bf16 engine with an fp32 reference.
TOLERANCES: dict[str, dict[str, float]] = {
    "float32": {"norm": 1e-5, "attention": 1e-5, "mlp": 1e-5, "moe": 1e-5, "layer": 1e-5, "model": 1e-5,
                "decode": 1e-5},
    "bfloat16": {"norm": 0.02, "attention": 0.10, "mlp": 0.05, "moe": 0.02, "layer": 0.05, "model": 0.05,
                 "decode": 0.05},
}
# (block kind, attribute of a decoder layer) in the order they are compared.
BLOCKS = (("norm", "input_layernorm"), ("attention", "self_attn"), ("mlp", "mlp"))
_SPECIAL_TOKEN_KEYS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "decoder_start_token_id": 0}


def rel_rmse(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """rmse(ours − ref) / rmse(ref), computed in float64."""
    ours, ref = ours.double(), ref.double()
    return float((ours - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())


def paged_logits(model: nn.Module, token_ids: list[int], chunks: list[int], block_size: int = 4,
                 num_blocks: int = 64) -> torch.Tensor:
    """Logits at every position of ``token_ids``, fed through the paged KV cache in ``chunks``.

    E.g. chunks=[10, 1, 1] prefills 10 tokens then decodes two single tokens with the cache. The
    model's own cache (if an engine bound one) is put back afterwards.
    """
    spec = model.spec
    attn_layers = [m for m in model.modules() if isinstance(m, Attention)]
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    entries, heads, dim = spec.kv_cache_layout
    cache = torch.zeros(len(attn_layers), entries, num_blocks, block_size, heads, dim, dtype=dtype, device=device)
    previous = [layer.kv_cache for layer in attn_layers]
    for i, layer in enumerate(attn_layers):
        layer.kv_cache = cache[i]
    # A scrambled block table checks that nothing assumes contiguous blocks.
    table = list(range(num_blocks))[::-1][: -(-len(token_ids) // block_size)]
    out, start = [], 0
    try:
        for n in chunks:
            end = start + n
            meta = AttentionMetadata(
                slot_mapping=torch.tensor([table[p // block_size] * block_size + p % block_size
                                           for p in range(start, end)], device=device),
                block_tables=torch.tensor([table], device=device), query_lens=[n], seq_lens=[end],
                block_size=block_size, seq_lens_tensor=torch.tensor([end], device=device),
            )
            with torch.no_grad(), forward_context(meta):
                hidden = model(torch.tensor(token_ids[start:end], device=device),
                               torch.arange(start, end, device=device))
                out.append(model.compute_logits(hidden))
            start = end
    finally:
        for layer, kv in zip(attn_layers, previous):
            layer.kv_cache = kv
    return torch.cat(out)


# ---------------------------------------------------------------- shrinking the config
def _text_part(config: dict[str, Any]) -> dict[str, Any]:
    return dict(language_model_config(config))


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


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
    for key, replacement in _SPECIAL_TOKEN_KEYS.items():
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
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


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
    factor = float(partial) if isinstance(partial, (int, float)) and not isinstance(partial, bool) else 1.0
    old_half, new_half = int(old_head_dim * factor) // 2, int(new_head_dim * factor) // 2
    for key in ("rope_scaling", "rope_parameters"):
        rope = cfg.get(key)
        if not isinstance(rope, dict):
            continue
        for name, value in list(rope.items()):
            if isinstance(value, list) and len(value) == old_half and old_half > new_half > 0:
                step = old_half / new_half
                rope[name] = [value[int(i * step)] for i in range(new_half)]


# ---------------------------------------------------------------- the HF reference
def transformers_support(model_type: str) -> str | None:
    """None when the installed transformers implements ``model_type`` as a causal LM, else why not."""
    try:
        import transformers
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        return "transformers is not installed"
    if model_type not in CONFIG_MAPPING_NAMES or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return (f"the installed transformers {transformers.__version__} has no causal-LM implementation of "
                f"model_type {model_type!r} (it may exist only as remote code)")
    return None


def build_reference(cfg: dict[str, Any], seed: int = 0) -> nn.Module:
    """The HF model for a (shrunken) config dict: fp32, eval, seeded, eager attention.

    Weights are redrawn at unit scale (std 1/sqrt(fan-in)) so attention is sharp and position
    matters; norm weights and biases, which HF initialises to 1 and 0, are perturbed.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {k: v for k, v in cfg.items() if k != "model_type"}
    hf_config = AutoConfig.for_model(cfg["model_type"], **kwargs)
    for key, replacement in _SPECIAL_TOKEN_KEYS.items():  # defaults of the config class, too
        value = getattr(hf_config, key, None)
        if isinstance(value, int) and value >= hf_config.vocab_size:
            setattr(hf_config, key, replacement)
        elif isinstance(value, list):
            setattr(hf_config, key, [v for v in value if v < hf_config.vocab_size] or [replacement])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager", dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
            elif name.endswith("sinks"):  # per-head logits: at the size of the scores, so they matter
                p.copy_(torch.randn(p.shape, generator=gen))
            elif "norm" in name or name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


# ---------------------------------------------------------------- results
@dataclass
class LevelResult:
    """One comparison: which level and block, its error and the bar it had to clear."""

    level: str  # block | layer | model | decode | load
    block: str  # norm | attention | mlp | decoder layer | prefill logits | ...
    module: str  # where it lives, e.g. model.layers.0.self_attn
    rel_err: float | None
    tolerance: float
    passed: bool
    detail: str = ""

    @property
    def where(self) -> str:
        return f"{self.level} '{self.block}' ({self.module})"


@dataclass
class MutationResult:
    """One ablated feature: what was broken and the first level that noticed (None: the gate passed it)."""

    feature: str
    what: str
    caught_by: LevelResult | None

    @property
    def caught(self) -> bool:
        return self.caught_by is not None

    def margin(self) -> float | None:
        """The catching level's error over its tolerance (None when caught by a crash or a load failure)."""
        lv = self.caught_by
        if lv is None or lv.rel_err is None or not lv.tolerance:
            return None
        return lv.rel_err / lv.tolerance


@dataclass
class EquivalenceResult:
    """The equivalence verdict with every level compared."""

    status: str  # pass | fail | skip
    reason: str = ""
    model_type: str = ""
    dtype: str = "float32"
    seq_len: int = SEQ_LEN
    decode_steps: int = DECODE_STEPS
    shrunk_config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    levels: list[LevelResult] = field(default_factory=list)
    tolerances: dict[str, float] = field(default_factory=dict)
    duration_s: float = 0.0
    mutations: list[MutationResult] = field(default_factory=list)
    path: str = ""  # the implementation compared: "dockyard" (native family) or "transformers" (generic path)

    @property
    def first_failure(self) -> LevelResult | None:
        return next((lv for lv in self.levels if not lv.passed), None)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        first = self.first_failure
        out["first_failure"] = None if first is None else {**asdict(first), "where": first.where}
        out["mutations"] = [{"feature": m.feature, "what": m.what, "caught": m.caught,
                             "caught_by": None if m.caught_by is None else m.caught_by.where,
                             "rel_err": None if m.caught_by is None else m.caught_by.rel_err,
                             "tolerance": None if m.caught_by is None else m.caught_by.tolerance}
                            for m in self.mutations]
        return out


# ---------------------------------------------------------------- the comparison
def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _module(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _layer_type_indices(hf_model: nn.Module) -> list[tuple[int, str]]:
    """(first layer index, kind) of every kind of layer in the reference model.

    A kind is the attention type (``layer_types``: sliding / full) and the MLP class (dense or MoE),
    each named only where the model has more than one; a uniform model has the one kind 'decoder'.
    """
    types = getattr(hf_model.config, "layer_types", None)
    layers = list(getattr(getattr(hf_model, "model", None), "layers", []))
    if not isinstance(types, list) or len(types) != len(layers):
        types = [""] * len(layers)
    mlps = [type(getattr(layer, "mlp", None)).__name__ for layer in layers]
    keys = [(str(t) if len(set(types)) > 1 else "", m if len(set(mlps)) > 1 else "") for t, m in zip(types, mlps)]
    seen: dict[tuple[str, str], int] = {}
    for i, key in enumerate(keys):
        seen.setdefault(key, i)
    if not seen:
        return [(0, "decoder")]
    return [(i, ", ".join(part for part in key if part) or "decoder") for key, i in seen.items()]


def _capture_kwargs(hf_model: nn.Module, ids: torch.Tensor, paths: list[str]) -> dict[str, dict[str, Any]]:
    """The keyword arguments HF's own forward passes to each module in ``paths``."""
    captured: dict[str, dict[str, Any]] = {}
    handles = []
    for path in paths:
        module = _module(hf_model, path)
        if module is None:
            continue

        def hook(_mod: nn.Module, _args: tuple, kwargs: dict[str, Any], path: str = path) -> None:
            captured.setdefault(path, dict(kwargs))

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            hf_model(ids[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return captured


def _clean(kwargs: dict[str, Any]) -> dict[str, Any]:
    drop = {"hidden_states", "past_key_values", "past_key_value", "use_cache", "cache_position"}
    return {k: v for k, v in kwargs.items() if k not in drop}


class _FirstFailure(Exception):
    """Raised inside :func:`compare_models` to stop at the first level that fails, when asked to."""


def compare_models(ours: nn.Module, hf_model: nn.Module, seq_len: int = SEQ_LEN, decode_steps: int = DECODE_STEPS,
                   dtype: str = "float32", seed: int = 1, stop_at_first_failure: bool = False) -> list[LevelResult]:
    """Every level of the comparison between our loaded model and the HF reference, in order (up to the first
    failing one with ``stop_at_first_failure``)."""
    results: list[LevelResult] = []
    try:
        _compare_levels(ours, hf_model, seq_len, decode_steps, dtype, seed, stop_at_first_failure, results)
    except _FirstFailure:
        pass
    return results


def _compare_levels(ours: nn.Module, hf_model: nn.Module, seq_len: int, decode_steps: int, dtype: str, seed: int,
                    stop: bool, results: list[LevelResult]) -> None:
    tol = TOLERANCES[dtype]
    vocab = hf_model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (seq_len,), generator=gen)
    positions = torch.arange(seq_len)
    hidden_size = hf_model.config.hidden_size
    x = torch.randn(1, seq_len, hidden_size, generator=gen)
    # The generic path runs HF's own blocks: only what dockyard adds (paged attention, decode) is compared.
    generic = getattr(getattr(ours, "spec", None), "model_impl", "dockyard") == "transformers"
    layer_types = [] if generic else _layer_type_indices(hf_model)
    paths = []
    for i, _ in layer_types:
        paths += [f"model.layers.{i}", f"model.layers.{i}.self_attn"]
    captured = _capture_kwargs(hf_model, ids, paths)

    def compare(level: str, block: str, module: str, run_ours: Callable[[], torch.Tensor],
                run_ref: Callable[[], torch.Tensor], bar: float) -> None:
        try:
            with torch.no_grad():
                a, b = run_ours(), run_ref()
            a = a.reshape(b.shape)
            err = rel_rmse(a, b)
            ok = err <= bar and torch.isfinite(a).all().item()
            results.append(LevelResult(level, block, module, err, bar, bool(ok)))
        except Exception as exc:  # noqa: BLE001 - a crash in one level is that level's failure
            logger.exception("equivalence level %s/%s crashed", level, block)
            results.append(LevelResult(level, block, module, None, bar, False, f"{type(exc).__name__}: {exc}"))
        if stop and not all(r.passed for r in results):  # also the missing-module failures recorded directly
            raise _FirstFailure

    x2d = x[0]
    for i, kind in layer_types:
        prefix = f"model.layers.{i}"
        for block, attr in BLOCKS:
            mine, ref = _module(ours, f"{prefix}.{attr}"), _module(hf_model, f"{prefix}.{attr}")
            if mine is None and ref is None:  # neither has it (OLMo 2 has no input norm)
                continue
            if mine is None or ref is None:
                side = "dockyard" if mine is None else "HF"
                results.append(LevelResult("block", block, f"{prefix}.{attr}", None, tol.get(block, 1e-5), False,
                                           f"{side} model has no module {prefix}.{attr}"))
                continue
            bar = tol["moe"] if block == "mlp" and "moe" in type(ref).__name__.lower() else tol.get(block, 1e-5)
            label = block if kind == "decoder" else f"{block} [{kind}]"
            if block == "attention":
                kwargs = _clean(captured.get(f"{prefix}.self_attn", {}))
                compare("block", label, f"{prefix}.{attr}", lambda m=mine: m(positions, x2d),
                        lambda r=ref, kw=kwargs: _first(r(hidden_states=x, **kw)), bar)
            else:
                compare("block", label, f"{prefix}.{attr}", lambda m=mine: _first(m(x2d)),
                        lambda r=ref: _first(r(x)), bar)
    for i, kind in layer_types:
        prefix = f"model.layers.{i}"
        mine, ref = _module(ours, prefix), _module(hf_model, prefix)
        kwargs = _clean(captured.get(prefix, {}))
        label = "decoder layer" if kind == "decoder" else f"decoder layer [{kind}]"
        if mine is None or ref is None:
            results.append(LevelResult("layer", label, prefix, None, tol["layer"], False, "layer missing"))
            continue
        compare("layer", label, prefix, lambda m=mine: m(positions, x2d),
                lambda r=ref, kw=kwargs: _first(r(x, **kw)), tol["layer"])

    with torch.no_grad():
        ref_logits = hf_model(ids[None], use_cache=False).logits[0].float()
    compare("model", "prefill logits", "whole model",
            lambda: ours.compute_logits(ours(ids, positions)), lambda: ref_logits, tol["model"])
    head = seq_len - decode_steps
    chunks = [head // 2, head - head // 2] + [1] * decode_steps
    paged: dict[str, torch.Tensor] = {}

    def run_paged() -> torch.Tensor:
        paged["logits"] = paged_logits(ours, ids.tolist(), chunks)
        return paged["logits"]

    compare("decode", "chunked prefill + decode (paged KV cache)", f"chunks {chunks}", run_paged,
            lambda: ref_logits, tol["decode"])
    compare("decode", "decode steps only", f"last {decode_steps} positions",
            lambda: paged["logits"][-decode_steps:], lambda: ref_logits[-decode_steps:], tol["decode"])


def _run_ablation(ablation: Ablation, checkpoint: str, hf_model: nn.Module, seq_len: int, decode_steps: int,
                  seed: int, model_impl: str = "auto") -> MutationResult:
    """Load ``checkpoint`` with one feature broken and compare up to the first level that fails."""
    from dockyard.model_loader import load_model  # pulls in the model families, more than the rest of this module needs
    from dockyard.model_source import resolve_model

    source = resolve_model(checkpoint, model_impl=model_impl)
    try:
        source = dataclasses.replace(source, spec=ablation.ablated_spec(source.spec))
        model, _ = load_model(source, torch.device("cpu"), torch.float32)
    except Exception as exc:  # noqa: BLE001 - a model that cannot be built or loaded is caught at loading
        return MutationResult(ablation.feature, ablation.what, LevelResult(
            "load", "weights saved by HF", "checkpoint", None, 0.0, False, f"{type(exc).__name__}: {exc}"))
    if ablation.model is not None:
        ablation.model(model)
    with ablation.patched():
        levels = compare_models(model, hf_model, seq_len, decode_steps, seed=seed, stop_at_first_failure=True)
    return MutationResult(ablation.feature, ablation.what, next((lv for lv in levels if not lv.passed), None))


def check_equivalence(config: dict[str, Any], workdir: str | Path | None = None, seq_len: int = SEQ_LEN,
                      decode_steps: int = DECODE_STEPS, seed: int = 0,
                      ablations: Sequence[Ablation] = (), model_impl: str = "auto") -> EquivalenceResult:
    """Shrink ``config``, build the HF reference, load it through dockyard, compare every level.

    Then, if every level passed, the mutation check: each of ``ablations`` (``dockyard.onboard.ablations``)
    loaded from the same checkpoint and compared up to the first level that fails
    (``EquivalenceResult.mutations``); an ablation no level catches is a feature the gate cannot vouch for.
    ``model_impl`` picks the implementation loaded (``dockyard.model_impl``); on the generic path the blocks
    and layers are HF's own, so prefill logits and the paged decode are the levels compared."""
    t0 = time.perf_counter()
    model_type = str(_text_part(config).get("model_type") or "")
    result = EquivalenceResult(status="skip", model_type=model_type, tolerances=TOLERANCES["float32"],
                               seq_len=seq_len, decode_steps=decode_steps)
    why_not = transformers_support(model_type)
    if why_not is not None:
        result.reason = why_not
        return result
    if model_impl == "auto":  # decided on the real config: the saved checkpoint's config.json has more keys
        try:
            model_impl = choose_model_impl(config).impl
        except DockyardError:
            pass  # the load below fails with the same refusal, recorded as the verdict
    cfg, notes = shrink_config(config, seq_len)
    max_pos = _int(cfg.get("max_position_embeddings"))
    if max_pos is not None and max_pos < seq_len:
        seq_len = result.seq_len = max_pos
        decode_steps = result.decode_steps = min(decode_steps, max(1, seq_len // 4))
    result.shrunk_config, result.notes = cfg, notes
    try:
        hf_model = build_reference(cfg, seed)
    except Exception as exc:  # noqa: BLE001 - no reference means nothing is proven: say why
        logger.exception("building the HF reference failed")
        result.status = "fail"
        result.levels.append(LevelResult("reference", "HF reference model", model_type, None, 0.0, False,
                                         f"{type(exc).__name__}: {exc}"))
        result.reason = f"transformers could not build the reference for the shrunken config: {exc}"
        result.duration_s = time.perf_counter() - t0
        return result
    with tempfile.TemporaryDirectory(prefix="dockyard-equiv-", dir=workdir) as tmp:
        hf_model.save_pretrained(tmp)
        from dockyard import LLM  # the engine pulls in more than the rest of this module needs

        try:
            llm = LLM(tmp, dtype="float32", device="cpu", num_kv_blocks=64, model_impl=model_impl)
        except Exception as exc:  # noqa: BLE001 - a load failure is the verdict, named
            result.status = "fail"
            result.levels.append(LevelResult("load", "weights saved by HF", tmp, None, 0.0, False,
                                             f"{type(exc).__name__}: {exc}"))
            result.reason = f"dockyard could not load the reference checkpoint: {exc}"
            result.duration_s = time.perf_counter() - t0
            return result
        result.path = llm.spec.model_impl
        result.levels = compare_models(llm.model, hf_model, seq_len, decode_steps, seed=seed + 1)
        del llm
        if result.first_failure is None:  # a mutation check means something only where the intact model passes
            result.mutations = [_run_ablation(a, tmp, hf_model, seq_len, decode_steps, seed + 1, model_impl)
                                for a in ablations]
    first = result.first_failure
    result.status = "pass" if first is None else "fail"
    if first is not None:
        err = "crashed" if first.rel_err is None else f"rel err {first.rel_err:.2e} > {first.tolerance:.0e}"
        result.reason = f"first mismatch at {first.where}: {err}" + (f" ({first.detail})" if first.detail else "")
    else:
        worst = max(lv.rel_err or 0.0 for lv in result.levels)
        result.reason = f"{len(result.levels)} levels agree; worst rel err {worst:.2e}"
    result.duration_s = time.perf_counter() - t0
    return result
