"""Cut a built dockyard model in place for tensor-parallel rank r of N, and slice its weights to match.

What each rank keeps (vLLM's layout):

* attention: q heads ``[r·H/N, (r+1)·H/N)`` (q_proj rows, o_proj columns); KV heads ``[r·K/N, (r+1)·K/N)``
  when K ≥ N, else KV head ``r // (N/K)`` replicated on N/K ranks — exactly the KV head its q heads
  attend with (q head h uses KV head ``h // (H/K)``). q/k/v column-parallel, o_proj row-parallel.
* dense MLP: gate/up column-parallel, down row-parallel (intermediate split).
* MoE block, tensor-parallel: every expert's (and the shared expert's) intermediate split as the MLP;
  the block sums its experts' partial outputs and all-reduces once.
* MoE block, expert-parallel: experts ``[r·E/N, (r+1)·E/N)`` whole on rank r; the router is replicated,
  so each rank computes the tokens routed to its own experts and one all-reduce combines them (shared
  experts are split as in tensor parallelism).
* embedding and LM head: a vocabulary slice each (:mod:`.layers`).

Norms, routers and rotary tables are replicated. :func:`shard_model` records a :class:`ShardPlan`
on the model (``model.shard_plan``): each sharded parameter's slice of the full checkpoint tensor,
the full shapes (dummy weights are drawn at the full shape, then sliced, so any N gives the same
model) and the experts this rank does not hold; :func:`shard_weights` applies it to a weight stream.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dockyard.distributed.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from dockyard.errors import ConfigError
from dockyard.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP
from dockyard.ops.moe import ExpertMLP, GptOssMoeBlock, LocalExperts, SparseMoeBlock
from dockyard.spec import ModelSpec


@dataclass(frozen=True)
class SliceSpec:
    """Rows ``[start, stop)`` of dimension ``dim`` of the full tensor, zero-padded to ``size`` along it."""

    dim: int
    start: int
    stop: int
    size: int

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the full tensor."""
        part = full.narrow(self.dim, self.start, self.stop - self.start)
        if self.size > self.stop - self.start:
            pad_shape = list(part.shape)
            pad_shape[self.dim] = self.size - (self.stop - self.start)
            part = torch.cat([part, part.new_zeros(pad_shape)], dim=self.dim)
        return part.contiguous()


@dataclass
class ShardPlan:
    """How one rank's parameters relate to the full checkpoint."""

    rank: int
    size: int
    expert_parallel: bool
    slices: dict[str, SliceSpec] = field(default_factory=dict)
    full_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dropped_experts: set[str] = field(default_factory=set)  # "model.layers.0.mlp.experts.5" not held here

    def holds(self, name: str) -> bool:
        """Whether parameter ``name`` (our naming) lives on this rank (False only for other ranks' experts)."""
        if not self.dropped_experts:
            return True
        head, sep, rest = name.partition(".experts.")
        if not sep:
            return True
        return f"{head}.experts.{rest.split('.', 1)[0]}" not in self.dropped_experts


def _split(total: int, size: int, rank: int) -> tuple[int, int]:
    per = total // size
    return rank * per, (rank + 1) * per


