"""The torch.compile trial: a COMPILE_LAYERS-layer copy at true widths where memory allows (the dummy gate's
reductions otherwise), compiled vs eager logits of an uncached prefill; when compiling fails, the fallback
ladder compiled → eager → ``TORCHDYNAMO_DISABLE=1``, each rung recorded on the context."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from dockyard.model_source import spec_for_config
from dockyard.onboard.config_surgery import text_config
from dockyard.onboard.context import GateContext
from dockyard.onboard.gates.dummy import choose_config, memory_budget
from dockyard.onboard.gates.features.plumbing import dynamo_disabled
from dockyard.onboard.gates.features.trial_model import dummy_model, row
from dockyard.testing import rel_rmse

logger = logging.getLogger(__name__)

COMPILE_TOLERANCE = 1e-4  # compiled vs eager logits, fp32: kernels may reassociate sums
COMPILE_TOKENS = 16
COMPILE_LAYERS = 2


def _compile_model(ctx: GateContext) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A COMPILE_LAYERS-layer copy of the model with dummy weights (true widths when the dummy gate had them)."""
    budget, _ = memory_budget(ctx)
    layers = min(COMPILE_LAYERS, ctx.spec.num_hidden_layers)
    impl = ctx.impl_kwargs["model_impl"]
    cfg, reductions, need = choose_config(ctx.raw.config, layers, budget, torch.float32, ctx.machine.device, impl)
    if cfg is None:
        raise MemoryError(f"even a reduced copy needs {need} bytes, over the {budget}-byte budget")
    layers = int(text_config(cfg)["num_hidden_layers"])
    model = dummy_model(spec_for_config(cfg, model_impl=impl), torch.device(ctx.machine.device), ctx.options.seed)
    true_widths = not any(r.startswith(("vocab", "width")) for r in reductions)
    return model, {"layers": layers, "true_widths": true_widths, "reductions": reductions, "dtype": "float32",
                   "tokens": COMPILE_TOKENS, "path": "uncached prefill (the engine's paged path is not compiled)"}


def trial_row(ctx: GateContext) -> dict[str, Any]:
    """Compiled vs eager logits of a small copy of the model; on failure, the fallback ladder."""
    backend = ctx.options.compile_backend or "inductor"
    model, setup = _compile_model(ctx)
    device = next(model.parameters()).device
    ids = torch.arange(COMPILE_TOKENS, device=device) % model.spec.vocab_size
    positions = torch.arange(COMPILE_TOKENS, device=device)
    with torch.no_grad():
        eager = model.compute_logits(model(ids, positions))
    rungs: list[dict[str, Any]] = []
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=backend, dynamic=False)
    t0 = time.perf_counter()
    error = None
    try:
        with torch.no_grad():
            out = model.compute_logits(compiled(ids, positions))
        err = rel_rmse(out, eager)
        ok = err <= COMPILE_TOLERANCE
        detail = f"rel err vs eager {err:.1e} (tolerance {COMPILE_TOLERANCE:.0e})"
    except Exception as exc:  # noqa: BLE001 - a compiler failure is the finding
        logger.exception("torch.compile trial failed")
        ok, err, error = False, None, f"{type(exc).__name__}: {str(exc)[:500]}"
        detail = error
    seconds = time.perf_counter() - t0
    graph_breaks = dict(counters.get("graph_break", {}))
    graphs = int(counters.get("stats", {}).get("unique_graphs", 0))
    rungs.append({"mode": f"torch.compile(backend={backend!r})", "status": "pass" if ok else "fail",
                  "detail": detail, "seconds": seconds})
    evidence = {"backend": backend, **setup, "rel_err": err, "compile_and_run_seconds": seconds,
                "graphs": graphs, "graph_breaks": sum(graph_breaks.values()),
                "graph_break_reasons": [str(k)[:200] for k in list(graph_breaks)[:5]], "rungs": rungs}
    if ok:
        return row("torch.compile", "supported",
                   f"model forward compiled with backend {backend!r} matches eager ({err:.1e}); {graphs} graphs, "
                   f"{sum(graph_breaks.values())} graph breaks; the engine itself runs eagerly (no compile option "
                   "yet)", **evidence)
    # Fallback ladder: eager, then the compiled callable with dynamo disabled.
    with torch.no_grad():
        again = model.compute_logits(model(ids, positions))
    rungs.append({"mode": "eager", "status": "pass" if torch.isfinite(again).all() else "fail",
                  "detail": "same model without compile"})
    try:
        with dynamo_disabled(), torch.no_grad():
            out = model.compute_logits(compiled(ids, positions))
        err3 = rel_rmse(out, eager)
        rungs.append({"mode": "TORCHDYNAMO_DISABLE=1", "status": "pass" if err3 <= COMPILE_TOLERANCE else "fail",
                      "detail": f"rel err vs eager {err3:.1e}"})
    except Exception as exc:  # noqa: BLE001
        rungs.append({"mode": "TORCHDYNAMO_DISABLE=1", "status": "fail", "detail": f"{type(exc).__name__}: {exc}"})
    ctx.ladder.append({"gate": "features", "check": "torch.compile", "rungs": rungs,
                       "outcome": f"compiled mode failed ({detail}); "
                                  + ("eager works" if rungs[1]["status"] == "pass" else "eager fails too")})
    return row("torch.compile", "unsupported", f"compile failed: {detail}; fell back to eager", **evidence)

