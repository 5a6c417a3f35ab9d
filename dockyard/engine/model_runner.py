"""Model runner: owns the model and the KV cache; turns a scheduled step into sampled tokens.

Per step it builds the flat inputs once (``input_ids``, ``positions``, slot mapping, block
tables, lengths), runs the model under the attention forward context, computes logits only
for the sequences that sample this step, and runs the sampler.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from dockyard.engine.sampler import Sampler, SamplerOutput, SamplingBatch, apply_penalties
from dockyard.engine.scheduler import ScheduledSeq
from dockyard.ops.attention import Attention as AttentionLayer
from dockyard.ops.attention import AttentionMetadata, forward_context
from dockyard.spec import ModelSpec

logger = logging.getLogger(__name__)


@dataclass
class StepInputs:
    """The flat tensors of one step."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: AttentionMetadata
    sample_rows: torch.Tensor  # index into the flat batch of each sampling sequence's last token
    sampling: list[ScheduledSeq]


class ModelRunner:
    """Runs the model over paged KV for the scheduler's batches."""

    def __init__(self, model: nn.Module, spec: ModelSpec, num_blocks: int, block_size: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.spec = spec
        self.device = device
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.sampler = Sampler()
        self.attention_layers = [m for m in model.modules() if isinstance(m, AttentionLayer)]
        entries, heads, dim = spec.kv_cache_layout
        shape = (len(self.attention_layers), entries, num_blocks, block_size, heads, dim)
        self.kv_cache = torch.zeros(shape, dtype=dtype, device=device)

    def prepare(self, batch: list[ScheduledSeq]) -> StepInputs:
        """Flat inputs for ``batch``."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        sampling: list[ScheduledSeq] = []
        bs = self.block_size
        for item in batch:
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_new_tokens
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(seq.block_table[p // bs] * bs + p % bs for p in range(start, end))
            query_lens.append(item.num_new_tokens)
            seq_lens.append(end)
            if item.samples:
                sample_rows.append(len(input_ids) - 1)
                sampling.append(item)
        max_blocks = max(len(item.seq.block_table) for item in batch)
        tables = [item.seq.block_table + [0] * (max_blocks - len(item.seq.block_table)) for item in batch]
        dev = self.device

        def as_tensor(values: list) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=dev)

        metadata = AttentionMetadata(
            slot_mapping=as_tensor(slots),
            block_tables=as_tensor(tables),
            query_lens=query_lens,
            seq_lens=seq_lens,
            block_size=bs,
            seq_lens_tensor=as_tensor(seq_lens),
        )
        return StepInputs(as_tensor(input_ids), as_tensor(positions), metadata, as_tensor(sample_rows), sampling)

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSeq]) -> tuple[list[ScheduledSeq], SamplerOutput | None]:
        """Run one step; return the sequences that sampled and their sampler output."""
        inputs = self.prepare(batch)
        # Bound every step, so several engines may take turns on one model (tests, onboarding).
        for i, layer in enumerate(self.attention_layers):
            layer.kv_cache = self.kv_cache[i]
        with forward_context(inputs.metadata):
            hidden = self.model(inputs.input_ids, inputs.positions)
        if not inputs.sampling:
            return [], None
        logits = self.model.compute_logits(hidden[inputs.sample_rows])
        seqs = [item.seq for item in inputs.sampling]
        params = [s.params for s in seqs]
        sampling_batch = SamplingBatch.build(params, [s.generator for s in seqs], logits.device)
        self._mask_stops_before_min_tokens(logits, seqs)
        logits = apply_penalties(
            logits, [s.prompt_token_ids for s in seqs], [s.output_token_ids for s in seqs], sampling_batch
        )
        num_logprobs = max((p.logprobs or 0) for p in params)
        want_logprobs = any(p.logprobs is not None for p in params)
        out = self.sampler(logits, sampling_batch, num_logprobs=num_logprobs if want_logprobs else 0)
        return inputs.sampling, out

    def _mask_stops_before_min_tokens(self, logits: torch.Tensor, seqs: list) -> None:
        """Until a sequence has min_tokens outputs, EOS and its stop tokens cannot be sampled."""
        for row, seq in enumerate(seqs):
            params = seq.params
            if len(seq.output_token_ids) < params.min_tokens:
                banned = list(params.stop_token_ids or ())
                if not params.ignore_eos:
                    banned += list(self.spec.eos_token_ids)
                if banned:
                    logits[row, banned] = float("-inf")
