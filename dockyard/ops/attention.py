"""Attention over a paged KV cache: the reference (pure PyTorch) backend.

The KV cache of one layer is a tensor ``[2, num_blocks, block_size, num_kv_heads, head_dim]``
(keys, values). A step's flat batch concatenates the new tokens of several sequences; the
:class:`AttentionMetadata` says where each sequence's queries are, how long its context is
and which blocks hold it. Prefill, chunked prefill, prefix-cache hits and decode are the same
computation: queries at the end of a context of ``seq_len`` tokens, attending causally.

The model runner publishes the metadata with :func:`forward_context`; an :class:`Attention`
module called outside such a context treats its input as one sequence with no cache (this is
how block-level equivalence tests call it).

An FP8 KV cache (``float8_e4m3fn``, :mod:`dockyard.ops.fp8_kv`) stores K and V divided by the
layer's ``k_scale`` / ``v_scale``; every write quantizes with them and every read (the reference
path here, the Triton kernel) multiplies them back.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from dockyard.ops import fp8_kv
from dockyard.ops.dispatch import triton_installed

logger = logging.getLogger(__name__)


@dataclass
class AttentionMetadata:
    """Where a step's tokens go in the KV cache and what each sequence attends to."""

    slot_mapping: torch.Tensor  # [T] int64: flat cache slot (block * block_size + offset) of each new token
    block_tables: torch.Tensor  # [B, max_blocks] int64, padded with 0
    query_lens: list[int]  # new tokens per sequence; sum == T
    seq_lens: list[int]  # context length per sequence after this step (cached + new)
    block_size: int
    seq_lens_tensor: torch.Tensor | None = None  # seq_lens on the device (the batched decode path uses it)
    # (batch, context) the Triton decode kernel sizes its split-K from, instead of the batch and the block
    # table's width: the runner gives an eager step the shape its CUDA graph would have, so both sum alike.
    decode_split_shape: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        # Sequences at the front of the batch with one new token each (the scheduler puts running
        # sequences first): a mixed batch runs them as one decode batch.
        n = 0
        for q_len in self.query_lens:
            if q_len != 1:
                break
            n += 1
        self.num_leading_decodes = n

    @property
    def is_decode_only(self) -> bool:
        return self.num_leading_decodes == len(self.query_lens)


_CONTEXT: AttentionMetadata | None = None


# SDPA backends for the prompts of a step on CUDA: not cuDNN's, which builds an execution plan for
# every new sequence length (tens of ms each; a batch of random-length prompts pays it per prompt).
_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@contextlib.contextmanager
def forward_context(metadata: AttentionMetadata | None) -> Iterator[None]:
    """Make ``metadata`` visible to every Attention module during one forward pass (and, on CUDA,
    choose the SDPA backends its prompts use)."""
    global _CONTEXT
    previous, _CONTEXT = _CONTEXT, metadata
    try:
        if metadata is not None and metadata.slot_mapping.is_cuda:
            with sdpa_kernel(_SDPA_BACKENDS):
                yield
        else:
            yield
    finally:
        _CONTEXT = previous


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                   k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
    """Store the new tokens' keys and values at their slots (every slot valid: a padded row of a
    captured batch writes to a block no sequence owns). No host synchronization. An FP8 cache
    stores them quantized with ``k_scale`` / ``v_scale``."""
    num_kv_heads, head_dim = k.shape[-2:]
    keys = kv_cache[0].view(-1, num_kv_heads, head_dim)
    values = kv_cache[1].view(-1, num_kv_heads, head_dim)
    if fp8_kv.is_fp8(kv_cache):
        assert k_scale is not None and v_scale is not None, "an FP8 KV cache written without its scales"
        # Byte views: index_copy_ has no float8 kernel on the CPU.
        keys.view(torch.uint8).index_copy_(0, slot_mapping, fp8_kv.quantize(k, k_scale).view(torch.uint8))
        values.view(torch.uint8).index_copy_(0, slot_mapping, fp8_kv.quantize(v, v_scale).view(torch.uint8))
        return
    keys.index_copy_(0, slot_mapping, k.to(keys.dtype))
    values.index_copy_(0, slot_mapping, v.to(values.dtype))


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                      softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q·kᵀ·scale [soft-capped], masked [, sinks]) · v over [..., H, L, D] tensors.

    ``mask`` (bool, True = attend) broadcasts to [..., H, Lq, Lk]. ``softcap`` c turns scores s into
    c·tanh(s / c) (Gemma 2). ``sinks`` [H] are learned per-head logits that join every softmax's
    denominator but attend to nothing (gpt-oss). Without either, this is PyTorch's SDPA.
    """
    if softcap is None and sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        sink = sinks.float().reshape(-1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v.float()).to(q.dtype)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            sliding_window: int | None = None, softcap: float | None = None,
            sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of q [Lq, Hq, D] placed at the end of a context k [Lk, Hkv, D], v [Lk, Hkv, Dv].

    With ``sliding_window`` W, a query at position p sees keys at positions p-W+1 .. p only.
    """
    q_len, k_len = q.shape[0], k.shape[0]
    groups = q.shape[1] // k.shape[1]
    if softcap is None and sinks is None and (sliding_window is None or k_len <= sliding_window):
        # Plain causal attention goes to SDPA's fused kernels (flash attention on a GPU), never
        # materializing the scores: a whole prompt is causal, one query sees everything, and a
        # chunk after a cached prefix is causal aligned to the bottom-right corner (query i sees
        # keys up to k_len - q_len + i).
        # Grouped heads are repeated: with enable_gqa, SDPA on CUDA falls back to its math kernel.
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        mask = None if q_len == k_len or q_len == 1 else causal_lower_right(q_len, k_len)
        # [1, heads, L, D]: the fused kernels take 4-D inputs only (3-D goes to the math kernel).
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                             v.transpose(0, 1)[None], attn_mask=mask,
                                             is_causal=q_len > 1 and mask is None, scale=scale)
        return out[0].transpose(0, 1)
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    mask = None
    if q_len > 1 or (sliding_window is not None and k_len > sliding_window):
        q_pos = torch.arange(k_len - q_len, k_len, device=q.device)[:, None]
        k_pos = torch.arange(k_len, device=q.device)[None, :]
        mask = q_pos >= k_pos
        if sliding_window is not None:
            mask &= k_pos > q_pos - sliding_window
    out = softmax_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), mask, scale, softcap, sinks)
    return out.transpose(0, 1)


