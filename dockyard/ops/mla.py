"""Multi-head latent attention (MLA) of DeepSeek-V2/V3, the reference version (pure PyTorch).

Each token's keys and values come from one low-rank latent: ``kv_a_proj_with_mqa`` maps the
hidden state to ``c_kv`` (``kv_lora_rank`` dims, RMS-normalized by ``kv_a_layernorm``) and a
single rotary key ``k_pe`` (``qk_rope_head_dim`` dims) that every head shares. ``kv_b_proj``
up-projects ``c_kv`` to each head's no-rope key ``k_nope`` and its value. Queries are
``[q_nope, q_pe]`` per head, from ``q_proj`` or, with a q LoRA rank, from
``q_b_proj(q_a_layernorm(q_a_proj(x)))``. Rotary embeddings touch only the ``pe`` parts.

The paged KV cache stores only ``[c_kv, k_pe]`` per token (one entry, one head, dim
``kv_lora_rank + qk_rope_head_dim``; see ``ModelSpec.kv_cache_layout``): the memory saving MLA
exists for. Two forms compute the same attention from it:

- *expanded* (prompts and prompt chunks): gather a sequence's latents, up-project them through
  ``kv_b_proj`` to per-head keys and values, and attend as ordinary multi-head attention with
  ``qk_head_dim = qk_nope_head_dim + qk_rope_head_dim`` for q·k and ``v_head_dim`` for values
  (SDPA, flash attention on a GPU). Its cost grows with context × heads × (nope + v dims).
- *absorbed* (decode: the leading one-token sequences of a step). ``kv_b_proj`` is
  ``[W_UK; W_UV]`` per head, so ``q_nope · (W_UK c) = (q_nope W_UK) · c`` and
  ``Σ p · (W_UV c) = W_UV (Σ p · c)``: each head's ``q_nope`` is multiplied into latent space,
  attention runs directly over the cached ``[c_kv, k_pe]`` (scores with the latent and rope
  parts, values = ``c_kv``, an MQA over one latent "head"), and the result is up-projected by
  ``W_UV`` before ``o_proj``. A step reads each cached latent once and expands nothing. On CUDA
  the attention is the Triton kernel :func:`~dockyard.ops.triton_attention.paged_mla_decode_attention`
  (grids from shapes, so decode can be captured in a CUDA graph); elsewhere
  :func:`absorbed_decode_reference`, which is also the kernel's test oracle. ``W_UK`` and
  ``W_UV`` are applied as two small batched products per step rather than multiplied into
  ``q_proj`` / ``o_proj`` ahead of time: pre-multiplied, those would hold ``kv_lora_rank``
  instead of ``qk_nope_head_dim`` / ``v_head_dim`` columns per head, several times the weight
  bytes a decode step must read.

Two DeepSeek conventions, both as in the original checkpoints and in transformers:

- Rotary pairs are interleaved, ``(x0, x1), (x2, x3), …``. We de-interleave ``q_pe`` and ``k_pe``
  (even dims, then odd dims) and apply our rotate-half rotary; the dot products then equal those
  of DeepSeek-V2's complex rotation and of V3's ``rope_interleave=True``. With
  ``rope_interleave=False`` (a V3 config option), plain rotate-half is used.
- The softmax scale is ``qk_head_dim ** -0.5``, times ``mscale²`` when the rope is scaled (any
  type but ``default``) and ``mscale_all_dim`` is set, where
  ``mscale = 0.1 · mscale_all_dim · ln(factor) + 1`` (1 when ``factor <= 1``). The rotary module
  separately scales cos/sin by YaRN's attention factor (``mscale / mscale_all_dim`` ratio).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dockyard.distributed.sharding import Sharder
from dockyard.errors import ConfigError
from dockyard.ops.attention import Attention, AttentionMetadata, _attend, decode_backend, gather_context
from dockyard.ops.norm import RMSNorm
from dockyard.spec import ModelSpec, RopeSpec

# DeepSeek's q_a_layernorm and kv_a_layernorm are built with the RMSNorm default eps (not the
# config's rms_norm_eps), in the original modeling code and in transformers alike.
LATENT_NORM_EPS = 1e-6


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction ``0.1 · mscale · ln(factor) + 1`` (1 when ``factor <= 1``)."""
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def mla_softmax_scale(qk_head_dim: int, rope: RopeSpec) -> float:
    """``qk_head_dim ** -0.5``, times ``yarn_mscale(factor, mscale_all_dim) ** 2`` for scaled ropes."""
    scale = qk_head_dim**-0.5
    if rope.rope_type != "default" and rope.mscale_all_dim:  # truthiness, as DeepSeek: 0 means unset
        scale *= yarn_mscale(rope.factor, rope.mscale_all_dim) ** 2
    return scale


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """Reorder the last dim from pairs ``(x0, x1, x2, x3, …)`` to ``(x0, x2, …, x1, x3, …)``."""
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)


