"""AsyncLLM: the engine driven from asyncio, for the HTTP server.

One background task runs the engine loop; each step runs in a worker thread so the event loop
keeps serving connections meanwhile. When there is no work the task sleeps on an event (no
busy-wait). ``generate`` adds a request and yields its outputs as they grow; closing the
iterator early (a client that went away) aborts the request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator

from dockyard.engine.llm_engine import LLMEngine
from dockyard.engine.outputs import RequestOutput
from dockyard.engine.sampling_params import SamplingParams
from dockyard.errors import DockyardError

logger = logging.getLogger(__name__)


class EngineDeadError(DockyardError):
    """The engine loop failed; no request can be served any more."""


class AsyncLLM:
    """Streams request outputs from an :class:`LLMEngine` stepping in the background."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._lock = asyncio.Lock()  # the engine is touched by one coroutine (or its step thread) at a time
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._ids = itertools.count()
        self.dead: BaseException | None = None

    def start(self) -> None:
        """Start the loop task on the running event loop (idempotent)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="dockyard-engine")

    async def shutdown(self) -> None:
        """Abort everything in flight and stop the loop."""
        async with self._lock:
            for rid in list(self.engine.requests):
                self.engine.abort_request(rid)
        for queue in self._queues.values():
            queue.put_nowait(EngineDeadError("the server is shutting down"))
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _loop(self) -> None:
        while True:
            if not self.engine.has_unfinished_requests():
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                async with self._lock:
                    outputs = await asyncio.to_thread(self.engine.step)
            except Exception as exc:  # a bug: fail every waiter loudly rather than hang them
                logger.exception("engine step failed")
                self.dead = exc
                for queue in self._queues.values():
                    queue.put_nowait(EngineDeadError(f"the engine failed: {exc!r}"))
                return
            for out in outputs:
                queue = self._queues.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(out)

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str | None = None, prompt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its RequestOutput after every step that changed it."""
        if self.dead is not None:
            raise EngineDeadError(f"the engine failed earlier: {self.dead!r}")
        self.start()
        rid = request_id or f"req-{next(self._ids)}"
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        async with self._lock:
            self.engine.add_request(rid, prompt_token_ids, params, prompt=prompt)  # raises if invalid
            self._queues[rid] = queue
        self._wakeup.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(rid, None)
            if not finished:
                await self.abort(rid)

    async def abort(self, request_id: str) -> None:
        """Abort a request; its KV blocks are free when this returns."""
        async with self._lock:
            self.engine.abort_request(request_id)
