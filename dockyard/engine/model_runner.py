"""Model runner: owns the model and the KV cache; turns a scheduled step into sampled tokens.

Per step (:meth:`ModelRunner.step`, rank 0) it builds the flat inputs once (:class:`StepInputs`:
``input_ids``, ``positions``, slot mapping, block tables, lengths, the rows that get logits), runs
:meth:`ModelRunner.execute` on them — the model under the attention forward context, logits only for
the rows that sample this step and the prompt-logprob rows — and hands the logits to the sampler with
the rows' :class:`~dockyard.engine.sampler.SamplingBatch` (built once per step): every logits rule is
the sampler's. Under tensor parallelism ``execute`` is what every rank runs: rank 0 broadcasts the
``StepInputs`` first (``broadcast_step``, :mod:`dockyard.distributed.executor`) and the other ranks run
the same call on them (:mod:`dockyard.distributed.worker`), so their collectives meet; only rank 0
samples.

Prompt logprobs: for a sequence that computes them, every prompt row of the step whose entry is
not known yet (row ``p`` scores prompt token ``p + 1``) also goes through ``compute_logits``, in
chunks of rows so that at most ~``PROMPT_LOGITS_CHUNK_ELEMENTS`` logits exist at a time; they
are log-softmaxed in float32 as the model gives them (no penalties, no temperature).

An FP8 KV cache (``kv_cache_dtype`` float8_e4m3fn, :mod:`dockyard.ops.fp8_kv`) is allocated at one
byte per element; layers without checkpoint scales get theirs from one calibration forward pass at
start-up, before any CUDA graph is captured.

On CUDA, decode-only steps replay a captured CUDA graph of the forward (:mod:`.cuda_graphs`)
unless ``enforce_eager`` is set or the model cannot be captured; every other step runs eagerly.

Fault isolation: preparing a step's inputs and sampling are per-row work, so an exception there is
narrowed down to the sequences that cause it (each tried alone, seeded generators rewound first),
which ``execute`` returns as failed; the rest of the batch runs as it would have without them. An
exception that no single sequence reproduces, one in the forward pass, and one that
:func:`corrupts_engine` classes as fatal (a CUDA error, a broken invariant) propagate: the
engine's shared state can no longer be trusted.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from dockyard.distributed.sharding import parallel_config_of
from dockyard.engine.cuda_graphs import DecodeGraphs, capture_decode_graphs, decode_split_shape, graph_batch_sizes
from dockyard.engine.sampler import Sampler, SamplerOutput, SamplingBatch, argmax_suffices
from dockyard.engine.scheduler import ScheduledSeq
from dockyard.engine.sequence import Sequence
from dockyard.engine.spec_decode import Proposal, VerifyOutput, expanded_batch, verify, verify_argmax
from dockyard.ops import fp8_kv
from dockyard.ops.attention import Attention as AttentionLayer
from dockyard.ops.attention import AttentionMetadata, calibrate_kv_scales, forward_context
from dockyard.spec import ModelSpec

logger = logging.getLogger(__name__)

PROMPT_LOGITS_CHUNK_ELEMENTS = 1 << 23  # float32 logits (32 MiB) per chunk of prompt-logprob rows

_Result = TypeVar("_Result")
FailedSeqs = list[tuple[Sequence, Exception]]


def corrupts_engine(exc: BaseException) -> bool:
    """Whether ``exc`` means the engine's shared state is broken (never blamed on one request): a CUDA
    or other accelerator error (the context is unusable after one), an NCCL failure, a failed internal
    assertion (an invariant of the KV cache or the scheduler), or running out of host memory."""
    if isinstance(exc, AssertionError | MemoryError):
        return True
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(k in text for k in ("CUDA error", "device-side assert", "NCCL"))


def isolate_failures(items: list[ScheduledSeq], run: Callable[[list[ScheduledSeq]], _Result]
                     ) -> tuple[list[ScheduledSeq], _Result | None, FailedSeqs]:
    """``run(items)``; if it raises, find the items that make it raise alone and run the rest without
    them. Returns (the items run, the result or None when none is left, [(failed seq, its error)]).
    Re-raises when the error corrupts the engine or no single item reproduces it."""
    try:
        return items, run(items), []
    except Exception as exc:
        if corrupts_engine(exc):
            raise
        failed: FailedSeqs = []
        good = []
        for item in items:
            try:
                run([item])
            except Exception as item_exc:
                if corrupts_engine(item_exc):
                    raise
                failed.append((item.seq, item_exc))
            else:
                good.append(item)
        if not failed:
            raise
        for seq, item_exc in failed:
            logger.error("request %s failed in its step and is finished with an error; the others go on",
                         seq.request_id, exc_info=item_exc)
        return good, (run(good) if good else None), failed


@dataclass
class StepInputs:
    """What every rank needs to run one step: the flat inputs and the rows whose logits are computed.
    Tensors only (no sequences), so rank 0 can broadcast it to the other tensor-parallel ranks."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: AttentionMetadata
    sample_rows: torch.Tensor  # index into the flat batch of each sampling sequence's last token
    prompt_rows: torch.Tensor  # rows whose logits score the next prompt token (prompt logprobs)
    prompt_targets: torch.Tensor  # the prompt token each of those rows scores
    prompt_top_k: int  # most likely tokens kept per prompt row (the largest number asked for)

    def to(self, device: torch.device) -> StepInputs:
        """The same inputs with every tensor on ``device``."""
        md = self.metadata
        metadata = dataclasses.replace(
            md, slot_mapping=md.slot_mapping.to(device), block_tables=md.block_tables.to(device),
            seq_lens_tensor=None if md.seq_lens_tensor is None else md.seq_lens_tensor.to(device))
        return dataclasses.replace(
            self, input_ids=self.input_ids.to(device), positions=self.positions.to(device), metadata=metadata,
            sample_rows=self.sample_rows.to(device), prompt_rows=self.prompt_rows.to(device),
            prompt_targets=self.prompt_targets.to(device))