def check_parallel_config(spec: ModelSpec, tp_size: int, expert_parallel: bool = False) -> None:
    """Raise ConfigError when ``spec`` cannot be split over ``tp_size`` ranks, naming the sizes."""
    if tp_size < 1:
        raise ConfigError(f"tensor_parallel_size={tp_size} must be at least 1")
    if expert_parallel and spec.moe is None:
        raise ConfigError(f"enable_expert_parallel needs an MoE model; {spec.architecture} has no experts")
    if tp_size == 1:
        return
    n, heads, kv = tp_size, spec.num_attention_heads, spec.num_key_value_heads
    if spec.mla is not None:
        raise ConfigError(f"{spec.architecture}: tensor parallelism does not support multi-head latent "
                          "attention (MLA) yet; use tensor_parallel_size=1")
    if spec.qk_norm == "full":
        raise ConfigError(f"{spec.architecture}: tensor parallelism does not support q/k norms over the whole "
                          "projection (qk_norm=full) yet; use tensor_parallel_size=1")
    if spec.attention_sinks:
        raise ConfigError(f"{spec.architecture}: tensor parallelism does not support attention sinks yet")
    if heads % n:
        raise ConfigError(f"num_attention_heads={heads} is not divisible by tensor_parallel_size={n}; "
                          f"choose a tensor-parallel size that divides {heads}")
    if kv >= n and kv % n:
        raise ConfigError(f"num_key_value_heads={kv} is not divisible by tensor_parallel_size={n}; "
                          f"choose a tensor-parallel size that divides {kv}")
    if kv < n and n % kv:
        raise ConfigError(f"tensor_parallel_size={n} is not a multiple of num_key_value_heads={kv}: KV heads "
                          "can only be replicated evenly; choose a tensor-parallel size that is")
    if spec.intermediate_size % n and not (spec.moe is not None and all(map(spec.is_moe_layer,
                                                                             range(spec.num_hidden_layers)))):
        raise ConfigError(f"intermediate_size={spec.intermediate_size} is not divisible by "
                          f"tensor_parallel_size={n}")
    moe = spec.moe
    if moe is not None:
        if expert_parallel and moe.num_experts % n:
            raise ConfigError(f"num_experts={moe.num_experts} is not divisible by tensor_parallel_size={n} "
                              "(expert parallelism places an equal number of experts on each rank)")
        if not expert_parallel and moe.intermediate_size % n:
            raise ConfigError(f"moe_intermediate_size={moe.intermediate_size} is not divisible by "
                              f"tensor_parallel_size={n}")
        if moe.shared_expert_intermediate_size % n:
            raise ConfigError(f"shared_expert_intermediate_size={moe.shared_expert_intermediate_size} is not "
                              f"divisible by tensor_parallel_size={n}")


