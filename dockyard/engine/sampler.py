"""Batched sampling: every logits rule of a step, then a seeded draw and logprobs.

Pure PyTorch on whatever device the logits live on. Per step the model runner builds one
:class:`SamplingBatch` from the sampling sequences (:meth:`SamplingBatch.for_sequences`: their
:class:`SamplingParams`, generators, token histories and what ``min_tokens`` bans) and calls
:class:`Sampler` with the logits of those rows; the sampler applies every rule, in this order:

1. Token constraints, in the logits' dtype: stop tokens banned until ``min_tokens`` outputs exist
   (EOS unless ``ignore_eos``, and the stop token ids), then the per-row allowed-token mask of
   structured outputs (rows with a grammar matcher; ``structured_output.manager.allowed_token_mask``),
   then each row's ``logit_bias``.
2. Penalties (:func:`apply_penalties`): repetition, presence, frequency.
3. Logprobs of the result (in float32): reported after penalties, before temperature and the
   filters, as vLLM reports by default.
4. Temperature scaling, then top-k, then top-p, then min-p (:func:`filter_logits`), then a draw.

Semantics of the draw (see also the docstrings below):

* Greedy rows (temperature < 1e-5) take the argmax of the constrained, penalized logits, lowest
  token id on ties. When no row has any rule (:func:`argmax_suffices`) the argmax of the raw
  logits is the answer, and the runner may take it from a captured graph without the sampler.
* Filters keep tokens by *value*: a token tied with the last one a filter keeps is kept too, so the
  result never depends on how a sort orders equal values (HF and vLLM keep top-k ties the same way).
  top-p keeps the smallest set of most-likely tokens whose probability sums to >= top_p (at least
  one token), plus any ties of its least likely member. min-p keeps tokens with
  prob >= min_p * max_prob; that ratio does not change under renormalization, so it is applied
  to the temperature-scaled logits directly.
* The draw is the exponential race ``argmax(probs / q)``, ``q ~ Exp(1)`` per token, computed in
  log space as ``argmax(logits - log q)`` (Gumbel-max); it samples exactly from the filtered,
  renormalized distribution. Each row with a generator draws its own ``q`` from it, so a seeded
  request's tokens do not depend on its neighbours or its row; rows without one share the
  default RNG in one draw.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dockyard.engine.sampling_params import SamplingParams
from dockyard.engine.sequence import Sequence as EngineSequence
from dockyard.structured_output.manager import allowed_token_mask

_NEG_INF = float("-inf")


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator on ``device`` seeded with ``seed`` (reduced mod 2**64), or None when unseeded."""
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed) % 2**64)
    return gen