@dataclass
class StepRows:
    """Rank 0's side of a step: the sequences its sampled rows and its prompt-logprob rows belong to."""

    sampling: list[ScheduledSeq]
    prompt_spans: list[PromptSpan]


@dataclass
class ModelOutput:
    """What :meth:`ModelRunner.execute` computes, on the device: the logits of the sampled rows and the
    prompt logprobs (None when the step has no such rows)."""

    logits: torch.Tensor | None  # [len(sample_rows), vocab]
    prompt_logprobs: PromptLogprobTensors | None


@dataclass
class PromptLogprobTensors:
    """Per prompt row: the logprob of the prompt token it scores, and the top-k tokens and logprobs."""

    token_logprobs: torch.Tensor  # [rows]
    top_token_ids: torch.Tensor | None  # [rows, k]; None when k = 0
    top_logprobs: torch.Tensor | None


@dataclass
class PromptSpan:
    """``count`` consecutive rows of ``prompt_rows`` give prompt logprob entries ``first``.. of ``seq``."""

    seq: Sequence
    first: int
    count: int
    offset: int  # where its rows start in ``prompt_rows``


@dataclass
class PromptLogprobsOutput:
    """Prompt logprobs of one step: per row of ``StepInputs.prompt_rows``, as host lists."""

    spans: list[PromptSpan]
    token_logprobs: list[float]  # of the prompt token the row scores
    top_token_ids: list[list[int]]  # per row, the k most likely tokens (k = the largest asked for)
    top_logprobs: list[list[float]]

    @classmethod
    def from_tensors(cls, spans: list[PromptSpan], tensors: PromptLogprobTensors) -> PromptLogprobsOutput:
        """The host lists of ``tensors`` (rows in the order of ``spans``)."""
        n = len(tensors.token_logprobs)
        no_top: list[list] = [[] for _ in range(n)]
        return cls(spans, tensors.token_logprobs.tolist(),
                   no_top if tensors.top_token_ids is None else tensors.top_token_ids.tolist(),
                   no_top if tensors.top_logprobs is None else tensors.top_logprobs.tolist())

    def entries(self, span: PromptSpan, k: int) -> list[dict[int, float]]:
        """``{prompt token: logprob}`` then the top ``k`` by descending logprob, per row of ``span``."""
        out = []
        for r in range(span.offset, span.offset + span.count):
            target = span.seq.prompt_token_ids[span.first + r - span.offset]
            entry = {target: self.token_logprobs[r]}
            for tid, lp in zip(self.top_token_ids[r][:k], self.top_logprobs[r][:k]):
                entry.setdefault(tid, lp)
            out.append(entry)
        return out


