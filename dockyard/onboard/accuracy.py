"""The onboarding's accuracy run: a small ``dockyard eval`` on the real weights, or why none ran.

The real gate calls :func:`run_accuracy` with the model it has just verified (no second load):
ARC-Easy, 20 questions, zero-shot, through lm-eval-harness on the engine. The numbers it records are
what that run measured, labelled as a 20-question subset on this hardware; when no run was made
(no real weights, the real gate did not pass, lm-eval or the data package is missing) the report and
accuracy.yaml say why instead of showing any number.
"""

from __future__ import annotations

import logging
import time
import traceback
from typing import Any

from dockyard.errors import DockyardError
from dockyard.eval.runner import EvalOptions, accuracy_data, command_line, run_eval

logger = logging.getLogger(__name__)

ONBOARD_TASKS = ("arc_easy",)
ONBOARD_LIMIT = 20


def not_evaluated(why: str) -> dict[str, Any]:
    """The report's accuracy section when no evaluation ran."""
    return {"evaluated": False, "note": f"No evaluation ran: {why}; no accuracy numbers are reported (none are "
                                        "invented)"}


def run_accuracy(llm: Any, model: str | None) -> dict[str, Any]:
    """Evaluate ``llm`` on :data:`ONBOARD_TASKS` with :data:`ONBOARD_LIMIT` documents each.

    Never raises: a missing package or an error in the evaluation is recorded as "not evaluated",
    with the reason (and the traceback in the gate's log).
    """
    options = EvalOptions(tasks=list(ONBOARD_TASKS), model=model, limit=ONBOARD_LIMIT)
    t0 = time.perf_counter()
    try:
        run = run_eval(options, llm=llm, progress=None)
    except DockyardError as exc:
        return not_evaluated(f"`{command_line(options)}` could not run ({exc})")
    except Exception as exc:  # noqa: BLE001 - the accuracy run must not fail the gate that hosts it
        traceback.print_exc()
        return not_evaluated(f"`{command_line(options)}` failed ({type(exc).__name__}: {exc})")
    seconds = time.perf_counter() - t0
    docs = ", ".join(f"{t.name} {t.samples} documents" for t in run.tasks)
    note = (f"Measured by a real `dockyard eval` run during onboarding, on {run.hardware} ({run.dtype}): {docs}, "
            f"zero-shot, lm-eval-harness {run.versions.get('lm-eval')}. A {ONBOARD_LIMIT}-question subset, "
            "so the standard error is large and the numbers are not comparable to full-set published ones; run "
            "`dockyard eval --tasks arc_easy,arc_challenge,hellaswag,piqa,winogrande,mmlu,gsm8k` for a full "
            "evaluation")
    logger.info("accuracy run: %s in %.1fs", docs, seconds)
    return {"evaluated": True, "note": note, "seconds": round(seconds, 3), "command": command_line(options),
            "results": accuracy_data(run, note=note)}