class _Sharder:
    def __init__(self, model: nn.Module, plan: ShardPlan) -> None:
        self.model = model
        self.plan = plan
        self.rank, self.size = plan.rank, plan.size

    def column(self, parent: nn.Module, prefix: str, attr: str, start: int, stop: int) -> None:
        old = getattr(parent, attr)
        setattr(parent, attr, ColumnParallelLinear.from_linear(old, stop - start))
        self.plan.slices[f"{prefix}.{attr}.weight"] = SliceSpec(0, start, stop, stop - start)
        if old.bias is not None:
            self.plan.slices[f"{prefix}.{attr}.bias"] = SliceSpec(0, start, stop, stop - start)

    def row(self, parent: nn.Module, prefix: str, attr: str, start: int, stop: int, reduce: bool) -> None:
        old = getattr(parent, attr)
        setattr(parent, attr, RowParallelLinear.from_linear(old, stop - start, reduce=reduce))
        self.plan.slices[f"{prefix}.{attr}.weight"] = SliceSpec(1, start, stop, stop - start)

    def attention(self, prefix: str, attn: LlamaAttention) -> None:
        if hasattr(attn, "qkv_proj"):
            raise ConfigError("tensor parallelism does not support fused qkv_proj checkpoints (Phi-3) yet")
        n, r, d = self.size, self.rank, attn.head_dim
        heads, kv = attn.num_heads, attn.num_kv_heads
        h0, h1 = _split(heads, n, r)
        if kv >= n:
            k0, k1 = _split(kv, n, r)
        else:
            k0 = r // (n // kv)
            k1 = k0 + 1
        self.column(attn, prefix, "q_proj", h0 * d, h1 * d)
        self.column(attn, prefix, "k_proj", k0 * d, k1 * d)
        self.column(attn, prefix, "v_proj", k0 * d, k1 * d)
        self.row(attn, prefix, "o_proj", h0 * d, h1 * d, reduce=True)
        attn.num_heads, attn.num_kv_heads = h1 - h0, k1 - k0
        attn.q_size, attn.kv_size = (h1 - h0) * d, (k1 - k0) * d
        attn.attn.num_heads, attn.attn.num_kv_heads = h1 - h0, k1 - k0

    def mlp(self, prefix: str, mlp: nn.Module, size: int, reduce: bool) -> int:
        if hasattr(mlp, "gate_up_proj"):
            raise ConfigError("tensor parallelism does not support fused gate_up_proj checkpoints (Phi-3) yet")
        i0, i1 = _split(size, self.size, self.rank)
        self.column(mlp, prefix, "gate_proj", i0, i1)
        self.column(mlp, prefix, "up_proj", i0, i1)
        self.row(mlp, prefix, "down_proj", i0, i1, reduce=reduce)
        return i1 - i0

    def moe(self, prefix: str, block: SparseMoeBlock) -> None:
        experts = block.experts
        if self.plan.expert_parallel:
            e0, e1 = _split(experts.num_experts, self.size, self.rank)
            block.experts = LocalExperts({e: experts[e] for e in range(e0, e1)}, experts.num_experts)
            self.plan.dropped_experts.update(f"{prefix}.experts.{e}" for e in range(experts.num_experts)
                                             if not e0 <= e < e1)
        else:
            for e, expert in enumerate(experts):
                self.mlp(f"{prefix}.experts.{e}", expert, expert.gate_proj.out_features, reduce=False)
        for name in ("shared_expert", "shared_experts"):
            shared = getattr(block, name)
            if isinstance(shared, ExpertMLP):
                self.mlp(f"{prefix}.{name}", shared, shared.gate_proj.out_features, reduce=False)
        block.reduce_results = True

    def vocab(self) -> None:
        model, n, r = self.model, self.size, self.rank
        vocab = model.spec.vocab_size
        rows = -(-vocab // n)
        start, stop = min(r * rows, vocab), min((r + 1) * rows, vocab)
        embed = model.model.embed_tokens
        model.model.embed_tokens = VocabParallelEmbedding.from_embedding(embed, rows, start)
        tied = model.lm_head.weight is embed.weight
        model.lm_head = ParallelLMHead.from_linear(model.lm_head, rows, vocab)
        if tied:
            model.lm_head.weight = model.model.embed_tokens.weight
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            self.plan.slices[name] = SliceSpec(0, start, stop, rows)


def shard_model(model: nn.Module, tp_rank: int, tp_size: int, expert_parallel: bool = False) -> ShardPlan:
    """Replace ``model``'s layers by rank ``tp_rank``'s shards of ``tp_size`` (in place); the plan is
    also stored as ``model.shard_plan``. Parameters are left uninitialized: load weights through
    :func:`shard_weights` afterwards."""
    if not isinstance(model, LlamaForCausalLM):
        raise ConfigError(f"tensor parallelism supports the decoder families of dockyard/models/llama.py; "
                          f"got {type(model).__name__}")
    spec = model.spec
    check_parallel_config(spec, tp_size, expert_parallel)
    plan = ShardPlan(tp_rank, tp_size, expert_parallel)
    plan.full_shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    model.shard_plan = plan
    if tp_size == 1:
        return plan
    sharder = _Sharder(model, plan)
    for prefix, module in list(model.named_modules()):
        if isinstance(module, GptOssMoeBlock):
            raise ConfigError(f"{spec.architecture}: tensor parallelism does not support gpt-oss's stacked "
                              "experts yet; use tensor_parallel_size=1")
        if isinstance(module, LlamaAttention):
            sharder.attention(prefix, module)
        elif isinstance(module, LlamaMLP):
            module.size = sharder.mlp(prefix, module, module.size, reduce=True)
        elif isinstance(module, SparseMoeBlock):
            sharder.moe(prefix, module)
        elif type(module).__name__ == "MLAAttention":
            raise ConfigError(f"{spec.architecture}: tensor parallelism does not support MLA yet")
    sharder.vocab()
    return plan


def lazy_cutter(model: nn.Module) -> Callable[[str, Any], torch.Tensor | None]:
    """For ``iter_safetensors(..., cut=)``: read only this rank's part of each checkpoint tensor
    (``get_slice``), skip other ranks' experts; tensors outside the plan are read whole."""
    plan: ShardPlan = model.shard_plan
    name_map = getattr(model, "map_checkpoint_name", None)

    def cut(ckpt_name: str, lazy: Any) -> torch.Tensor | None:
        name = name_map(ckpt_name) if name_map else ckpt_name
        if name is not None and not plan.holds(name):
            return None
        spec = plan.slices.get(name) if name is not None else None
        if spec is None:
            return lazy[:]
        index: list[slice] = [slice(None)] * len(lazy.get_shape())
        index[spec.dim] = slice(spec.start, spec.stop)
        part = lazy[tuple(index)]
        return SliceSpec(spec.dim, 0, spec.stop - spec.start, spec.size).take(part)

    return cut


def shard_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """The weight stream cut to this rank: each sharded tensor sliced by ``model.shard_plan``, other
    ranks' experts left out; names come out in the model's own naming."""
    plan: ShardPlan | None = getattr(model, "shard_plan", None)
    name_map = getattr(model, "map_checkpoint_name", None)
    for ckpt_name, tensor in weights:
        name = name_map(ckpt_name) if name_map else ckpt_name
        if plan is None or name is None:
            yield ckpt_name, tensor
            continue
        if not plan.holds(name):
            continue
        spec = plan.slices.get(name)
        yield name, (spec.take(tensor) if spec is not None else tensor)
