"""The Llama family (Llama 2/3/3.1/3.2, Mistral, SmolLM): pre-norm decoder, GQA, gated MLP.

Parameter names are HF's (``model.layers.N.self_attn.q_proj``), so checkpoints map onto the
module tree with no renaming and this file reads side by side with ``modeling_llama.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from dockyard.ops.activation import act_and_mul
from dockyard.ops.attention import Attention
from dockyard.ops.norm import RMSNorm
from dockyard.ops.rotary import get_rope
from dockyard.spec import ModelSpec


class LlamaAttention(nn.Module):
    """q/k/v projections → rotary → attention over the KV cache → output projection."""

    def __init__(self, spec: ModelSpec, rotary_emb: nn.Module) -> None:
        super().__init__()
        self.num_heads = spec.num_attention_heads
        self.num_kv_heads = spec.num_key_value_heads
        self.head_dim = spec.head_dim
        bias = spec.attention_bias
        self.q_proj = nn.Linear(spec.hidden_size, spec.q_size, bias=bias)
        self.k_proj = nn.Linear(spec.hidden_size, spec.kv_size, bias=bias)
        self.v_proj = nn.Linear(spec.hidden_size, spec.kv_size, bias=bias)
        self.o_proj = nn.Linear(spec.q_size, spec.hidden_size, bias=bias)
        self.rotary_emb = rotary_emb
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads, scale=self.head_dim**-0.5,
                              sliding_window=spec.sliding_window)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [T, hidden] at ``positions`` [T] → attention output [T, hidden]."""
        tokens = hidden_states.shape[0]
        q = self.q_proj(hidden_states).view(tokens, self.num_heads, self.head_dim)
        k = self.k_proj(hidden_states).view(tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden_states).view(tokens, self.num_kv_heads, self.head_dim)
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v)
        return self.o_proj(out.reshape(tokens, -1))


class LlamaMLP(nn.Module):
    """down(act(gate(x)) * up(x))."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        bias = spec.mlp_bias
        self.gate_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=bias)
        self.act = spec.hidden_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(act_and_mul(self.gate_proj(x), self.up_proj(x), self.act))


class LlamaDecoderLayer(nn.Module):
    """x + attn(norm(x)), then + mlp(norm(·))."""

    def __init__(self, spec: ModelSpec, rotary_emb: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = LlamaAttention(spec, rotary_emb)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = LlamaMLP(spec)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(positions, self.input_layernorm(hidden_states))
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class LlamaModel(nn.Module):
    """Embedding → decoder layers → final norm."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        # One rotary table shared by every layer (it can be large at long max lengths).
        rotary_emb = get_rope(spec.rope, spec.head_dim, spec.max_position_embeddings)
        self.layers = nn.ModuleList(LlamaDecoderLayer(spec, rotary_emb) for _ in range(spec.num_hidden_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        for layer in self.layers:
            hidden_states = layer(positions, hidden_states)
        return self.norm(hidden_states)


class LlamaForCausalLM(nn.Module):
    """Flat token batch → hidden states; ``compute_logits`` turns chosen rows into logits."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.model = LlamaModel(spec)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T] → hidden states [T, hidden]."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden states [N, hidden] → logits [N, vocab] in float32."""
        return self.lm_head(hidden_states).float()