class ModelRunner:
    """Runs the model over paged KV for the scheduler's batches."""

    def __init__(self, model: nn.Module, spec: ModelSpec, num_blocks: int, block_size: int,
                 device: torch.device, dtype: torch.dtype, *, max_num_seqs: int = 64,
                 max_model_len: int | None = None, enforce_eager: bool = False,
                 kv_cache_dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.spec = spec
        self.device = device
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.sampler = Sampler()
        self.attention_layers = [m for m in model.modules() if isinstance(m, AttentionLayer)]
        # A tensor-parallel shard caches only its own KV heads.
        entries, heads, dim = parallel_config_of(model, spec).kv_cache_layout(spec)
        # On CUDA one more block than the block manager owns: the sink of captured batches' padding rows.
        use_graphs = device.type == "cuda" and not enforce_eager
        shape = (len(self.attention_layers), entries, num_blocks + int(use_graphs), block_size, heads, dim)
        self.kv_cache_dtype = kv_cache_dtype or dtype
        if self.kv_cache_dtype == fp8_kv.FP8_DTYPE:
            if entries != 2:
                raise fp8_kv.latent_cache_refusal(spec.name, "fp8")
            calibrate_kv_scales(model, self.attention_layers)
        self.kv_cache = torch.zeros(shape, dtype=self.kv_cache_dtype, device=device)
        self._bind_kv_cache()
        self.graphs: DecodeGraphs | None = None
        # Tensor parallel, rank 0: sends each step's inputs to the other ranks before its forward
        # (``Executor.broadcast_step``; they run the same ``execute`` on them).
        self.broadcast_step: Callable[[StepInputs], None] | None = None
        # Speculative decoding's MTP proposer: told which sequences' rows each eager forward computed, right
        # after it (it reads the target's hidden states of those rows; ``spec_decode.HiddenStateProposer``).
        self.forward_observer: Callable[[list[ScheduledSeq]], None] | None = None
        self.eager_reason = "enforce_eager" if enforce_eager else None
        max_len = max_model_len or spec.max_model_len
        self._split_sizes = graph_batch_sizes(max_num_seqs)
        self._split_context = -(-max_len // block_size) * block_size
        if use_graphs:
            self.graphs, self.eager_reason = capture_decode_graphs(model, self.kv_cache, num_blocks, block_size,
                                                                   max_num_seqs, max_len)
            if self.graphs is None:
                logger.info("decode steps run eagerly (no CUDA graphs): %s", self.eager_reason)

    def _bind_kv_cache(self) -> None:
        for i, layer in enumerate(self.attention_layers):
            layer.kv_cache = self.kv_cache[i]

    def prepare(self, batch: list[ScheduledSeq], pending: torch.Tensor | None = None
                ) -> tuple[StepInputs, StepRows]:
        """Flat inputs for ``batch`` and the sequences their rows belong to; a pending token's input
        comes from ``pending`` (the sampled tokens of the step in flight), on the device."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        sampling: list[ScheduledSeq] = []
        prompt_rows: list[int] = []
        prompt_targets: list[int] = []
        prompt_spans: list[PromptSpan] = []
        fill_rows: list[int] = []  # rows whose input is a pending token, and its row in ``pending``
        fill_sources: list[int] = []
        bs = self.block_size
        for item in batch:
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_new_tokens
            if seq.prompt_logprobs is not None:
                # Rows first..last-1 give entries first+1..last; the last prompt row scores no prompt token.
                first = len(seq.prompt_logprobs) - 1
                last = min(end, len(seq.prompt_token_ids) - 1)
                if first < start and first < last:
                    raise RuntimeError(f"prompt logprobs of sequence {seq.seq_id}: rows {first}..{start - 1} "
                                       "were skipped (taken from the prefix cache)")
                if first < last:
                    base = len(input_ids) - start
                    prompt_spans.append(PromptSpan(seq, first + 1, last - first, len(prompt_rows)))
                    prompt_rows.extend(range(base + first, base + last))
                    prompt_targets.extend(seq.prompt_token_ids[first + 1:last + 1])
            input_ids.extend(seq.tokens(start, end))
            if end > seq.num_known_tokens:  # only the newest token can be pending
                fill_rows.append(len(input_ids) - 1)
                fill_sources.append(seq.pending_row)
            last_row = len(input_ids) - 1
            # Proposed tokens (speculative decoding) follow the newest one: every row of them gets logits.
            input_ids.extend(item.spec_token_ids)
            end += len(item.spec_token_ids)
            positions.extend(range(start, end))
            slots.extend(seq.block_table[p // bs] * bs + p % bs for p in range(start, end))
            query_lens.append(end - start)
            seq_lens.append(end)
            if item.samples:
                sample_rows.extend(range(last_row, len(input_ids)))
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
        if dev.type == "cuda":
            metadata.decode_split_shape = decode_split_shape(metadata.num_leading_decodes, self._split_sizes,
                                                             self._split_context)
        ids = as_tensor(input_ids)
        if fill_rows:
            if pending is None:
                raise RuntimeError("a sequence has a pending token but no in-flight step's tokens were given")
            ids[as_tensor(fill_rows)] = pending[as_tensor(fill_sources)]
        top_k = max((span.seq.params.prompt_logprobs or 0 for span in prompt_spans), default=0)
        inputs = StepInputs(ids, as_tensor(positions), metadata, as_tensor(sample_rows), as_tensor(prompt_rows),
                            as_tensor(prompt_targets), top_k)
        return inputs, StepRows(sampling, prompt_spans)

    @torch.inference_mode()
    def step(self, batch: list[ScheduledSeq], pending: torch.Tensor | None = None
             ) -> tuple[list[ScheduledSeq], SamplerOutput | VerifyOutput | None, PromptLogprobsOutput | None,
                        FailedSeqs]:
        """Run one step; return the sequences that sampled, their sampler output (a :class:`VerifyOutput`
        when some of them verified proposals: then every sampling sequence may emit several tokens), the prompt logprobs
        computed in this step (None when no sequence needed any), and the sequences whose rows failed
        (with the error; nothing of them was computed or sampled). ``pending``: the sampled tokens (on
        the device) of the step still in flight, which some inputs of this one are."""
        # Bound every step, so several engines may take turns on one model (tests, onboarding).
        self._bind_kv_cache()
        if self.graphs is not None and self._graph_step(batch):
            return self._execute_graph(batch, pending)
        batch, prepared, failed = isolate_failures(batch, lambda items: self.prepare(items, pending))
        if prepared is None:
            return [], None, None, failed
        inputs, rows = prepared
        if self.broadcast_step is not None:
            self.broadcast_step(inputs)
        output = self.execute(inputs)
        if self.forward_observer is not None:
            self.forward_observer(batch)
        prompt_out = None
        if output.prompt_logprobs is not None:
            prompt_out = PromptLogprobsOutput.from_tensors(rows.prompt_spans, output.prompt_logprobs)
        if not rows.sampling:
            return [], None, prompt_out, failed
        sampled, out, prompt_out, sample_failed = self._sample(output.logits, rows.sampling, prompt_out)
        return sampled, out, prompt_out, failed + sample_failed

    @torch.inference_mode()
    def execute(self, inputs: StepInputs) -> ModelOutput:
        """The step's forward on this rank and the logits of its sampled and prompt-logprob rows. Every
        tensor-parallel rank runs it on the same inputs (the forward and ``compute_logits`` are
        collectives); rank 0 samples from the result, the others drop it."""
        self._bind_kv_cache()
        with forward_context(inputs.metadata):
            hidden = self.model(inputs.input_ids, inputs.positions)
        prompt = self._prompt_logprobs(hidden, inputs) if inputs.prompt_rows.numel() else None
        logits = self.model.compute_logits(hidden[inputs.sample_rows]) if inputs.sample_rows.numel() else None
        return ModelOutput(logits, prompt)

    def verify(self, logits: torch.Tensor, sampling: list[ScheduledSeq], argmax: torch.Tensor | None = None
               ) -> VerifyOutput:
        """A speculative step's sampling: every sampling sequence's proposals verified against its rows of
        ``logits`` (one row per proposal plus one; :func:`~dockyard.engine.spec_decode.verify`). When every
        row takes its plain argmax, the argmax alone decides (``argmax``: the logits' own, from a graph)."""
        seqs = [item.seq for item in sampling]
        if argmax_suffices(seqs):
            return verify_argmax(logits.argmax(dim=-1) if argmax is None else argmax,
                                 [item.spec_token_ids for item in sampling])
        proposals = [Proposal(item.spec_token_ids, item.seq.spec_probs if item.spec_token_ids else None)
                     for item in sampling]
        batch = expanded_batch(seqs, [p.token_ids for p in proposals], self.spec.eos_token_ids, logits.device,
                               logits.shape[-1])
        return verify(logits, seqs, proposals, batch, self.sampler.apply_logits_rules)

    def _graph_step(self, batch: list[ScheduledSeq]) -> bool:
        """Whether a captured graph runs this step: every sequence decodes one token (and its proposals, one
        graph row each) and samples it."""
        assert self.graphs is not None
        if not self.graphs.fits(sum(1 + len(item.spec_token_ids) for item in batch)):
            return False
        for item in batch:
            seq = item.seq
            if item.num_new_tokens != 1 or not item.samples:
                return False
            if seq.prompt_logprobs is not None and len(seq.prompt_logprobs) < len(seq.prompt_token_ids):
                return False
        return True

    def _execute_graph(self, batch: list[ScheduledSeq], pending: torch.Tensor | None
                       ) -> tuple[list[ScheduledSeq], SamplerOutput | VerifyOutput | None, PromptLogprobsOutput | None,
                                  FailedSeqs]:
        assert self.graphs is not None
        bs = self.block_size
        ids, positions, slots, lens, tables, sources = [], [], [], [], [], []
        for item in batch:
            seq = item.seq
            p = seq.num_computed_tokens
            # A verify step is a decode batch too: proposal j is a one-token row at position p + j whose
            # context ends with it. Every row's KV is written before any row attends, so row j sees the
            # step's rows 0..j: causal attention over the proposals, in the decode graph's shape.
            for j, token in enumerate([seq.tokens(p, p + 1)[0], *item.spec_token_ids]):
                ids.append(token)
                sources.append(seq.pending_row if seq.num_pending else 0)
                positions.append(p + j)
                slots.append(seq.block_table[(p + j) // bs] * bs + (p + j) % bs)
                lens.append(p + j + 1)
                tables.append(seq.block_table)
        logits, argmax = self.graphs.run(ids, positions, slots, lens, tables, pending, sources)
        if argmax_suffices([item.seq for item in batch]):  # the graph's argmax is every row's token
            if any(item.spec_token_ids for item in batch):
                return batch, self.verify(logits, batch, argmax), None, []
            return batch, SamplerOutput(argmax, None), None, []
        return self._sample(logits, batch, None)

    def _sample(self, logits: torch.Tensor, sampling: list[ScheduledSeq], prompt_out: PromptLogprobsOutput | None
                ) -> tuple[list[ScheduledSeq], SamplerOutput | VerifyOutput | None, PromptLogprobsOutput | None,
                           FailedSeqs]:
        """The sampler over the sampling rows' float32 logits (one row per sequence, or 1 + its proposals'
        rows when some sequence verifies proposals: then :meth:`verify` decides); rows whose sampling fails
        are left out (returned as failed), the others sampled as if those had not been there."""
        speculative = any(item.spec_token_ids for item in sampling)
        rows_of, start = {}, 0
        for item in sampling:
            n = 1 + len(item.spec_token_ids)
            rows_of[id(item)] = range(start, start + n)
            start += n
        # A retry must draw what the first try would have: rewind the seeded generators before retries.
        states = [(g, g.get_state()) for g in (item.seq.generator for item in sampling) if g is not None]
        tries = 0

        def run(items: list[ScheduledSeq]) -> SamplerOutput | VerifyOutput:
            nonlocal tries
            if tries:
                for gen, state in states:
                    gen.set_state(state)
            tries += 1
            rows = [r for item in items for r in rows_of[id(item)]]
            subset = logits if len(items) == len(sampling) else logits[torch.tensor(rows, device=logits.device)]
            return self.verify(subset, items) if speculative else self._sample_rows(subset, items)

        sampled, out, failed = isolate_failures(sampling, run)
        return sampled, out, prompt_out, failed

    def _sample_rows(self, logits: torch.Tensor, sampling: list[ScheduledSeq]) -> SamplerOutput:
        batch = SamplingBatch.for_sequences([item.seq for item in sampling], self.spec.eos_token_ids,
                                            logits.device, vocab_size=logits.shape[1])
        return self.sampler(logits, batch)

    def _prompt_logprobs(self, hidden: torch.Tensor, inputs: StepInputs) -> PromptLogprobTensors:
        """log_softmax (float32) of the logits of ``inputs.prompt_rows``, a chunk of rows at a time."""
        k = inputs.prompt_top_k
        rows, targets = inputs.prompt_rows, inputs.prompt_targets
        chunk = self.prompt_logits_chunk
        token_lps, top_ids, top_lps = [], [], []
        for s in range(0, len(rows), chunk):
            logprobs = torch.log_softmax(self.model.compute_logits(hidden[rows[s:s + chunk]]).float(), dim=-1)
            token_lps.append(logprobs.gather(1, targets[s:s + chunk, None]).squeeze(1))
            if k > 0:
                values, ids = logprobs.topk(min(k, logprobs.shape[1]), dim=-1)
                top_ids.append(ids)
                top_lps.append(values)
            del logprobs
        return PromptLogprobTensors(torch.cat(token_lps), torch.cat(top_ids) if k > 0 else None,
                                    torch.cat(top_lps) if k > 0 else None)

    @property
    def prompt_logits_chunk(self) -> int:
        """Prompt-logprob rows per ``compute_logits`` call."""
        return max(1, PROMPT_LOGITS_CHUNK_ELEMENTS // self.spec.vocab_size)

