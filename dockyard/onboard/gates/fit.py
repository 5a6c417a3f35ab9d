"""Gate 2, fit: the memory plan against the target device, and the tensor-parallel size that would fit.

A model that does not fit one device is a (soft) failure: the gates after it still run, the dummy
gate with fewer layers, so the rest of the onboarding is not lost on a small machine.
"""

from __future__ import annotations

import torch

from dockyard.onboard.context import GateContext, Outcome

GiB = 1024**3
# The engine's defaults (dockyard.engine.llm.LLM): the plan is for the engine as it would start.
MAX_NUM_BATCHED_TOKENS = 2048
MAX_NUM_SEQS = 64
MIN_CONTEXT = 4096  # "fits" means: weights, activations, overhead and one sequence of this many tokens
TP_SIZES = (1, 2, 4, 8)


def serving_dtype(ctx: GateContext) -> torch.dtype:
    from dockyard.engine.llm import resolve_dtype

    return resolve_dtype("auto", ctx.spec.torch_dtype, torch.device(ctx.machine.device))


def bytes_per_device(plan, tp: int, kv_heads: int, context: int) -> int:
    """Weights split tp ways; KV heads split up to their count (replicated beyond); the rest per device."""
    kv_split = max(1, min(tp, kv_heads))
    return (plan.weight_bytes // tp + plan.activation_peak_bytes + plan.overhead_bytes
            + context * plan.kv_bytes_per_token // kv_split)


def ensure_plan(ctx: GateContext) -> None:
    """The memory plan at the serving dtype on ``ctx`` (computed here when fit was skipped)."""
    from dockyard.memory import plan_memory

    if ctx.plan is None and ctx.spec is not None:
        ctx.dtype = serving_dtype(ctx)
        ctx.plan = plan_memory(ctx.spec, ctx.dtype, max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
                               max_num_seqs=MAX_NUM_SEQS, device_type=ctx.machine.device)


def run(ctx: GateContext) -> Outcome:
    spec = ctx.spec
    if spec is None:
        return Outcome("skip", "no validated spec (inspect did not pass)", hard=False)
    ensure_plan(ctx)
    plan = ctx.plan
    device_bytes = ctx.machine.device_bytes
    context = min(MIN_CONTEXT, spec.max_model_len)
    need = plan.bytes_for(context)
    margin = device_bytes - need
    ctx.fits_device = fits = margin >= 0
    tp_fit = next((tp for tp in TP_SIZES
                   if bytes_per_device(plan, tp, spec.num_key_value_heads, context) <= device_bytes), None)
    evidence = {
        "device": ctx.machine.device,
        "device_name": ctx.machine.device_name,
        "device_bytes": device_bytes,
        "device_bytes_source": ctx.machine.device_bytes_source,
        "dtype": plan.dtype,
        "num_parameters": plan.num_parameters,
        "active_parameters": plan.active_parameters,
        "weight_bytes": plan.weight_bytes,
        "kv_bytes_per_token": plan.kv_bytes_per_token,
        "activation_peak_bytes": plan.activation_peak_bytes,
        "overhead_bytes": plan.overhead_bytes,
        "fixed_bytes": plan.fixed_bytes,
        "min_context_tokens": context,
        "bytes_needed": need,
        "margin_bytes": margin,
        "fits": fits,
        "kv_tokens_that_fit": plan.kv_tokens_that_fit(device_bytes),
        "smallest_tensor_parallel_size": tp_fit,
        "tensor_parallel_rule": "per device: weights/tp + activations + overhead + KV of the context split over "
                                "min(tp, kv_heads)",
        "engine_limits": {"max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS, "max_num_seqs": MAX_NUM_SEQS},
    }
    where = f"{device_bytes / GiB:.1f} GiB {ctx.machine.device}"
    head = f"{plan.weight_bytes / GiB:.2f} GiB weights ({plan.dtype}), KV {plan.kv_bytes_per_token:,} B/token"
    if fits:
        return Outcome("pass", f"{head}; fits {where} with {margin / GiB:.1f} GiB to spare", evidence)
    tp = f"tensor-parallel size {tp_fit} would fit" if tp_fit else "does not fit even on 8 such devices"
    return Outcome("fail", f"{head}; does NOT fit {where}: short by {-margin / GiB:.1f} GiB; {tp}", evidence,
                   hard=False)
