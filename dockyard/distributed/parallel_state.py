"""The tensor-parallel process group of this process and its collectives.

One group per process (the default ``torch.distributed`` group): every rank of it is a
tensor-parallel rank; with expert parallelism the same ranks hold the experts. The data-plane
collectives run on the group's backend (gloo on CPU, NCCL on CUDA); step inputs, which are small
Python objects, are broadcast over a gloo group in both cases, so they never touch the GPU.

Without an initialized group (``tensor_parallel_size=1``) the collectives are identities.

:class:`ParallelConfig` is what one rank holds of a model: its rank, the world size, whether MoE
experts are placed whole (expert parallelism), and the attention heads it computes. The head split
is decided here once; the modules shard themselves from it and the KV cache is sized from it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from dockyard.errors import DockyardError
from dockyard.spec import ModelSpec


@dataclass
class ParallelState:
    """Where this process sits: its rank, the world size, and the groups it talks over."""

    rank: int
    world_size: int
    backend: str
    cpu_group: Any  # gloo group for object broadcasts (the default group itself when it is gloo)


_STATE: ParallelState | None = None


def even_split(total: int, size: int, rank: int) -> tuple[int, int]:
    """Rank ``rank``'s ``[start, stop)`` of ``total`` items split evenly over ``size`` ranks."""
    per = total // size
    return rank * per, (rank + 1) * per


@dataclass(frozen=True)
class ParallelConfig:
    """One rank's share of a model under tensor (and expert) parallelism.

    ``heads`` / ``kv_heads``: the ``[start, stop)`` q and KV heads this rank computes. q heads are
    split evenly; KV heads too when K ≥ N, else KV head ``r // (N/K)`` is replicated on N/K ranks,
    exactly the KV head the rank's q heads attend with (q head h uses KV head ``h // (H/K)``)."""

    rank: int
    size: int
    expert_parallel: bool
    heads: tuple[int, int]
    kv_heads: tuple[int, int]

    @classmethod
    def for_rank(cls, spec: ModelSpec, rank: int = 0, size: int = 1,
                 expert_parallel: bool = False) -> ParallelConfig:
        """Rank ``rank`` of ``size`` for ``spec`` (sizes must divide: ``sharding.check_parallel_config``)."""
        kv = spec.num_key_value_heads
        if kv >= size:
            kv_heads = even_split(kv, size, rank)
        else:
            first = rank // (size // kv)
            kv_heads = (first, first + 1)
        return cls(rank, size, expert_parallel, even_split(spec.num_attention_heads, size, rank), kv_heads)

    @property
    def num_heads(self) -> int:
        """q heads on this rank."""
        return self.heads[1] - self.heads[0]

    @property
    def num_kv_heads(self) -> int:
        """KV heads on this rank (and in its KV cache)."""
        return self.kv_heads[1] - self.kv_heads[0]

    def split(self, total: int) -> tuple[int, int]:
        """This rank's ``[start, stop)`` of ``total`` evenly split items (intermediate features, experts)."""
        return even_split(total, self.size, self.rank)

    def kv_cache_layout(self, spec: ModelSpec) -> tuple[int, int, int]:
        """(entries, heads, dim) of this rank's KV cache per token and layer: its own KV heads (MLA's one
        latent is not split)."""
        entries, heads, dim = spec.kv_cache_layout
        return (entries, heads if spec.mla is not None else self.num_kv_heads, dim)


def backend_for(device: torch.device | str) -> str:
    """The collective backend for ``device``: nccl on CUDA, gloo otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"



def launched_by_torchrun() -> bool:
    """Whether this process was started by torchrun (its env:// variables are set)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_parallel(rank: int, world_size: int, device: torch.device | str, init_method: str | None = None,
                  timeout_s: float = 600.0) -> ParallelState:
    """Join the tensor-parallel group as ``rank`` of ``world_size``.

    ``init_method``: ``tcp://127.0.0.1:PORT`` for the engine's own spawn, ``env://`` (the default)
    when torchrun set MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE.
    """
    global _STATE
    if _STATE is not None:
        raise DockyardError("this process already belongs to a tensor-parallel group; shut the other LLM down "
                            "first (one tensor-parallel LLM per process)")
    backend = backend_for(device)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        kwargs["device_id"] = dev
    dist.init_process_group(backend, init_method=init_method or "env://", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s), **kwargs)
    cpu_group = dist.group.WORLD if backend == "gloo" else dist.new_group(backend="gloo")
    _STATE = ParallelState(rank, world_size, backend, cpu_group)
    return _STATE


def destroy_parallel() -> None:
    """Leave the group (no-op when this process is in none)."""
    global _STATE
    if _STATE is None:
        return
    _STATE = None
    if dist.is_initialized():
        dist.destroy_process_group()


def get_tp_rank() -> int:
    """This process's tensor-parallel rank (0 when not parallel)."""
    return 0 if _STATE is None else _STATE.rank


def get_tp_size() -> int:
    """The tensor-parallel world size (1 when not parallel)."""
    return 1 if _STATE is None else _STATE.world_size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over the ranks (in place; returned for chaining)."""
    if get_tp_size() == 1:
        return x
    dist.all_reduce(x)
    return x


def all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The ranks' ``x`` (equal shapes) concatenated along ``dim`` in rank order."""
    size = get_tp_size()
    if size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=dim)


def barrier() -> None:
    """Wait for every rank (over the gloo group)."""
    if _STATE is not None and _STATE.world_size > 1:
        dist.barrier(group=_STATE.cpu_group)


def broadcast_object(obj: Any = None) -> Any:
    """Rank 0's ``obj`` on every rank (pickled over the gloo group)."""
    if _STATE is None or _STATE.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_STATE.cpu_group)
    return box[0]
