"""Gate 6, features: each serving feature tried (or said why not), one row of the feature matrix each.

Statuses: ``supported`` (tried here and it worked), ``unsupported`` (the model needs it or the
checkpoint has it, and dockyard cannot do it yet, or it was tried and failed), ``not-applicable``
(the model has no use for it), ``checkpoint-missing`` (the checkpoint carries nothing for it),
``not-run`` (it could not be tried on this machine, e.g. it needs a GPU). Nothing is called
supported without a trial on this run.

The trials run the model's own architecture at toy sizes: the equivalence gate's shrunken config
(:func:`~dockyard.onboard.config_surgery.shrink_config`, every architectural flag kept) with dummy
weights, its head counts picked so that two ranks meet the same case as the real model
(:func:`~dockyard.onboard.config_surgery.trial_config`). Each greedy-decodes ``TRIAL_TOKENS`` tokens
from ``len(TRIAL_PROMPTS)`` prompts, so a trial takes seconds; a trial that fails is a row with the
error, never a crash.

* CUDA graph (a GPU only): the engine as it starts, whether it captured decode graphs (else its
  ``eager_reason``), and the graph's greedy tokens against ``enforce_eager=True``.
* torch.compile: a 2-layer copy at true widths where memory allows, compiled vs eager logits; the
  fallback ladder compiled → eager → ``TORCHDYNAMO_DISABLE=1``, each rung recorded on the context.
* tensor parallel / expert parallel (MoE only): the real config checked by the engine's own
  ``check_parallel_config`` (its refusal, word for word, is the unsupported row), then the trial
  model at TP=2 (and TP=2 with experts placed across ranks) against one process: tokens must be
  identical. NCCL with 2+ GPUs, else gloo on the CPU.
* FP8: the trial model's decoder projections quantized to e4m3 with 128×128 block scales
  (``weights/fp8_quantize.py``), written as an FP8 checkpoint, loaded through ``LLM``; logits against
  the unquantized model within ``FP8_LOGITS_BOUND``, and which path ran (native FP8 matmul when a
  parameter stayed ``float8_e4m3fn``, else dequantized on load). An FP8 checkpoint adds what the
  real gate showed on its own weights.
* FP8 KV cache: the trial model through the paged cache (chunked prefill, then decodes) with an e4m3
  cache (scales calibrated as the engine does) against a cache in its own dtype: logits within
  ``FP8_KV_LOGITS_BOUND`` (3 × e4m3's rms rounding error); MLA is refused by the engine, so unsupported.

* MTP (a checkpoint with ``num_nextn_predict_layers`` > 0; else checkpoint-missing): the trial model's MTP layer
  proposing through speculative decoding's ``mtp`` method; greedy tokens must equal plain decoding's, and
  the acceptance rate is reported.

One module per trial (``cuda_graph``, ``torch_compile``, ``parallel``, ``fp8``, ``fp8_kv``, ``mtp``); the model they
share is ``trial_model``, the process plumbing (worker output, threads, dynamo off) ``plumbing``.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dockyard.onboard.config_features import is_moe
from dockyard.onboard.context import GateContext, Outcome
from dockyard.onboard.gates.features import cuda_graph, fp8, fp8_kv, mtp, parallel, torch_compile
from dockyard.onboard.gates.features.trial_model import Trials, error_text, row
from dockyard.onboard.gates.fit import quantization_of

logger = logging.getLogger(__name__)


def _guarded(feature: str, trial: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``trial()``'s row; a trial that raises (a bug in the trial itself) still gives a row, saying so."""
    try:
        return trial()
    except Exception as exc:  # noqa: BLE001 - the gate reports every row, whatever one trial does
        logger.exception("%s trial crashed", feature)
        return row(feature, "not-run", f"the trial itself crashed: {error_text(exc)}", error=error_text(exc))


def _quantization_row(ctx: GateContext) -> dict[str, Any]:
    """The checkpoint's quantization and what dockyard does with it; supported once the real gate checked the
    loaded weights' output."""
    verdict = quantization_of(ctx)
    scheme, handling, why = verdict["scheme"], verdict["handling"], verdict["why"]
    name = f"quantization ({scheme})"
    if handling == "none":
        return row("quantization", "not-applicable", why, scheme=scheme, handling=handling)
    if handling == "refused":
        return row(name, "unsupported", why, scheme=scheme, handling=handling)
    if ctx.real.passed:
        return row(name, "supported", f"{handling}: {why}; the real gate checked the output of the weights "
                                      "loaded this way", scheme=scheme, handling=handling)
    return row(name, "not-run", f"{handling}: {why}; the real gate did not pass on these weights", scheme=scheme,
               handling=handling)


def run(ctx: GateContext) -> Outcome:
    """Every trial's row (one that fails or crashes is a row saying so), then the rows read off the config."""
    if ctx.spec is None:
        return Outcome("skip", "no validated spec (inspect did not pass)", hard=False)
    keys = {f.key for f in ctx.features}
    with tempfile.TemporaryDirectory(prefix="dockyard-features-") as tmp:
        trials, setup_error = None, None
        try:
            trials = Trials(ctx, Path(tmp))
            for note in trials.notes:
                logger.info("trial model: %s", note)
        except Exception as exc:  # noqa: BLE001 - every trial row then says why it did not run
            logger.exception("the trial model could not be set up")
            setup_error = error_text(exc)
        rows = [_guarded("CUDA graph", lambda: cuda_graph.trial_row(ctx, trials, setup_error))]
        try:
            rows.append(torch_compile.trial_row(ctx))
        except Exception as exc:  # noqa: BLE001 - the trial could not even be set up: say so, do not crash
            logger.exception("torch.compile trial could not be set up")
            rows.append(row("torch.compile", "not-run", f"trial could not be set up: {type(exc).__name__}: {exc}"))
        rows.append(_guarded("tensor parallel", lambda: parallel.trial_row(ctx, trials, setup_error, False)))
        if is_moe(ctx.features):
            rows.append(_guarded("expert parallel", lambda: parallel.trial_row(ctx, trials, setup_error, True)))
        else:
            rows.append(row("expert parallel", "not-applicable", "dense model: the config has no experts"))
        rows.append(_guarded("FP8", lambda: fp8.trial_row(ctx, trials, setup_error)))
        rows.append(_guarded(fp8_kv.FEATURE, lambda: fp8_kv.trial_row(ctx, trials, setup_error)))
        mtp_row = _guarded(mtp.FEATURE, lambda: mtp.trial_row(ctx, trials, setup_error))
    rows.append(_guarded("quantization", lambda: _quantization_row(ctx)))
    rows.append(mtp_row)
    if "multimodal" in keys:
        rows.append(row("multimodal", "unsupported", "the config has a vision tower; dockyard serves text only"))
    else:
        rows.append(row("multimodal", "not-applicable", "text-only model (no vision_config)"))
    ctx.feature_matrix = rows
    for entry in rows:
        logger.info("%-22s %-18s %s", entry["feature"], entry["status"], entry["why"])
    summary = "; ".join(f"{r['feature']}: {r['status']}" for r in rows)
    return Outcome("pass", summary, {"matrix": rows}, hard=False)
