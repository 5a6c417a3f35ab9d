"""The CUDA-graph trial (a GPU only): the engine as it starts on the trial model, whether it captured decode
graphs (else its ``eager_reason``, a fallback-ladder entry), and the graphs' greedy tokens against
``enforce_eager=True``."""

from __future__ import annotations

import logging
from typing import Any

import torch

from dockyard.dtypes import dtype_name
from dockyard.onboard.context import GateContext
from dockyard.onboard.gates.features.trial_model import TRIAL_TOKENS, Trials, error_text, first_difference, row

logger = logging.getLogger(__name__)


def trial_row(ctx: GateContext, trials: Trials | None, setup_error: str | None) -> dict[str, Any]:
    """Does the engine capture this model's decode steps, and do the graphs decode as eager does?"""
    feature = "CUDA graph"
    if ctx.machine.device != "cuda":
        return row(feature, "not-run", "needs a GPU: the engine captures decode steps only on CUDA; whether this "
                                       "model can be captured (engine/cuda_graphs.why_not_capturable) is decided "
                                       "against a CUDA KV cache and the Triton decode kernel, so it was not "
                                       "evaluated here")
    if trials is None:
        return row(feature, "not-run", f"trial could not be set up: {setup_error}")
    dtype = ctx.dtype or torch.float32
    evidence: dict[str, Any] = {"device": "cuda", "dtype": dtype_name(dtype), **trials.setup()}

    def observe(llm: Any) -> dict[str, Any]:
        runner = llm.engine.runner
        graphs = getattr(runner, "graphs", None)
        return {"captured": graphs is not None, "eager_reason": getattr(runner, "eager_reason", None),
                "batch_sizes": sorted(getattr(graphs, "graphs", None) or [])}

    def fall_back(detail: str, eager: str, eager_ok: bool, outcome: str) -> None:
        ctx.ladder.append({"gate": "features", "check": "CUDA graph", "outcome": outcome, "rungs": [
            {"mode": "CUDA graphs", "status": "fail", "detail": detail},
            {"mode": "enforce_eager=True", "status": "pass" if eager_ok else "fail", "detail": eager}]})

    logger.info("CUDA graph trial: engine start (%s), %d prompts × %d tokens", dtype_name(dtype),
                len(trials.prompts), TRIAL_TOKENS)
    try:
        graphed = trials.greedy("cuda", dtype, observe=observe)
    except Exception as exc:  # noqa: BLE001 - a capture failure is the finding
        logger.exception("CUDA graph trial failed")
        try:
            trials.greedy("cuda", dtype, enforce_eager=True)
            eager_ok, eager_detail = True, "the engine started and decoded with enforce_eager=True"
        except Exception as eager_exc:  # noqa: BLE001
            eager_ok, eager_detail = False, f"fails too: {error_text(eager_exc)}"
        fall_back(error_text(exc), eager_detail, eager_ok, f"graph mode failed ({error_text(exc)}); "
                  + ("eager works" if eager_ok else "eager fails too"))
        return row(feature, "unsupported", f"the engine failed to start or decode with CUDA graphs: {error_text(exc)}",
                   error=error_text(exc), **evidence)
    evidence["graphs"] = graphed
    if not graphed["captured"]:
        reason = graphed["eager_reason"] or "no reason given"
        fall_back(f"not captured: {reason}", "the same engine decoded eagerly", True,
                  f"decode steps run eagerly: {reason}")
        return row(feature, "unsupported", f"the engine does not capture this model's decode steps, it runs them "
                                           f"eagerly: {reason}", **evidence)
    try:
        eager = trials.greedy("cuda", dtype, enforce_eager=True)
    except Exception as exc:  # noqa: BLE001
        logger.exception("eager run of the CUDA graph trial failed")
        return row(feature, "unsupported", f"graphs captured, but the eager run to compare with failed: "
                                           f"{error_text(exc)}", error=error_text(exc), **evidence)
    diff = first_difference(eager["tokens"], graphed["tokens"], "eager", "with graphs")
    evidence.update(eager=eager, tokens_equal=diff is None)
    what = f"{len(trials.prompts)} prompts × {TRIAL_TOKENS} greedy tokens"
    if diff is None:
        return row(feature, "supported", f"decode graphs captured (batch sizes {graphed['batch_sizes']}); {what} "
                                         f"identical to enforce_eager=True ({dtype_name(dtype)}, shrunken model, "
                                         "dummy weights)", **evidence)
    fall_back(f"tokens differ from eager: {diff}", "reference tokens", True, f"graphs decode differently: {diff}")
    return row(feature, "unsupported", f"decode graphs captured, but they decode differently from "
                                       f"enforce_eager=True: {diff}", **evidence)

