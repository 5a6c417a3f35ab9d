"""Gate 3, equivalence: block → layer → model → decode against HF transformers, on a shrunken config."""

from __future__ import annotations

import logging

from dockyard.onboard.ablations import ablations_for, claimed_features
from dockyard.onboard.context import GateContext, Outcome
from dockyard.onboard.equivalence import check_equivalence

logger = logging.getLogger(__name__)


def run(ctx: GateContext) -> Outcome:
    if ctx.raw is None:
        return Outcome("skip", "no config (inspect did not run)")
    # The mutation check: each covered feature of this config broken in turn must fail the comparison, else
    # passing it says nothing about that feature.
    # The generic path runs HF's own modules: the ablations break dockyard's, so none applies there.
    impl = ctx.spec.model_impl if ctx.spec is not None else ctx.options.model_impl
    keys = claimed_features(ctx.raw.config) if impl != "transformers" else []
    ctx.step(f"comparing with transformers on a shrunken config, then {len(keys)} feature ablations")
    result = check_equivalence(ctx.raw.config, seed=ctx.options.seed, ablations=ablations_for(keys), model_impl=impl)
    for note in result.notes:
        logger.info("shrunken config: %s", note)
    for lv in result.levels:
        err = "crashed" if lv.rel_err is None else f"{lv.rel_err:.3e}"
        logger.info("%-6s %-45s %-34s rel err %-10s tol %.0e %s %s", lv.level, lv.block, lv.module, err,
                    lv.tolerance, "ok" if lv.passed else "FAIL", lv.detail)
    for m in result.mutations:
        logger.info("ablation %-28s (%s): %s", m.feature, m.what,
                    f"caught at {m.caught_by.where}" if m.caught else "NOT caught")
    evidence = result.to_dict()
    if result.status == "skip":
        return Outcome("skip", result.reason, evidence)
    if result.status == "pass":
        worst = max(lv.rel_err or 0.0 for lv in result.levels)
        compared = "prefill, paged decode of HF's own modules" if result.path == "transformers" else \
            "blocks, layer, prefill, paged decode"
        summary = (f"{len(result.levels)} levels ({compared}) within "
                   f"{result.tolerances['model']:.0e}; worst rel err {worst:.1e}")
        unseen = [m.feature for m in result.mutations if not m.caught]
        if unseen:  # soft: the model agrees, but the comparison cannot vouch for these features
            return Outcome("fail", f"{summary}; but with {', '.join(unseen)} ablated it still passes, so the "
                                   "comparison does not show that they are computed", evidence, hard=False)
        if result.mutations:
            summary += f"; each of its {len(result.mutations)} covered features, ablated, fails it"
        return Outcome("pass", summary, evidence)
    return Outcome("fail", result.reason, evidence)
