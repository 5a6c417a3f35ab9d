"""Fixtures shared across the suite (the bundled real model, loaded once per session) and the torch thread
count under pytest-xdist.

``scripts/test.sh`` runs the suite on two xdist workers with ``--dist loadfile``: a module runs on one
worker as a whole, so a module-scoped fixture is built once; a session fixture is built once per worker
that asks for it. (``--dist loadgroup`` could also keep the modules that share the HF reference model or
the server process together, but with pytest 9.2 xdist's group marks have no effect: pytest-xdist issue
#1386.) torch fixes its intra-op thread count when it is imported, from ``OMP_NUM_THREADS``, so that
variable is set here, before any test module imports torch: each of N workers gets ``cores // N``
threads (at least 1), and the subprocesses the tests start (CLI, server, onboarding, parallel ranks)
inherit it. An explicit ``OMP_NUM_THREADS`` is kept.

The modules in :data:`LONGEST_FIRST` (the most CPU seconds, measured one module at a time with
``benchmarks/suite_cputime.py``; figures in benchmarks/RESULTS.md) are collected first, longest first, so the
workers start on them and finish together instead of one ending on a long module alone (longest processing
time first); the order of everything else is unchanged. tests/test_suite_order.py checks that each exists.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if _WORKERS and "OMP_NUM_THREADS" not in os.environ:
    _CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ["OMP_NUM_THREADS"] = str(max(1, _CPUS // _WORKERS))
    if "torch" in sys.modules:  # imported before this module (by a plugin): the variable came too late for it
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


LONGEST_FIRST = ("tests/engine/test_spec_decode.py", "tests/engine/test_engine.py", "tests/onboard/test_corpus.py",
                 "tests/onboard/test_bundled.py", "tests/test_cli.py", "tests/engine/test_async_scheduling.py",
                 "tests/server/test_structured_outputs.py", "tests/server/test_tools_reasoning.py",
                 "tests/test_hf_cache.py", "tests/test_real_model.py", "tests/test_gemma3_gguf.py")


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Move the modules of :data:`LONGEST_FIRST` to the front, in that order (a stable sort: tests keep their
    order within a module, and the other modules theirs)."""
    root = Path(str(config.rootpath))
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}

    def key(item: pytest.Item) -> int:
        path = Path(str(item.path))
        return rank.get(path.relative_to(root).as_posix() if path.is_relative_to(root) else "", len(rank))

    items.sort(key=key)


def _installed_model(locate_name: str, what: str) -> Path:
    """The path ``dockyard.model_path.<locate_name>()`` gives, or skip (any reason it is absent means skip)."""
    from dockyard import model_path

    try:
        return getattr(model_path, locate_name)()
    except Exception as exc:  # noqa: BLE001 - see above
        pytest.skip(f"{what} not installed: {exc}")


@pytest.fixture(scope="session")
def bundled_gguf() -> Path:
    """Path of the bundled SmolLM2-135M-Instruct GGUF, or skip when it is not installed."""
    return _installed_model("bundled_model_path", "bundled model")


@pytest.fixture(scope="session")
def bundled_llm(bundled_gguf):
    """The bundled model in float32 on the CPU (the reference precision of the equivalence tests)."""
    from dockyard import LLM

    return LLM(dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def hf_model(bundled_gguf):
    """transformers' own load of the bundled GGUF in float32: the reference of the real-model tests
    (and lm-eval's ``--model hf``); saved once per file and library versions (``tests.helpers.hf_gguf_reference``)."""
    from tests.helpers import hf_gguf_reference

    return hf_gguf_reference(bundled_gguf)


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    """Path of Gemma-3-270M Q4_K_M (the second real model), assembled once into the dockyard cache, or skip."""
    return _installed_model("gemma3_270m_path", "Gemma-3-270M GGUF")
