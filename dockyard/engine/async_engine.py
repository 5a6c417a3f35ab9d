"""AsyncLLM: the engine driven from asyncio, for the HTTP server.

One background task runs the engine loop; each step runs in a worker thread so the event loop
keeps serving connections meanwhile. When there is no work the task sleeps on an event (no
busy-wait). ``add_request`` queues a request at once (raising if it is invalid) and returns a
:class:`RequestStream` of its outputs; ``generate`` wraps the same as an async generator.
Closing a stream before its request finished (a client that went away) aborts the request and
frees its KV blocks. The abort needs no ``await``, so it also happens from code that is being
cancelled: if a step is running in its thread right then, the abort is applied as soon as that
step returns, before the next one starts.

A request that fails alone (``RequestOutput.error``, see ``llm_engine``) ends its stream with
:class:`~dockyard.errors.RequestFailedError`. An exception escaping ``engine.step`` marks the engine
dead: it is logged, every stream ends with :class:`EngineDeadError`, later requests are refused,
and ``on_dead`` is called (the server then stops with a non-zero exit so a supervisor restarts it).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Callable

from dockyard.engine.llm_engine import LLMEngine
from dockyard.engine.outputs import RequestOutput
from dockyard.engine.sampling_params import SamplingParams
from dockyard.errors import DockyardError, RequestFailedError

logger = logging.getLogger(__name__)


class EngineDeadError(DockyardError):
    """The engine loop failed or was shut down; no request can be served any more."""


class RequestStream:
    """The outputs of one request, as an async iterator; ``close()`` before the end aborts it."""

    def __init__(self, owner: AsyncLLM, request_id: str,
                 queue: asyncio.Queue[RequestOutput | BaseException]) -> None:
        self.request_id = request_id
        self._owner = owner
        self._queue = queue
        self._finished = False  # the engine reported the request finished
        self._closed = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._finished or self._closed:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        if item.finished:
            self._finished = True
            self.close()
            if item.error is not None:
                raise RequestFailedError(self.request_id, item.error)
        return item

    def close(self) -> None:
        """Stop listening; abort the request if it has not finished. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._owner._queues.pop(self.request_id, None)
        if not self._finished:
            self._owner.abort_nowait(self.request_id)

    async def aclose(self) -> None:
        """Like :meth:`close`, then wait until the abort has been applied."""
        self.close()
        if self.request_id in self._owner._pending_aborts:
            async with self._owner._lock:  # the loop applies pending aborts before it lets go of the lock
                pass


class AsyncLLM:
    """Streams request outputs from an :class:`LLMEngine` stepping in the background."""

    def __init__(self, engine: LLMEngine, on_dead: Callable[[BaseException], None] | None = None) -> None:
        self.engine = engine
        self.on_dead = on_dead
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        # The engine is touched by one coroutine at a time, or by the step thread while the loop holds this.
        self._lock = asyncio.Lock()
        self._pending_aborts: set[str] = set()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._ids = itertools.count()
        self._closed = False
        self.dead: BaseException | None = None

    def start(self) -> None:
        """Start the loop task on the running event loop (idempotent)."""
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="dockyard-engine")

    async def shutdown(self) -> None:
        """Abort everything in flight, fail its streams, and stop the loop (idempotent)."""
        self._closed = True
        async with self._lock:
            self._apply_pending_aborts()
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
                    self._apply_pending_aborts()
                    outputs = await asyncio.to_thread(self.engine.step)
                    self._apply_pending_aborts()
            except Exception as exc:  # shared state is broken: fail every waiter loudly rather than hang them
                logger.exception("engine step failed: the engine is dead, every request in flight fails")
                self.dead = exc
                for queue in self._queues.values():
                    queue.put_nowait(EngineDeadError("the engine failed; the server must be restarted"))
                if self.on_dead is not None:
                    self.on_dead(exc)
                return
            for out in outputs:
                queue = self._queues.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(out)

    def _apply_pending_aborts(self) -> None:
        while self._pending_aborts:
            self.engine.abort_request(self._pending_aborts.pop())

    async def add_request(self, prompt_token_ids: list[int], params: SamplingParams,
                          request_id: str | None = None, prompt: str | None = None) -> RequestStream:
        """Queue a request now (InvalidRequestError if it can never run) and return its output stream."""
        if self.dead is not None:
            raise EngineDeadError("the engine failed earlier; the server must be restarted")
        if self._closed:
            raise EngineDeadError("the server is shutting down")
        self.start()
        rid = request_id or f"req-{next(self._ids)}"
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        async with self._lock:
            self.engine.add_request(rid, prompt_token_ids, params, prompt=prompt)  # raises if invalid
            self._queues[rid] = queue
        self._wakeup.set()
        return RequestStream(self, rid, queue)

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str | None = None, prompt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its RequestOutput after every step that changed it."""
        stream = await self.add_request(prompt_token_ids, params, request_id, prompt)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    def abort_nowait(self, request_id: str) -> None:
        """Abort a request without waiting: now if no step is running, else right after the current step."""
        if self._lock.locked():
            self._pending_aborts.add(request_id)
        else:  # no step thread is running and we are on the loop's thread: nobody else touches the engine
            self.engine.abort_request(request_id)

    async def abort(self, request_id: str) -> None:
        """Abort a request; its KV blocks are free when this returns."""
        async with self._lock:
            self.engine.abort_request(request_id)
