"""Scheduler: decides which sequences run in the next step, and finishes what it scheduled.

Every step is the same computation for every sequence: feed the tokens not yet in the KV cache
(a whole prompt, a chunk of one, or the single newest token), up to a token budget. Running
sequences go first (FCFS), then waiting ones while blocks and the sequence cap allow. When
blocks run out, the most recently started sequence is preempted: its blocks are freed and it
goes back to the front of the waiting queue, to be recomputed later. A sequence that alone needs
more blocks than the pool has is finished instead ("length", as at max_model_len), never
preempted forever; :meth:`Scheduler.schedule` reports it in ``SchedulerOutput.ended``.

After the step, :meth:`Scheduler.update_from_output` does the token-level bookkeeping: the
step's tokens are in the KV cache (full blocks are sealed for the prefix cache), the sampled
tokens are appended, the token-level stops apply (:func:`check_stop`: EOS, stop token ids,
length) and finished sequences free their blocks. What needs text (detokenization, stop strings)
is the engine's.

Speculative decoding (:mod:`dockyard.engine.spec_decode`): a decoding sequence with proposals
(``Sequence.spec_token_ids``) is fed its newest token and its proposals in one step, within the token
budget (proposals are dropped before anything is preempted for their blocks). After the step its
accepted proposals count as computed and the blocks past its new length go back to the pool.

:class:`AsyncScheduler` schedules a step while the previous step's sampled tokens are still on the
device: it counts them as *pending* tokens of their sequences (they count in ``len(seq)``, so the
next step feeds them, read on the device by the runner) until they arrive.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from dockyard.engine.block_manager import BlockManager
from dockyard.engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)


@dataclass
class ScheduledSeq:
    """One sequence's share of a step: ``num_new_tokens`` tokens starting at its computed length."""

    seq: Sequence
    num_new_tokens: int
    # Speculative decoding: proposed tokens fed after the new ones (their rows are verified, not computed
    # for good), and how many of them the verification accepted (set before update_from_output).
    spec_token_ids: list[int] = field(default_factory=list)
    num_accepted: int = 0

    @property
    def samples(self) -> bool:
        """True when this step brings the sequence up to date, so a next token is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == len(self.seq)

    @property
    def num_prompt_tokens(self) -> int:
        """How many of the step's new tokens are prompt tokens (before the step has run)."""
        prompt_left = len(self.seq.prompt_token_ids) - self.seq.num_computed_tokens
        return max(0, min(prompt_left, self.num_new_tokens))


@dataclass
class SchedulerOutput:
    """A step's work, and the sequences scheduling ended because the whole KV pool cannot hold them."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    ended: list[Sequence] = field(default_factory=list)


@dataclass
class SampledTokens:
    """Sampled tokens that reached the host: ``token_ids[i]`` is the next token of ``seqs[i]``."""

    seqs: list[Sequence]
    token_ids: list[int]


def check_stop(seq: Sequence, eos_token_ids: Seq[int]) -> bool:
    """Set ``seq``'s finish reason if its newest token ends it: EOS (unless ``ignore_eos``) or a stop
    token id, both only once ``min_tokens`` is reached, or the length limit. Returns whether it ended.
    Stop strings are the engine's (they need the text); one found there overrides "length"."""
    params, token = seq.params, seq.output_token_ids[-1]
    if params.min_tokens_reached(len(seq.output_token_ids)):
        if not params.ignore_eos and token in eos_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", None
        elif token in (params.stop_token_ids or ()):
            seq.finish_reason, seq.stop_reason = "stop", token
    if seq.finish_reason is None and seq.num_known_tokens >= seq.max_total_len:
        seq.finish_reason = "length"
    return seq.finish_reason is not None


