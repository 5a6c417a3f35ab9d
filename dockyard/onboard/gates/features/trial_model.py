"""The model the features gate's engine trials share, and the helpers every trial uses.

:class:`Trials` writes :func:`~dockyard.onboard.config_surgery.trial_config` (the equivalence gate's
shrunken config, head counts picked for a two-rank split) as a config.json, draws the prompts, and
greedy-decodes them through ``LLM`` with dummy weights; the single-process run each parallel trial is
compared with is made once per device.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dockyard.engine.llm import LLM
from dockyard.engine.sampling_params import SamplingParams
from dockyard.model_source import spec_for_config
from dockyard.onboard.config_surgery import trial_config
from dockyard.onboard.context import GateContext
from dockyard.onboard.gates.features.plumbing import rank0_threads, worker_output_to_log
from dockyard.registry import build_model
from dockyard.weights.dummy import iter_dummy
from dockyard.weights.loader import load_weights

TRIAL_TOKENS = 8  # greedy tokens per prompt in the engine trials
TRIAL_PROMPTS = (7, 12)  # prompt lengths (seeded random ids)
TRIAL_ENGINE = {"max_num_seqs": 4, "max_num_batched_tokens": 256, "block_size": 16, "num_kv_blocks": 32}
TRIAL_MAX_LEN = 256


def row(feature: str, status: str, why: str, **evidence: Any) -> dict[str, Any]:
    """One row of the feature matrix."""
    return {"feature": feature, "status": status, "why": why, "evidence": evidence}


def error_text(exc: BaseException) -> str:
    """An exception as a row states it: its type and the start of its message."""
    return f"{type(exc).__name__}: {str(exc)[:500]}"


def dummy_model(spec: Any, device: torch.device, seed: int) -> torch.nn.Module:
    """``spec`` built in float32 on ``device`` and filled with the engine's seeded dummy weights."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.device(device):
            model = build_model(spec).eval()
    finally:
        torch.set_default_dtype(previous)
    load_weights(model, iter_dummy(model, seed))
    return model


def first_difference(reference: list[list[int]], tokens: list[list[int]], ref_label: str,
                     label: str) -> str | None:
    """None when every prompt decoded the same tokens, else where they first differ, in words."""
    for p, (ref, got) in enumerate(zip(reference, tokens, strict=True)):
        if ref != got:
            i = next((k for k, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
            a = ref[i] if i < len(ref) else "nothing"
            b = got[i] if i < len(got) else "nothing"
            return f"prompt {p}, token {i}: {a} {ref_label}, {b} {label}"
    return None


class Trials:
    """The model the engine trials share (:func:`trial_config`, dummy weights, as a config.json in a
    temporary folder), their prompts, and the single-process greedy tokens each parallel trial is
    compared with (decoded once per device)."""

    def __init__(self, ctx: GateContext, workdir: Path) -> None:
        self.config, self.notes = trial_config(ctx.raw.config)
        self.impl = ctx.impl_kwargs  # the path inspect chose, kept for the trimmed copy
        self.spec = spec_for_config(self.config, model_impl=self.impl["model_impl"])
        self.workdir = workdir
        (workdir / "model").mkdir()
        self.path = workdir / "model" / "config.json"
        self.path.write_text(json.dumps(self.config))
        self.seed = ctx.options.seed
        rng = random.Random(self.seed)
        self.prompts = [[rng.randrange(self.spec.vocab_size) for _ in range(n)] for n in TRIAL_PROMPTS]
        self.max_len = min(TRIAL_MAX_LEN, self.spec.max_model_len)
        self._references: dict[tuple[str, torch.dtype], dict[str, Any]] = {}

    def setup(self) -> dict[str, Any]:
        """What each trial row records about the model that ran."""
        s = self.spec
        return {"trial_model": {"layers": s.num_hidden_layers, "hidden_size": s.hidden_size,
                                "heads": s.num_attention_heads, "kv_heads": s.num_key_value_heads,
                                "experts": s.moe.num_experts if s.moe is not None else None,
                                "vocab_size": s.vocab_size, "weights": f"dummy (seed {self.seed})",
                                "shrunk": self.notes},
                "prompts": self.prompts, "max_tokens": TRIAL_TOKENS}

    def greedy(self, device: str, dtype: torch.dtype, observe: Callable[[Any], dict[str, Any]] | None = None,
               **engine: Any) -> dict[str, Any]:
        """Start ``LLM`` on the trial model (``engine``: extra LLM arguments), greedy-decode the prompts,
        let ``observe(llm)`` add what it reads off the engine, shut it down."""
        ranks = int(engine.get("tensor_parallel_size", 1))
        t0 = time.perf_counter()
        with worker_output_to_log() if ranks > 1 else contextlib.nullcontext():
            llm = LLM(str(self.path), load_format="dummy", dtype=dtype, device=device, seed=self.seed,
                      max_model_len=self.max_len, **TRIAL_ENGINE, **self.impl, **engine)
            try:
                started = time.perf_counter()
                params = SamplingParams(max_tokens=TRIAL_TOKENS, temperature=0.0, ignore_eos=True)
                with rank0_threads(ranks if device == "cpu" else 1):
                    outputs = llm.generate(self.prompts, params, use_tqdm=False)
                decoded = time.perf_counter()
                seen = observe(llm) if observe is not None else {}
            finally:
                llm.shutdown()
        return {"tokens": [list(o.outputs[0].token_ids) for o in outputs], "start_seconds": started - t0,
                "decode_seconds": decoded - started, **seen}

    def reference(self, device: str, dtype: torch.dtype) -> dict[str, Any]:
        """The single-process greedy run on ``device`` (made once)."""
        key = (device, dtype)
        if key not in self._references:
            self._references[key] = self.greedy(device, dtype)
        return self._references[key]

