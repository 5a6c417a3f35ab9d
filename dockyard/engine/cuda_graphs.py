"""CUDA graphs for decode steps: the model's forward over a batch of one-token sequences, captured
once per batch size at start-up and replayed, so a step costs one launch instead of hundreds.

A decode step at small batch is bound by reading the weights; launching each layer's dozen
kernels from Python costs more than the kernels themselves. The graph covers the forward, the
logits and their argmax: a greedy batch needs nothing else from the GPU. Capturing needs a forward with no host
synchronization and shapes that depend only on the batch size: the Triton decode kernel (grids from
shapes), the KV-cache write (``index_copy_`` at device slots), rotary tables reserved up to
``max_model_len`` (:meth:`RotaryEmbedding.reserve`). A batch of ``n`` sequences replays the graph
of the smallest captured size ``>= n``; the padding rows decode token 0 at position 0 with a
context of one token held in a *sink block*, an extra KV block that the block manager never hands
out, so they write nowhere that matters and their outputs are dropped.

MoE models capture like dense ones when their experts run the fused kernels (``ops/triton_moe.py``:
routing, alignment and grouped GEMMs on the device, fixed grids), and MLA models decode in the
absorbed form through their own Triton kernel over the latent cache, so their attention captures
like the dense one. Models whose forward cannot be captured (experts on the reference loop, which
reads per-expert counts on the host; attention the kernels do not handle; dynamic-NTK and longrope
rotary) run eagerly; the reason is logged once.
``enforce_eager`` turns graphs off entirely.

A model whose modules are not dockyard's (the generic path's HF modules: ``capture_by_trial``) cannot be
judged by looking at its modules: :func:`capture_decode_graphs` tries the capture at start-up, and any model
whose capture fails (a host synchronization, data-dependent Python, a pageable copy in its forward) runs
eagerly with the failure as its recorded reason.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from dockyard.ops.attention import Attention, AttentionMetadata, decode_backend, forward_context
from dockyard.ops.dispatch import fused_ops_enabled
from dockyard.ops.rotary import RotaryEmbedding

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, then every 16 up to ``max_num_seqs`` (always included)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    return sorted(set(sizes + [max_num_seqs]))


def decode_split_shape(num_decodes: int, sizes: list[int], max_context: int) -> tuple[int, int]:
    """(batch, context) the decode kernel splits by for ``num_decodes`` sequences: the captured size
    that would run them and the widest context. Eager steps on CUDA use the same (with or without
    graphs), so a sequence's attention sums in the same order either way and greedy tokens agree."""
    return next((b for b in sizes if b >= num_decodes), num_decodes), max_context


def why_not_capturable(model: nn.Module, kv_cache: torch.Tensor, max_model_len: int) -> str | None:
    """None when the decode forward of ``model`` can be captured, else the reason in words.

    Reserves the rotary tables up to ``max_model_len`` as a side effect (that is what makes them
    capturable)."""
    if kv_cache.device.type != "cuda":
        return f"the model runs on {kv_cache.device.type}, not CUDA"
    attention = [m for m in model.modules() if isinstance(m, Attention)]
    if not attention:
        return "it has no paged attention layers"
    # A model captured by trial has no dockyard expert banks or rotary modules to inspect: its capture decides.
    trial = bool(getattr(model, "capture_by_trial", False))
    banks = [] if trial else [m.experts for m in model.modules() if hasattr(m, "experts")]
    if banks and (any(getattr(b, "stacked", None) is None for b in banks) or not fused_ops_enabled(kv_cache)):
        return "its MoE experts run the reference loop, which reads per-expert token counts on the host"
    if kv_cache.dim() != 6:
        return f"its KV cache {tuple(kv_cache.shape)} is not one [entries, blocks, block size, heads, dim] per layer"
    # A decode query as the layer's kernel takes it: [1, heads, cache dim] (MLA's absorbed query has the
    # latent's width, which is the cache's).
    for shape in {(m.num_heads, m.head_dim) for m in attention}:
        probe_q = torch.empty(1, *shape, dtype=next(model.parameters()).dtype, device=kv_cache.device)
        if decode_backend(probe_q, kv_cache[0]) != "triton":
            return ("the Triton decode kernel is not available for its attention (the reference decode path "
                    "gathers whole block tables)")
    for rotary in (m for m in model.modules() if isinstance(m, RotaryEmbedding)):
        if not rotary.reserve(max_model_len):
            return f"its rotary embedding ({rotary.rope.rope_type}) depends on the largest position of a step"
    return None


def capture_decode_graphs(model: nn.Module, kv_cache: torch.Tensor, sink_block: int, block_size: int,
                          max_num_seqs: int, max_model_len: int) -> tuple[DecodeGraphs | None, str | None]:
    """The model's captured decode graphs, or None and the reason decode steps run eagerly: what
    :func:`why_not_capturable` finds, or the error of a capture that failed (the model then runs eagerly; a
    broken CUDA context still fails loudly on the next synchronization)."""
    reason = why_not_capturable(model, kv_cache, max_model_len)
    if reason is not None:
        return None, reason
    stream = torch.cuda.current_stream(kv_cache.device)
    graphs: DecodeGraphs | None = DecodeGraphs(model, kv_cache, sink_block, block_size, max_num_seqs, max_model_len)
    try:
        graphs.capture()
        return graphs, None
    except Exception as exc:  # noqa: BLE001 - any failure to capture means eager decode, with the reason kept
        # The first error is the cause (a failed capture's end raises again, about the capture only).
        while exc.__context__ is not None and isinstance(exc.__context__, Exception):
            exc = exc.__context__
        first_line = (str(exc).strip().splitlines() or [""])[0]
        reason = (f"capturing the decode forward of {type(model).__name__} failed ({type(exc).__name__}: "
                  f"{first_line})")
    # A capture that fails in its end leaves the capture stream current: the engine's work goes back to its own.
    torch.cuda.set_stream(stream)
    graphs = None
    torch.cuda.synchronize(kv_cache.device)
    torch.cuda.empty_cache()
    logger.warning("decode steps run eagerly: %s", reason)
    return None, reason


