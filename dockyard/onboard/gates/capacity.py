"""Gate 7, capacity: the config's max length vs what the device holds, and concurrency at a baseline.

From the memory plan of the fit gate (the target device: a GPU of ``--device-memory``, else this
machine's): KV tokens that fit once weights, activations and overhead are placed; the longest single
sequence that fits; how many sequences fit at each context length; and the baseline question, 16
sequences of 128k tokens (or of the model's own maximum if shorter).
"""

from __future__ import annotations

from dockyard.engine.llm_engine import EngineConfig
from dockyard.onboard.context import GateContext, Outcome
from dockyard.onboard.gates.fit import ensure_plan

GiB = 1024**3
BASELINE_CONTEXT = 131072
BASELINE_SEQUENCES = 16
CONTEXT_ROWS = (4096, 8192, 32768, 131072)


def run(ctx: GateContext) -> Outcome:
    ensure_plan(ctx)
    plan, spec = ctx.plan, ctx.spec
    if plan is None or spec is None:
        return Outcome("skip", "no validated spec (inspect did not pass)", hard=False)
    device_bytes = ctx.machine.device_bytes
    kv_tokens = plan.kv_tokens_that_fit(device_bytes)
    if kv_tokens == 0:
        return Outcome("skip", f"weights, activations and overhead ({plan.fixed_bytes / GiB:.1f} GiB) leave no room "
                               f"for a KV cache on {device_bytes / GiB:.1f} GiB: see fit", {"kv_tokens_that_fit": 0},
                       hard=False)
    config_max = spec.max_model_len
    practical = min(config_max, kv_tokens)
    rows = []
    for context in sorted({*(c for c in CONTEXT_ROWS if c < config_max), config_max}):
        rows.append({"context_len": context, "sequences_fit": kv_tokens // context,
                     "kv_bytes_per_sequence": context * plan.kv_bytes_per_token,
                     "kv_bytes_needed_per_sequence": plan.kv_bytes_needed(context)})
    baseline_ctx = min(BASELINE_CONTEXT, config_max)
    baseline_fit = kv_tokens // baseline_ctx
    baseline = {"context_len": baseline_ctx, "sequences_wanted": BASELINE_SEQUENCES, "sequences_fit": baseline_fit,
                "fits": baseline_fit >= BASELINE_SEQUENCES,
                "kv_bytes_needed": BASELINE_SEQUENCES * baseline_ctx * plan.kv_bytes_per_token,
                "kv_bytes_available": kv_tokens * plan.kv_bytes_per_token}
    evidence = {
        "device_bytes": device_bytes,
        "dtype": plan.dtype,
        "kv_bytes_per_token": plan.kv_bytes_per_token,
        "kv_tokens_that_fit": kv_tokens,
        "config_max_len": config_max,
        "practical_max_len": practical,
        "rows": rows,
        "baseline": baseline,
    }
    if plan.sliding_layers:
        evidence["sliding_window_note"] = (
            f"{plan.sliding_layers} of {plan.num_layers} layers attend to a {plan.sliding_window}-token window: a "
            f"sequence of {config_max:,} tokens needs {plan.kv_bytes_needed(config_max) / GiB:.2f} GiB of KV, but "
            f"the engine allocates every layer for the whole context ({config_max * plan.kv_bytes_per_token / GiB:.2f}"
            " GiB); the figures above are what the engine allocates")
    if ctx.machine.device == "cpu" and ctx.options.device_memory_gib is None:
        cpu_budget = EngineConfig.kv_cache_memory_bytes
        evidence["engine_cpu_kv_budget"] = {
            "bytes": cpu_budget, "tokens": cpu_budget // plan.kv_bytes_per_token,
            "note": "on CPU the engine sizes its KV pool from kv_cache_memory_bytes (LLM(kv_cache_memory_bytes=...)), "
                    "not from RAM; the numbers above are what RAM would allow"}
    ctx.capacity = evidence
    base = (f"{BASELINE_SEQUENCES}×{baseline_ctx // 1024}k: " + ("fits" if baseline["fits"] else
            f"no, {baseline_fit} fit"))
    limit = "the config's maximum fits" if practical == config_max else f"only {practical:,} tokens fit"
    return Outcome("pass", f"max len {config_max:,} (config) vs {practical:,} practical ({limit}); {base}",
                   evidence, hard=False)
