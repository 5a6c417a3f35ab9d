"""DeepSeek-V3's multi-token prediction (MTP) layer, the draft of speculative decoding's ``mtp`` method.

The checkpoint stores ``num_nextn_predict_layers`` extra layers after the decoder's, as
``model.layers.{num_hidden_layers + i}.``: a DeepSeek decoder block (MLA attention, an MoE or dense MLP
by the config's rule, its two RMSNorms) with, around it,

* ``enorm`` and ``hnorm``: RMSNorms of the next token's embedding and of the target's hidden state;
* ``eh_proj``: a Linear 2H → H of their concatenation ``[enorm(e); hnorm(h)]`` (embedding first);
* ``shared_head.norm``: the final RMSNorm, and ``shared_head.head``: the vocabulary projection (when the
  checkpoint stores none, the target's ``lm_head``).

The embedding is the target's (V3's checkpoint stores a copy under the layer too; the copy is not read).
For the target's hidden state ``h_t`` at position ``t`` (the last decoder layer's output, before the
final norm) and token ``t + 1``, the layer computes ``x = block(eh_proj([enorm(embed(x_{t+1})); hnorm(h_t)]))``
and ``logits = head(shared_head.norm(x))``, its guess of token ``t + 2``; ``x`` is also the hidden state
it takes for its next guess when it guesses several tokens in a row (as vLLM does with one MTP layer).
Its row ``t`` sits at rotary position ``t``: rotary attention depends only on position differences,
and this way the layer's KV cache holds one row per position from 0, a sequence of its own.

Only the first MTP layer is built: published checkpoints have one, and speculation applies it
recursively. The others' tensors, where a checkpoint has them, are not read.
"""

from __future__ import annotations

import torch
from torch import nn

from dockyard.errors import ConfigError
from dockyard.models.deepseek import DeepseekForCausalLM, checkpoint_layer
from dockyard.models.llama import LlamaDecoderLayer, make_norm
from dockyard.spec import ModelSpec


class SharedHead(nn.Module):
    """The MTP layer's output norm and, when the checkpoint stores one, its own vocabulary projection."""

    def __init__(self, spec: ModelSpec, own_head: bool) -> None:
        super().__init__()
        self.norm = make_norm(spec, spec.hidden_size)
        if own_head:
            self.head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)


class DeepseekMTPLayer(LlamaDecoderLayer):
    """A DeepSeek decoder block fed ``eh_proj([enorm(embedding); hnorm(previous hidden)])``."""

    def __init__(self, spec: ModelSpec, attn: nn.Module, mlp: nn.Module, own_head: bool) -> None:
        super().__init__(spec, attn, mlp)
        self.enorm = make_norm(spec, spec.hidden_size)
        self.hnorm = make_norm(spec, spec.hidden_size)
        self.eh_proj = nn.Linear(2 * spec.hidden_size, spec.hidden_size, bias=False)
        self.shared_head = SharedHead(spec, own_head)

    def forward(self, positions: torch.Tensor, embeds: torch.Tensor,  # type: ignore[override]
                previous_hidden: torch.Tensor) -> torch.Tensor:
        """Embeddings of tokens ``t + 1`` and hidden states of rows ``t`` [T, hidden] → the layer's output."""
        x = self.eh_proj(torch.cat([self.enorm(embeds), self.hnorm(previous_hidden)], dim=-1))
        return super().forward(positions, x)


class _Layers(nn.Module):
    """``model.layers.{index}``: the checkpoint's naming of the MTP layer."""

    def __init__(self, index: int, layer: DeepseekMTPLayer) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({str(index): layer})


class DeepseekMTP(nn.Module):
    """The first MTP layer of ``target``'s checkpoint (``own_head``: the checkpoint stores ``shared_head.head``).

    Its parameters are named as in the checkpoint (``model.layers.61.eh_proj.weight``); the target's
    embedding and LM head are used, not owned (they are loaded and counted with the target).
    """

    def __init__(self, target: DeepseekForCausalLM, own_head: bool) -> None:
        super().__init__()
        spec = target.spec
        if spec.num_nextn_predict_layers < 1:
            raise ConfigError(f"{spec.name} has no MTP layers (num_nextn_predict_layers="
                              f"{spec.num_nextn_predict_layers}); use speculative_config method 'ngram' or "
                              "'draft_model'")
        self.spec = spec
        self.index = spec.num_hidden_layers
        layer = DeepseekMTPLayer(spec, target.make_attention(spec, self.index, target.rotary_emb),
                                 target.make_mlp(spec, self.index), own_head)
        self.model = _Layers(self.index, layer)
        # The target's modules, kept out of this module's parameters (a plain tuple is not registered).
        self.shared = (target.model.embed_tokens, target.lm_head)

    @property
    def layer(self) -> DeepseekMTPLayer:
        return self.model.layers[str(self.index)]  # type: ignore[return-value]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, previous_hidden: torch.Tensor) -> torch.Tensor:
        """Tokens ``t + 1`` [T], positions ``t`` [T] and the hidden states of rows ``t`` [T, hidden] → the layer's
        output [T, hidden] (its hidden state for a next guess; :meth:`compute_logits` gives the guess)."""
        embed = self.shared[0]
        return self.layer(positions, embed(input_ids), previous_hidden.to(embed.weight.dtype))

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The layer's outputs [N, hidden] → logits [N, vocab] in float32."""
        shared_head = self.layer.shared_head
        head = shared_head.head if hasattr(shared_head, "head") else self.shared[1]
        return head(shared_head.norm(hidden_states)).float()

    def map_checkpoint_name(self, name: str) -> str | None:
        """The checkpoint names of the first MTP layer, unchanged; everything else (the decoder's tensors, the
        copy of the embedding, further MTP layers) is not this module's (None)."""
        if checkpoint_layer(name) != self.index or name == f"model.layers.{self.index}.embed_tokens.weight":
            return None
        return name

    def reads(self, name: str) -> bool:
        """Whether the checkpoint tensor ``name`` is one of this module's (to read only those)."""
        return self.map_checkpoint_name(name) is not None
