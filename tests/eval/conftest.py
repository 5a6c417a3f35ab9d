"""Fixtures of the evaluation tests: lm-eval (skip without it), the rendered task manager, the HF reference."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def lm_eval():
    return pytest.importorskip("lm_eval")


@pytest.fixture(scope="session")
def manager(lm_eval):
    """lm-eval's TaskManager over every dockyard task, rendered with this machine's paths."""
    from dockyard.eval.tasks import TASKS, task_manager

    return task_manager(list(TASKS))


@pytest.fixture(scope="session")
def ours(lm_eval, bundled_llm):
    from dockyard.eval.lm import DockyardLM

    return DockyardLM(llm=bundled_llm)


@pytest.fixture(scope="session")
def reference(lm_eval, hf_model, bundled_llm):
    """lm-eval's HFLM on the HF model, with the same tokenizer (so only the engines differ)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=hf_model, tokenizer=bundled_llm.get_tokenizer(), device="cpu", batch_size=16)
