"""LLMEngine: continuous batching over the scheduler, model runner and sampler.

``step()`` is the whole loop: schedule → run → update → report. The scheduler picks the work and
finishes what it scheduled (``Scheduler.update_from_output``: computed tokens, prefix-cache
blocks, appended tokens, EOS / stop ids / length, freeing finished sequences); the runner turns
the work into sampled tokens (the sampler owns every logits rule); the engine keeps what needs
text or the user: detokenization, stop strings, logprobs and latencies, and building outputs.
Requests are added and aborted between steps; every request's output is what it would have been
alone.

Async scheduling (on by default on CUDA; :class:`~dockyard.engine.scheduler.AsyncScheduler`): when
every sequence sampling in a step needs nothing of its own output on the host to take its next
step (``SamplingParams.needs_host_tokens``), the step is left in flight. Its sampled tokens stay
on the device and count as *pending* tokens of their sequences; the next step is scheduled and
launched at once, its inputs read from the device, and only then are the in-flight tokens copied
back and handed to the scheduler, while the GPU runs. A sequence that stopped has one wasted row
in the step launched meanwhile; its result is dropped. Outputs are identical to synchronous
stepping.

Structured outputs: a request with ``SamplingParams.structured_outputs`` has its grammar compiled on the
:class:`~dockyard.structured_output.manager.StructuredOutputManager`'s threads; until it is ready the
request waits outside the scheduler (the batch goes on without it), then each of its samples gets its own
matcher and is scheduled. The sampler masks each row to what its matcher allows; after the scheduler has
appended a token, the engine advances the sample's matcher by it (a token the grammar refuses fails the
request alone), and a sample whose grammar has terminated finishes ("stop"). A reasoning model's request
(``StructuredOutputsParams.reasoning_end_token_ids``) samples freely until its output has written the
reasoning's end sequence, and is held to the grammar from the next token (``structured_output.reasoning_gate``).

A request fails alone: an exception in its own rows of a step (preparing inputs, sampling — see
``model_runner.isolate_failures`` — detokenizing, stop strings, building its output) finishes that
request with ``RequestOutput.error`` set (its samples with ``finish_reason="error"``, KV blocks
freed) and the step goes on for the others. An exception that escapes ``step`` (the forward pass,
the scheduler, a broken invariant) leaves the engine in an unknown state: callers must treat the
engine as dead.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any

import torch

from dockyard.engine.block_manager import BlockManager
from dockyard.engine.detokenizer import IncrementalDetokenizer, find_stop_string
from dockyard.engine.metrics import EngineMetrics, RequestTiming
from dockyard.engine.model_runner import FailedSeqs, ModelRunner, corrupts_engine
from dockyard.engine.outputs import CompletionOutput, RequestOutput
from dockyard.engine.sampler import SamplerOutput, make_generator
from dockyard.engine.sampling_params import SamplingParams
from dockyard.engine.scheduler import AsyncScheduler, SampledTokens, ScheduledSeq, Scheduler
from dockyard.engine.sequence import Sequence
from dockyard.engine.spec_decode import HiddenStateProposer, Proposer, VerifyOutput, make_proposer
from dockyard.engine.speculative_config import SpeculativeConfig
from dockyard.errors import InvalidRequestError
from dockyard.ops.fp8_kv import resolve_kv_cache_dtype
from dockyard.spec import ModelSpec
from dockyard.structured_output.manager import StructuredOutputManager

logger = logging.getLogger(__name__)

# How long an idle step waits for a grammar still compiling (so an engine loop with nothing else to do
# sleeps instead of spinning).
GRAMMAR_WAIT_S = 0.05


@dataclass
class EngineConfig:
    """Engine limits; the KV pool size is derived from the memory budget at start-up."""

    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    num_kv_blocks: int | None = None  # None: derive from kv_cache_memory_bytes / gpu_memory_utilization
    enable_prefix_caching: bool = True
    kv_cache_memory_bytes: int = 1 << 30  # CPU budget for the KV pool
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False  # CUDA: never capture decode steps in CUDA graphs
    async_scheduling: bool | None = None  # overlap a step's host work with the GPU; None: on for CUDA
    kv_cache_dtype: str = "auto"  # auto: the model's dtype; fp8 / fp8_e4m3: e4m3 with per-tensor scales
    speculative_config: SpeculativeConfig | None = None  # speculative decoding (engine/spec_decode.py)


@dataclass
class _InFlight:
    """A launched step whose sampled tokens are not applied yet: ``tokens`` on the device (the next
    step's inputs read them there) and their copy to ``host``, complete once ``done`` has passed."""

    seqs: list[Sequence]
    tokens: torch.Tensor
    host: torch.Tensor
    done: torch.cuda.Event | None


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    arrival_time: float = field(default_factory=time.monotonic)
    error: Exception | None = None  # why it failed (its samples then finish with "error")
    grammar: Future | None = None  # its compiled grammar, while it waits for it outside the scheduler


class LLMEngine:
    """Holds requests and advances all of them one step at a time."""

    def __init__(self, model: torch.nn.Module, spec: ModelSpec, tokenizer: Any, config: EngineConfig,
                 device: torch.device, dtype: torch.dtype, num_blocks: int, proposer: Proposer | None = None) -> None:
        """``proposer``: speculative decoding's, when ``config.speculative_config`` names one that needs a
        loaded model (draft_model); built here otherwise."""
        self.spec = spec
        self.tokenizer = tokenizer
        self.config = config
        self.max_model_len = config.max_model_len or spec.max_model_len
        # An MTP proposer reads the target's hidden state of every position: no prefix caching, eager forwards.
        follows_target = config.speculative_config is not None and isinstance(proposer, HiddenStateProposer)
        self.block_manager = BlockManager(num_blocks, config.block_size,
                                          config.enable_prefix_caching and not follows_target)
        self.async_scheduling = (device.type == "cuda" if config.async_scheduling is None
                                 else config.async_scheduling)
        self.speculative_config = config.speculative_config
        self.proposer: Proposer | None = None
        if self.speculative_config is not None:
            # A verify step's emitted tokens decide the next step's inputs and proposals: it runs synchronously.
            self.async_scheduling = False
            self.proposer = proposer or make_proposer(self.speculative_config)
        scheduler_class = AsyncScheduler if self.async_scheduling else Scheduler
        self.scheduler = scheduler_class(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                         spec.eos_token_ids)
        # A verify step decodes 1 + k rows per sequence, each a row of the decode graph: capture that many.
        rows_per_seq = 1 + (self.speculative_config.num_speculative_tokens if self.speculative_config else 0)
        self.runner = ModelRunner(model, spec, num_blocks, config.block_size, device, dtype,
                                  max_num_seqs=config.max_num_seqs * rows_per_seq, max_model_len=self.max_model_len,
                                  enforce_eager=config.enforce_eager or follows_target,
                                  kv_cache_dtype=resolve_kv_cache_dtype(config.kv_cache_dtype, dtype))
        if isinstance(self.proposer, HiddenStateProposer):
            self.proposer.follow(self.runner)
        self.requests: dict[str, _Request] = {}
        self._seq_ids = itertools.count()
        self.metrics = EngineMetrics()
        self._in_flight: _InFlight | None = None
        self.structured_output = StructuredOutputManager(tokenizer, spec.vocab_size, spec.eos_token_ids)
        self._compiling: list[_Request] = []  # requests waiting for their grammar, in arrival order
        # Built now: its start-up probe of the tokenizer takes tens of ms, not to be paid by a first token.
        self._detokenizer = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None

    # ---- requests ----
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None) -> None:
        """Queue a request; reject it at once if it can never run."""
        if request_id in self.requests:
            raise InvalidRequestError(f"request_id {request_id!r} is already in use", param="request_id")
        params.check_for_vocab(self.spec.vocab_size)
        n_prompt = len(prompt_token_ids)
        if n_prompt == 0:
            raise InvalidRequestError("the prompt is empty; give at least one token", param="prompt")
        if n_prompt >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {n_prompt} tokens, but the model's maximum length is "
                f"{self.max_model_len} (prompt plus at least one generated token); shorten the prompt",
                param="prompt",
            )
        pool_tokens = self.block_manager.num_blocks * self.block_manager.block_size
        if n_prompt + 1 > pool_tokens:
            raise InvalidRequestError(
                f"the prompt has {n_prompt} tokens but the whole KV cache holds {pool_tokens}; "
                "shorten the prompt or give the engine more KV-cache memory",
                param="prompt",
            )
        bad = [t for t in prompt_token_ids if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.spec.vocab_size})",
                param="prompt",
            )
        max_total = self.max_model_len
        if params.max_tokens is not None:
            max_total = min(max_total, n_prompt + params.max_tokens)
        seqs = []
        for i in range(params.n):
            seed = None if params.seed is None else params.seed + i
            seq = Sequence(
                seq_id=next(self._seq_ids), request_id=request_id, sample_index=i,
                prompt_token_ids=list(prompt_token_ids), params=params, max_total_len=max_total,
                generator=make_generator(seed, self.runner.device),
                # The prompt's logprobs are the same for every sample: the first one computes them.
                prompt_logprobs=[None] if params.prompt_logprobs is not None and i == 0 else None,
            )
            seqs.append(seq)
        req = _Request(request_id, prompt, list(prompt_token_ids), seqs)
        if params.structured_outputs is not None:
            req.grammar = self.structured_output.compile(params.structured_outputs)
            self._compiling.append(req)
        else:
            for seq in seqs:
                self.scheduler.add(seq)
        self.requests[request_id] = req
        self.metrics.requests_added += 1
        self.metrics.prompt_tokens += n_prompt

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its KV blocks."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        if req in self._compiling:
            self._compiling.remove(req)
        for seq in req.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        self._observe_finished(req, "abort")

    def _fail_request(self, request_id: str, exc: Exception, touched: dict[str, _Request]) -> None:
        """Finish every unfinished sample of a request with "error" (blocks freed) and report it."""
        req = self.requests.get(request_id)
        if req is None:
            return
        if req.error is None:
            req.error = exc
        if req in self._compiling:
            self._compiling.remove(req)
        for seq in req.seqs:
            if not seq.is_finished:
                seq.finish_reason = "error"
                self.scheduler.finish(seq)
        touched[request_id] = req

    def _fail_seqs(self, failed: FailedSeqs, touched: dict[str, _Request]) -> None:
        for seq, exc in failed:
            self._fail_request(seq.request_id, exc, touched)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def stats(self) -> dict[str, float]:
        """A snapshot of queue lengths, KV-cache use and the cumulative counters."""
        bm, m = self.block_manager, self.metrics
        return {
            "num_requests_running": len({seq.request_id for seq in list(self.scheduler.running)}),  # requests
            "num_requests_waiting": len({seq.request_id for seq in list(self.scheduler.waiting)}),
            "kv_blocks_total": bm.num_blocks,
            "kv_blocks_used": bm.num_used_blocks,
            "kv_blocks_free": bm.num_free_blocks,
            "kv_cache_usage": bm.num_used_blocks / bm.num_blocks,
            "prefix_cache_queries": bm.prefix_queries,
            "prefix_cache_hits": bm.prefix_hits,
            "prefix_cache_hit_rate": bm.prefix_cache_hit_rate,
            "prompt_tokens_computed": m.prompt_tokens_computed,
            "generation_tokens": m.generation_tokens,
            "num_preemptions": self.scheduler.num_preemptions,
            "steps": m.steps,
            # Speculative decoding (zero without it): proposals verified and accepted.
            "spec_decode_num_drafts": m.spec_decode.num_drafts,
            "spec_decode_num_draft_tokens": m.spec_decode.num_draft_tokens,
            "spec_decode_num_accepted_tokens": m.spec_decode.num_accepted_tokens,
            "spec_decode_acceptance_rate": m.spec_decode.acceptance_rate,
            "spec_decode_mean_acceptance_length": m.spec_decode.mean_acceptance_length,
        }

    # ---- the loop ----
    def step(self, report_unfinished: bool = True) -> list[RequestOutput]:
        """Schedule, run the model, update the sequences, and report every request that changed (only
        the ones that finished with ``report_unfinished=False``: building outputs costs host time).

        With async scheduling the tokens a step appends may be those of the step before it."""
        touched: dict[str, _Request] = {}
        if self._compiling:
            self._admit_compiled(touched)
        if self._in_flight is not None and self._async_scheduler().needs_pending_tokens():
            self._update_from_output([], self._take_in_flight(), touched, report_unfinished)
        if self.proposer is not None:
            self._propose(self.proposer)
        scheduled = self.scheduler.schedule()
        ended = self._report_ended(scheduled.ended)
        for out in ended:  # reported (and forgotten) already
            touched.pop(out.request_id, None)
        batch = scheduled.scheduled
        if not batch:
            if self._in_flight is not None:
                self._update_from_output([], self._take_in_flight(), touched, report_unfinished)
            elif self._compiling and not touched:  # nothing to run but grammars compiling: wait for one
                wait_futures([req.grammar for req in self._compiling], GRAMMAR_WAIT_S, FIRST_COMPLETED)
            return ended + self._outputs(touched.values())
        self.metrics.steps += 1
        self.metrics.iteration_tokens.observe(sum(item.num_new_tokens for item in batch))
        now = time.monotonic()
        for item in batch:
            if item.seq.first_scheduled_time is None:
                item.seq.first_scheduled_time = now
        previous = self._take_in_flight()
        sampled, out, prompt_out, failed = self.runner.step(batch, previous.tokens if previous else None)
        if failed:
            self._fail_seqs(failed, touched)
            batch = [item for item in batch if not item.seq.is_finished]
        if prompt_out is not None:
            for span in prompt_out.spans:
                entries = span.seq.prompt_logprobs
                assert entries is not None and len(entries) == span.first, (span.first, entries and len(entries))
                entries.extend(prompt_out.entries(span, span.seq.params.prompt_logprobs or 0))
        self.metrics.prompt_tokens_computed += sum(item.num_prompt_tokens for item in batch)
        if isinstance(out, VerifyOutput):
            self._update_from_verify(batch, sampled, out, touched, report_unfinished)
            return ended + self._outputs(touched.values())
        current = None
        if sampled:
            assert out is not None
            current = self._launch_copy([item.seq for item in sampled], out)
        if current is not None and self._may_defer(current.seqs):  # the GPU runs this step meanwhile
            self._update_from_output(batch, previous, touched, report_unfinished)
            self._async_scheduler().defer(current.seqs)
            self._in_flight = current
        elif previous is not None:  # the GPU runs this step meanwhile
            self._update_from_output(batch, previous, touched, report_unfinished)
            if current is not None:
                self._update_from_output([], current, touched, report_unfinished, out)
        else:
            self._update_from_output(batch, current, touched, report_unfinished, out)
        return ended + self._outputs(touched.values())

    def _admit_compiled(self, touched: dict[str, _Request]) -> None:
        """Schedule the requests whose grammar has compiled (one matcher per sample); fail those whose
        grammar does not compile (InvalidRequestError naming the field)."""
        for req in [r for r in self._compiling if r.grammar is not None and r.grammar.done()]:
            self._compiling.remove(req)
            exc = req.grammar.exception()
            if exc is not None:
                self._fail_request(req.request_id, exc, touched)
                continue
            compiled = req.grammar.result()
            req.grammar = None
            for seq in req.seqs:
                seq.grammar = self.structured_output.matcher(compiled, seq.params.structured_outputs,
                                                             seq.prompt_token_ids)
                self.scheduler.add(seq)

    def check_structured_outputs(self, params: SamplingParams) -> None:
        """Compile ``params``' grammar now (cached for the request that follows); InvalidRequestError
        naming the field when it does not compile. Offline callers use it to refuse a bad schema before
        any request is added."""
        if params.structured_outputs is not None:
            self.structured_output.compile(params.structured_outputs).result()

    def _async_scheduler(self) -> AsyncScheduler:
        """The scheduler, which has a step in flight only when it is the async one."""
        assert isinstance(self.scheduler, AsyncScheduler)
        return self.scheduler

    def _may_defer(self, seqs: list[Sequence]) -> bool:
        """Whether the step that sampled for ``seqs`` may stay in flight: async scheduling, no
        tensor-parallel peers waiting for exact inputs, and the scheduler agrees (no sequence needs its
        newest token on the host)."""
        return (isinstance(self.scheduler, AsyncScheduler) and self.runner.broadcast_step is None
                and self.scheduler.may_defer(seqs))

    def _take_in_flight(self) -> _InFlight | None:
        in_flight, self._in_flight = self._in_flight, None
        return in_flight

    def _launch_copy(self, seqs: list[Sequence], out: SamplerOutput) -> _InFlight:
        """Start copying a step's sampled tokens to the host (asynchronously on CUDA)."""
        tokens = out.token_ids
        if tokens.device.type != "cuda":
            return _InFlight(seqs, tokens, tokens, None)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return _InFlight(seqs, tokens, host, done)

    def _update_from_output(self, batch: list[ScheduledSeq], step: _InFlight | None, touched: dict[str, _Request],
                            report_unfinished: bool, out: SamplerOutput | None = None) -> None:
        """The scheduler's bookkeeping of ``batch`` and of ``step``'s tokens, once on the host (see
        ``Scheduler.update_from_output``); then, per appended token, what needs the engine: timing,
        logprobs (from ``out``, for a step applied at once), text and stop strings. Collects the
        requests to report in ``touched``."""
        sampled = None
        if step is not None:
            if step.done is not None:
                step.done.synchronize()
            sampled = SampledTokens(step.seqs, step.host.tolist())  # one device-to-host read per step
        rows = self.scheduler.update_from_output(batch, sampled)
        if sampled is None:
            return
        token_logprobs = self._token_logprobs(sampled.seqs, out)
        self._process_tokens([(sampled.seqs[row], row) for row in rows], token_logprobs, out, touched,
                             report_unfinished)

    @staticmethod
    def _token_logprobs(seqs: list[Sequence], out: SamplerOutput | None) -> list[float] | None:
        """The sampled tokens' logprobs on the host, when a sequence of ``seqs`` reports them."""
        want_logprobs = out is not None and any(seq.params.logprobs is not None for seq in seqs)
        return out.logprobs.tolist() if want_logprobs and out is not None and out.logprobs is not None else None

    def _process_tokens(self, appended: list[tuple[Sequence, int]], token_logprobs: list[float] | None,
                        out: SamplerOutput | None, touched: dict[str, _Request], report_unfinished: bool) -> None:
        """:meth:`_process_token` for each (sequence, its row of ``out``) the scheduler appended a token to;
        a request whose processing fails is finished with the error."""
        now = time.monotonic()
        for seq, row in appended:
            try:
                self._process_token(seq, row, now, token_logprobs, out)
            except Exception as exc:
                if corrupts_engine(exc):
                    raise
                logger.error("request %s failed after its step (processing a token) and is finished with an "
                             "error; the others go on", seq.request_id, exc_info=exc)
                self._fail_request(seq.request_id, exc, touched)
                continue
            req = self.requests.get(seq.request_id)
            if req is not None and (report_unfinished or seq.finish_reason is not None):
                touched[req.request_id] = req

    def _update_from_verify(self, batch: list[ScheduledSeq], sampled: list[ScheduledSeq], out: VerifyOutput,
                            touched: dict[str, _Request], report_unfinished: bool) -> None:
        """The bookkeeping of a speculative step: the accepted proposals' KV counts as computed (the rest is
        rolled back), then the emitted tokens are handed over in rounds, the ``j``-th of every sequence in
        round ``j``, so every stop condition applies token by token and a stop drops the tokens after it."""
        # One device-to-host read for both (a verify step's only one unless logprobs are reported).
        host = torch.cat([out.num_emitted, out.sampled.token_ids.to(out.num_emitted.device)]).tolist()
        counts, tokens = host[:len(sampled)], host[len(sampled):]
        m = self.metrics
        for item, n in zip(sampled, counts, strict=True):
            item.num_accepted = n - 1
            if item.spec_token_ids:
                m.spec_decode.observe(len(item.spec_token_ids), n - 1)
        self.scheduler.update_from_output(batch, None)
        token_logprobs = self._token_logprobs([item.seq for item in sampled], out.sampled)
        for j in range(max(counts, default=0)):
            rows = [(item.seq, off + j) for item, off, n in zip(sampled, out.offsets, counts, strict=True) if j < n]
            round_tokens = SampledTokens([seq for seq, _ in rows], [tokens[row] for _, row in rows])
            appended = self.scheduler.update_from_output([], round_tokens)
            self._process_tokens([rows[i] for i in appended], token_logprobs, out.sampled, touched, report_unfinished)

    def _propose(self, proposer: Proposer) -> None:
        """Fresh proposals for every running sequence that decodes its newest token next, as many as can
        still be emitted before its length limit (the emitted run is the accepted proposals plus one)."""
        assert self.speculative_config is not None
        k = self.speculative_config.num_speculative_tokens
        seqs, limits = [], []
        for seq in self.scheduler.running:
            seq.spec_token_ids, seq.spec_probs = [], None
            limit = min(k, seq.max_total_len - len(seq) - 1)
            # A grammar-constrained sample is not speculated on: its matcher would have to check and roll back
            # every proposal (the hook is the allowed-token mask per verified row; not wired yet).
            if (limit > 0 and len(seq) - seq.num_computed_tokens == 1 and not seq.num_pending
                    and seq.grammar is None):
                seqs.append(seq)
                limits.append(limit)
        if not seqs:
            return
        for seq, limit, proposal in zip(seqs, limits, proposer.propose(seqs, limits), strict=True):
            seq.spec_token_ids = proposal.token_ids[:limit]
            seq.spec_probs = None if proposal.probs is None else proposal.probs[:limit]

    def _process_token(self, seq: Sequence, row: int, now: float, token_logprobs: list[float] | None,
                       out: SamplerOutput | None) -> None:
        """The engine's part of a token the scheduler appended to ``seq`` (row ``row`` of its step):
        latency metrics, logprobs, detokenization and stop strings (a sequence one ends is finished)."""
        token = seq.output_token_ids[-1]
        if seq.grammar is not None:
            self._advance_grammar(seq, token)
        if seq.first_token_time is None:
            seq.first_token_time = now
            self.metrics.observe_ttft(now - seq.arrival_time)
        else:
            self.metrics.observe_itl(now - seq.last_token_time)
        seq.last_token_time = now
        if token_logprobs is not None and seq.params.logprobs is not None:
            assert out is not None
            entry = {token: token_logprobs[row]}
            if out.top_token_ids is not None:
                k = seq.params.logprobs
                for tid, lp in zip(out.top_token_ids[row, :k].tolist(), out.top_logprobs[row, :k].tolist()):
                    entry.setdefault(tid, lp)
            seq.output_logprobs.append(entry)
            seq.cumulative_logprob += token_logprobs[row]
        self.metrics.generation_tokens += 1
        self._check_stop_strings(seq)
        if seq.finish_reason is not None and not seq.is_finished:
            self.scheduler.finish(seq)

    @staticmethod
    def _advance_grammar(seq: Sequence, token: int) -> None:
        """Advance ``seq``'s matcher by its newest token; a terminated grammar ends the sample ("stop")."""
        assert seq.grammar is not None
        if not seq.grammar.accept(token):
            raise InvalidRequestError(
                f"the structured-output grammar does not allow token {token} after {len(seq.output_token_ids) - 1} "
                "output tokens (min_tokens or stop token ids may forbid what the grammar needs)",
                param="structured_outputs")
        if seq.grammar.is_terminated and seq.finish_reason is None:
            seq.finish_reason, seq.stop_reason = "stop", None

    def _outputs(self, reqs: Iterable[_Request]) -> list[RequestOutput]:
        """The outputs of ``reqs``; finished requests are counted and forgotten."""
        outputs = []
        for req in reqs:
            try:
                output = self._make_output(req)
            except Exception as exc:
                if corrupts_engine(exc):
                    raise
                logger.error("request %s failed building its output and is finished with an error; the others "
                             "go on", req.request_id, exc_info=exc)
                self._fail_request(req.request_id, exc, {})
                output = RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, [], True, {}, error=exc)
            if output.finished:
                del self.requests[req.request_id]
                reasons = [s.finish_reason or "stop" for s in req.seqs]
                # One reason per request: an error or a length cut of any sample wins over "stop".
                self._observe_finished(req, next((r for r in ("error", "length") if r in reasons), reasons[0]))
            outputs.append(output)
        return outputs

    def _observe_finished(self, req: _Request, reason: str) -> None:
        if self.proposer is not None:  # a finished request's proposal state (a draft model's KV) is freed now
            self.proposer.release(req.seqs)
        params = req.seqs[0].params
        timings = [RequestTiming(s.arrival_time, s.first_scheduled_time, s.first_token_time, s.last_token_time,
                                 len(s.output_token_ids)) for s in req.seqs]
        self.metrics.observe_request(reason, timings, len(req.prompt_token_ids), params.n, params.max_tokens,
                                     time.monotonic())

    def _report_ended(self, seqs: list[Sequence]) -> list[RequestOutput]:
        """The outputs of the requests of ``seqs``, which the scheduler ended while scheduling."""
        touched: dict[str, _Request] = {}
        for seq in seqs:
            self._flush_text(seq)
            if seq.request_id in self.requests:
                touched[seq.request_id] = self.requests[seq.request_id]
        return self._outputs(touched.values())

    # ---- stopping and detokenization ----
    def _check_stop_strings(self, seq: Sequence) -> None:
        """Detokenize ``seq``'s newest token and end it at a stop string (its text is cut before it, or
        after it with ``include_stop_str_in_output``), unless the scheduler's ``check_stop`` ended it
        at a stop token (a stop string overrides "length"); flush the text of a finished sequence.
        Stop strings are searched only where they can newly end (see
        ``detokenizer.find_stop_string``), and only from ``min_tokens`` on: one that ends in text
        produced before then does not count (as in vLLM; the server may have streamed that text)."""
        params = seq.params
        self._detokenize(seq)
        state = seq.detok
        if not params.min_tokens_reached(len(seq.output_token_ids)):
            if state is not None:  # a stop string must end in text produced from min_tokens on
                state.searched = len(seq.output_text) + len(state.tail)
        elif params.stop and seq.finish_reason in (None, "length"):
            text = seq.output_text + state.tail if state is not None else seq.output_text
            found = find_stop_string(text, params.stop, state.searched if state is not None else 0)
            if found is not None:
                stop, idx = found
                seq.output_text = text[:idx + len(stop) if params.include_stop_str_in_output else idx]
                seq.finish_reason, seq.stop_reason = "stop", stop
                return
            if state is not None:  # the tail may still change: it is searched again next time
                state.searched = max(state.searched, state.stable)
        if seq.finish_reason is not None:
            self._flush_text(seq)

    def _detokenize(self, seq: Sequence) -> None:
        """Bring ``seq.output_text`` up to date, incrementally (engine/detokenizer.py): the stable part
        of the decode of the output ids (less a final EOS unless ``ignore_eos``); the rest, which may
        still change, waits in ``seq.detok.tail`` until more tokens settle it or the sequence ends."""
        if self.tokenizer is None:
            return
        detok = self._detokenizer
        if detok is None or detok.tokenizer is not self.tokenizer:
            detok = self._detokenizer = IncrementalDetokenizer(self.tokenizer)
        if seq.detok is None:
            seq.detok = detok.new_state()
        ids = seq.output_token_ids
        n = len(ids)
        if not seq.params.ignore_eos and n and ids[-1] in self.spec.eos_token_ids:
            n -= 1
        seq.output_text = detok.update(seq.detok, seq.output_text, ids, n, seq.params.skip_special_tokens)

    @staticmethod
    def _flush_text(seq: Sequence) -> None:
        """A finished sequence's text: the stable text plus the unsettled tail, i.e. the full decode."""
        if seq.detok is not None and seq.detok.tail:
            seq.output_text += seq.detok.tail
            seq.detok.tail = ""

    def _make_output(self, req: _Request) -> RequestOutput:
        outs = [
            CompletionOutput(
                index=s.sample_index, text=s.output_text, token_ids=list(s.output_token_ids),
                cumulative_logprob=s.cumulative_logprob if s.params.logprobs is not None else None,
                logprobs=list(s.output_logprobs) if s.params.logprobs is not None else None,
                finish_reason=s.finish_reason, stop_reason=s.stop_reason,
            )
            for s in req.seqs
        ]
        finished = all(s.is_finished for s in req.seqs)
        metrics: dict[str, float] = {}
        first = [s.first_token_time for s in req.seqs if s.first_token_time is not None]
        if first:
            metrics["time_to_first_token"] = min(first) - req.arrival_time
        gaps = [(s.last_token_time - s.first_token_time, len(s.output_token_ids) - 1)
                for s in req.seqs if s.first_token_time is not None and len(s.output_token_ids) > 1]
        if gaps:
            metrics["mean_inter_token_latency"] = sum(g[0] for g in gaps) / sum(g[1] for g in gaps)
        if finished:
            metrics["e2e_latency"] = time.monotonic() - req.arrival_time
        drafts = sum(s.num_drafts for s in req.seqs)
        if drafts:  # speculative decoding: this request's share of proposals verified and accepted
            accepted = sum(s.num_accepted_tokens for s in req.seqs)
            metrics["spec_decode_acceptance_rate"] = accepted / sum(s.num_draft_tokens for s in req.seqs)
            metrics["spec_decode_mean_acceptance_length"] = 1 + accepted / drafts
        # Complete once the first sample has its first token (a later sample can overtake it only if the
        # first was preempted mid-prompt: then the prompt logprobs come with a later output).
        plp = req.seqs[0].prompt_logprobs
        prompt_logprobs = list(plp) if plp is not None and len(plp) == len(req.prompt_token_ids) else None
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, finished, metrics,
                             prompt_logprobs=prompt_logprobs, error=req.error)
