"""Fixtures shared across the suite (the bundled real model, loaded once per session) and how the suite
runs under pytest-xdist.

Under xdist (``scripts/test.sh`` runs ``-n 2 --dist loadgroup``) two things are decided here:

- Threads: torch fixes its intra-op thread count when it is imported, from ``OMP_NUM_THREADS``, so that
  variable is set before any test module imports torch: each of N workers gets
  ``cpu_count // N`` threads (at least 1), and the subprocesses the tests start (CLI, server, onboarding,
  parallel ranks) inherit it. An explicit ``OMP_NUM_THREADS`` is kept.
- Grouping: a fixture is set up once per worker that asks for it. A module whose tests share a
  module-scoped fixture is sent to one worker as a whole, and so is every module that asks for an
  expensive session fixture (``GROUPED_SESSION_FIXTURES``: the HF reference model, the server process),
  so each of those is built once per run, not once per worker. Other tests are spread one by one.
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

# Session fixtures too expensive to build on every worker: the modules asking for one run on one worker.
GROUPED_SESSION_FIXTURES = ("hf_model", "_launched")


def _xdist_groups(items: list[pytest.Item]) -> dict[str, str]:
    """Module path → xdist group, for the modules that must stay on one worker (see the module docstring).
    Modules that share an expensive session fixture are merged into one group (union-find)."""
    parent: dict[str, str] = {}

    def find(key: str) -> str:
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None:
            continue
        module = item.nodeid.split("::")[0]
        module_scoped = any(defs[-1].scope in ("module", "package", "class")
                            for defs in info.name2fixturedefs.values() if defs)
        shared = [name for name in GROUPED_SESSION_FIXTURES if name in item.fixturenames]
        if module_scoped or shared:
            find(module)
        for name in shared:
            parent[find(module)] = find(name)
    return {key: find(key) for key in parent if "::" not in key and key.endswith(".py")}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the marks into the node ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("dist", "no") != "loadgroup":
        return
    groups = _xdist_groups(items)
    for item in items:
        group = groups.get(item.nodeid.split("::")[0])
        if group is not None and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def bundled_gguf() -> Path:
    """Path of the bundled SmolLM2-135M-Instruct GGUF, or skip when it is not installed."""
    from dockyard.model_source import bundled_model_path

    try:
        return bundled_model_path()
    except Exception as exc:  # noqa: BLE001 - any reason it is absent means skip
        pytest.skip(f"bundled model not installed: {exc}")


@pytest.fixture(scope="session")
def bundled_llm(bundled_gguf):
    """The bundled model in float32 on the CPU (the reference precision of the equivalence tests)."""
    from dockyard import LLM

    return LLM(dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def hf_model(bundled_gguf):
    """transformers' own load of the bundled GGUF in float32: the reference of the real-model tests
    (and lm-eval's ``--model hf``)."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        str(bundled_gguf.parent), gguf_file=bundled_gguf.name, dtype=torch.float32
    ).eval()
