"""Tensor-parallel layers: each is an ``nn.Linear`` / ``nn.Embedding`` holding one rank's slice.

They keep the parameter names (``weight``, ``bias``) of the layers they replace, so checkpoints
load onto them by the same names (the sharding loader slices each tensor first).

* :class:`ColumnParallelLinear` — output features split; the output stays split (the next layer is
  row-parallel), so it computes exactly as a plain Linear.
* :class:`RowParallelLinear` — input features split; partial products summed over the ranks, the
  bias added once after the sum (``reduce=False`` leaves the sum to the caller, e.g. an MoE block
  that sums all its experts before one all-reduce; the bias then lives on rank 0 only).
* :class:`VocabParallelEmbedding` — a vocabulary slice per rank; ids outside it embed to zeros and
  the all-reduce fills them in.
* :class:`ParallelLMHead` — a vocabulary slice per rank; the logits are all-gathered.

Vocabulary slices are ``ceil(vocab / N)`` rows each; the last rank's trailing rows past the vocabulary
are padding (zeros), dropped from the gathered logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dockyard.distributed.parallel_state import all_gather, all_reduce, get_tp_rank


def _empty_like_params(new: nn.Module, old: nn.Module) -> nn.Module:
    """Put ``new``'s parameters on ``old``'s device and dtype (uninitialized: the loader fills them)."""
    ref = next(old.parameters())
    for name, p in list(new.named_parameters(recurse=False)):
        setattr(new, name, nn.Parameter(torch.empty(p.shape, dtype=ref.dtype, device=ref.device),
                                        requires_grad=False))
    return new


class ColumnParallelLinear(nn.Linear):
    """A Linear whose output features are this rank's slice of the full layer's."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, out_local: int) -> ColumnParallelLinear:
        """The shard shape of ``linear`` (parameters uninitialized)."""
        new = cls(linear.in_features, out_local, bias=linear.bias is not None, device="meta")
        return _empty_like_params(new, linear)  # type: ignore[return-value]


class RowParallelLinear(nn.Linear):
    """A Linear whose input features are this rank's slice; the output is summed over the ranks."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, reduce: bool = True,
                 device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device)
        self.reduce = reduce

    @classmethod
    def from_linear(cls, linear: nn.Linear, in_local: int, reduce: bool = True) -> RowParallelLinear:
        """The shard shape of ``linear`` (parameters uninitialized)."""
        new = cls(in_local, linear.out_features, bias=linear.bias is not None, reduce=reduce, device="meta")
        return _empty_like_params(new, linear)  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        if self.reduce:
            out = all_reduce(out)
            return out if self.bias is None else out + self.bias
        if self.bias is not None and get_tp_rank() == 0:
            out = out + self.bias
        return out


class VocabParallelEmbedding(nn.Embedding):
    """Rows ``[start, start + rows)`` of the embedding on this rank; the others are all-reduced in."""

    def __init__(self, rows: int, dim: int, start: int, device: torch.device | str | None = None) -> None:
        super().__init__(rows, dim, device=device)
        self.start = start

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, rows: int, start: int) -> VocabParallelEmbedding:
        """The shard shape of ``emb`` (parameters uninitialized)."""
        new = cls(rows, emb.embedding_dim, start, device="meta")
        return _empty_like_params(new, emb)  # type: ignore[return-value]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return all_reduce(out)


class ParallelLMHead(nn.Linear):
    """The LM head's vocabulary slice; ``forward`` returns the full logits, gathered from every rank."""

    def __init__(self, hidden: int, rows: int, vocab_size: int, device: torch.device | str | None = None) -> None:
        super().__init__(hidden, rows, bias=False, device=device)
        self.vocab_size = vocab_size

    @classmethod
    def from_linear(cls, linear: nn.Linear, rows: int, vocab_size: int) -> ParallelLMHead:
        """The shard shape of ``linear`` (parameters uninitialized)."""
        new = cls(linear.in_features, rows, vocab_size, device="meta")
        return _empty_like_params(new, linear)  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_gather(F.linear(x, self.weight), dim=-1)[..., :self.vocab_size]