@dataclass
class SamplingBatch:
    """What the sampler needs of one step's rows: per-row parameters as tensors on the logits' device,
    and the inputs of the rules that are not per-row scalars (token histories, banned tokens, hooks).

    Build it once per step with :meth:`for_sequences` (or :meth:`build` from bare params, which has no
    histories or bans): besides the tensors it records, from the host-side params, which stages any
    row needs, so the sampler skips the rest without reading tensors back.
    """

    temperature: torch.Tensor  # [B] float32
    top_p: torch.Tensor  # [B] float32
    top_k: torch.Tensor  # [B] int64, 0 = off
    min_p: torch.Tensor  # [B] float32
    presence_penalty: torch.Tensor  # [B] float32
    frequency_penalty: torch.Tensor  # [B] float32
    repetition_penalty: torch.Tensor  # [B] float32
    generators: list[torch.Generator | None]  # per row; None = the default RNG
    greedy: torch.Tensor  # [B] bool
    # Host-side summaries (derived in build(); derived from the tensors, with a sync, if left None).
    greedy_rows: list[bool] | None = None
    max_top_k: int | None = None  # largest top-k among sampled rows; 0 when none uses top-k
    any_top_p: bool | None = None
    any_min_p: bool | None = None
    penalty_rows: list[int] | None = None  # rows with any penalty
    repetition_rows: list[int] | None = None  # rows with repetition_penalty != 1
    # Rules beyond the per-row scalars (for_sequences fills these four).
    prompt_token_ids: list[Sequence[int]] | None = None  # per row, for the repetition penalty; None: empty
    output_token_ids: list[Sequence[int]] | None = None  # per row, for every penalty; None: empty
    banned_token_ids: list[list[int]] | None = None  # per row: stop tokens min_tokens bans this step
    num_logprobs: int = 0  # top alternatives reported per row (0: the sampled token's logprob only)
    # [B, V] bool, True where a token may be sampled (structured outputs); [B, V] added to the logits
    # (logit_bias). for_sequences sets them when a row needs them.
    allowed_token_mask: torch.Tensor | None = None
    logit_bias: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.greedy_rows is None:
            self.greedy_rows = self.greedy.tolist()
        sampled = ~self.greedy
        if self.max_top_k is None:
            top_k = torch.where(sampled, self.top_k.clamp_min(0), 0)
            self.max_top_k = int(top_k.max().item()) if len(self) else 0
        if self.any_top_p is None:
            self.any_top_p = bool((sampled & (self.top_p < 1)).any().item())
        if self.any_min_p is None:
            self.any_min_p = bool((sampled & (self.min_p > 0)).any().item())
        if self.repetition_rows is None:
            self.repetition_rows = torch.nonzero(self.repetition_penalty != 1).flatten().tolist()
        if self.penalty_rows is None:
            uses = self.repetition_penalty != 1
            uses |= (self.presence_penalty != 0) | (self.frequency_penalty != 0)
            self.penalty_rows = torch.nonzero(uses).flatten().tolist()

    def __len__(self) -> int:
        return self.temperature.shape[0]

    @property
    def all_greedy(self) -> bool:
        return all(self.greedy_rows)

    @property
    def any_greedy(self) -> bool:
        return any(self.greedy_rows)

    @classmethod
    def build(cls, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
              device: torch.device | str) -> SamplingBatch:
        """Stack ``params`` (one per row) into tensors on ``device``; ``generators`` is one per row."""
        if len(params) != len(generators):
            raise ValueError(f"got {len(params)} SamplingParams but {len(generators)} generators")
        greedy = [p.greedy for p in params]
        top_k = [max(p.top_k, 0) for p in params]
        floats = torch.tensor(
            [[p.temperature for p in params], [p.top_p for p in params], [p.min_p for p in params],
             [p.presence_penalty for p in params], [p.frequency_penalty for p in params],
             [p.repetition_penalty for p in params]],
            dtype=torch.float32,
        ).reshape(6, len(params)).to(device)
        temperature, top_p, min_p, presence, frequency, repetition = floats.unbind(0)
        sampled = [p for p, g in zip(params, greedy, strict=True) if not g]
        return cls(
            temperature=temperature, top_p=top_p, top_k=torch.tensor(top_k, dtype=torch.long).to(device),
            min_p=min_p, presence_penalty=presence, frequency_penalty=frequency,
            repetition_penalty=repetition,
            generators=list(generators), greedy=torch.tensor(greedy, dtype=torch.bool).to(device),
            greedy_rows=greedy,
            max_top_k=max((k for k, g in zip(top_k, greedy, strict=True) if not g), default=0),
            any_top_p=any(p.top_p < 1 for p in sampled),
            any_min_p=any(p.min_p > 0 for p in sampled),
            penalty_rows=[i for i, p in enumerate(params) if p.uses_penalties],
            repetition_rows=[i for i, p in enumerate(params) if p.repetition_penalty != 1],
        )

    @classmethod
    def for_sequences(cls, seqs: Sequence[EngineSequence], eos_token_ids: Sequence[int],
                      device: torch.device | str, vocab_size: int | None = None) -> SamplingBatch:
        """The batch of one step that samples a next token for each of ``seqs`` (one row each): their
        params and generators, token histories for the penalties, the stop tokens ``min_tokens``
        bans (EOS unless ``ignore_eos``, and the stop token ids) for rows that have not reached it, and,
        given the logits' ``vocab_size``, the grammar masks of rows with a matcher and the logit bias."""
        params = [s.params for s in seqs]
        batch = cls.build(params, [s.generator for s in seqs], device)
        batch.prompt_token_ids = [s.prompt_token_ids for s in seqs]
        batch.output_token_ids = [s.output_token_ids for s in seqs]
        batch.banned_token_ids = [
            [] if p.min_tokens_reached(len(s.output_token_ids))
            else list(p.stop_token_ids or ()) + ([] if p.ignore_eos else list(eos_token_ids))
            for s, p in zip(seqs, params, strict=True)
        ]
        if any(p.logprobs is not None for p in params):
            batch.num_logprobs = max(p.logprobs or 0 for p in params)
        if vocab_size is not None:
            batch.allowed_token_mask = allowed_token_mask([s.grammar for s in seqs], vocab_size, device)
            if any(p.logit_bias for p in params):
                batch.logit_bias = logit_bias_tensor([p.logit_bias for p in params], vocab_size, device)
        return batch


def logit_bias_tensor(biases: Sequence[dict[int, float] | None], vocab_size: int, device: torch.device | str
                      ) -> torch.Tensor:
    """[B, V] float32 on ``device``: row ``i`` holds ``biases[i]`` (token id → value), zeros elsewhere."""
    rows, cols, values = [], [], []
    for row, bias in enumerate(biases):
        for tid, value in (bias or {}).items():
            rows.append(row)
            cols.append(tid)
            values.append(value)
    out = torch.zeros(len(biases), vocab_size, dtype=torch.float32, device=device)
    index = torch.tensor([rows, cols], dtype=torch.long).to(device)
    out.index_put_((index[0], index[1]), torch.tensor(values, dtype=torch.float32).to(device))
    return out


