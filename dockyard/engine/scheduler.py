"""Scheduler: decides which sequences run in the next step and how many tokens each.

Every step is the same computation for every sequence: feed the tokens not yet in the KV cache
(a whole prompt, a chunk of one, or the single newest token), up to a token budget. Running
sequences go first (FCFS), then waiting ones while blocks and the sequence cap allow. When
blocks run out, the most recently started sequence is preempted: its blocks are freed and it
goes back to the front of the waiting queue, to be recomputed later. A sequence that alone needs
more blocks than the pool has is finished instead (``out_of_blocks``), never preempted forever.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from dockyard.engine.block_manager import BlockManager
from dockyard.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    """One sequence's share of a step: ``num_new_tokens`` tokens starting at its computed length."""

    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """True when this step brings the sequence up to date, so a next token is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == len(self.seq)


class Scheduler:
    """FCFS scheduling with a token budget, a sequence cap, chunked prefill and preemption."""

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # Sequences that outgrew the whole KV pool; the engine finishes them with reason "length".
        self.out_of_blocks: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> list[ScheduledSeq]:
        """Pick this step's work; allocates the KV blocks it needs."""
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(len(seq) - seq.num_computed_tokens, budget)
            while not bm.can_allocate(seq, seq.num_computed_tokens + n):
                victim = self.running.pop()
                if victim is seq and not self.running:
                    # Alone and still too big: the whole pool cannot hold it, so recomputing would loop
                    # forever. It ends here ("length"), as at max_model_len.
                    bm.free(seq)
                    self.out_of_blocks.append(seq)
                    break
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                bm.allocate(seq, seq.num_computed_tokens + n)
                scheduled.append(ScheduledSeq(seq, n))
                budget -= n
                i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = bm.allocate_prompt(seq, budget)
            if n is None:
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        return scheduled

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
