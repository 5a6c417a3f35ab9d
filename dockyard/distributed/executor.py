"""Rank 0's seam to the other tensor-parallel ranks: their processes and the one broadcast of each step.

Every rank runs the same ``ModelRunner.execute(inputs)`` on the same
:class:`~dockyard.engine.model_runner.StepInputs`: rank 0 (the process that made the ``LLM``) builds
them from the scheduler's batch, :meth:`Executor.broadcast_step` sends them, and the other ranks
(:func:`dockyard.distributed.worker.worker_main`) receive and run them, so that the collectives inside
the forward meet. Only rank 0 samples. A ``None`` step ends the workers' loops.

:class:`Executor` owns the worker processes. On one host it starts ranks 1..N-1 itself (``spawn``,
daemonic) without re-running the caller's main module in them (a script read on stdin, a notebook or a
script without an ``if __name__ == "__main__":`` guard all work: :func:`_bare_main_module`); under
torchrun every rank is started by torchrun and rank 0 only joins the env:// group. A worker that dies
during start-up fails rank 0 at once with its name and exit code (:meth:`WorkerGroup.watched`), not
after the collective's timeout. Shutdown (``LLM.shutdown``, garbage collection or interpreter exit)
ends the workers' loops, then terminates what is left.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing import connection as mp_connection
from types import ModuleType
from typing import Any

import torch

from dockyard.distributed import worker
from dockyard.distributed.parallel_state import (
    barrier,
    broadcast_object,
    destroy_parallel,
    init_parallel,
    launched_by_torchrun,
)
from dockyard.distributed.worker import WorkerConfig, rank_device
from dockyard.engine.model_runner import StepInputs
from dockyard.engine_args import EngineArgs
from dockyard.errors import DockyardError
from dockyard.ports import free_port

logger = logging.getLogger(__name__)

_EXIT_WAIT_S = 120.0  # after a start-up collective failed: how long a worker may take to be seen exiting


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
    """Rank 0's spawned workers (none under torchrun): started before the group forms, stopped by
    :meth:`close` (idempotent)."""

    def __init__(self, configs: list[WorkerConfig]) -> None:
        ctx = mp.get_context("spawn")
        # Looked up on the module when the group starts, so a test may replace the workers' entry.
        self.procs = [ctx.Process(target=worker.worker_main, args=(cfg,), daemon=True, name=f"dockyard-tp{cfg.rank}")
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


class Executor:
    """Rank 0 of a tensor-parallel group: forms it (:meth:`start`), tells the workers the KV cache's
    shape once loaded (:meth:`finish_start`), broadcasts every step (:meth:`broadcast_step`) and stops
    them (:meth:`shutdown`). ``device`` is rank 0's device."""

    def __init__(self, workers: WorkerGroup, device: torch.device) -> None:
        self.workers = workers
        self.device = device

    @classmethod
    def start(cls, engine_args: EngineArgs, device_type: str) -> Executor:
        """Join (or form) the tensor-parallel group of ``engine_args.tensor_parallel_size`` ranks as rank 0: under
        torchrun its env:// group, otherwise a group on a loopback TCP store with N - 1 spawned workers that load
        the same model from the same settings."""
        n = engine_args.tensor_parallel_size
        device = rank_device(device_type, 0)
        if launched_by_torchrun():
            if int(os.environ["WORLD_SIZE"]) != n or int(os.environ["RANK"]) != 0:
                raise DockyardError(f"under torchrun the LLM is made on rank 0 with tensor_parallel_size equal to "
                                    f"WORLD_SIZE={os.environ['WORLD_SIZE']} (got {n} on rank {os.environ['RANK']})")
            init_parallel(0, n, device, "env://")
            return cls(WorkerGroup([]), device)  # torchrun owns the processes; shutdown still ends their loops
        init_method = f"tcp://127.0.0.1:{free_port()}"
        threads = max(1, torch.get_num_threads() // n) if device.type == "cpu" else 0
        configs = [WorkerConfig(engine_args, device_type=device.type, rank=r, world_size=n, init_method=init_method,
                                num_threads=threads)
                   for r in range(1, n)]
        workers = WorkerGroup(configs)
        try:
            workers.watched("start-up", lambda: init_parallel(0, n, device, init_method))
        except BaseException:
            workers.close()
            raise
        return cls(workers, device)

    def finish_start(self, num_blocks: int, block_size: int) -> None:
        """Send the KV cache's shape (rank 0 sized it) and wait until every worker has loaded its shard."""
        self.workers.watched("model loading", lambda: (broadcast_object((num_blocks, block_size)), barrier()))
        self.workers.ready = True

    def broadcast_step(self, inputs: StepInputs) -> None:
        """Send one step's inputs to the other ranks (as host tensors; each moves them to its device)."""
        broadcast_object(inputs.to(torch.device("cpu")))

    def shutdown(self) -> None:
        """Stop the workers and leave the group (idempotent)."""
        self.workers.close()