def gather_context(cache: torch.Tensor, metadata: AttentionMetadata, index: int) -> torch.Tensor:
    """The ``seq_lens[index]`` cached entries [L, heads, dim] of sequence ``index`` from one cache part."""
    seq_len = metadata.seq_lens[index]
    blocks = metadata.block_tables[index, : -(-seq_len // metadata.block_size)]
    return cache[blocks].reshape(-1, *cache.shape[-2:])[:seq_len]


BACKEND_ENV = "DOCKYARD_ATTENTION_BACKEND"


def decode_backend(q: torch.Tensor, kv_cache: torch.Tensor) -> str:
    """Which backend runs a decode-only batch: ``"triton"`` or ``"reference"``.

    ``DOCKYARD_ATTENTION_BACKEND=reference|triton`` forces one (``triton`` raises where it cannot
    run; on the CPU it needs ``TRITON_INTERPRET=1``). Unset (or ``auto``): Triton on CUDA when it
    is installed and handles the shapes, the reference otherwise.
    """
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice == "reference":
        return "reference"
    if choice not in ("auto", "triton"):
        raise ValueError(f"{BACKEND_ENV}={choice!r}: expected reference, triton or auto")
    if choice == "auto" and q.device.type != "cuda":
        return "reference"
    usable = _triton_usable(q, kv_cache)
    if choice == "triton" and not usable:
        raise RuntimeError(f"{BACKEND_ENV}=triton, but the Triton decode kernel cannot run here (Triton "
                           f"installed: {triton_installed()}, device {q.device}, q {tuple(q.shape)} {q.dtype}, "
                           f"kv_cache {tuple(kv_cache.shape)})")
    return "triton" if usable else "reference"


def _triton_usable(q: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """Whether a kernel handles q over this layer's cache: K and V per head (entries 2), or MLA's one
    latent per token (entries 1, q already absorbed into latent space)."""
    if not triton_installed() or q.dim() != 3 or kv_cache.dim() != 5 or kv_cache.shape[0] not in (1, 2):
        return False
    if kv_cache.shape[-1] != q.shape[-1] or kv_cache.device != q.device:
        return False
    # Triton is an optional dependency
    from dockyard.ops.triton_attention import mla_supports, supports, triton_available

    if not triton_available(q.device):
        return False
    if kv_cache.shape[0] == 1:
        return kv_cache.shape[-2] == 1 and mla_supports(q.shape[-1], q.shape[1], q.dtype)
    return supports(q.shape[-1], q.shape[1], kv_cache.shape[-2], q.dtype)


def paged_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
    sliding_window: int | None = None, softcap: float | None = None, sinks: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention for a mixed batch: each sequence's queries over its cached context.

    The sequences at the front of the batch that decode one token go to the Triton kernel on CUDA
    (see :func:`decode_backend`) as one batch; the others (prompts, chunks of prompts), and every
    batch on the CPU, take the reference path one sequence at a time (a whole uncached prompt is
    causal SDPA). An FP8 cache is read as its values times ``k_scale`` / ``v_scale``.
    """
    num_decodes = metadata.num_leading_decodes
    start = 0
    out = q.new_empty(*q.shape[:2], kv_cache.shape[-1])
    if num_decodes and metadata.seq_lens_tensor is not None:
        if decode_backend(q, kv_cache) == "triton":
            from dockyard.ops.triton_attention import paged_decode_attention  # Triton is an optional dependency

            decoded = paged_decode_attention(q[:num_decodes], kv_cache, metadata.block_tables[:num_decodes],
                                             metadata.seq_lens_tensor[:num_decodes], scale, sliding_window,
                                             softcap, sinks, num_splits=_decode_splits(metadata, kv_cache,
                                                                                       sliding_window),
                                             k_scale=k_scale, v_scale=v_scale)
            if num_decodes == len(metadata.query_lens):
                return decoded
            out[:num_decodes] = decoded
            start = num_decodes
        elif metadata.is_decode_only and num_decodes > 1:
            return _decode_attention(q, kv_cache, metadata, scale, sliding_window, softcap, sinks, k_scale, v_scale)
    for i in range(start, len(metadata.query_lens)):
        q_len = metadata.query_lens[i]
        k = fp8_kv.dequantize(gather_context(kv_cache[0], metadata, i), k_scale, q.dtype)
        v = fp8_kv.dequantize(gather_context(kv_cache[1], metadata, i), v_scale, q.dtype)
        out[start:start + q_len] = _attend(q[start:start + q_len], k, v, scale, sliding_window, softcap, sinks)
        start += q_len
    return out


def _decode_splits(metadata: AttentionMetadata, kv_cache: torch.Tensor, sliding_window: int | None) -> int | None:
    """The kernel's split count for ``metadata.decode_split_shape`` (None: the kernel's own default)."""
    if metadata.decode_split_shape is None:
        return None
    from dockyard.ops.triton_attention import default_num_splits  # Triton is an optional dependency

    batch, context = metadata.decode_split_shape
    if sliding_window is not None:
        context = min(context, sliding_window)
    return default_num_splits(batch, kv_cache.shape[-2], context, kv_cache.device)


def _decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float,
                      sliding_window: int | None, softcap: float | None = None,
                      sinks: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                      v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """One query per sequence: gather every context through the block tables and attend in one call."""
    batch, max_blocks = metadata.block_tables.shape
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    ctx = max_blocks * metadata.block_size
    k = fp8_kv.dequantize(kv_cache[0][metadata.block_tables], k_scale, q.dtype).reshape(batch, ctx, num_kv_heads,
                                                                                          head_dim)
    v = fp8_kv.dequantize(kv_cache[1][metadata.block_tables], v_scale, q.dtype).reshape(batch, ctx, num_kv_heads,
                                                                                          head_dim)
    groups = q.shape[1] // num_kv_heads
    if groups > 1:
        k = k.repeat_interleave(groups, dim=2)
        v = v.repeat_interleave(groups, dim=2)
    pos = torch.arange(ctx, device=q.device)[None, :]
    lens = metadata.seq_lens_tensor[:, None]
    mask = pos < lens
    if sliding_window is not None:
        mask &= pos > lens - 1 - sliding_window
    out = softmax_attention(q[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2), mask[:, None, None, :], scale,
                            softcap, sinks)
    return out[:, :, 0, :]


@torch.no_grad()
def calibrate_kv_scales(model: nn.Module, layers: list[Attention]) -> None:
    """FP8 KV-cache scales for the ``layers`` the checkpoint gave none: one forward pass of ``model``
    without a cache over ``fp8_kv.CALIBRATION_TOKENS`` seeded token ids (:mod:`dockyard.ops.fp8_kv`)."""
    missing = [layer for layer in layers if layer.kv_scale_source != "checkpoint"]
    if not missing:
        logger.info("FP8 KV cache: per-tensor scales of all %d layers from the checkpoint", len(layers))
        return
    spec = model.spec
    device = next(model.parameters()).device
    tokens = min(fp8_kv.CALIBRATION_TOKENS, spec.max_model_len)
    ids = torch.randint(0, spec.vocab_size, (tokens,), generator=torch.Generator().manual_seed(0)).to(device)
    with fp8_kv.calibration(), forward_context(None):
        model(ids, torch.arange(tokens, device=device))
    logger.info("FP8 KV cache: per-tensor scales of %d of %d layers calibrated at start-up (%d tokens), the rest "
                "from the checkpoint", len(missing), len(layers), tokens)


class Attention(nn.Module):
    """Multi-head / grouped-query attention on the paged KV cache published by the runner.

    ``logit_softcap`` soft-caps the scores (Gemma 2); per-head ``sinks`` may be passed to each
    call (gpt-oss keeps them as a parameter of its attention block). ``k_scale`` / ``v_scale`` are the
    layer's FP8 KV-cache scales (used only when the bound cache is FP8); ``kv_scale_source`` says where
    they came from: "default" (1.0), "checkpoint" or "calibrated".
    """

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float,
                 sliding_window: int | None = None, logit_softcap: float | None = None) -> None:
        super().__init__()
        self.sliding_window = sliding_window
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        self.logit_softcap = logit_softcap
        # Assigned by the model runner once the pool is allocated: [entries, blocks, block_size, heads, dim].
        self.kv_cache: torch.Tensor | None = None
        # Not in the state dict: the weights loader fills parameters only; checkpoint scales arrive through
        # fp8_kv.apply_kv_scales.
        self.register_buffer("k_scale", torch.ones((), dtype=torch.float32), persistent=False)
        self.register_buffer("v_scale", torch.ones((), dtype=torch.float32), persistent=False)
        self.kv_scale_source = "default"

    def set_kv_scales(self, k_scale: float | torch.Tensor, v_scale: float | torch.Tensor, source: str) -> None:
        """Set the FP8 KV-cache scales in place (captured CUDA graphs read these very tensors)."""
        self.k_scale.fill_(k_scale)
        self.v_scale.fill_(v_scale)
        self.kv_scale_source = source

    def observe_kv(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """During an FP8 calibration pass (:func:`fp8_kv.calibration`), raise the scales to cover ``k``/``v``
        (checkpoint scales are kept); otherwise nothing."""
        if not fp8_kv.calibrating() or self.kv_scale_source == "checkpoint":
            return
        k_new = fp8_kv.calibration_scale(k, fp8_kv.K_SCALE_HEADROOM)
        v_new = fp8_kv.calibration_scale(v, fp8_kv.V_SCALE_HEADROOM)
        if self.kv_scale_source == "calibrated":
            k_new, v_new = torch.maximum(k_new, self.k_scale), torch.maximum(v_new, self.v_scale)
        self.set_kv_scales(k_new, v_new, "calibrated")

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store new keys and values in the bound cache (quantized with this layer's scales when FP8)."""
        assert self.kv_cache is not None
        write_kv_cache(k, v, self.kv_cache, slot_mapping, self.k_scale, self.v_scale)

    def attend_cached(self, q: torch.Tensor, metadata: AttentionMetadata, scale: float,
                      sliding_window: int | None = None, softcap: float | None = None,
                      sinks: torch.Tensor | None = None) -> torch.Tensor:
        """:func:`paged_attention` of ``q`` over the bound cache, with this layer's scales."""
        assert self.kv_cache is not None
        return paged_attention(q, self.kv_cache, metadata, scale, sliding_window, softcap, sinks,
                               self.k_scale, self.v_scale)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor | None = None,
                rotary: nn.Module | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] → [T, Hq, D]. With ``rotary`` (a RotaryEmbedding) q and k are
        rotated at ``positions`` first; on the fused-ops path one kernel rotates them and writes the
        KV cache."""
        metadata = _CONTEXT
        if metadata is None or self.kv_cache is None:
            if rotary is not None:
                q, k = rotary(positions, q, k)
            self.observe_kv(k, v)
            return _attend(q, k, v, self.scale, self.sliding_window, self.logit_softcap, sinks)
        tables = rotary.fused_tables(q) if rotary is not None else None
        if tables is not None and self.kv_cache.is_contiguous() and v.shape == k.shape:
            from dockyard.ops.triton_fused import rotary_and_write_kv  # Triton is an optional dependency

            assert rotary is not None and positions is not None
            rotary_and_write_kv(q, k, v, positions, *tables, rotary.rotary_dim, self.kv_cache,
                                metadata.slot_mapping, self.k_scale, self.v_scale)
        else:
            if rotary is not None:
                q, k = rotary(positions, q, k)
            self.write_kv(k, v, metadata.slot_mapping)
        return self.attend_cached(q, metadata, self.scale, self.sliding_window, self.logit_softcap, sinks)

    @staticmethod
    def current_metadata() -> AttentionMetadata | None:
        """The step's metadata (None outside a forward context): for attention variants such as MLA."""
        return _CONTEXT
