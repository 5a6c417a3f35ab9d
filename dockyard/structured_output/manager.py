"""StructuredOutputManager: grammar compilation off the step, cached; matchers for the engine's samples.

The engine owns one manager. ``compile(params)`` returns a future at once: the compilation runs on a
small thread pool (xgrammar releases the GIL while it compiles), so a request whose grammar is still
compiling waits outside the scheduler while the batch goes on. Futures are cached by the constraint's
canonical text (:meth:`StructuredOutputsParams.cache_key`), so equal constraints compile once, and a
request the server already checked finds its grammar ready. The backend (and the xgrammar import, which
takes seconds) is made on the first structured request, in the pool's thread.

:func:`allowed_token_mask` turns the matchers of a step's rows into the sampler's per-row mask: each
matcher fills its row of an int32 bitmask on the host (the only per-row host work), which is copied to the
logits' device once and unpacked there into a ``[B, V]`` bool mask; several rows are filled at once on
xgrammar's own threads.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol

import torch

from dockyard.errors import InvalidRequestError
from dockyard.structured_output.params import PARAM, StructuredOutputsParams
from dockyard.structured_output.reasoning_gate import ReasoningGate

if TYPE_CHECKING:
    from dockyard.structured_output.backend import CompiledGrammar, GrammarBackend, GrammarMatcher

CACHE_SIZE = 256  # compiled grammars kept (least recently used dropped first)
COMPILE_THREADS = 2


class RowMatcher(Protocol):
    """What :func:`allowed_token_mask` needs of the rows' matchers (``backend.GrammarMatcher``)."""

    @property
    def active(self) -> bool: ...

    @classmethod
    def fill_rows(cls, matchers: list[Any], bitmask: torch.Tensor, rows: list[int]) -> None: ...


def _bit_values(device: torch.device) -> torch.Tensor:
    """[32] int32: 1 << i (bit 31 as the int32 bit pattern)."""
    return torch.tensor([1 << i if i < 31 else -(1 << 31) for i in range(32)], dtype=torch.int32, device=device)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] bool from a [B, ceil(V/32)] int32 token bitmask (bit ``t % 32`` of word ``t // 32``)."""
    bits = torch.bitwise_and(bitmask.unsqueeze(-1), _bit_values(bitmask.device)) != 0
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size]


def allowed_token_mask(matchers: Sequence[RowMatcher | None], vocab_size: int, device: torch.device | str
                       ) -> torch.Tensor | None:
    """[B, V] bool on ``device``, True where row ``i``'s matcher allows a token (rows without one, or whose
    matcher is not active yet (still reasoning), allow every token); None when no row is constrained."""
    rows = [row for row, m in enumerate(matchers) if m is not None and m.active]
    if not rows:
        return None
    bitmask = torch.full((len(matchers), (vocab_size + 31) // 32), -1, dtype=torch.int32)
    first = matchers[rows[0]]
    assert first is not None
    type(first).fill_rows([matchers[row] for row in rows], bitmask, rows)
    return unpack_bitmask(bitmask.to(device, non_blocking=True), vocab_size)


class StructuredOutputManager:
    """Compiles constraints for one model's tokenizer (cached, on a thread pool) and makes matchers."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self._backend: GrammarBackend | None = None
        self._lock = threading.Lock()  # the cache (compile() is called from the server's event loop too)
        self._backend_lock = threading.Lock()  # making the backend, which takes seconds
        self._cache: OrderedDict[str, Future[CompiledGrammar]] = OrderedDict()
        self._pool: ThreadPoolExecutor | None = None

    def compile(self, params: StructuredOutputsParams) -> Future[CompiledGrammar]:
        """A future of the compiled grammar of ``params`` (its exception: InvalidRequestError naming the
        field). Thread-safe; equal constraints share one compilation."""
        if self.tokenizer is None:
            raise InvalidRequestError(f"{PARAM} needs the model's tokenizer, and this model was loaded without "
                                      "one; load it with its tokenizer files", param=PARAM)
        key = params.cache_key()
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            if self._pool is None:
                self._pool = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="dockyard-grammar")
            future = self._pool.submit(self._compile, params)
            self._cache[key] = future
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return future

    def backend(self) -> GrammarBackend:
        """The backend for this tokenizer, made on first use (on a compile thread: it takes seconds)."""
        with self._backend_lock:
            if self._backend is None:
                try:
                    # xgrammar is an optional dependency (the structured extra), loaded by the first structured request
                    from dockyard.structured_output.backend import GrammarBackend

                    self._backend = GrammarBackend(self.tokenizer, self.vocab_size, self.eos_token_ids)
                except ImportError as exc:
                    raise InvalidRequestError(f"{PARAM} needs the xgrammar package ({exc}); pip install xgrammar",
                                              param=PARAM) from exc
                except (RuntimeError, ValueError, TypeError) as exc:
                    raise InvalidRequestError(f"{PARAM} is not available for this model: the grammar engine cannot "
                                              f"read its tokenizer ({exc})", param=PARAM) from exc
            return self._backend

    def _compile(self, params: StructuredOutputsParams) -> CompiledGrammar:
        return self.backend().compile(params)

    def matcher(self, compiled: CompiledGrammar, params: StructuredOutputsParams | None = None,
                prompt_token_ids: Sequence[int] = ()) -> GrammarMatcher:
        """A fresh matcher at the start of ``compiled`` (one per sample); when ``params`` names the end of a
        reasoning section, the grammar starts after it (see ``reasoning_gate``)."""
        # xgrammar is an optional dependency (the structured extra); loaded already: a compiled grammar came from it
        from dockyard.structured_output.backend import GrammarMatcher

        gate = None
        if params is not None and params.reasoning_end_token_ids:
            gate = ReasoningGate(params.reasoning_end_token_ids, params.reasoning_start_token_ids, prompt_token_ids)
        return GrammarMatcher(compiled, gate)
