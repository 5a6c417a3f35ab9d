"""dockyard's paged KV cache as an attention implementation of transformers (the generic path's only hook).

transformers' decoders call ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, q, k, v, mask,
scaling=..., sliding_window=..., softcap=..., s_aux=...)`` from each attention module, after their own
projections, norms and rotary embeddings. Registering :func:`paged_attention_forward` under the name
``"dockyard"`` routes every such call to the engine's paged cache: the new keys and values are written at
the step's slots and each sequence's queries attend over its cached context, with the step's metadata
(slot mapping, block tables, sequence boundaries) published by the runner's ``forward_context``. The
engine's flattened token batch reaches transformers as one row of positions; since the name is not one of
transformers' mask interfaces, the model builds no mask of its own, and the sequence boundaries come from
the metadata alone.

The window, the scale, the soft-cap and the sinks are read from each call (they are what the HF module
computes with); what this function cannot express (an explicit mask, a position bias such as ALiBi,
non-causal attention) is refused by name instead of being computed wrongly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface

from dockyard.errors import UnsupportedArchitectureError
from dockyard.ops.attention import Attention, _attend

ATTN_IMPLEMENTATION = "dockyard"

# Keyword arguments HF attention modules pass that change nothing here (inference runs without dropout;
# the position ids and the cache position are already in the step's metadata).
_IGNORED_KWARGS = frozenset({"dropout", "position_ids", "cache_position", "output_attentions", "use_cache",
                             "past_key_values", "past_key_value", "layer_idx", "is_causal", "head_mask",
                             "attention_dropout", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                             "max_length_k", "return_dict", "token_type_ids"})


class PagedAttentionSlot(Attention):
    """The KV cache slot of one HF attention module: an :class:`~dockyard.ops.attention.Attention` the model
    runner finds and binds its cache layer to; the computation itself takes each call's own settings."""


def _refuse(module: nn.Module, what: str) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(
        f"{type(module).__name__} calls attention with {what}, which dockyard's paged attention cannot express; "
        "this architecture cannot run on the generic (transformers) path")


def paged_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None = None,
                            sliding_window: int | None = None, softcap: float | None = None,
                            s_aux: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention of ``query`` [1, Hq, T, D] over the paged cache after writing ``key``/``value`` [1, Hkv, T, D]
    → ([1, T, Hq, Dv], None), HF's attention-function contract."""
    slot = getattr(module, "dockyard_attention", None)
    if slot is None:
        raise RuntimeError(f"{type(module).__name__} has no dockyard KV slot; build the model with "
                           "dockyard.models.generic.TransformersForCausalLM")
    if attention_mask is not None:
        raise _refuse(module, "an explicit attention mask (the model builds its own mask)")
    if kwargs.get("position_bias") is not None or kwargs.get("alibi") is not None:
        raise _refuse(module, "a position bias (ALiBi or relative bias)")
    if kwargs.get("is_causal") is False or getattr(module, "is_causal", True) is False:
        raise _refuse(module, "non-causal attention")
    unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in _IGNORED_KWARGS
                     and k not in ("position_bias", "alibi"))
    if unknown:
        raise _refuse(module, f"the argument(s) {', '.join(unknown)}")
    if query.shape[0] != 1:
        raise RuntimeError("the generic path runs the step's tokens as one row; got a batch of "
                           f"{query.shape[0]}")
    if sliding_window is None:  # some modules keep the window as an attribute and build it into a mask
        sliding_window = getattr(module, "sliding_window", None)
    if sliding_window is not None and sliding_window <= 0:
        sliding_window = None
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    q = query[0].transpose(0, 1).contiguous()  # [T, Hq, D], laid out as the decode kernels expect
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    sinks = s_aux
    metadata = Attention.current_metadata()
    if metadata is None or slot.kv_cache is None:  # outside the engine (a plain forward): causal over the input
        slot.observe_kv(k, v)
        out = _attend(q, k, v, scale, sliding_window, softcap, sinks)
    else:
        entries, heads, dim = slot.kv_cache.shape[0], slot.kv_cache.shape[-2], slot.kv_cache.shape[-1]
        if entries != 2 or k.shape[1:] != (heads, dim) or v.shape[1:] != (heads, dim):
            raise UnsupportedArchitectureError(
                f"{type(module).__name__} gives keys {tuple(k.shape[1:])} and values {tuple(v.shape[1:])} per "
                f"token, but the KV cache was sized for ({heads}, {dim}) from the config; the config's head "
                "counts do not describe this module")
        slot.write_kv(k, v, metadata.slot_mapping)
        out = slot.attend_cached(q, metadata, scale, sliding_window, softcap, sinks)
    return out[None], None


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
