"""The MTP trial: a checkpoint with multi-token prediction layers (``num_nextn_predict_layers`` > 0) runs
speculative decoding's ``mtp`` method on the trial model (its shrunken config keeps the MTP layer; dummy
weights, the MTP layer's included): the greedy tokens with ``MTP_TOKENS`` proposals per step must be those
of plain decoding (``Trials.reference``), and the acceptance rate is reported (dummy weights guess badly:
it measures the machinery, not the checkpoint's layer). transformers implements no MTP head (it skips those
layers on load), so the layer itself is compared with :class:`~dockyard.onboard.mtp_reference.MTPReference`
(transformers' decoder layer holding the MTP layer's block weights, the MTP wiring around it in float64)
where transformers has that decoder layer: logits within ``MTP_HEAD_BOUND`` (float32 against float64).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from dockyard.models.deepseek_mtp import DeepseekMTP
from dockyard.onboard.context import GateContext
from dockyard.onboard.gates.features.trial_model import Trials, dummy_model, error_text, first_difference, row
from dockyard.onboard.mtp_reference import REFERENCE_MODEL_TYPES, compare_with_reference
from dockyard.weights.dummy import iter_dummy
from dockyard.weights.loader import load_weights

logger = logging.getLogger(__name__)

FEATURE = "MTP"
MTP_TOKENS = 2  # proposals per step: one from the target's hidden state, one from the layer's own output
MTP_HEAD_BOUND = 1e-5  # rms error of float32 logits relative to the float64 reference's rms


def head_check(trials: Trials) -> dict[str, Any]:
    """The trial model's MTP layer (dummy weights, float32 on the CPU) against the float64 reference, or why
    there is none."""
    if trials.spec.model_type not in REFERENCE_MODEL_TYPES:
        return {"compared": False, "why": f"transformers ships no decoder layer of model_type "
                                          f"{trials.spec.model_type!r} to build the reference from"}
    target = dummy_model(trials.spec, torch.device("cpu"), trials.seed)
    mtp = DeepseekMTP(target, own_head=False)
    load_weights(mtp, iter_dummy(mtp, trials.seed))
    errors = compare_with_reference(trials.config, mtp, seed=trials.seed)
    return {"compared": True, **errors, "bound": MTP_HEAD_BOUND,
            "passed": bool(errors["logits_rmse_ratio"] < MTP_HEAD_BOUND)}


def _acceptance(llm: Any) -> dict[str, Any]:
    stats = llm.engine.stats()
    return {key: stats[key] for key in stats if key.startswith("spec_decode_")}


def trial_row(ctx: GateContext, trials: Trials | None, setup_error: str | None) -> dict[str, Any]:
    """The feature-matrix row of MTP: checkpoint-missing without MTP layers, else the trial's verdict."""
    if ctx.spec is None or ctx.spec.num_nextn_predict_layers < 1:
        return row(FEATURE, "checkpoint-missing", "no MTP / speculative-decoding heads in the checkpoint "
                                                  "(num_nextn_predict_layers absent or 0)")
    if trials is None:
        return row(FEATURE, "not-run", f"MTP trial could not be set up: {setup_error}")
    device = ctx.machine.device
    dtype = ctx.dtype if device == "cuda" and ctx.dtype is not None else torch.float32
    config = {"method": "mtp", "num_speculative_tokens": MTP_TOKENS}
    try:
        reference = trials.reference(device, dtype)
        run = trials.greedy(device, dtype, observe=_acceptance, speculative_config=config)
    except Exception as exc:  # noqa: BLE001 - an MTP layer dockyard cannot run is the finding
        logger.exception("MTP trial failed")
        return row(FEATURE, "unsupported", f"speculative decoding with the MTP layer failed: {error_text(exc)}",
                   error=error_text(exc), **trials.setup())
    difference = first_difference(reference["tokens"], run["tokens"], "plain", "with MTP")
    head = head_check(trials)
    evidence = {**trials.setup(), "device": device, "speculative_config": config, "tokens": run["tokens"],
                "reference_tokens": reference["tokens"], "first_difference": difference, "head": head,
                **{k: v for k, v in run.items() if k.startswith("spec_decode_")}}
    rate = run.get("spec_decode_acceptance_rate", 0.0)
    drafts = run.get("spec_decode_num_drafts", 0)
    if difference is not None:
        return row(FEATURE, "unsupported", f"greedy tokens with MTP differ from plain decoding ({difference})",
                   **evidence)
    if not drafts:
        return row(FEATURE, "unsupported", "the MTP proposer proposed nothing", **evidence)
    if head["compared"] and not head["passed"]:
        return row(FEATURE, "unsupported", f"the MTP layer's logits differ from the float64 reference (transformers' "
                                           f"decoder layer + the MTP wiring): rmse ratio "
                                           f"{head['logits_rmse_ratio']:.2e} NOT < {MTP_HEAD_BOUND:.0e}", **evidence)
    head_words = (f"its logits within {head['logits_rmse_ratio']:.1e} (< {MTP_HEAD_BOUND:.0e}) of the float64 "
                  "reference (transformers' decoder layer + the MTP wiring)" if head["compared"]
                  else f"no reference for its logits ({head['why']})")
    why = (f"the shrunken model's MTP layer (dummy weights) proposed {MTP_TOKENS} tokens per step on {device}: "
           f"greedy tokens identical to plain decoding on {len(trials.prompts)} prompts, {drafts} drafts verified, "
           f"acceptance rate {rate:.2f} (dummy weights: the machinery, not the checkpoint's layer); {head_words}")
    return row(FEATURE, "supported", why, **evidence)
