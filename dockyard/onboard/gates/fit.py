"""Gate 2, fit: the memory plan against the target device, and the tensor-parallel size that would fit.

The plan is the run's own (``dockyard.run_plan``): the dtype the engine would use on the target device
(``--device-memory`` means a GPU of that size; ``--dtype`` overrides), the bytes the checkpoint stores (FP8
with its scales, GGUF blocks) and the bytes the run holds, the KV cache the engine allocates and the KV the
model needs (sliding-window layers keep their window). Tensor parallelism is suggested only where ranks have
memory of their own (GPUs), and only at sizes the model's parallel check accepts.

A model that does not fit one device is a (soft) failure: the gates after it still run, the dummy
gate with fewer layers, so the rest of the onboarding is not lost on a small machine.
"""

from __future__ import annotations

import torch

from dockyard.distributed.sharding import check_parallel_config
from dockyard.errors import ConfigError
from dockyard.onboard.context import GateContext, Outcome
from dockyard.onboard.quantization import quantization_verdict
from dockyard.run_plan import MAX_NUM_BATCHED_TOKENS, MAX_NUM_SEQS, RunTarget, plan_for_run, run_dtype

GiB = 1024**3
MIN_CONTEXT = 4096  # "fits" means: weights, activations, overhead and one sequence of this many tokens
TP_SIZES = (1, 2, 4, 8)


def serving_dtype(ctx: GateContext) -> torch.dtype:
    """The dtype the engine runs in on this machine (``--dtype``, else the engine's ``auto``)."""
    machine = RunTarget(ctx.machine.device, True)
    return run_dtype(ctx.options.dtype, ctx.spec.torch_dtype, machine)


def plan_target(ctx: GateContext) -> RunTarget:
    """The device the plan is for: this machine's, or a GPU of ``--device-memory``."""
    return RunTarget.for_machine(ctx.machine.device, ctx.options.device_memory_gib is not None)


