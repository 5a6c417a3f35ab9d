"""Ablations: for each feature a family claims, one way to break it, so the equivalence gate can prove it notices.

A feature key (``dockyard.onboard.config_features``) is *covered* only if switching it off, or computing a
wrong variant of it, makes the equivalence gate fail (``check_equivalence(..., ablations=...)``). The
ablations never touch the code they test: each one rewrites the :class:`~dockyard.spec.ModelSpec` the
model is built from (the feature switched off where the model reads it), edits the loaded model (a
bias zeroed, a norm skipped, heads or fused projection parts permuted), or replaces one module-level
function while the check runs (DeepSeek's group choice keeping the worst groups). So the serving path
has no test switches in it, and every ablation is a change a real bug could make.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import dockyard.ops.moe as moe_ops
from dockyard.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP
from dockyard.onboard.config_features import detect_features
from dockyard.ops.mla import MLAAttention
from dockyard.registry import MODEL_REGISTRY
from dockyard.spec import ModelSpec, MoESpec, RopeSpec


@dataclass(frozen=True)
class Ablation:
    """One feature broken on purpose: a spec rewrite, an edit of the loaded model, or a replaced function."""

    feature: str
    what: str  # what is broken, for people: "attention soft-cap removed"
    spec: Callable[[ModelSpec], ModelSpec] | None = None
    model: Callable[[nn.Module], None] | None = None
    patch: tuple[object, str, Callable[..., object]] | None = None  # (module, attribute, replacement)

    def ablated_spec(self, spec: ModelSpec) -> ModelSpec:
        return spec if self.spec is None else self.spec(spec)

    @contextlib.contextmanager
    def patched(self) -> Iterator[None]:
        """The replaced function in place while the comparison runs."""
        if self.patch is None:
            yield
            return
        owner, name, replacement = self.patch
        original = getattr(owner, name)
        setattr(owner, name, replacement)
        try:
            yield
        finally:
            setattr(owner, name, original)


# ---------------------------------------------------------------- spec rewrites
def _set(**changes: object) -> Callable[[ModelSpec], ModelSpec]:
    return lambda spec: spec.replace(**changes)


def _moe(**changes: object) -> Callable[[ModelSpec], ModelSpec]:
    def rewrite(spec: ModelSpec) -> ModelSpec:
        assert spec.moe is not None
        return spec.replace(moe=dataclasses.replace(spec.moe, **changes))
    return rewrite


def _rope_without_scaling(spec: ModelSpec) -> ModelSpec:
    return spec.replace(rope=RopeSpec(rope_type="default", theta=spec.rope.theta))


def _whole_head_rotated(spec: ModelSpec) -> ModelSpec:
    """Partial rotary off; longrope's per-frequency factors padded with their last value to the new size (so
    the ablated model is built and fails numerically, not at validation)."""
    half = spec.head_dim // 2
    factors = {name: tuple(v) + (v[-1],) * (half - len(v)) for name in ("short_factor", "long_factor")
               if (v := getattr(spec.rope, name))}
    return spec.replace(partial_rotary_factor=1.0, rope=dataclasses.replace(spec.rope, **factors))


def _other_activation(spec: ModelSpec) -> ModelSpec:
    return spec.replace(hidden_act="gelu" if spec.hidden_act == "silu" else "silu")


# ---------------------------------------------------------------- edits of the loaded model
def _zero_biases(module_types: tuple[type, ...], names: tuple[str, ...]) -> Callable[[nn.Module], None]:
    def edit(model: nn.Module) -> None:
        for module in model.modules():
            if isinstance(module, module_types):
                for name in names:
                    linear = getattr(module, name, None)
                    if isinstance(linear, nn.Linear) and linear.bias is not None:
                        with torch.no_grad():
                            linear.bias.zero_()
    return edit


def _rotate_query_heads(model: nn.Module) -> None:
    """Each query head's projection rows moved to the next head: queries meet the wrong keys."""
    for module in model.modules():
        if isinstance(module, LlamaAttention):
            linear, rows, head_dim = getattr(module, "q_proj", None) or module.qkv_proj, module.q_size, module.head_dim
        elif isinstance(module, MLAAttention):
            linear, head_dim = getattr(module, "q_proj", None) or module.q_b_proj, module.qk_head_dim
            rows = linear.weight.shape[0]
        else:
            continue
        with torch.no_grad():
            q = linear.weight[:rows]
            q.copy_(q.reshape(-1, head_dim, q.shape[-1]).roll(1, dims=0).reshape(q.shape))


def _swap_fused_k_and_v(model: nn.Module) -> None:
    """The fused [q, k, v] projection read as [q, v, k] (a wrong split of the checkpoint's fused tensor)."""
    for module in model.modules():
        if isinstance(module, LlamaAttention) and hasattr(module, "qkv_proj"):
            q, kv = module.q_size, module.kv_size
            with torch.no_grad():
                w = module.qkv_proj.weight
                w.copy_(torch.cat([w[:q], w[q + kv:], w[q:q + kv]]))


def _skip_qk_norm(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, LlamaAttention):
            module.qk_norm = None


def _skip_post_norms(model: nn.Module) -> None:
    """The norms on each block's output (sandwich / post placement) replaced by the identity."""
    for module in model.modules():
        if isinstance(module, LlamaDecoderLayer) and module.placement in ("sandwich", "post"):
            module.post_attention_layernorm = nn.Identity()
            module.post_feedforward_layernorm = nn.Identity()


def _drop_sinks(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, LlamaAttention) and hasattr(module, "sinks"):
            del module.sinks


