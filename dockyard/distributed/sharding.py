"""Cut a built dockyard model in place for tensor-parallel rank r of N, and slice its weights to match.

Each shardable module knows how it is cut: it has a ``shard(sharder, prefix)`` method, written
beside its class, that replaces its projections by their parallel versions through the
:class:`Sharder` given (which records each sharded parameter's slice) and updates its own sizes.
:func:`shard_model` calls every such method of a model once. What the modules keep (vLLM's layout):

* attention (``models/llama.py``): the q and KV heads of :class:`~.parallel_state.ParallelConfig`
  (q/k/v column-parallel, o_proj row-parallel);
* dense MLP (``models/llama.py``): gate/up column-parallel, down row-parallel (intermediate split);
* MoE block (``ops/moe.py``), tensor-parallel: every expert's (and the shared expert's) intermediate
  split as the MLP; the block sums its experts' partial outputs and all-reduces once;
* MoE block, expert-parallel: experts ``[r·E/N, (r+1)·E/N)`` whole on rank r; the router is replicated,
  so each rank computes the tokens routed to its own experts and one all-reduce combines them (shared
  experts are split as in tensor parallelism);
* embedding and LM head (the ``ForCausalLM`` class): a vocabulary slice each (:mod:`.layers`).

Norms, routers and rotary tables are replicated. A module that cannot be split yet says so in its
``shard`` (a ``ConfigError``). :func:`shard_model` records a :class:`ShardPlan` on the model
(``model.shard_plan``): the rank's :class:`~.parallel_state.ParallelConfig`, each sharded parameter's
slice of the full checkpoint tensor, the full shapes (dummy weights are drawn at the full shape, then
sliced, so any N gives the same model) and the experts this rank does not hold; :func:`shard_weights`
applies it to a weight stream.
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
from dockyard.distributed.parallel_state import ParallelConfig
from dockyard.errors import ConfigError
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

    parallel: ParallelConfig
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


class Sharder:
    """Replaces the modules of one model (of ``spec``) by their shards for one rank (``parallel``),
    recording in ``plan`` which slice of each full checkpoint tensor every sharded parameter holds."""

    def __init__(self, spec: ModelSpec, plan: ShardPlan) -> None:
        self.spec = spec
        self.plan = plan
        self.parallel = plan.parallel

    def column(self, parent: nn.Module, prefix: str, attr: str, start: int, stop: int) -> None:
        """``parent.<attr>`` keeps output features ``[start, stop)`` (a :class:`ColumnParallelLinear`)."""
        old = getattr(parent, attr)
        setattr(parent, attr, ColumnParallelLinear.from_linear(old, stop - start))
        self.plan.slices[f"{prefix}.{attr}.weight"] = SliceSpec(0, start, stop, stop - start)
        if old.bias is not None:
            self.plan.slices[f"{prefix}.{attr}.bias"] = SliceSpec(0, start, stop, stop - start)

    def row(self, parent: nn.Module, prefix: str, attr: str, start: int, stop: int, reduce: bool) -> None:
        """``parent.<attr>`` keeps input features ``[start, stop)`` (a :class:`RowParallelLinear`)."""
        old = getattr(parent, attr)
        setattr(parent, attr, RowParallelLinear.from_linear(old, stop - start, reduce=reduce))
        self.plan.slices[f"{prefix}.{attr}.weight"] = SliceSpec(1, start, stop, stop - start)

    def gated_mlp(self, mlp: nn.Module, prefix: str, size: int, reduce: bool) -> int:
        """gate/up column-parallel, down row-parallel over the ``size`` intermediate features; returns the
        rank's intermediate size. ``reduce=False`` leaves the sum over ranks to the caller (an MoE block)."""
        if hasattr(mlp, "gate_up_proj"):
            raise ConfigError("tensor parallelism does not support fused gate_up_proj checkpoints (Phi-3) yet")
        i0, i1 = self.parallel.split(size)
        self.column(mlp, prefix, "gate_proj", i0, i1)
        self.column(mlp, prefix, "up_proj", i0, i1)
        self.row(mlp, prefix, "down_proj", i0, i1, reduce=reduce)
        return i1 - i0

    def drop_experts(self, prefix: str, total: int, held: range) -> None:
        """Record that experts ``prefix.experts.{e}`` outside ``held`` live on other ranks."""
        self.plan.dropped_experts.update(f"{prefix}.experts.{e}" for e in range(total) if e not in held)

    def vocab(self, model: nn.Module, embed_attr: str = "model.embed_tokens", head_attr: str = "lm_head") -> None:
        """The embedding and the LM head keep a vocabulary slice each of ``ceil(vocab / N)`` rows (a tied
        head keeps sharing the embedding's)."""
        vocab, n, r = self.spec.vocab_size, self.parallel.size, self.parallel.rank
        rows = -(-vocab // n)
        start, stop = min(r * rows, vocab), min((r + 1) * rows, vocab)
        owner_path, _, embed_name = embed_attr.rpartition(".")
        owner = model.get_submodule(owner_path)
        embed = getattr(owner, embed_name)
        setattr(owner, embed_name, VocabParallelEmbedding.from_embedding(embed, rows, start))
        head = getattr(model, head_attr)
        tied = head.weight is embed.weight
        setattr(model, head_attr, ParallelLMHead.from_linear(head, rows, vocab))
        if tied:
            getattr(model, head_attr).weight = getattr(owner, embed_name).weight
        for name in (f"{embed_attr}.weight", f"{head_attr}.weight"):
            self.plan.slices[name] = SliceSpec(0, start, stop, rows)


def shard_model(model: nn.Module, tp_rank: int, tp_size: int, expert_parallel: bool = False) -> ShardPlan:
    """Replace ``model``'s layers by rank ``tp_rank``'s shards of ``tp_size`` (in place), each module
    through its own ``shard`` method; the plan is also stored as ``model.shard_plan``. Parameters are
    left uninitialized: load weights through :func:`shard_weights` afterwards."""
    if getattr(type(model), "shard", None) is None:
        raise ConfigError(f"tensor parallelism supports the decoder families of dockyard/models/llama.py; "
                          f"got {type(model).__name__}")
    spec = model.spec
    check_parallel_config(spec, tp_size, expert_parallel)
    plan = ShardPlan(ParallelConfig.for_rank(spec, tp_rank, tp_size, expert_parallel))
    plan.full_shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    model.shard_plan = plan
    if tp_size == 1:
        return plan
    sharder = Sharder(spec, plan)
    for prefix, module in list(model.named_modules()):
        shard = getattr(type(module), "shard", None)
        if shard is not None:
            shard(module, sharder, prefix)
    return plan


def parallel_config_of(model: nn.Module, spec: ModelSpec) -> ParallelConfig:
    """The parallel config ``model`` (of ``spec``) was sharded with (all of it on one rank if it was not)."""
    plan: ShardPlan | None = getattr(model, "shard_plan", None)
    return plan.parallel if plan is not None else ParallelConfig.for_rank(spec)


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
