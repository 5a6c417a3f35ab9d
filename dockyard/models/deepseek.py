"""DeepSeek-V2 / V2-Lite / V3 (and Kimi K2, the V3 architecture): MLA attention, dense then MoE layers.

The decoder is the shared one (pre-norm, RMSNorm, residuals); attention is multi-head latent
attention (``dockyard/ops/mla.py``: the KV cache holds one latent per token), and the MLP of the
layers past ``first_k_dense_replace`` is an MoE with shared experts and DeepSeek's routing
(group-limited greedy for V2, ``noaux_tc`` sigmoid routing with a correction bias for V3).
"""

from __future__ import annotations

from torch import nn

from dockyard.models.llama import LlamaMLP
from dockyard.models.moe import MoEForCausalLM
from dockyard.ops.mla import MLAAttention
from dockyard.spec import ModelSpec


class DeepseekForCausalLM(MoEForCausalLM):
    """DeepSeek-V2/V3: MLA attention in every layer; dense MLP first, MoE after."""

    def make_attention(self, spec: ModelSpec, layer: int, rotary_emb: nn.Module) -> nn.Module:
        return MLAAttention(spec, rotary_emb)  # its rotary_dim is spec.rotary_dim: the decoupled rope dims

    def make_mlp(self, spec: ModelSpec, layer: int) -> nn.Module:
        return super().make_mlp(spec, layer) if spec.is_moe_layer(layer) else LlamaMLP(spec)
