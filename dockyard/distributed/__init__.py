"""Tensor and expert parallelism over ``torch.distributed``.

* :mod:`.parallel_state` — the process group (gloo on CPU, NCCL on CUDA; a TCP store on loopback
  for the engine's own single-host spawn, ``env://`` under torchrun), the collectives the model
  calls (``all_reduce``, ``all_gather``) plus the object broadcast the engine uses for step inputs,
  and ``ParallelConfig``: what one rank holds (its heads, experts).
* :mod:`.layers` — column/row-parallel linears and the vocab-parallel embedding and LM head.
* :mod:`.sharding` — cuts a built model in place for one rank (each module through its own ``shard``
  method) and slices its weights to match.
* :mod:`.executor` — rank 0's side: starts and stops the other ranks, broadcasts each step's inputs.
* :mod:`.worker` — the loop of ranks 1..N-1: build the same shard, then run every step rank 0 sends.
"""

from dockyard.distributed.parallel_state import (
    all_gather,
    all_reduce,
    get_tp_rank,
    get_tp_size,
)

__all__ = ["all_gather", "all_reduce", "get_tp_rank", "get_tp_size"]