def _skip_latent_norm(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, MLAAttention):
            module.kv_a_layernorm = nn.Identity()


def _zero_shared_experts(model: nn.Module) -> None:
    for module in model.modules():
        for name in ("shared_expert", "shared_experts"):
            shared = getattr(module, name, None)
            if shared is not None and not isinstance(module, LlamaMLP):
                with torch.no_grad():
                    shared.down_proj.weight.zero_()


# ---------------------------------------------------------------- replaced functions
_best_groups = moe_ops._mask_groups


def _keep_worst_groups(choice: torch.Tensor, moe: MoESpec) -> torch.Tensor:
    """DeepSeek's group-limited routing keeping the ``topk_group`` *worst* groups: the complement of the
    ``n_group - topk_group`` best ones, ranked as the real routing ranks them."""
    best = _best_groups(choice, dataclasses.replace(moe, topk_group=moe.n_group - moe.topk_group))
    return choice.masked_fill(torch.isfinite(best), float("-inf"))


_ATTENTION_BIASES = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj")
ABLATIONS: dict[str, Ablation] = {a.feature: a for a in (
    Ablation("mha", "query heads paired with the wrong key/value heads", model=_rotate_query_heads),
    Ablation("gqa", "query heads paired with the wrong key/value heads", model=_rotate_query_heads),
    Ablation("mqa", "query heads' outputs in the wrong places", model=_rotate_query_heads),
    Ablation("sliding_window", "sliding window ignored", spec=_set(sliding_window=None)),
    Ablation("interleaved_sliding_window", "sliding window ignored", spec=_set(sliding_window=None)),
    Ablation("attention_bias", "attention biases dropped", model=_zero_biases((LlamaAttention, MLAAttention),
                                                                              _ATTENTION_BIASES)),
    Ablation("qkv_bias", "q/k/v biases dropped", model=_zero_biases((LlamaAttention,), _ATTENTION_BIASES[:4])),
    Ablation("mlp_bias", "MLP biases dropped", model=_zero_biases((LlamaMLP,), ("gate_proj", "up_proj",
                                                                               "gate_up_proj", "down_proj"))),
    Ablation("qk_norm", "q/k norm skipped", model=_skip_qk_norm),
    Ablation("attn_softcap", "attention soft-cap removed", spec=_set(attn_logit_softcapping=None)),
    Ablation("final_softcap", "final-logit soft-cap removed", spec=_set(final_logit_softcapping=None)),
    Ablation("query_pre_attn_scalar", "attention scale 1/sqrt(head_dim) instead of query_pre_attn_scalar",
             spec=_set(attention_scale=None)),
    Ablation("attention_sinks", "attention sinks dropped", model=_drop_sinks),
    Ablation("partial_rotary", "whole head rotated", spec=_whole_head_rotated),
    Ablation("local_rope_base", "local layers use the global rope base", spec=_set(rope_local_theta=None)),
    Ablation("rope:default", "rope base doubled",
             spec=lambda s: s.replace(rope=dataclasses.replace(s.rope, theta=2 * s.rope.theta))),
    *(Ablation(f"rope:{t}", f"{t} rope scaling ignored", spec=_rope_without_scaling)
      for t in ("linear", "dynamic", "llama3", "yarn", "longrope")),
    *(Ablation(f"activation:{a}", "another activation", spec=_other_activation)
      for a in ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")),
    Ablation("post_norms", "post-block norms skipped", model=_skip_post_norms),
    Ablation("tied_embeddings", "LM head not tied to the embeddings", spec=_set(tie_word_embeddings=False)),
    Ablation("embedding_scale", "embeddings not scaled", spec=_set(embedding_multiplier=1.0)),
    Ablation("granite_multipliers", "embedding / residual / attention / logit multipliers ignored",
             spec=_set(embedding_multiplier=1.0, residual_multiplier=1.0, attention_scale=None, logits_scale=1.0)),
    Ablation("fused_qkv", "fused projection split as q, v, k", model=_swap_fused_k_and_v),
    Ablation("clamped_swiglu", "SwiGLU clamp removed", spec=_set(swiglu_limit=None)),
    Ablation("mla", "MLA's kv-latent norm skipped", model=_skip_latent_norm),
    Ablation("moe", "only the best expert used (top-1)", spec=_moe(top_k=1)),
    Ablation("moe_shared_experts", "shared experts dropped", model=_zero_shared_experts),
    Ablation("moe_dense_layers", "every layer's MLP an MoE", spec=lambda s: s.replace(
        moe_layers=(True,) * s.num_hidden_layers)),
    Ablation("moe_grouped_routing", "group-limited routing keeps the worst groups",
             patch=(moe_ops, "_mask_groups", _keep_worst_groups)),
    Ablation("moe_sigmoid_scoring", "softmax router scores instead of sigmoid", spec=_moe(scoring_func="softmax")),
)}


def claimed_features(config: dict[str, Any]) -> list[str]:
    """The features ``config`` asks for that its registered architecture claims (detection order; none when the
    architecture is not registered): the ones the equivalence gate must show it would notice broken."""
    archs = config.get("architectures") if isinstance(config, dict) else None
    entry = MODEL_REGISTRY.get(str(archs[0])) if isinstance(archs, list) and archs else None
    if entry is None:
        return []
    return [f.key for f in detect_features(config) if f.kind == "arch" and f.key in entry.features]


def ablations_for(keys: list[str]) -> list[Ablation]:
    """The ablation of each feature key (a claimed key without one is a registry error the tests catch)."""
    return [ABLATIONS[k] for k in keys if k in ABLATIONS]
