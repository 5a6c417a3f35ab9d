"""Ranks 1..N-1 of a tensor-parallel ``LLM``, and rank 0's handle on them.

Rank 0 (the process that made the ``LLM``) runs the scheduler and the sampler; every other rank
builds the same model shard, allocates its own KV cache (its KV heads, rank 0's block count) and
then, each step, receives rank 0's flat inputs (``ModelRunner.step_message``) and runs the same
forward, so that their collectives meet. A ``None`` message ends the loop.

On one host the engine starts the workers itself (``spawn``, daemonic) without re-running the
caller's main module in them (a script read on stdin, a notebook or a script without an
``if __name__ == "__main__":`` guard all work: :func:`_bare_main_module`); past one host every rank
is started by torchrun and :func:`run_torchrun_rank` is the entry of ranks 1..N-1 (docs/ARCHITECTURE.md,
"Parallelism").
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing import connection as mp_connection
from types import ModuleType
from typing import Any

import torch

from dockyard.distributed.parallel_state import barrier, broadcast_object, destroy_parallel, init_parallel
from dockyard.engine.model_runner import ModelRunner
from dockyard.errors import DockyardError
from dockyard.model_source import resolve_model

logger = logging.getLogger(__name__)

_EXIT_WAIT_S = 120.0  # after a start-up collective failed: how long a worker may take to be seen exiting


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker needs to build rank ``rank``'s shard of the model rank 0 built."""

    model: str | None
    load_format: str
    dtype: str | torch.dtype  # as given to LLM ('auto' resolves per rank exactly as on rank 0)
    device_type: str
    seed: int
    rank: int
    world_size: int
    init_method: str | None
    expert_parallel: bool
    num_threads: int = 0  # 0: leave torch's default


def rank_device(device_type: str, rank: int) -> torch.device:
    """The device of ``rank``: its own GPU on CUDA (local rank = rank on one host), else the CPU."""
    if device_type == "cuda":
        import os

        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    return torch.device(device_type)


def worker_main(cfg: WorkerConfig) -> None:
    """Join the group, build and load this rank's shard, then run rank 0's steps until told to stop."""
    # engine/llm.py imports this module: the cycle the executor refactor removes
    from dockyard.engine.llm import load_model, resolve_dtype

    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    device = rank_device(cfg.device_type, cfg.rank)
    init_parallel(cfg.rank, cfg.world_size, device, cfg.init_method)
    try:
        source = resolve_model(cfg.model, cfg.load_format)
        dtype = resolve_dtype(cfg.dtype, source.spec.torch_dtype, device)
        model, _ = load_model(source, device, dtype, cfg.seed, cfg.rank, cfg.world_size, cfg.expert_parallel)
        num_blocks, block_size = broadcast_object()
        runner = ModelRunner(model, source.spec, num_blocks, block_size, device, dtype, enforce_eager=True)
        barrier()  # rank 0 waits here, watching for workers that died loading
        while (msg := broadcast_object()) is not None:
            runner.execute_message(msg)
    finally:
        destroy_parallel()


def run_torchrun_worker(model: str | None, *, load_format: str = "auto", dtype: str = "auto",
                        device: str = "auto", seed: int = 0, expert_parallel: bool = False) -> None:
    """Under torchrun, ranks ≥ 1: :func:`worker_main` with the group from env:// (rank 0 builds its
    ``LLM(model, tensor_parallel_size=WORLD_SIZE, ...)`` as usual, which joins the same group)."""
    import os

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device_type = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device).type
    worker_main(WorkerConfig(model=model, load_format=load_format, dtype=dtype, device_type=device_type, seed=seed,
                             rank=rank, world_size=world, init_method="env://", expert_parallel=expert_parallel))


@contextlib.contextmanager
def _bare_main_module() -> Iterator[None]:
    """While spawned children start, let them see a main module with no file and no module name.

    ``spawn`` re-runs the parent's ``__main__`` in each child (by path, or by module name) before
    unpickling the target. The workers need nothing from it (their target and config are dockyard's),
    and it may not be runnable again: ``<stdin>`` is no file, a notebook's main is the kernel, and a
    script without a ``__main__`` guard would build another LLM in every worker. The preparation data
    is read synchronously in ``Process.start``, so the swap lasts only that call."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


class WorkerGroup:
    """Rank 0's spawned workers: started before the group forms, stopped by :meth:`close` (idempotent,
    also run at garbage collection and interpreter exit through the LLM's finalizer)."""

    def __init__(self, configs: list[WorkerConfig]) -> None:
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=worker_main, args=(cfg,), daemon=True, name=f"dockyard-tp{cfg.rank}")
                      for cfg in configs]
        with _bare_main_module():
            for p in self.procs:
                p.start()
        self.ready = False  # set once the group formed and the workers wait for steps
        self.closed = False

    def watched(self, what: str, fn: Callable[[], Any]) -> Any:
        """``fn()`` (a blocking start-up step that needs every worker), failing at once, with the worker's
        exit code, when a worker dies instead of waiting for the collective's timeout."""
        result: list[Any] = []
        error: list[BaseException] = []

        def run() -> None:
            try:
                result.append(fn())
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                error.append(exc)

        def check_workers(cause: BaseException | None = None) -> None:
            dead = [p for p in self.procs if not p.is_alive()]
            if dead:
                p = dead[0]
                raise DockyardError(f"tensor-parallel worker {p.name} exited (code {p.exitcode}) during {what}; "
                                    "its error is in the log above") from cause

        thread = threading.Thread(target=run, daemon=True, name=f"dockyard-tp-{what}")
        thread.start()
        while thread.is_alive():
            thread.join(timeout=0.2)
            if thread.is_alive():
                check_workers()
        if error:
            # A peer's death shows up here first, as a collective error, possibly before the process
            # has finished exiting: wait for an exit (woken by the process sentinels, not polled), so
            # the worker is named however loaded the machine is. The bound only ends the wait when
            # the error had another cause and every worker is still alive.
            deadline = time.monotonic() + _EXIT_WAIT_S
            while all(p.is_alive() for p in self.procs) and time.monotonic() < deadline:
                mp_connection.wait([p.sentinel for p in self.procs], timeout=deadline - time.monotonic())
            check_workers(error[0])
            raise error[0]
        return result[0] if result else None

    def close(self) -> None:
        """Tell the workers to stop (when they are in the step loop), wait briefly, then terminate."""
        if self.closed:
            return
        self.closed = True
        try:
            if self.ready and all(p.is_alive() for p in self.procs):
                broadcast_object(None)
        except Exception as exc:  # noqa: BLE001 - shutting down: a broken group only means they are gone
            logger.debug("tensor-parallel shutdown broadcast failed: %s", exc)
        for p in self.procs:
            p.join(timeout=10 if self.ready else 0.5)  # before the step loop they have nothing to finish
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        destroy_parallel()
