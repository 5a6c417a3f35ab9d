"""MoE families on the shared decoder: Mixtral, Qwen2-MoE, Qwen3-MoE and gpt-oss.

Attention, norms and embeddings are the shared decoder's (``dockyard/models/llama.py``); only the
MLP of the layers ``spec.moe_layers`` marks is a mixture of experts (``dockyard/ops/moe.py``).
"""

from __future__ import annotations

from torch import nn

from dockyard.models.llama import LlamaForCausalLM, LlamaMLP
from dockyard.ops.moe import ExpertList, GptOssExperts, GptOssMoeBlock, LocalExperts, SparseMoeBlock
from dockyard.spec import ModelSpec

_MIXTRAL_EXPERT_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def mixtral_checkpoint_name(name: str) -> str:
    """A Mixtral checkpoint name → ours: ``block_sparse_moe.`` → ``mlp.``, ``experts.N.w1|w3|w2`` →
    ``experts.N.gate_proj|up_proj|down_proj``; every other name unchanged.

    ``model.layers.0.block_sparse_moe.experts.3.w1.weight`` → ``model.layers.0.mlp.experts.3.gate_proj.weight``.
    """
    parts = name.split(".")
    if "block_sparse_moe" not in parts:
        return name
    i = parts.index("block_sparse_moe")
    parts[i] = "mlp"
    rest = parts[i + 1:]
    if len(rest) >= 3 and rest[0] == "experts" and rest[1].isdigit() and rest[2] in _MIXTRAL_EXPERT_NAMES:
        parts[i + 3] = _MIXTRAL_EXPERT_NAMES[rest[2]]
    return ".".join(parts)


class MoEForCausalLM(LlamaForCausalLM):
    """Qwen2-MoE / Qwen3-MoE: router + routed experts (+ Qwen2-MoE's gated shared expert) on MoE layers."""

    def make_mlp(self, spec: ModelSpec, layer: int) -> nn.Module:
        if spec.is_moe_layer(layer):
            return SparseMoeBlock(spec)
        return LlamaMLP(spec)

    def fuse_projections(self) -> None:
        """The shared decoder's fusions, and each routed-expert bank's weights stacked for the fused MoE
        kernels (``ExpertList.stack_``: each expert's Linears become views, so memory is not doubled)."""
        super().fuse_projections()
        for module in self.modules():
            if isinstance(module, (ExpertList, LocalExperts)):
                module.stack_()


class MixtralForCausalLM(MoEForCausalLM):
    """Mixtral: every layer's MLP is 8 experts, top-2; checkpoints call it ``block_sparse_moe`` (w1/w3/w2)."""

    def map_checkpoint_name(self, name: str) -> str | None:
        mapped = super().map_checkpoint_name(name)
        return None if mapped is None else mixtral_checkpoint_name(mapped)


class GptOssForCausalLM(LlamaForCausalLM):
    """gpt-oss: attention sinks, alternating sliding/full layers, biased router and clamped-SwiGLU experts."""

    def make_mlp(self, spec: ModelSpec, layer: int) -> nn.Module:
        return GptOssMoeBlock(spec)

    def fuse_projections(self) -> None:
        """The shared decoder's fusions, and each expert bank's weights re-laid out for the fused MoE kernels
        (``GptOssExperts.stack_``)."""
        super().fuse_projections()
        for module in self.modules():
            if isinstance(module, GptOssExperts):
                module.stack_()
