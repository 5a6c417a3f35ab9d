"""The FP8 KV cache trial: the trial model (dummy weights) driven through the paged cache twice, chunked
prefill then single decode tokens (``testing.paged_logits``), with a cache in the model's dtype and with
an e4m3 cache whose scales are calibrated as the engine calibrates them; the logits' rms difference
over the reference's rms must stay under ``FP8_KV_LOGITS_BOUND``.

The bound comes from e4m3's precision: 3 mantissa bits, so rounding moves a cached value by at most
2^-4 of it, with an rms of about 2^-4 / sqrt(3) ≈ 3.6% (uniform over the step). Logits of a model
whose every K and V carries that error move by about as much (residual streams dilute it, softmax
and depth amplify it), so the bound is 3× that rms: 0.108. A lost or misapplied scale moves the
logits by about their own size (a ratio near 1), far above it.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch

from dockyard.dtypes import dtype_name
from dockyard.onboard.context import GateContext
from dockyard.onboard.gates.features.trial_model import Trials, dummy_model, error_text, row
from dockyard.ops import fp8_kv
from dockyard.testing import paged_logits, rel_rmse

logger = logging.getLogger(__name__)

FEATURE = "FP8 KV cache"
E4M3_RMS_ROUNDING = 2.0**-4 / math.sqrt(3)  # relative rms of rounding to 3 mantissa bits
FP8_KV_LOGITS_BOUND = 3 * E4M3_RMS_ROUNDING
DECODE_TOKENS = 3  # the last tokens of the longest trial prompt decoded one by one (the decode kernel's path)


def run_trial(ctx: GateContext, trials: Trials) -> dict[str, Any]:
    """Logits of the trial model with an FP8 cache against a cache in its own dtype, and the evidence."""
    device = torch.device(ctx.machine.device)
    t0 = time.perf_counter()
    model = dummy_model(trials.spec, device, trials.seed)
    if ctx.machine.device == "cuda" and ctx.dtype is not None:
        model = model.to(ctx.dtype)
    ids = max(trials.prompts, key=len)
    chunks = [len(ids) - DECODE_TOKENS] + [1] * DECODE_TOKENS
    blocks = -(-len(ids) // 4) + 1
    reference = paged_logits(model, ids, chunks, num_blocks=blocks).float()
    logits = paged_logits(model, ids, chunks, num_blocks=blocks, kv_cache_dtype=fp8_kv.FP8_DTYPE).float()
    ratio = rel_rmse(logits, reference)
    layers = [m for m in model.modules() if hasattr(m, "kv_scale_source")]
    return {"device": ctx.machine.device, "dtype": dtype_name(next(model.parameters()).dtype),
            "cache": "float8_e4m3fn, one scale per layer for K and one for V, calibrated at start-up",
            "reference": "the same model and tokens through a cache in the model's dtype",
            "chunks": chunks, "scales": sorted({m.kv_scale_source for m in layers}),
            "rmse_ratio": ratio, "bound": FP8_KV_LOGITS_BOUND,
            "bound_rule": "3 × e4m3's relative rms rounding error (2^-4 / sqrt(3))",
            "passed": bool(0 < ratio < FP8_KV_LOGITS_BOUND), "seconds": time.perf_counter() - t0}


def trial_row(ctx: GateContext, trials: Trials | None, setup_error: str | None) -> dict[str, Any]:
    """The feature-matrix row of the FP8 KV cache."""
    if ctx.spec is not None and ctx.spec.mla is not None:
        return row(FEATURE, "unsupported", "multi-head latent attention caches one latent per token; dockyard "
                                           "refuses --kv-cache-dtype fp8 for it")
    if trials is None:
        return row(FEATURE, "not-run", f"FP8 KV cache trial could not be set up: {setup_error}")
    try:
        evidence = run_trial(ctx, trials)
    except Exception as exc:  # noqa: BLE001 - a failing FP8 cache is the finding
        logger.exception("FP8 KV cache trial failed")
        return row(FEATURE, "unsupported", f"FP8 KV cache trial failed: {error_text(exc)}", error=error_text(exc))
    verdict = "<" if evidence["passed"] else "NOT <"
    why = (f"the shrunken model's logits with an e4m3 KV cache (chunked prefill + {DECODE_TOKENS} decodes, "
           f"{evidence['dtype']} on {evidence['device']}) vs a {evidence['dtype']} cache: rmse ratio "
           f"{evidence['rmse_ratio']:.3f} {verdict} bound {evidence['bound']:.3f} ({evidence['bound_rule']})")
    return row(FEATURE, "supported" if evidence["passed"] else "unsupported", why, **evidence)
