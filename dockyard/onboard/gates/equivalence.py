"""Gate 3, equivalence: block → layer → model → decode against HF transformers, on a shrunken config."""

from __future__ import annotations

import logging

from dockyard.onboard.context import GateContext, Outcome
from dockyard.onboard.equivalence import check_equivalence

logger = logging.getLogger(__name__)


def run(ctx: GateContext) -> Outcome:
    if ctx.raw is None:
        return Outcome("skip", "no config (inspect did not run)")
    result = check_equivalence(ctx.raw.config, seed=ctx.options.seed)
    for note in result.notes:
        logger.info("shrunken config: %s", note)
    for lv in result.levels:
        err = "crashed" if lv.rel_err is None else f"{lv.rel_err:.3e}"
        logger.info("%-6s %-45s %-34s rel err %-10s tol %.0e %s %s", lv.level, lv.block, lv.module, err,
                    lv.tolerance, "ok" if lv.passed else "FAIL", lv.detail)
    evidence = result.to_dict()
    if result.status == "skip":
        return Outcome("skip", result.reason, evidence)
    if result.status == "pass":
        worst = max(lv.rel_err or 0.0 for lv in result.levels)
        summary = (f"{len(result.levels)} levels (blocks, layer, prefill, paged decode) within "
                   f"{result.tolerances['model']:.0e}; worst rel err {worst:.1e}")
        return Outcome("pass", summary, evidence)
    return Outcome("fail", result.reason, evidence)