class Scheduler:
    """FCFS scheduling with a token budget, a sequence cap, chunked prefill and preemption."""

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 eos_token_ids: Seq[int]) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.eos_token_ids = tuple(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> SchedulerOutput:
        """Pick this step's work; allocates the KV blocks it needs."""
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        out = SchedulerOutput()
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(len(seq) - seq.num_computed_tokens, budget)
            k = self._num_spec_tokens(seq, n, budget)
            spec = seq.spec_token_ids[:k]
            while not bm.can_allocate(seq, seq.num_computed_tokens + n + len(spec)):
                if spec:  # speculation gives way before any sequence is preempted
                    spec = []
                    continue
                victim = self.running.pop()
                if victim is seq and not self.running:
                    # Alone and still too big: the whole pool cannot hold it, so recomputing would loop forever.
                    self._end_out_of_blocks(seq)
                    out.ended.append(seq)
                    break
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                bm.allocate(seq, seq.num_computed_tokens + n + len(spec))
                out.scheduled.append(ScheduledSeq(seq, n, spec))
                budget -= n + len(spec)
                i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = bm.allocate_prompt(seq, budget)
            if n is None:
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        return out

    @staticmethod
    def _num_spec_tokens(seq: Sequence, num_new_tokens: int, budget: int) -> int:
        """How many of ``seq``'s proposals this step verifies: only a sequence decoding its newest token,
        within the token budget."""
        if not seq.spec_token_ids or num_new_tokens != 1 or seq.num_pending:
            return 0
        return min(len(seq.spec_token_ids), budget - 1)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _end_out_of_blocks(self, seq: Sequence) -> None:
        bm = self.block_manager
        logger.warning("request %s needs more KV cache than the whole pool (%d blocks of %d tokens) holds: "
                       "finished at %d tokens; give the engine more KV cache memory",
                       seq.request_id, bm.num_blocks, bm.block_size, len(seq))
        seq.finish_reason = "length"
        self.finish(seq)

    def update_from_output(self, batch: list[ScheduledSeq], sampled: SampledTokens | None) -> list[int]:
        """Bookkeeping after a step: ``batch`` has run (its tokens and the proposals it accepted are in the KV
        cache, newly full blocks are sealed for the prefix cache, rejected proposals' blocks freed); then
        each token of ``sampled`` (this step's, or the step before's with async scheduling; None when none
        reached the host) is appended to its sequence, checked for a token-level stop (:func:`check_stop`),
        and a finished sequence frees its blocks. Returns the rows of ``sampled`` whose token was appended
        (not those of sequences that finished meanwhile: their token is void)."""
        for item in batch:
            seq = item.seq
            seq.num_computed_tokens += item.num_new_tokens + item.num_accepted
            if item.spec_token_ids:
                seq.spec_token_ids, seq.spec_probs = [], None
                seq.num_drafts += 1
                seq.num_draft_tokens += len(item.spec_token_ids)
                seq.num_accepted_tokens += item.num_accepted
                if not seq.is_finished:  # rejected proposals' KV is void: their blocks go back to the pool
                    self.block_manager.trim(seq, seq.num_computed_tokens + 1)
            self.block_manager.seal_full_blocks(seq)
        if sampled is None:
            return []
        appended = []
        for row, (seq, token) in enumerate(zip(sampled.seqs, sampled.token_ids, strict=True)):
            self._token_arrived(seq)
            if seq.is_finished:  # stopped or aborted while the token was sampled
                continue
            seq.output_token_ids.append(token)
            self.block_manager.seal_full_blocks(seq)  # a block the token completed becomes shareable
            if check_stop(seq, self.eos_token_ids):
                self.finish(seq)
            appended.append(row)
        return appended

    def _token_arrived(self, seq: Sequence) -> None:
        """A sampled token of ``seq`` reached the host (the async scheduler uncounts it here)."""

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED


class AsyncScheduler(Scheduler):
    """Schedules the next step before the sampled tokens of the one in flight reach the host.

    A step may stay in flight (:meth:`may_defer`) when none of its sampling sequences needs its newest
    token on the host for its next step (``SamplingParams.needs_host_tokens``). Its tokens are then
    counted as pending (:meth:`defer`): ``len(seq)`` includes them, so the next step feeds each one as
    its sequence's input, which the runner reads from the in-flight step's tokens on the device (row
    ``seq.pending_row``). :meth:`update_from_output` uncounts them as they arrive. Prefix-cache blocks
    are sealed only once all their tokens are known.
    """

    def may_defer(self, seqs: list[Sequence]) -> bool:
        """Whether a step that sampled for ``seqs`` may stay in flight while the next one is scheduled."""
        return not any(seq.params.needs_host_tokens(len(seq.output_token_ids)) for seq in seqs)

    def defer(self, seqs: list[Sequence]) -> None:
        """Count the in-flight step's sampled tokens (row ``i`` for ``seqs[i]``) as pending."""
        for row, seq in enumerate(seqs):
            seq.num_pending += 1
            seq.pending_row = row

    def needs_pending_tokens(self) -> bool:
        """Whether the next :meth:`schedule` needs the pending tokens on the host first: when no running
        sequence has anything to compute after its pending token (its length limit: the step would
        only waste rows), or when KV blocks may run short (scheduling may then preempt or end a
        sequence, which must keep the token it sampled last)."""
        bm = self.block_manager
        if bm.num_free_blocks < len(self.running) + -(-self.max_num_batched_tokens // bm.block_size):
            return True
        return all(len(seq) >= seq.max_total_len for seq in self.running)

    def _token_arrived(self, seq: Sequence) -> None:
        if seq.num_pending:
            seq.num_pending -= 1
