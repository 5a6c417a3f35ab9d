"""DeepSeek-V2 / V2-Lite / V3 (and Kimi K2, the V3 architecture): MLA attention, dense then MoE layers.

The decoder is the shared one (pre-norm, RMSNorm, residuals); attention is multi-head latent
attention (``dockyard/ops/mla.py``: the KV cache holds one latent per token), and the MLP of the
layers past ``first_k_dense_replace`` is an MoE with shared experts and DeepSeek's routing
(group-limited greedy for V2, ``noaux_tc`` sigmoid routing with a correction bias for V3).

A V3 checkpoint also stores its multi-token prediction layers as ``model.layers.{num_hidden_layers + i}``:
they are not part of this model (its checkpoint names map to None) but of
:class:`~dockyard.models.deepseek_mtp.DeepseekMTP`, which speculative decoding's ``mtp`` method loads.
"""

from __future__ import annotations

import re

from torch import nn

from dockyard.models.llama import LlamaMLP
from dockyard.models.moe import MoEForCausalLM
from dockyard.ops.mla import MLAAttention
from dockyard.spec import ModelSpec

_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.")


def checkpoint_layer(name: str) -> int | None:
    """The decoder layer index a checkpoint name belongs to (``model.layers.N.…`` → N), else None."""
    match = _LAYER_NAME.match(name)
    return int(match.group(1)) if match else None


class DeepseekForCausalLM(MoEForCausalLM):
    """DeepSeek-V2/V3: MLA attention in every layer; dense MLP first, MoE after."""

    def make_attention(self, spec: ModelSpec, layer: int, rotary_emb: nn.Module) -> nn.Module:
        return MLAAttention(spec, rotary_emb)  # its rotary_dim is spec.rotary_dim: the decoupled rope dims

    def make_mlp(self, spec: ModelSpec, layer: int) -> nn.Module:
        return super().make_mlp(spec, layer) if spec.is_moe_layer(layer) else LlamaMLP(spec)

    def map_checkpoint_name(self, name: str) -> str | None:
        """The shared decoder's mapping; the MTP layers' tensors (past the decoder's layers) are not this model's."""
        mapped = super().map_checkpoint_name(name)
        layer = None if mapped is None else checkpoint_layer(mapped)
        return None if layer is not None and layer >= self.spec.num_hidden_layers else mapped
