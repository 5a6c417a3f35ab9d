"""The tensor- and expert-parallel trials: the real config through the engine's own
``check_parallel_config`` (its refusal, word for word, is the unsupported row), then the trial model
over TRIAL_PARALLEL_SIZE ranks (experts placed across them for EP) against one process: the greedy
tokens must be identical. NCCL with enough GPUs, else gloo on the CPU."""

from __future__ import annotations

import logging
from typing import Any

import torch

from dockyard.distributed.sharding import check_parallel_config
from dockyard.errors import ConfigError
from dockyard.onboard.config_surgery import TRIAL_PARALLEL_SIZE
from dockyard.onboard.context import GateContext
from dockyard.onboard.gates.features.trial_model import TRIAL_TOKENS, Trials, error_text, first_difference, row

logger = logging.getLogger(__name__)


def trial_row(ctx: GateContext, trials: Trials | None, setup_error: str | None,
              expert_parallel: bool) -> dict[str, Any]:
    """The real config through the engine's split check, then the trial model over TRIAL_PARALLEL_SIZE
    ranks against one process."""
    n = TRIAL_PARALLEL_SIZE
    feature = "expert parallel" if expert_parallel else "tensor parallel"
    mode = f"EP={n}" if expert_parallel else f"TP={n}"
    try:
        check_parallel_config(ctx.spec, n, expert_parallel)
    except ConfigError as exc:
        return row(feature, "unsupported", f"the engine cannot split this model over {n} ranks: {exc}", size=n,
                   error=str(exc))
    if trials is None:
        return row(feature, "not-run", f"trial could not be set up: {setup_error}", size=n)
    on_gpus = ctx.machine.device == "cuda" and ctx.machine.num_gpus >= n
    device, backend = ("cuda", "nccl") if on_gpus else ("cpu", "gloo")
    evidence: dict[str, Any] = {"size": n, "expert_parallel": expert_parallel, "device": device,
                                "backend": backend, "dtype": "float32", **trials.setup()}
    if ctx.machine.device == "cuda" and not on_gpus:
        evidence["note"] = f"{ctx.machine.num_gpus} GPU(s) here: the ranks ran on the CPU over gloo"
    if device == "cuda":
        evidence["note"] = "tensor-parallel steps run eagerly (no CUDA graphs under TP yet)"
    try:
        check_parallel_config(trials.spec, n, expert_parallel)  # the trial model splits as the real one does
        reference = trials.reference(device, torch.float32)
    except Exception as exc:  # noqa: BLE001 - no baseline: nothing was tried
        logger.exception("%s trial could not be set up", feature)
        return row(feature, "not-run", f"trial could not be set up: {error_text(exc)}", error=error_text(exc),
                   **evidence)
    evidence["one_process"] = reference
    logger.info("%s trial: %s over %s on %s, %d prompts × %d tokens", feature, mode, backend, device,
                len(trials.prompts), TRIAL_TOKENS)
    try:
        run = trials.greedy(device, torch.float32, tensor_parallel_size=n, enable_expert_parallel=expert_parallel)
    except ConfigError as exc:  # refused while cutting the model (e.g. fused projections): its words
        logger.info("%s refused: %s", mode, exc)
        return row(feature, "unsupported", f"the engine cannot split this model over {n} ranks: {exc}",
                   error=str(exc), **evidence)
    except Exception as exc:  # noqa: BLE001 - a failing split is the finding
        logger.exception("%s trial failed", feature)
        return row(feature, "unsupported", f"{mode} over {backend} failed: {error_text(exc)}", error=error_text(exc),
                   **evidence)
    diff = first_difference(reference["tokens"], run["tokens"], "in one process", f"at {mode}")
    seconds = run["start_seconds"] + run["decode_seconds"]
    evidence.update({"parallel": run, "tokens_equal": diff is None, "seconds": seconds})
    where = f"{mode} over {backend} ({device})"
    if diff is None:
        return row(feature, "supported", f"{where}: {len(trials.prompts)} prompts × {TRIAL_TOKENS} greedy tokens "
                                         f"identical to one process, {seconds:.1f}s with start-up (shrunken "
                                         "model, dummy weights)", **evidence)
    return row(feature, "unsupported", f"{where} decodes differently from one process: {diff}", **evidence)

