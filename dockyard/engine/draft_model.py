"""The draft-model proposer: a (smaller) model with the target's vocabulary guesses the next tokens.

The draft keeps its own paged KV cache (its own :class:`~dockyard.engine.model_runner.ModelRunner` and
:class:`~dockyard.engine.block_manager.BlockManager`) and a *shadow* sequence per target sequence: the
target's tokens followed by the draft's own last guesses. Before each proposal the shadow is synced to
the target's tokens: its KV stays valid up to the longest common prefix (the accepted guesses), the rest
is rolled back and its blocks freed. Then ``k`` batched draft steps run: the first feeds whatever the
shadow has not computed (the target's newest tokens; a whole prompt for a new sequence), each later one
the previous guess. A greedy request's guesses are the draft's argmax; a sampled request's are drawn
from the draft's temperature / top-k / top-p / min-p distribution, which comes with the proposal as ``q``
for rejection sampling (:func:`~dockyard.engine.spec_decode.verify`).
"""

from __future__ import annotations

import torch
from torch import nn

from dockyard.engine.block_manager import BlockManager
from dockyard.engine.model_runner import ModelRunner
from dockyard.engine.sampler import SamplingBatch, filter_logits
from dockyard.engine.scheduler import ScheduledSeq
from dockyard.engine.sequence import Sequence, SequenceStatus
from dockyard.engine.spec_decode import Proposal
from dockyard.errors import ConfigError
from dockyard.spec import ModelSpec


class DraftModelProposer:
    """Proposes with ``model`` (of ``spec``), its KV cache holding ``num_blocks`` blocks of ``block_size``."""

    def __init__(self, model: nn.Module, spec: ModelSpec, target_spec: ModelSpec, num_blocks: int, block_size: int,
                 device: torch.device, dtype: torch.dtype, max_num_seqs: int, max_model_len: int) -> None:
        if spec.vocab_size != target_spec.vocab_size:
            raise ConfigError(f"the draft model's vocabulary has {spec.vocab_size} tokens but the target's has "
                              f"{target_spec.vocab_size}; a draft model must share the target's tokenizer")
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
        self.runner = ModelRunner(model, spec, num_blocks, block_size, device, dtype, max_num_seqs=max_num_seqs,
                                  max_model_len=max_model_len, enforce_eager=True)
        self.shadows: dict[int, tuple[Sequence, Sequence]] = {}  # target seq_id -> (target, shadow)

    def propose(self, seqs: list[Sequence], max_tokens: list[int]) -> list[Proposal]:
        """Up to ``max_tokens[i]`` guesses for ``seqs[i]``, from batched draft steps."""
        self._forget_stale()
        proposals = [Proposal() for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        active = [(i, self._sync(seq), k) for i, (seq, k) in enumerate(zip(seqs, max_tokens, strict=True))]
        for step in range(max(max_tokens, default=0)):
            items = []
            for i, shadow, k in active:
                if step >= k or not self._grow(shadow):
                    continue
                items.append((i, ScheduledSeq(shadow, len(shadow) - shadow.num_computed_tokens)))
            if not items:
                break
            with torch.inference_mode():
                inputs, _ = self.runner.prepare([item for _, item in items])
                logits = self.runner.execute(inputs).logits
                tokens, q = draw_guesses(logits, [seqs[i] for i, _ in items])
            for row, ((i, item), token) in enumerate(zip(items, tokens.tolist(), strict=True)):
                shadow = item.seq
                shadow.num_computed_tokens = len(shadow)
                shadow.prompt_token_ids.append(token)
                proposals[i].token_ids.append(token)
                if q is not None:
                    probs[i].append(q[row])
            stepped = {i for i, _ in items}  # a sequence whose draft cache could not grow proposes no more
            active = [entry for entry in active if entry[0] in stepped]
        for proposal, rows, seq in zip(proposals, probs, seqs, strict=True):
            if rows and not seq.params.greedy:
                proposal.probs = torch.stack(rows)
        return proposals

    def _shadow_tokens(self, seq: Sequence) -> list[int]:
        """The tokens ``seq``'s shadow holds: the target's."""
        return seq.token_ids

    def _sync(self, seq: Sequence) -> Sequence:
        """``seq``'s shadow with its tokens (:meth:`_shadow_tokens`); its KV kept up to the common prefix, the
        rest freed."""
        entry = self.shadows.get(seq.seq_id)
        tokens = self._shadow_tokens(seq)
        if entry is None:
            shadow = Sequence(seq.seq_id, seq.request_id, 0, list(tokens), seq.params, seq.max_total_len,
                              generator=seq.generator, status=SequenceStatus.RUNNING)
            self.shadows[seq.seq_id] = (seq, shadow)
            return shadow
        shadow = entry[1]
        own = shadow.prompt_token_ids
        common = 0
        limit = min(len(own), len(tokens))
        while common < limit and own[common] == tokens[common]:
            common += 1
        del own[common:]
        own.extend(tokens[common:])
        shadow.num_computed_tokens = min(shadow.num_computed_tokens, common)
        self.block_manager.trim(shadow, shadow.num_computed_tokens)
        return shadow

    def _grow(self, shadow: Sequence) -> bool:
        """Blocks for all of ``shadow``'s tokens; False (nothing allocated) when the draft cache is full."""
        if not self.block_manager.can_allocate(shadow, len(shadow)):
            return False
        self.block_manager.allocate(shadow, len(shadow))
        return True

    def release(self, seqs: list[Sequence]) -> None:
        """Free the shadows (and their draft KV blocks) of ``seqs``, which finished."""
        for seq in seqs:
            entry = self.shadows.pop(seq.seq_id, None)
            if entry is not None:
                self.block_manager.free(entry[1])

    def _forget_stale(self) -> None:
        """Free the shadows of target sequences that left the running set (preempted, or finished unseen)."""
        self.release([seq for seq, _ in self.shadows.values() if seq.status != SequenceStatus.RUNNING])


def draw_guesses(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One guess per row: the argmax for greedy requests, else a draw from the draft's filtered
    distribution, which is returned too ([rows, V] float32; None when every row is greedy)."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    if all(seq.params.greedy for seq in seqs):
        return greedy, None
    batch = SamplingBatch.build([seq.params for seq in seqs], [seq.generator for seq in seqs], logits.device)
    q = torch.softmax(filter_logits(logits, batch), dim=-1)
    drawn = torch.stack([torch.multinomial(q[r], 1, generator=seq.generator).squeeze(0)
                         for r, seq in enumerate(seqs)])
    return torch.where(batch.greedy, greedy, drawn), q