def argmax_suffices(seqs: Sequence[EngineSequence]) -> bool:
    """Whether every one of ``seqs`` samples the argmax of its raw logits: greedy, with no logits rule
    and nothing to report (``SamplingParams.needs_host_tokens`` false, no logit bias)."""
    return all(s.params.greedy and not s.params.logit_bias and not s.params.needs_host_tokens(len(s.output_token_ids))
               for s in seqs)


def _token_counts(rows: list[Sequence[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[len(rows), V] float32 count of each token id in each row, from one host-to-device copy."""
    counts = torch.zeros(len(rows), vocab_size, dtype=torch.float32, device=device)
    lengths = [len(r) for r in rows]
    if sum(lengths):
        # numpy concatenation is several times faster than torch.tensor on nested Python lists.
        ids = np.concatenate([np.asarray(r, dtype=np.int64).reshape(-1) for r in rows])
        flat = np.repeat(np.arange(len(rows), dtype=np.int64) * vocab_size, lengths) + ids
        index = torch.from_numpy(flat).to(device)
        counts.view(-1).index_add_(0, index, torch.ones(index.shape, dtype=torch.float32, device=device))
    return counts


def apply_penalties(logits: torch.Tensor, prompt_token_ids: Sequence[Sequence[int]],
                    output_token_ids: Sequence[Sequence[int]], batch: SamplingBatch) -> torch.Tensor:
    """Logits with repetition, presence and frequency penalties applied (a new tensor if any apply).

    * repetition (HF/vLLM): for every token in the prompt or the output so far, a positive logit
      is divided by ``repetition_penalty`` and a negative one multiplied by it.
    * presence / frequency (OpenAI): over the output tokens only,
      ``logit -= presence * (count > 0) + frequency * count``.

    Returns ``logits`` itself, untouched, when no row uses a penalty.
    """
    rows = batch.penalty_rows
    if not rows:
        return logits
    device, vocab_size = logits.device, logits.shape[1]
    all_rows = len(rows) == logits.shape[0]
    index = None if all_rows else torch.tensor(rows, dtype=torch.long, device=device)

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t if index is None else t.index_select(0, index)

    sub = pick(logits).clone()
    counts = _token_counts([output_token_ids[i] for i in rows], vocab_size, device)
    if batch.repetition_rows:
        rep = set(batch.repetition_rows)
        # Rows without a repetition penalty need no prompt mask: their factor is 1.
        seen = _token_counts([prompt_token_ids[i] if i in rep else () for i in rows], vocab_size, device) > 0
        seen |= counts > 0
        penalty = pick(batch.repetition_penalty)[:, None]
        penalized = torch.where(sub > 0, sub / penalty, sub * penalty)
        sub = torch.where(seen, penalized, sub)
    sub -= pick(batch.frequency_penalty)[:, None] * counts
    sub -= pick(batch.presence_penalty)[:, None] * (counts > 0).to(sub.dtype)
    if index is None:
        return sub
    out = logits.clone()
    out.index_copy_(0, index, sub)
    return out


def filter_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Temperature-scaled logits with the tokens top-k, top-p and min-p drop set to -inf.

    Greedy rows come back unscaled and unfiltered (the sampler takes their argmax elsewhere).
    """
    vocab_size = logits.shape[1]
    temperature = torch.where(batch.greedy, torch.ones_like(batch.temperature), batch.temperature)
    x = logits / temperature[:, None]
    threshold = torch.full((x.shape[0],), _NEG_INF, dtype=x.dtype, device=x.device)
    sorted_desc = None
    if batch.any_top_p:
        sorted_desc = x.sort(dim=-1, descending=True).values
    elif batch.max_top_k:
        sorted_desc = x.topk(min(batch.max_top_k, vocab_size), dim=-1).values
    if batch.max_top_k:
        k = batch.top_k
        active = (k > 0) & (k < vocab_size) & ~batch.greedy
        kth = sorted_desc.gather(1, (k.clamp(1, sorted_desc.shape[1]) - 1)[:, None]).squeeze(1)
        threshold = torch.where(active, kth, threshold)
    if batch.any_top_p:
        # Probabilities of the top-k survivors, in descending order; keep a token while the mass
        # strictly before it is < top_p, then widen to every token >= the last one kept.
        probs = torch.softmax(sorted_desc.masked_fill(sorted_desc < threshold[:, None], _NEG_INF), dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        count = (mass_before < batch.top_p[:, None]).sum(dim=-1).clamp_min(1)
        last_kept = sorted_desc.gather(1, (count - 1)[:, None]).squeeze(1)
        active = (batch.top_p < 1) & ~batch.greedy
        threshold = torch.where(active, torch.maximum(threshold, last_kept), threshold)
    if batch.any_min_p:
        row_max = sorted_desc[:, 0] if sorted_desc is not None else x.max(dim=-1).values
        # p_i >= min_p * p_max  <=>  x_i >= x_max + log(min_p); log(0) = -inf keeps everything.
        floor = row_max + torch.log(batch.min_p)
        threshold = torch.where(batch.greedy, threshold, torch.maximum(threshold, floor))
    if batch.max_top_k or batch.any_top_p or batch.any_min_p:
        x = x.masked_fill(x < threshold[:, None], _NEG_INF)
    return x


def _exponential_noise(shape: tuple[int, int], batch: SamplingBatch, device: torch.device) -> torch.Tensor:
    """q ~ Exp(1) of ``shape``; each seeded row from its own generator, greedy rows left at 1."""
    greedy = batch.greedy_rows
    if not batch.any_greedy and all(g is None for g in batch.generators):
        return torch.empty(shape, dtype=torch.float32, device=device).exponential_()
    q = torch.ones(shape, dtype=torch.float32, device=device)
    shared = [i for i, g in enumerate(batch.generators) if g is None and not greedy[i]]
    if shared:
        index = torch.tensor(shared, dtype=torch.long, device=device)
        q.index_copy_(0, index, torch.empty(len(shared), shape[1], device=device).exponential_())
    for i, gen in enumerate(batch.generators):
        if gen is not None and not greedy[i]:
            q[i].exponential_(generator=gen)
    return q


@dataclass
class SamplerOutput:
    """Sampled tokens and their log-probabilities under the sampler's input logits."""

    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] float32: log_softmax(logits)[token]
    top_logprobs: torch.Tensor | None = None  # [B, K] float32, descending, when num_logprobs > 0
    top_token_ids: torch.Tensor | None = None  # [B, K] int64


class Sampler:
    """Turns a step's logits into one token per row; see the module docstring for the semantics."""

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch, num_logprobs: int | None = None
                 ) -> SamplerOutput:
        """Sample ``logits`` [B, V] under every rule of ``batch``; the top ``num_logprobs`` alternatives
        (default: ``batch.num_logprobs``) come back too when > 0."""
        if logits.dim() != 2 or logits.shape[0] != len(batch):
            raise ValueError(f"logits must be [B={len(batch)}, V], got {tuple(logits.shape)}")
        logits = self.apply_logits_rules(logits, batch).float()
        token_ids = self.sample(logits, batch)
        lse = torch.logsumexp(logits, dim=-1)
        logprobs = logits.gather(1, token_ids[:, None]).squeeze(1) - lse
        top_logprobs = top_token_ids = None
        k = batch.num_logprobs if num_logprobs is None else num_logprobs
        if k > 0:
            values, top_token_ids = logits.topk(min(k, logits.shape[1]), dim=-1)
            top_logprobs = values - lse[:, None]
        return SamplerOutput(token_ids, logprobs, top_logprobs, top_token_ids)

    @staticmethod
    def apply_logits_rules(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """``logits`` with the token constraints and penalties of ``batch`` applied (itself when none
        applies; never modified in place)."""
        if batch.banned_token_ids is not None and any(batch.banned_token_ids):
            logits = logits.clone()
            for row, banned in enumerate(batch.banned_token_ids):
                if banned:
                    logits[row, banned] = _NEG_INF
        if batch.allowed_token_mask is not None:
            logits = logits.masked_fill(~batch.allowed_token_mask, _NEG_INF)
        if batch.logit_bias is not None:
            logits = logits + batch.logit_bias.to(logits.dtype)
        if batch.penalty_rows:
            empty: list[Sequence[int]] = [()] * len(batch)
            logits = apply_penalties(logits, batch.prompt_token_ids or empty, batch.output_token_ids or empty,
                                     batch)
        return logits

    @staticmethod
    def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """[B] token ids: argmax for greedy rows, a draw from the filtered distribution otherwise."""
        if batch.all_greedy:
            return logits.argmax(dim=-1)
        x = filter_logits(logits, batch)
        q = _exponential_noise(tuple(x.shape), batch, x.device)
        # argmax(softmax(x) / q) == argmax(x - log q); clamp guards log(0) from a zero draw.
        sampled = (x - q.clamp_min(torch.finfo(q.dtype).tiny).log()).argmax(dim=-1)
        if batch.any_greedy:
            sampled = torch.where(batch.greedy, logits.argmax(dim=-1), sampled)
        return sampled
