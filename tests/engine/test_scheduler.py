"""Scheduler bookkeeping without a model: update_from_output's appends, stops and frees, the
out-of-blocks end, and the async scheduler's pending-token count, against hand-worked steps."""

from __future__ import annotations

from dockyard import SamplingParams
from dockyard.engine.block_manager import BlockManager
from dockyard.engine.scheduler import AsyncScheduler, SampledTokens, Scheduler
from dockyard.engine.sequence import Sequence

EOS = [0]


def _seq(prompt: list[int], params: SamplingParams, max_total_len: int, seq_id: int = 0) -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", 0, prompt, params, max_total_len=max_total_len)


def _step(scheduler: Scheduler, tokens: dict[Sequence, int]) -> list[int]:
    """Schedule one step, then hand back ``tokens`` for the sequences that sample (rows in batch order)."""
    batch = scheduler.schedule().scheduled
    seqs = [item.seq for item in batch if item.samples]
    return scheduler.update_from_output(batch, SampledTokens(seqs, [tokens[s] for s in seqs]))


def test_update_from_output_appends_stops_and_frees() -> None:
    bm = BlockManager(8, 4)
    scheduler = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, eos_token_ids=EOS)
    a = _seq([1, 2, 3, 4, 5], SamplingParams(min_tokens=2, stop_token_ids=[9]), max_total_len=20)
    b = _seq([6, 7, 8], SamplingParams(), max_total_len=5, seq_id=1)
    scheduler.add(a)
    scheduler.add(b)
    assert _step(scheduler, {a: 0, b: 3}) == [0, 1]  # EOS before min_tokens does not stop a
    assert a.output_token_ids == [0] and a.finish_reason is None and a.num_computed_tokens == 5
    assert len(a.block_hashes) == 1  # its first block (4 prompt tokens) is sealed for the prefix cache
    assert _step(scheduler, {a: 9, b: 4}) == [0, 1]
    assert (a.finish_reason, a.stop_reason) == ("stop", 9)  # a stop id from min_tokens on
    assert (b.finish_reason, b.output_token_ids) == ("length", [3, 4])  # 3 + 2 = max_total_len
    assert a.is_finished and b.is_finished and not scheduler.running
    assert bm.num_free_blocks == bm.num_blocks


def test_a_sequence_outgrowing_the_pool_is_ended_by_schedule() -> None:
    bm = BlockManager(2, 4)  # 8 slots
    scheduler = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, eos_token_ids=EOS)
    seq = _seq(list(range(1, 8)), SamplingParams(max_tokens=10), max_total_len=17)
    scheduler.add(seq)
    _step(scheduler, {seq: 20})  # 7 prompt tokens + 1 sampled: 8 slots, full
    _step(scheduler, {seq: 21})  # computes token 8 into the last slot, samples token 9
    out = scheduler.schedule()  # token 9 needs a third block
    assert out.scheduled == [] and out.ended == [seq]
    assert seq.finish_reason == "length" and seq.output_token_ids == [20, 21] and seq.is_finished
    assert bm.num_free_blocks == 2 and not scheduler.running


def test_async_scheduler_counts_pending_tokens() -> None:
    bm = BlockManager(32, 4)  # enough that blocks cannot run short: a step's budget is 16 blocks
    scheduler = AsyncScheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, eos_token_ids=EOS)
    seq = _seq([1, 2, 3], SamplingParams(ignore_eos=True), max_total_len=5)
    logprobs = _seq([1, 2], SamplingParams(logprobs=1), max_total_len=10, seq_id=1)
    assert scheduler.may_defer([seq]) and not scheduler.may_defer([seq, logprobs])
    scheduler.add(seq)
    first = scheduler.schedule().scheduled
    scheduler.update_from_output(first, None)  # the prefill ran; its token stays on the device
    scheduler.defer([seq])
    assert (len(seq), seq.num_pending, seq.pending_row, seq.num_known_tokens) == (4, 1, 0, 3)
    assert not scheduler.needs_pending_tokens()  # it has tokens to compute after the pending one
    second = scheduler.schedule().scheduled  # feeds the pending token
    assert [(item.seq, item.num_new_tokens) for item in second] == [(seq, 1)]
    assert scheduler.update_from_output(second, SampledTokens([seq], [7])) == [0]  # the first token arrives
    assert seq.output_token_ids == [7] and seq.num_pending == 0 and seq.num_computed_tokens == 4
    scheduler.defer([seq])  # the second step's token is pending: 3 + 2 = its length limit
    assert scheduler.needs_pending_tokens()  # nothing after it to compute: applied before scheduling
    scheduler.finish(seq)  # aborted meanwhile: the token that arrives later is void
    assert scheduler.update_from_output([], SampledTokens([seq], [8])) == []
    assert seq.output_token_ids == [7] and seq.num_pending == 0 and bm.num_free_blocks == 32


def test_async_scheduler_wants_pending_tokens_when_blocks_may_run_short() -> None:
    bm = BlockManager(20, 4)
    scheduler = AsyncScheduler(bm, max_num_seqs=4, max_num_batched_tokens=16, eos_token_ids=EOS)
    seqs = [_seq([1, 2, 3, 4, 5], SamplingParams(), max_total_len=30, seq_id=i) for i in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    batch = scheduler.schedule().scheduled
    scheduler.update_from_output(batch, None)
    scheduler.defer(seqs)
    # A step may need one more block per running sequence (3) plus its 16-token budget's (4): 7.
    assert bm.num_free_blocks == 14 and not scheduler.needs_pending_tokens()
    bm.allocate(seqs[0], 4 * 9)  # sequence 0 grows from 2 to 9 blocks
    assert bm.num_free_blocks == 7 and not scheduler.needs_pending_tokens()
    bm.allocate(seqs[0], 4 * 10)
    assert bm.num_free_blocks == 6 and scheduler.needs_pending_tokens()