class _Staging:
    """Pinned host buffers of one step's graph inputs, and the event of their last copy to the device."""

    def __init__(self, max_batch: int, max_blocks: int, sink_block: int) -> None:
        self.ids = torch.zeros(5, max_batch, dtype=torch.long, pin_memory=True)
        self.tables = torch.full((max_batch, max_blocks), sink_block, dtype=torch.long, pin_memory=True)
        self.ids_np = self.ids.numpy()
        self.tables_np = self.tables.numpy()
        self.copied = torch.cuda.Event()


class DecodeGraphs:
    """Captured decode forwards, one per batch size of :func:`graph_batch_sizes`.

    ``run(...)`` copies a step's inputs into the static buffers, replays the graph of the smallest
    size that fits and returns the logits and argmax of the real rows.
    """

    def __init__(self, model: nn.Module, kv_cache: torch.Tensor, sink_block: int, block_size: int,
                 max_num_seqs: int, max_model_len: int) -> None:
        self.model = model
        self.device = kv_cache.device
        self.block_size = block_size
        self.sink_block = sink_block
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.max_batch = self.sizes[-1]
        self.max_blocks = -(-max_model_len // block_size)
        dev = self.device
        # Rows: input ids, positions, slots, context lengths, and where a pending input id is in the
        # in-flight step's tokens (one host→device copy per step).
        self.inputs = torch.zeros(5, self.max_batch, dtype=torch.long, device=dev)
        self.block_tables = torch.full((self.max_batch, self.max_blocks), sink_block, dtype=torch.long, device=dev)
        # Pinned staging buffers, written through numpy views (fast from Python lists), copied asynchronously.
        # Two sets, used in turn, each reused only once its copy has run: with async scheduling the host
        # stages a step while the previous step's copies may still wait behind the GPU's work.
        self._staging = [_Staging(self.max_batch, self.max_blocks, sink_block) for _ in range(2)]
        self._turn = 0
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # (logits, argmax) per size
        self.pool = None

    def _metadata(self, batch: int) -> AttentionMetadata:
        splits = decode_split_shape(batch, self.sizes, self.max_blocks * self.block_size)
        return AttentionMetadata(slot_mapping=self.inputs[2, :batch], block_tables=self.block_tables[:batch],
                                 query_lens=[1] * batch, seq_lens=[1] * batch, block_size=self.block_size,
                                 seq_lens_tensor=self.inputs[3, :batch], decode_split_shape=splits)

    def _pad(self, start: int, end: int) -> None:
        """Rows start..end-1 decode token 0 at position 0 into the sink block, with a context of one."""
        self.inputs[0:2, start:end] = 0
        self.inputs[2, start:end] = self.sink_block * self.block_size
        self.inputs[3, start:end] = 1
        self.block_tables[start:end, 0] = self.sink_block

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every batch size, largest first (the smaller graphs reuse its memory pool)."""
        t0 = time.perf_counter()
        self._pad(0, self.max_batch)
        for batch in reversed(self.sizes):
            ids, positions = self.inputs[0, :batch], self.inputs[1, :batch]
            metadata = self._metadata(batch)
            with forward_context(metadata):
                self._step(ids, positions)  # warm-up: Triton compiles, allocator settles
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    out = self._step(ids, positions)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[batch] = graph
            self.outputs[batch] = out
        torch.cuda.synchronize(self.device)
        logger.info("captured decode CUDA graphs for batch sizes %s in %.1fs", self.sizes, time.perf_counter() - t0)

    def _step(self, ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model.compute_logits(self.model(ids, positions))
        return logits, logits.argmax(dim=-1)

    def fits(self, batch: int) -> bool:
        return 0 < batch <= self.max_batch

    def run(self, input_ids: list[int], positions: list[int], slots: list[int], seq_lens: list[int],
            tables: list[list[int]], pending: torch.Tensor | None = None, sources: list[int] | None = None,
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 logits [n, vocab] and their argmax [n] for a decode batch of n = len(input_ids)
        sequences (views of the graph's output buffers: valid until the next replay). A negative
        input id is a pending token: row ``sources[i]`` of ``pending``, read on the device."""
        n = len(input_ids)
        batch = next(b for b in self.sizes if b >= n)
        staging = self._staging[self._turn]
        self._turn ^= 1
        staging.copied.synchronize()
        host = staging.ids_np
        host[0, :n] = input_ids
        host[1, :n] = positions
        host[2, :n] = slots
        host[3, :n] = seq_lens
        if pending is not None:
            host[4, :n] = sources
        width = max(len(t) for t in tables)
        rows = staging.tables_np
        for i, table in enumerate(tables):  # entries past a row's length are never read
            rows[i, :len(table)] = table
        self.inputs[:, :n].copy_(staging.ids[:, :n], non_blocking=True)
        if pending is not None:
            ids = self.inputs[0, :n]
            ids.copy_(torch.where(ids < 0, pending[self.inputs[4, :n]], ids))
        self.block_tables[:n, :width].copy_(staging.tables[:n, :width], non_blocking=True)
        staging.copied.record()
        if batch > n:
            self._pad(n, batch)
        self.graphs[batch].replay()
        logits, tokens = self.outputs[batch]
        return logits[:n], tokens[:n]
