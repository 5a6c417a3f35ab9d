"""Ranks 1..N-1 of a tensor-parallel ``LLM``: build the same model shard, then run every step rank 0 sends.

A worker joins the group, loads its shard (:func:`dockyard.model_loader.load_model`), allocates its own
KV cache (its KV heads, rank 0's block count) and then, each step, receives rank 0's
:class:`~dockyard.engine.model_runner.StepInputs` and runs ``ModelRunner.execute`` on them: the same
call rank 0 makes, so their collectives meet. A ``None`` step ends the loop. Rank 0's side (starting
these processes, sending the steps) is :mod:`dockyard.distributed.executor`.

On one host the executor spawns the workers (:func:`worker_main`); past one host every rank is started
by torchrun and :func:`run_torchrun_worker` is the entry of ranks 1..N-1 (docs/ARCHITECTURE.md,
"Parallelism").
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from dockyard.distributed.parallel_state import barrier, broadcast_object, destroy_parallel, init_parallel
from dockyard.engine.model_runner import ModelRunner
from dockyard.engine_args import EngineArgs, model_source_kwargs
from dockyard.model_loader import load_model, resolve_dtype
from dockyard.model_source import resolve_model


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker needs to build rank ``rank``'s shard of the model rank 0 built: the ``LLM``'s own settings
    (``engine_args``: its model, load format, dtype, seed, expert parallelism and model source; the model is the
    snapshot rank 0 resolved when it named a repo id) and its place in the group."""

    engine_args: EngineArgs
    device_type: str
    rank: int
    world_size: int
    init_method: str | None
    num_threads: int = 0  # 0: leave torch's default


def rank_device(device_type: str, rank: int) -> torch.device:
    """The device of ``rank``: its own GPU on CUDA (local rank = rank on one host), else the CPU."""
    if device_type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    return torch.device(device_type)


def worker_main(cfg: WorkerConfig) -> None:
    """Join the group, build and load this rank's shard, then run rank 0's steps until told to stop."""
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    device = rank_device(cfg.device_type, cfg.rank)
    init_parallel(cfg.rank, cfg.world_size, device, cfg.init_method)
    try:
        # Tensor parallelism runs native families only (LLM refuses the generic path before any worker starts):
        # never re-decided here, where a trimmed trial config could read as one with unknown keys.
        args = cfg.engine_args
        source = resolve_model(args.model, args.load_format, **{**model_source_kwargs(args), "model_impl": "dockyard"})
        dtype = resolve_dtype(args.dtype, source.spec.torch_dtype, device)
        model, _ = load_model(source, device, dtype, args.seed, cfg.rank, cfg.world_size, args.enable_expert_parallel)
        num_blocks, block_size = broadcast_object()
        runner = ModelRunner(model, source.spec, num_blocks, block_size, device, dtype, enforce_eager=True)
        barrier()  # rank 0 waits here, watching for workers that died loading
        while (inputs := broadcast_object()) is not None:
            runner.execute(inputs.to(device))
    finally:
        destroy_parallel()


def run_torchrun_worker(engine_args: EngineArgs) -> None:
    """Under torchrun, ranks ≥ 1: :func:`worker_main` with the group from env:// (rank 0 builds its
    ``LLM(model, tensor_parallel_size=WORLD_SIZE, ...)`` from the same settings, which joins the same group)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = engine_args.device
    device_type = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device).type
    worker_main(WorkerConfig(engine_args, device_type=device_type, rank=rank, world_size=world,
                             init_method="env://"))