def bytes_per_device(plan, tp: int, kv_heads: int, context: int) -> int:
    """Weights split tp ways; KV heads split up to their count (replicated beyond); the rest per device."""
    kv_split = max(1, min(tp, kv_heads))
    return (plan.weight_bytes // tp + plan.activation_peak_bytes + plan.overhead_bytes
            + context * plan.kv_bytes_per_token // kv_split)


def ensure_plan(ctx: GateContext) -> None:
    """The memory plan of the target device on ``ctx`` (computed here when fit was skipped)."""
    if ctx.spec is None:
        return
    if ctx.dtype is None:
        ctx.dtype = serving_dtype(ctx)
    if ctx.plan is None:
        ctx.plan, ctx.plan_fp8_path = plan_for_run(ctx.source, plan_target(ctx), ctx.options.dtype,
                                                   kv_cache_dtype=ctx.options.kv_cache_dtype)


def quantization_of(ctx: GateContext) -> dict[str, str]:
    """The checkpoint's quantization and what the run on the plan's target does with it (``onboard.quantization``)."""
    ensure_plan(ctx)
    return quantization_verdict(ctx.source, ctx.features, ctx.plan, plan_target(ctx))


def tensor_parallel_advice(ctx: GateContext, context: int) -> tuple[int | None, dict[str, object], str]:
    """(smallest accepted size that fits or None, each size's verdict, the advice in words)."""
    target = plan_target(ctx)
    if target.device_type == "cpu":
        return None, {}, ("tensor parallelism splits a model over GPUs with memory of their own; on this CPU "
                          "machine every rank would share the same RAM, so it cannot make the model fit")
    sizes: dict[str, object] = {}
    for tp in TP_SIZES[1:]:
        try:
            check_parallel_config(ctx.spec, tp)
        except ConfigError as exc:
            sizes[str(tp)] = f"refused: {exc}"
            continue
        plan_tp, _ = plan_for_run(ctx.source, target, ctx.options.dtype, tp_size=tp,
                                  kv_cache_dtype=ctx.options.kv_cache_dtype)
        need = bytes_per_device(plan_tp, tp, ctx.spec.num_key_value_heads, context)
        sizes[str(tp)] = {"bytes_per_device": need, "fits": need <= ctx.machine.device_bytes}
        if need <= ctx.machine.device_bytes:
            return tp, sizes, f"tensor-parallel size {tp} would fit ({need / GiB:.1f} GiB per device)"
    accepted = [tp for tp, v in sizes.items() if isinstance(v, dict)]
    if not accepted:
        return None, sizes, ("no tensor-parallel size the engine accepts for this model "
                             f"({', '.join(map(str, TP_SIZES[1:]))} refused: see evidence)")
    return None, sizes, f"does not fit even at tensor-parallel size {accepted[-1]} (the largest accepted)"


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
    tp_fit, tp_sizes, tp_advice = (None, {}, "") if fits else tensor_parallel_advice(ctx, context)
    target = plan_target(ctx)
    quant = quantization_of(ctx)
    evidence = {
        "device": target.device_type,
        "device_present": target.present,
        "device_name": ctx.machine.device_name if target.present else f"a GPU of {device_bytes / GiB:.1f} GiB",
        "device_bytes": device_bytes,
        "device_bytes_source": ctx.machine.device_bytes_source,
        "dtype": plan.dtype,
        "weight_format": plan.weight_format,
        "fp8_path": ctx.plan_fp8_path,
        "quantization": quant,
        "num_parameters": plan.num_parameters,
        "active_parameters": plan.active_parameters,
        "checkpoint_bytes": plan.checkpoint_bytes,
        "checkpoint_bytes_by_dtype": plan.checkpoint_bytes_by_dtype,
        "checkpoint_bytes_source": plan.checkpoint_source,
        "weight_bytes": plan.weight_bytes,
        "weight_bytes_by_dtype": plan.weight_bytes_by_dtype,
        "kv_bytes_per_token": plan.kv_bytes_per_token,
        "kv_layers": {"total": plan.num_layers, "sliding": plan.sliding_layers, "window": plan.sliding_window},
        "kv_bytes_at_config_max_len": {
            "engine_allocates": spec.max_model_len * plan.kv_bytes_per_token,
            "model_needs": plan.kv_bytes_needed(spec.max_model_len),
            "note": "the engine keeps every layer's KV for the whole context; sliding-window layers need only "
                    "their window (not trimmed by the engine yet)" if plan.sliding_layers else "every layer "
                    "attends to the whole context"},
        "activation_peak_bytes": plan.activation_peak_bytes,
        "overhead_bytes": plan.overhead_bytes,
        "fixed_bytes": plan.fixed_bytes,
        "min_context_tokens": context,
        "bytes_needed": need,
        "margin_bytes": margin,
        "fits": fits,
        "kv_tokens_that_fit": plan.kv_tokens_that_fit(device_bytes),
        "smallest_tensor_parallel_size": tp_fit,
        "tensor_parallel_sizes": tp_sizes,
        "tensor_parallel_advice": tp_advice or None,
        "tensor_parallel_rule": "per device: weights/tp (dequantized: no native FP8 under TP) + activations + "
                                "overhead + KV of the context split over min(tp, kv_heads); only sizes "
                                "check_parallel_config accepts",
        "engine_limits": {"max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS, "max_num_seqs": MAX_NUM_SEQS},
    }
    where = f"{device_bytes / GiB:.1f} GiB {target.device_type}"
    stored = (f"; checkpoint {plan.checkpoint_bytes / GiB:.2f} GiB"
              if plan.checkpoint_bytes is not None and plan.checkpoint_bytes != plan.weight_bytes else "")
    quantized = "" if quant["handling"] == "none" else f"{quant['scheme']}, {quant['handling']}; "
    head = (f"{quantized}{plan.weight_bytes / GiB:.2f} GiB weights ({plan.weight_format}){stored}, KV "
            f"{plan.kv_bytes_per_token:,} B/token")
    if fits:
        return Outcome("pass", f"{head}; fits {where} with {margin / GiB:.1f} GiB to spare", evidence)
    return Outcome("fail", f"{head}; does NOT fit {where}: short by {-margin / GiB:.1f} GiB; {tp_advice}", evidence,
                   hard=False)
