"""The MTP trial: a checkpoint with multi-token prediction layers (``num_nextn_predict_layers`` > 0) runs
speculative decoding's ``mtp`` method on the trial model (its shrunken config keeps the MTP layer; dummy
weights, the MTP layer's included): the greedy tokens with ``MTP_TOKENS`` proposals per step must be those
of plain decoding (``Trials.reference``), and the acceptance rate is reported (dummy weights guess badly:
it measures the machinery, not the checkpoint's layer). transformers implements no MTP head to compare
with (it skips those layers on load); the layer's equality with its decoder block plus the MTP wiring in
float64 is a test (tests/engine/test_spec_decode_mtp.py).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from dockyard.onboard.context import GateContext
from dockyard.onboard.gates.features.trial_model import Trials, error_text, first_difference, row

logger = logging.getLogger(__name__)

FEATURE = "MTP"
MTP_TOKENS = 2  # proposals per step: one from the target's hidden state, one from the layer's own output


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
    evidence = {**trials.setup(), "device": device, "speculative_config": config, "tokens": run["tokens"],
                "reference_tokens": reference["tokens"], "first_difference": difference,
                **{k: v for k, v in run.items() if k.startswith("spec_decode_")}}
    rate = run.get("spec_decode_acceptance_rate", 0.0)
    drafts = run.get("spec_decode_num_drafts", 0)
    if difference is not None or not drafts:
        why = (f"greedy tokens with MTP differ from plain decoding ({difference})" if difference is not None
               else "the MTP proposer proposed nothing")
        return row(FEATURE, "unsupported", why, **evidence)
    why = (f"the shrunken model's MTP layer (dummy weights) proposed {MTP_TOKENS} tokens per step on {device}: "
           f"greedy tokens identical to plain decoding on {len(trials.prompts)} prompts, {drafts} drafts verified, "
           f"acceptance rate {rate:.2f} (dummy weights: the machinery, not the checkpoint's layer)")
    return row(FEATURE, "supported", why, **evidence)