def write_latent_cache(latent: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' latents [T, dim] at their slots of an MLA cache [1, blocks, block_size, 1, dim].

    Every slot must be valid (as for :func:`~dockyard.ops.attention.write_kv_cache`).
    """
    entries = kv_cache[0].view(-1, kv_cache.shape[-1])
    entries.index_copy_(0, slot_mapping, latent.to(entries.dtype))


def absorbed_decode_reference(q: torch.Tensor, latent_cache: torch.Tensor, metadata: AttentionMetadata,
                              scale: float, kv_lora_rank: int) -> torch.Tensor:
    """Absorbed attention in PyTorch: q [B, H, rank + rope] (one query per sequence, already in latent
    space) over each sequence's cached latents → [B, H, rank], the weighted sum of their ``c_kv`` parts."""
    outputs = []
    for i in range(q.shape[0]):
        context = gather_context(latent_cache[0], metadata, i)[:, 0].to(q.dtype)  # [L, rank + rope]
        # Every head attends to the one latent sequence with nothing masked: the heads are the rows of
        # a single-head attention, so the context is never repeated per head.
        outputs.append(F.scaled_dot_product_attention(q[i][None, None], context[None, None],
                                                      context[None, None, :, :kv_lora_rank], scale=scale)[0, 0])
    return torch.stack(outputs)


class MLAPagedAttention(Attention):
    """The cache-owning part of MLA: writes latents to the paged cache and attends over them.

    It is an :class:`Attention` so the model runner finds it and assigns ``kv_cache``
    (``[1, num_blocks, block_size, 1, kv_lora_rank + qk_rope_head_dim]``); ``head_dim`` here is
    that latent width and ``num_kv_heads`` is 1, as the cache stores them. ``absorb_decode``
    (default True) sends decode rows to the absorbed form; False keeps every row in the expanded
    form (the two are compared by tests and benchmarks).
    """

    def __init__(self, num_heads: int, kv_lora_rank: int, qk_nope_head_dim: int, qk_rope_head_dim: int,
                 v_head_dim: int, scale: float) -> None:
        super().__init__(num_heads, kv_lora_rank + qk_rope_head_dim, num_kv_heads=1, scale=scale)
        self.kv_lora_rank = kv_lora_rank
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.absorb_decode = True

    def forward(self, q: torch.Tensor, latent: torch.Tensor, kv_b_weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """q [T, H, qk_head_dim], the new tokens' latents [T, latent_dim] → [T, H, v_head_dim].

        ``kv_b_weight`` is ``kv_b_proj``'s weight [H · (qk_nope_head_dim + v_head_dim), kv_lora_rank].
        Outside a forward context (or before a cache is bound) the tokens are one sequence attending
        causally to itself.
        """
        metadata = self.current_metadata()
        if metadata is None or self.kv_cache is None:
            k, v = self.expand_kv(latent, kv_b_weight)
            return _attend(q, k, v, self.scale)
        write_latent_cache(latent, self.kv_cache, metadata.slot_mapping)
        return self._paged(q, kv_b_weight, metadata)

    def expand_kv(self, latent: torch.Tensor, kv_b_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents [L, latent_dim] → keys [L, H, qk_head_dim], values [L, H, v_head_dim]."""
        length = latent.shape[0]
        c_kv, k_pe = latent.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv = F.linear(c_kv, kv_b_weight).view(length, self.num_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k_pe = k_pe[:, None, :].expand(length, self.num_heads, self.qk_rope_head_dim)
        return torch.cat([k_nope, k_pe], dim=-1), v

    def absorbed_decode(self, q: torch.Tensor, kv_b_weight: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        """The first ``len(q)`` sequences of the step, one query each, in the absorbed form → [B, H, v_head_dim]."""
        assert self.kv_cache is not None
        heads, rank = self.num_heads, self.kv_lora_rank
        w_uk, w_uv = kv_b_weight.view(heads, self.qk_nope_head_dim + self.v_head_dim, rank).split(
            [self.qk_nope_head_dim, self.v_head_dim], dim=1)  # [H, nope, rank], [H, v, rank]
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [B, H, rank]
        q_absorbed = torch.cat([q_latent, q_pe], dim=-1)
        if metadata.seq_lens_tensor is not None and decode_backend(q_absorbed, self.kv_cache) == "triton":
            # Function-local import: Triton is an optional dependency (as in ops.attention).
            from dockyard.ops.triton_attention import mla_num_splits, paged_mla_decode_attention

            batch = q.shape[0]
            splits = None
            if metadata.decode_split_shape is not None:  # the split count of the step's CUDA-graph batch
                split_batch, context = metadata.decode_split_shape
                splits = mla_num_splits(split_batch, heads, context, q.device)
            latent_out = paged_mla_decode_attention(
                q_absorbed, self.kv_cache, metadata.block_tables[:batch], metadata.seq_lens_tensor[:batch],
                self.scale, rank, num_splits=splits)
        else:
            latent_out = absorbed_decode_reference(q_absorbed, self.kv_cache, metadata, self.scale, rank)
        return torch.bmm(latent_out.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [B, H, v_head_dim]

    def _paged(self, q: torch.Tensor, kv_b_weight: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        """Each sequence's queries over its cached context (this step's latents included)."""
        assert self.kv_cache is not None
        num_decodes = metadata.num_leading_decodes if self.absorb_decode else 0
        outputs = []
        if num_decodes:
            outputs.append(self.absorbed_decode(q[:num_decodes], kv_b_weight, metadata))
            if num_decodes == len(metadata.query_lens):
                return outputs[0]
        start = num_decodes
        for i in range(num_decodes, len(metadata.query_lens)):
            q_len = metadata.query_lens[i]
            context = gather_context(self.kv_cache[0], metadata, i)[:, 0, :].to(q.dtype)  # [L, latent_dim]
            k, v = self.expand_kv(context, kv_b_weight)
            outputs.append(_attend(q[start:start + q_len], k, v, self.scale))
            start += q_len
        return torch.cat(outputs)


class MLAAttention(nn.Module):
    """DeepSeek-V2/V3 multi-head latent attention block: ``forward(positions [T], x [T, hidden]) → [T, hidden]``.

    Parameter names are the checkpoints' (``self_attn.q_a_proj``, ``kv_b_proj``, …). ``rotary_emb``
    is the model's shared rotary module built for ``qk_rope_head_dim``-dim heads, e.g.
    ``get_rope(spec.rope, spec.mla.qk_rope_head_dim, spec.max_position_embeddings)``.
    ``rope_interleave`` (None: ``spec.rope_interleave`` if the spec has it, else True) says the
    checkpoint's rope dims come in interleaved pairs, as in every DeepSeek release.
    """

    def __init__(self, spec: ModelSpec, rotary_emb: nn.Module, rope_interleave: bool | None = None) -> None:
        super().__init__()
        if spec.mla is None:
            raise ConfigError(f"{spec.architecture}: MLAAttention needs an MLA config (kv_lora_rank, …)")
        mla = spec.mla
        self.num_heads = spec.num_attention_heads
        self.q_lora_rank = mla.q_lora_rank
        self.kv_lora_rank = mla.kv_lora_rank
        self.qk_nope_head_dim = mla.qk_nope_head_dim
        self.qk_rope_head_dim = mla.qk_rope_head_dim
        self.qk_head_dim = mla.qk_nope_head_dim + mla.qk_rope_head_dim
        self.v_head_dim = mla.v_head_dim
        rotary_dim = getattr(rotary_emb, "rotary_dim", mla.qk_rope_head_dim)
        if rotary_dim != mla.qk_rope_head_dim:
            raise ConfigError(f"MLA rotary embedding rotates {rotary_dim} dims; it must be built for "
                              f"qk_rope_head_dim={mla.qk_rope_head_dim}")
        if rope_interleave is None:
            rope_interleave = bool(getattr(spec, "rope_interleave", True))
        self.rope_interleave = rope_interleave
        bias = spec.attention_bias  # DeepSeek: on q_a_proj, kv_a_proj_with_mqa and o_proj only
        hidden, heads = spec.hidden_size, self.num_heads

        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(self.q_lora_rank, heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(heads * self.v_head_dim, hidden, bias=bias)
        self.rotary_emb = rotary_emb
        self.scale = mla_softmax_scale(self.qk_head_dim, spec.rope)
        self.attn = MLAPagedAttention(heads, self.kv_lora_rank, self.qk_nope_head_dim, self.qk_rope_head_dim,
                                     self.v_head_dim, self.scale)

    def _queries(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        return q.view(hidden_states.shape[0], self.num_heads, self.qk_head_dim)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [T, hidden] at ``positions`` [T] → attention output [T, hidden]."""
        tokens = hidden_states.shape[0]
        q_nope, q_pe = self._queries(hidden_states).split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(hidden_states).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        k_pe = k_pe.view(tokens, 1, self.qk_rope_head_dim)
        if self.rope_interleave:
            q_pe, k_pe = deinterleave(q_pe), deinterleave(k_pe)
        q_pe, k_pe = self.rotary_emb(positions, q_pe, k_pe)
        q = torch.cat([q_nope, q_pe], dim=-1)
        latent = torch.cat([c_kv, k_pe[:, 0, :]], dim=-1)  # what the cache stores per token
        out = self.attn(q, latent, self.kv_b_proj.weight)
        return self.o_proj(out.reshape(tokens, self.num_heads * self.v_head_dim))

    def shard(self, sharder: Sharder, prefix: str) -> None:
        """Not split yet: a clear refusal instead of a silently replicated block."""
        raise ConfigError(f"{sharder.spec.architecture}: tensor parallelism does not support MLA yet")
