"""The MTP proposer: a DeepSeek-V3 checkpoint's multi-token prediction layer guesses the next tokens.

The layer (:class:`~dockyard.models.deepseek_mtp.DeepseekMTP`) reads the target's hidden state ``h_t`` (before
the final norm) and token ``t + 1``, and guesses token ``t + 2``. It keeps a paged KV cache of its own, one
row per target position, in a *shadow* sequence per target sequence (the machinery of
:class:`~dockyard.engine.draft_model.DraftModelProposer`): shadow token ``t`` is target token ``t + 1``, so
shadow row ``t`` pairs ``h_t`` with the token that followed it.

Hidden states: the engine has the proposer follow the target's runner (``follow``). A forward hook on the
target's final norm keeps the step's pre-norm hidden states (the norm's input, or with a residual fused
into it the sum it returns, so nothing is copied), and the runner's ``forward_observer`` says which
sequences' rows they are; each sequence's rows are kept by position until its next proposal. Rows of
rejected proposals sit at positions the target has not counted as computed, and a later step's rows
for those positions replace them.

A proposal for a sequence of ``n`` tokens (the target has computed positions ``0 .. n - 2``): the shadow's
rows from its first uncomputed one to ``n - 2`` run with the target's hidden states (prompt rows in one
batch when the sequence is new), and row ``n - 2``'s logits give guess 1 (argmax for a greedy request, a
draw from the filtered distribution otherwise, as the draft model draws). Guess ``j + 1`` comes from row
``n - 2 + j``, fed guess ``j`` and the layer's own output of the row before in place of the target's
hidden state. Those later rows are rolled back afterwards: only rows computed from the target's hidden
states stay in the cache.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from dockyard.engine.draft_model import DraftModelProposer, draw_guesses
from dockyard.engine.model_runner import ModelRunner
from dockyard.engine.scheduler import ScheduledSeq
from dockyard.engine.sequence import Sequence
from dockyard.engine.spec_decode import Proposal
from dockyard.models.deepseek_mtp import DeepseekMTP
from dockyard.ops.attention import forward_context


class MTPProposer(DraftModelProposer):
    """Proposes with ``mtp`` (the target's MTP layer), its KV cache holding ``num_blocks`` blocks of ``block_size``."""

    def __init__(self, mtp: DeepseekMTP, num_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype,
                 max_num_seqs: int, max_model_len: int) -> None:
        super().__init__(mtp, mtp.spec, mtp.spec, num_blocks, block_size, device, dtype, max_num_seqs, max_model_len)
        self.mtp = mtp
        # seq_id -> consecutive chunks of its target pre-norm hidden states: (first position, rows); appended as
        # steps come (a sequence that is not proposing yet, mid-prompt or constrained, is not copied each step).
        self.hidden: dict[int, list[tuple[int, torch.Tensor]]] = {}
        self._step_hidden: torch.Tensor | None = None
        self._hook: RemovableHandle | None = None

    # ---- following the target ----
    def follow(self, runner: ModelRunner) -> None:
        """Keep the pre-norm hidden states of every forward ``runner`` (the target's) runs, by sequence."""
        if self._hook is not None:
            self._hook.remove()
        self._hook = runner.model.model.norm.register_forward_hook(self._capture)
        runner.forward_observer = self.observe

    def _capture(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        # With the last layer's residual fused into it, the norm returns (normed, its input summed): the sum is
        # the pre-norm hidden state; otherwise its input is.
        self._step_hidden = output[1] if isinstance(output, tuple) else args[0]

    def observe(self, batch: list[ScheduledSeq]) -> None:
        """The forward just run computed ``batch`` (each item's new tokens and proposals, from its computed length):
        keep each sequence's rows of the captured hidden states."""
        hidden, self._step_hidden = self._step_hidden, None
        assert hidden is not None, "the target's forward ran without its final norm"
        row = 0
        for item in batch:
            count = item.num_new_tokens + len(item.spec_token_ids)
            self._store(item.seq.seq_id, item.seq.num_computed_tokens, hidden[row:row + count])
            row += count
        assert row == hidden.shape[0], (row, hidden.shape)

    def _store(self, seq_id: int, start: int, rows: torch.Tensor) -> None:
        """Rows for positions ``start ..``, replacing the held ones from ``start`` on (those before it are kept
        when they reach it; after a gap nothing older is)."""
        chunks = []
        for first, held in self.hidden.get(seq_id, []):
            if first >= start:
                break
            chunks.append((first, held[:start - first]))
        if chunks and chunks[-1][0] + len(chunks[-1][1]) < start:
            chunks = []
        chunks.append((start, rows))
        self.hidden[seq_id] = chunks

    def _rows(self, seq_id: int, start: int, end: int) -> torch.Tensor | None:
        """The held target hidden states of positions ``start .. end - 1``; None when some are not held."""
        chunks = self.hidden.get(seq_id)
        if not chunks or chunks[0][0] > start or end > chunks[-1][0] + len(chunks[-1][1]):
            return None
        parts = [held[max(0, start - first):end - first] for first, held in chunks
                 if first < end and first + len(held) > start]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    # ---- proposing ----
    def _shadow_tokens(self, seq: Sequence) -> list[int]:
        """Shadow row ``t`` pairs the target's hidden state ``t`` with token ``t + 1``."""
        return seq.token_ids[1:]

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], max_tokens: list[int]) -> list[Proposal]:
        """Up to ``max_tokens[i]`` guesses for ``seqs[i]``: one batched forward of the rows the target's hidden
        states allow, then one per further guess."""
        self._forget_stale()
        proposals = [Proposal() for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        items: list[tuple[int, ScheduledSeq]] = []
        inputs: list[torch.Tensor] = []
        computed: dict[int, int] = {}  # shadow rows computed from the target's hidden states, per proposing index
        for i, (seq, k) in enumerate(zip(seqs, max_tokens, strict=True)):
            last = seq.num_computed_tokens - 1  # the newest row whose target hidden state exists
            if k < 1 or last < 0:
                continue
            shadow = self._sync(seq)
            # The newest row is run again when nothing newer came: its output is the first guess.
            start = min(shadow.num_computed_tokens, last)
            rows = self._rows(seq.seq_id, start, last + 1)
            if rows is None:
                continue
            shadow.num_computed_tokens = start
            self.block_manager.trim(shadow, start)
            if not self._grow(shadow):
                continue
            items.append((i, ScheduledSeq(shadow, len(shadow) - start)))
            inputs.append(rows)
            computed[i] = len(shadow)
        step = 0
        while items:
            out = self._forward([item for _, item in items], torch.cat(inputs))
            tokens, q = draw_guesses(self.mtp.compute_logits(out), [seqs[i] for i, _ in items])
            step += 1
            next_items, inputs = [], []
            for row, ((i, item), token) in enumerate(zip(items, tokens.tolist(), strict=True)):
                shadow = item.seq
                shadow.num_computed_tokens = len(shadow)
                proposals[i].token_ids.append(token)
                if q is not None:
                    probs[i].append(q[row])
                if step >= max_tokens[i]:
                    continue
                shadow.prompt_token_ids.append(token)
                if self._grow(shadow):  # a shadow whose cache cannot grow proposes no more
                    next_items.append((i, ScheduledSeq(shadow, 1)))
                    inputs.append(out[row:row + 1])
            items = next_items
        for i, real in computed.items():
            self._roll_back(seqs[i], real)
        for proposal, rows, seq in zip(proposals, probs, seqs, strict=True):
            if rows and not seq.params.greedy:
                proposal.probs = torch.stack(rows)
        return proposals

    def _forward(self, batch: list[ScheduledSeq], previous_hidden: torch.Tensor) -> torch.Tensor:
        """The MTP layer over ``batch``'s new rows (with ``previous_hidden`` per row) → the output of each
        item's last row [len(batch), hidden]."""
        step, _ = self.runner.prepare(batch)
        with forward_context(step.metadata):
            out = self.mtp(step.input_ids, step.positions, previous_hidden)
        return out[step.sample_rows]

    def _roll_back(self, seq: Sequence, real: int) -> None:
        """Keep ``seq``'s shadow rows computed from the target's hidden states (``real`` of them), free the rest,
        and the held hidden states the next proposal no longer needs (it restarts at row ``real - 1`` at most)."""
        shadow = self.shadows[seq.seq_id][1]
        del shadow.prompt_token_ids[real:]
        shadow.num_computed_tokens = min(shadow.num_computed_tokens, real)
        self.block_manager.trim(shadow, shadow.num_computed_tokens)
        chunks = self.hidden[seq.seq_id]
        keep_from, end = max(chunks[0][0], real - 1), chunks[-1][0] + len(chunks[-1][1])
        rows = self._rows(seq.seq_id, keep_from, end)
        assert rows is not None
        self.hidden[seq.seq_id] = [(keep_from, rows)]

    def release(self, seqs: list[Sequence]) -> None:
        """Free the shadows and held hidden states of ``seqs``, which finished (or left the running set)."""
        super().release(seqs)
        for seq in seqs:
            self.hidden.pop(seq.seq_id, None)
