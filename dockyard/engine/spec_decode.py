"""Speculative decoding: cheap proposals, one target forward over them, and exact verification.

A *proposer* guesses up to ``k`` next tokens of a decoding sequence (:class:`NgramProposer`: prompt
lookup in the sequence's own tokens; :class:`~dockyard.engine.draft_model.DraftModelProposer`: a
smaller model with its own KV cache; :class:`~dockyard.engine.mtp.MTPProposer`: the checkpoint's MTP layer,
fed the target's hidden states). The scheduler feeds the sequence's newest token and its
proposals as ``1 + k`` rows of one step (in the paged KV cache, batched with sequences that do not
speculate); the runner computes logits for all ``k + 1`` rows and :func:`verify` decides which
proposals stand:

* **Greedy rows** accept proposal ``j`` while it equals the target's argmax at row ``j``; the first
  mismatch is replaced by that argmax, and when all ``k`` are accepted the argmax of the last row is
  a bonus token. The emitted tokens are exactly those of non-speculative greedy decoding.
* **Sampled rows** use rejection sampling (Leviathan et al. 2023; Chen et al. 2023): proposal ``x``
  drawn from the draft distribution ``q`` is accepted with probability ``min(1, p(x) / q(x))``, ``p``
  being the target's distribution after every sampling rule; on rejection the emitted token is drawn
  from ``max(0, p - q)`` renormalised; after ``k`` acceptances a bonus token is drawn from ``p`` of the
  last row. The emitted tokens are then distributed exactly as the target's own samples. A proposer
  without a distribution (n-gram) proposes deterministically: ``q`` is the point mass on ``x``.

Every logits rule is applied per verified row as if the proposals before it had been emitted: row
``j`` of a sequence is a sequence whose output is extended by proposals ``0..j-1`` (penalty histories,
``min_tokens`` bans). An accepted run is exactly such an extension, so rules hold inside it. A
grammar-constrained sequence (structured output) gets no proposals: its one row carries its matcher's
mask, as in a plain step. (Speculating on it would need one mask per verified row, each from the matcher
advanced by the proposals before it, and ``rollback`` past the rejected ones.)

A row with no proposals draws its token exactly as :class:`~dockyard.engine.sampler.Sampler` would
(same noise from the same generator), so non-speculative requests sharing the step are unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from dockyard.engine.sampler import (
    SamplerOutput,
    SamplingBatch,
    _exponential_noise,
    filter_logits,
    logit_bias_tensor,
)
from dockyard.engine.sequence import Sequence as EngineSequence
from dockyard.engine.speculative_config import SpeculativeConfig
from dockyard.errors import ConfigError
from dockyard.structured_output.manager import allowed_token_mask


@dataclass
class Proposal:
    """Proposed next tokens of one sequence, and (a draft model's) the distribution each was drawn from
    ([len(token_ids), V] probabilities; None: each token was proposed deterministically)."""

    token_ids: list[int] = field(default_factory=list)
    probs: torch.Tensor | None = None


class Proposer(Protocol):
    """Guesses the next tokens of decoding sequences."""

    def propose(self, seqs: list[EngineSequence], max_tokens: list[int]) -> list[Proposal]:
        """At most ``max_tokens[i]`` proposed next tokens of ``seqs[i]`` (whose tokens are all known)."""
        ...

    def release(self, seqs: list[EngineSequence]) -> None:
        """``seqs`` finished: drop whatever the proposer keeps for them."""
        ...


@runtime_checkable
class HiddenStateProposer(Proposer, Protocol):
    """A proposer that drafts from the target's hidden states (MTP, :mod:`dockyard.engine.mtp`): the engine has
    it follow the target's forward passes, which then run eagerly and compute every prompt position (no
    prefix caching: a cached prefix has no hidden states)."""

    def follow(self, runner: Any) -> None:
        """Receive the hidden states of every forward ``runner`` (the target's ModelRunner) runs."""
        ...


class NgramProposer:
    """Prompt lookup: find the latest earlier occurrence of the sequence's last ``n`` tokens (``n`` from
    ``prompt_lookup_max`` down to ``prompt_lookup_min``) and propose the tokens that followed it."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.min_n, self.max_n = config.prompt_lookup_min, config.prompt_lookup_max

    def propose(self, seqs: list[EngineSequence], max_tokens: list[int]) -> list[Proposal]:
        return [Proposal(self.lookup(seq.token_ids, k)) for seq, k in zip(seqs, max_tokens, strict=True)]

    def release(self, seqs: list[EngineSequence]) -> None:
        """Nothing is kept per sequence."""

    def lookup(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` tokens that followed the latest earlier match of the longest suffix that has one."""
        ids = np.asarray(tokens, dtype=np.int64)
        for n in range(min(self.max_n, len(ids) - 1), self.min_n - 1, -1):
            windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)  # exclude the suffix itself
            hits = np.flatnonzero((windows == ids[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return ids[start:start + k].tolist()
        return []


@dataclass
class VerifyOutput:
    """A verify step's result: per sequence ``i``, rows ``offsets[i]`` .. ``offsets[i] + num_emitted[i]``
    of ``sampled`` (token ids, logprobs, top logprobs) are the tokens it emits, in order."""

    sampled: SamplerOutput
    offsets: list[int]
    num_emitted: torch.Tensor  # [num seqs] int64, on the logits' device (or the host: verify_argmax)


def expanded_batch(seqs: list[EngineSequence], proposals: list[list[int]], eos_token_ids: Sequence[int],
                   device: torch.device, vocab_size: int | None = None) -> SamplingBatch:
    """The sampling batch of a verify step: ``len(proposals[i]) + 1`` rows per sequence, row ``j``
    being ``seqs[i]`` with proposals ``0..j-1`` appended to its output (its histories and bans); given the
    logits' ``vocab_size``, also the grammar masks (a constrained sequence gets no proposals, so its one
    row is its matcher's mask) and the logit bias."""
    params, generators, prompts, outputs, banned, matchers = [], [], [], [], [], []
    for seq, proposal in zip(seqs, proposals, strict=True):
        p = seq.params
        assert seq.grammar is None or not proposal, "grammar-constrained sequences are not speculated on"
        matchers.extend([seq.grammar] * (len(proposal) + 1))
        for j in range(len(proposal) + 1):
            output = seq.output_token_ids + proposal[:j] if j else seq.output_token_ids
            params.append(p)
            generators.append(seq.generator)
            prompts.append(seq.prompt_token_ids)
            outputs.append(output)
            banned.append([] if p.min_tokens_reached(len(output))
                          else list(p.stop_token_ids or ()) + ([] if p.ignore_eos else list(eos_token_ids)))
    batch = SamplingBatch.build(params, generators, device)
    batch.prompt_token_ids, batch.output_token_ids, batch.banned_token_ids = prompts, outputs, banned
    if any(p.logprobs is not None for p in params):
        batch.num_logprobs = max(p.logprobs or 0 for p in params)
    if vocab_size is not None:
        batch.allowed_token_mask = allowed_token_mask(matchers, vocab_size, device)
        if any(p.logit_bias for p in params):
            batch.logit_bias = logit_bias_tensor([p.logit_bias for p in params], vocab_size, device)
    return batch


def verify(logits: torch.Tensor, seqs: list[EngineSequence], proposals: list[Proposal], batch: SamplingBatch,
           apply_rules: Any) -> VerifyOutput:
    """Verify ``proposals`` against the target ``logits`` [sum(len(p) + 1), V] (rows laid out per sequence as
    in :func:`expanded_batch`, whose ``batch`` they come with); ``apply_rules`` is the sampler's
    ``apply_logits_rules``. See the module docstring for the acceptance rules."""
    device = logits.device
    logits = apply_rules(logits, batch).float()
    num_rows = logits.shape[0]
    sizes = [len(p.token_ids) + 1 for p in proposals]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
    # Per row, in one host-to-device copy: the proposal it verifies (-1 on each sequence's last row, which
    # proposes nothing), its index within its sequence's rows, and its sequence.
    index = torch.tensor([[t for p in proposals for t in (*p.token_ids, -1)],
                          [j for n in sizes for j in range(n)],
                          [i for i, n in enumerate(sizes) for _ in range(n)]], dtype=torch.long).to(device)
    draft, row_in_seq, seq_of_row = index.unbind(0)
    has_draft = draft >= 0
    draft_index = draft.clamp_min(0)
    greedy_rows = batch.greedy  # one row per verified position, so per row already
    accept = torch.zeros(num_rows, dtype=torch.bool, device=device)
    argmax = replacement = logits.argmax(dim=-1)
    if not batch.all_greedy:
        x = filter_logits(logits, batch)
        probs = torch.softmax(x, dim=-1)
        # q: the draft's distribution per proposal row (a point mass where the proposer gave none).
        q = torch.zeros_like(probs)
        for p, off in zip(proposals, offsets, strict=True):
            if not p.token_ids:
                continue
            rows = slice(off, off + len(p.token_ids))
            if p.probs is not None:
                q[rows] = p.probs.to(device=device, dtype=q.dtype)
            else:
                q[rows].scatter_(1, draft_index[rows, None], 1.0)
        p_x = probs.gather(1, draft_index[:, None]).squeeze(1)
        q_x = q.gather(1, draft_index[:, None]).squeeze(1)
        uniform = _uniform_per_row(seqs, sizes, batch, device)
        accept_sampled = has_draft & (uniform * q_x <= p_x)
        # Rejected rows draw from max(0, p - q); the last row of each sequence from p itself (q = 0 there).
        residual = torch.where(has_draft[:, None], (probs - q).clamp_min(0), probs)
        noise = _exponential_noise(tuple(residual.shape), batch, device)
        tiny = torch.finfo(torch.float32).tiny
        # On the last row this is Sampler.sample's draw: argmax(x - log q) with x the filtered logits.
        log_residual = residual.clamp_min(tiny).log().masked_fill(residual <= 0, float("-inf"))
        drawn = torch.where(has_draft[:, None], log_residual, x) - noise.clamp_min(tiny).log()
        replacement = torch.where(greedy_rows, replacement, drawn.argmax(dim=-1))
        accept = torch.where(greedy_rows, accept, accept_sampled)
    accept = torch.where(greedy_rows, has_draft & (argmax == draft), accept)
    # Accepted proposals per sequence: the index of its first row not accepted (its last row never is).
    first_rejected = torch.where(accept, num_rows, row_in_seq)
    num_accepted = torch.full((len(sizes),), num_rows, dtype=torch.long, device=device).scatter_reduce(
        0, seq_of_row, first_rejected, reduce="amin")
    accepted_here = row_in_seq < num_accepted[seq_of_row]
    token_ids = torch.where(accepted_here, draft_index, replacement)
    logprobs = top_logprobs = top_token_ids = None
    if any(seq.params.logprobs is not None for seq in seqs):  # else the vocabulary-wide logsumexp is skipped
        lse = torch.logsumexp(logits, dim=-1)
        logprobs = logits.gather(1, token_ids[:, None]).squeeze(1) - lse
    if batch.num_logprobs > 0:
        values, top_token_ids = logits.topk(min(batch.num_logprobs, logits.shape[1]), dim=-1)
        top_logprobs = values - lse[:, None]
    return VerifyOutput(SamplerOutput(token_ids, logprobs, top_logprobs, top_token_ids), offsets, num_accepted + 1)


def verify_argmax(argmax: torch.Tensor, proposals: list[list[int]]) -> VerifyOutput:
    """Greedy verification when every row's token is the plain argmax of its logits (greedy rows, no logits
    rule, nothing to report: ``sampler.argmax_suffices``): ``argmax`` [sum(len(p) + 1)] laid out as in
    :func:`verify`. One device-to-host read of it and the comparison on the host, so a verify step adds no
    kernel and no further synchronization to its forward. An accepted proposal equals the argmax of its
    row, so every emitted token is that row's argmax."""
    tokens = argmax.to("cpu", torch.long)
    host = tokens.tolist()
    offsets, counts, off = [], [], 0
    for proposal in proposals:
        accepted = 0
        while accepted < len(proposal) and host[off + accepted] == proposal[accepted]:
            accepted += 1
        offsets.append(off)
        counts.append(accepted + 1)
        off += len(proposal) + 1
    if off != len(host):
        raise ValueError(f"{len(host)} argmax rows for proposals that need {off}")
    return VerifyOutput(SamplerOutput(tokens, None), offsets, torch.tensor(counts, dtype=torch.long))


def _uniform_per_row(seqs: list[EngineSequence], sizes: list[int], batch: SamplingBatch,
                     device: torch.device) -> torch.Tensor:
    """U(0, 1) per row for the acceptance tests, each seeded sequence's from its own generator."""
    parts = []
    for seq, n in zip(seqs, sizes, strict=True):
        u = torch.zeros(n, dtype=torch.float32, device=device)
        if n > 1 and not seq.params.greedy:
            u.uniform_(generator=seq.generator) if seq.generator is not None else u.uniform_()
        parts.append(u)
    return torch.cat(parts) if parts else torch.empty(0, device=device)


def make_proposer(config: SpeculativeConfig) -> Proposer:
    """The proposer ``config`` names, when it needs no model of its own (a draft model's is built by ``LLM``,
    which loads models)."""
    if config.method == "ngram":
        return NgramProposer(config)
    raise ConfigError(f"speculative_config method={config.method!r} needs its model loaded first: build the "
                      "engine through LLM (or pass the proposer to LLMEngine)")
