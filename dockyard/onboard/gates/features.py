"""Gate 6, features: each serving feature tried (or said why not), one row of the feature matrix each.

Statuses: ``supported`` (tried here and it worked), ``unsupported`` (the model needs it or the
checkpoint has it, and dockyard cannot do it yet, or it was tried and failed), ``not-applicable``
(the model has no use for it), ``checkpoint-missing`` (the checkpoint carries nothing for it),
``not-run`` (it could not be tried on this machine, e.g. it needs a GPU). Nothing is called
supported without a trial on this run.

The torch.compile trial follows the fallback ladder: compiled, then eager, then compiled with
``TORCHDYNAMO_DISABLE=1``; each rung tried is recorded on the context for the report.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import torch

from dockyard.onboard.config_features import is_moe
from dockyard.onboard.context import GateContext, Outcome

logger = logging.getLogger(__name__)

COMPILE_TOLERANCE = 1e-4  # compiled vs eager logits, fp32: kernels may reassociate sums
COMPILE_TOKENS = 16
COMPILE_LAYERS = 2


def _row(feature: str, status: str, why: str, **evidence: Any) -> dict[str, Any]:
    return {"feature": feature, "status": status, "why": why, "evidence": evidence}


@contextlib.contextmanager
def _dynamo_disabled() -> Iterator[None]:
    """TORCHDYNAMO_DISABLE=1 for the duration (the env var and the live config switch it controls)."""
    import torch._dynamo

    previous_env = os.environ.get("TORCHDYNAMO_DISABLE")
    previous_cfg = torch._dynamo.config.disable
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    torch._dynamo.config.disable = True
    try:
        yield
    finally:
        torch._dynamo.config.disable = previous_cfg
        if previous_env is None:
            os.environ.pop("TORCHDYNAMO_DISABLE", None)
        else:
            os.environ["TORCHDYNAMO_DISABLE"] = previous_env


def _trial_model(ctx: GateContext) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A COMPILE_LAYERS-layer copy of the model with dummy weights (true widths when the dummy gate had them)."""
    from dockyard.onboard.gates.dummy import _text, choose_config, memory_budget
    from dockyard.registry import build_model
    from dockyard.spec import ModelSpec
    from dockyard.weights.dummy import iter_dummy
    from dockyard.weights.loader import load_weights

    budget, _ = memory_budget(ctx)
    layers = min(COMPILE_LAYERS, ctx.spec.num_hidden_layers)
    cfg, reductions, need = choose_config(ctx.raw.config, layers, budget, torch.float32, ctx.machine.device)
    if cfg is None:
        raise MemoryError(f"even a reduced copy needs {need} bytes, over the {budget}-byte budget")
    layers = int(_text(cfg)["num_hidden_layers"])
    spec = ModelSpec.from_hf_config(cfg)
    device = torch.device(ctx.machine.device)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.device(device):
            model = build_model(spec).eval()
    finally:
        torch.set_default_dtype(previous)
    load_weights(model, iter_dummy(model, ctx.options.seed))
    true_widths = not any(r.startswith(("vocab", "width")) for r in reductions)
    return model, {"layers": layers, "true_widths": true_widths, "reductions": reductions, "dtype": "float32",
                   "tokens": COMPILE_TOKENS, "path": "uncached prefill (the engine's paged path is not compiled)"}


def _compile_trial(ctx: GateContext) -> dict[str, Any]:
    import torch._dynamo
    from torch._dynamo.utils import counters

    from dockyard.onboard.equivalence import rel_rmse

    backend = ctx.options.compile_backend or "inductor"
    model, setup = _trial_model(ctx)
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
        return _row("torch.compile", "supported",
                    f"model forward compiled with backend {backend!r} matches eager ({err:.1e}); {graphs} graphs, "
                    f"{sum(graph_breaks.values())} graph breaks; the engine itself runs eagerly (no compile option "
                    "yet)", **evidence)
    # Fallback ladder: eager, then the compiled callable with dynamo disabled.
    with torch.no_grad():
        again = model.compute_logits(model(ids, positions))
    rungs.append({"mode": "eager", "status": "pass" if torch.isfinite(again).all() else "fail",
                  "detail": "same model without compile"})
    try:
        with _dynamo_disabled(), torch.no_grad():
            out = model.compute_logits(compiled(ids, positions))
        err3 = rel_rmse(out, eager)
        rungs.append({"mode": "TORCHDYNAMO_DISABLE=1", "status": "pass" if err3 <= COMPILE_TOLERANCE else "fail",
                      "detail": f"rel err vs eager {err3:.1e}"})
    except Exception as exc:  # noqa: BLE001
        rungs.append({"mode": "TORCHDYNAMO_DISABLE=1", "status": "fail", "detail": f"{type(exc).__name__}: {exc}"})
    ctx.ladder.append({"gate": "features", "check": "torch.compile", "rungs": rungs,
                       "outcome": f"compiled mode failed ({detail}); "
                                  + ("eager works" if rungs[1]["status"] == "pass" else "eager fails too")})
    return _row("torch.compile", "unsupported", f"compile failed: {detail}; fell back to eager", **evidence)


