"""Fixtures shared across the suite: the bundled real model, loaded once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


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