def _needs_gpus(ctx: GateContext, feature: str, count: int, implemented: bool, what: str,
                note: str = "") -> dict[str, Any]:
    impl_note = "" if implemented else f"; dockyard has no {what} implementation yet either{note}"
    if ctx.machine.device != "cuda":
        return _row(feature, "not-run", f"needs {'a GPU' if count == 1 else f'{count}+ GPUs'}{impl_note}")
    if ctx.machine.num_gpus < count:
        return _row(feature, "not-run", f"needs {count}+ GPUs, found {ctx.machine.num_gpus}{impl_note}")
    if not implemented:
        return _row(feature, "unsupported", f"dockyard has no {what} implementation yet{note}")
    return _row(feature, "not-run", f"{what} exists but this gate has no trial for it yet")


def _fp8_row(ctx: GateContext) -> dict[str, Any]:
    """FP8 checkpoint: dequantized on load to the serving dtype; the real gate's strict load is the trial."""
    dtype = str(ctx.dtype).removeprefix("torch.") if ctx.dtype is not None else "the model dtype"
    fp8 = getattr(ctx.source, "fp8", None)
    evidence = {"path": "dequantize-on-load (weight x scale, block-expanded)", "dtype": dtype,
                "weight_block_size": list(fp8.block) if fp8 is not None and fp8.block else None,
                "native_fp8_matmul": "not implemented"}
    if fp8 is None:
        return _row("FP8", "not-run", f"FP8 checkpoint (quantization_config fp8), dequantized on load to {dtype}; "
                                      "no FP8 safetensors were loaded on this run (dummy weights)", **evidence)
    if ctx.real.get("passed"):
        return _row("FP8", "supported", f"dequantized on load to {dtype}: the real gate loaded this FP8 checkpoint "
                                        "(every weight paired with its scale) and checked its output; no native "
                                        "FP8 matmul yet", **evidence)
    return _row("FP8", "not-run", f"dequantized on load to {dtype}, but the real gate did not load and check this "
                                  "checkpoint on this run (see its row)", **evidence)


def run(ctx: GateContext) -> Outcome:
    from dockyard.engine.model_runner import ModelRunner

    if ctx.spec is None:
        return Outcome("skip", "no validated spec (inspect did not pass)", hard=False)
    keys = {f.key for f in ctx.features}
    distributed = importlib.util.find_spec("dockyard.distributed") is not None
    rows = [_needs_gpus(ctx, "CUDA graph", 1, bool(getattr(ModelRunner, "supports_cuda_graphs", False)),
                        "CUDA-graph capture", " (the model runner decodes eagerly)")]
    try:
        rows.append(_compile_trial(ctx))
    except Exception as exc:  # noqa: BLE001 - the trial could not even be set up: say so, do not crash
        logger.exception("torch.compile trial could not be set up")
        rows.append(_row("torch.compile", "not-run", f"trial could not be set up: {type(exc).__name__}: {exc}"))
    rows.append(_needs_gpus(ctx, "tensor parallel", 2, distributed, "tensor-parallel"))
    if is_moe(ctx.features):
        rows.append(_needs_gpus(ctx, "expert parallel", 2, False, "expert-parallel (or MoE)"))
    else:
        rows.append(_row("expert parallel", "not-applicable", "dense model: the config has no experts"))
    quant = sorted(k.split(":", 1)[1] for k in keys if k.startswith("quantized:"))
    if "fp8" in quant:
        rows.append(_fp8_row(ctx))
    else:
        rows.append(_row("FP8", "checkpoint-missing", "the checkpoint is not FP8 (no quantization_config with "
                                                      "quant_method fp8)"))
    for method in (m for m in quant if m != "fp8"):
        rows.append(_row(f"quantization ({method})", "unsupported", f"quant_method {method!r} is not implemented"))
    if ctx.source is not None and ctx.source.kind == "gguf":
        real_ok = bool(ctx.real.get("passed"))
        rows.append(_row("GGUF dequantization", "supported" if real_ok else "not-run",
                         "the real gate loaded this GGUF (dequantized on load) and checked its output" if real_ok
                         else "the real gate did not pass on this GGUF"))
    if "mtp" in keys:
        rows.append(_row("MTP", "unsupported", "the checkpoint has MTP layers (num_nextn_predict_layers > 0); "
                                               "dockyard has no speculative decoding yet"))
    else:
        rows.append(_row("MTP", "checkpoint-missing", "no MTP / speculative-decoding heads in the checkpoint "
                                                      "(num_nextn_predict_layers absent or 0)"))
    if "multimodal" in keys:
        rows.append(_row("multimodal", "unsupported", "the config has a vision tower; dockyard serves text only"))
    else:
        rows.append(_row("multimodal", "not-applicable", "text-only model (no vision_config)"))
    ctx.feature_matrix = rows
    for row in rows:
        logger.info("%-22s %-18s %s", row["feature"], row["status"], row["why"])
    summary = "; ".join(f"{r['feature']}: {r['status']}" for r in rows)
    return Outcome("pass", summary, {"matrix": rows}, hard=False)
