"""Gate 8, performance: decode and prefill speed on the run's device, each as a fraction of its roofline.

The roofline is measured in the same run (``dockyard.bench.ceilings``: device copy bandwidth, matmul rate
in the run's dtype), never taken from a datasheet, and the figures come from the functions
``dockyard bench latency`` uses, so the gate and the benchmark agree on one model:

- decode tokens/s at batch 1 and at the largest batch that fits (up to 64): the floor of a step is
  the weight bytes it reads (MoE: the experts it routed to, counted on the device) plus the batch's
  K/V over the copy bandwidth;
- time to first token of a 1k- and an 8k-token prompt (bounded by the model's max length): the
  floor is the prompt's model FLOPs over the matmul rate.

The model runs with dummy weights at the shapes the dummy gate chose (speed does not depend on the
values). A fraction under 0.3 on a GPU is a warning naming its likely cause: decode steps run eagerly
(and why), the reference attention or the expert loop on the hot path, a prefill that waited on the host
queueing its eager forward (its forward host time, from :func:`~dockyard.bench.latency.ttft`, close to its
whole time), or the generic (transformers) path. On a CPU everything is scaled down (at most four layers, short
prompts, few steps) and the evidence says so: the fractions then say how the CPU path uses this CPU, nothing
about a GPU.
"""

from __future__ import annotations

import gc
import json
import logging
import random
import tempfile
from pathlib import Path
from typing import Any

import torch

from dockyard.bench.ceilings import measure
from dockyard.bench.latency import decode_rate, ttft, weight_read_bytes, with_decode_roofline, with_ttft_roofline
from dockyard.dtypes import dtype_name
from dockyard.engine.llm import LLM
from dockyard.memory import plan_memory
from dockyard.onboard.config_surgery import text_config, with_layers
from dockyard.onboard.context import GateContext, Outcome
from dockyard.onboard.gates.fit import serving_dtype
from dockyard.ops.attention import decode_backend
from dockyard.ops.moe import RoutedExpertCounter, count_routed_experts

logger = logging.getLogger(__name__)

WARN_BELOW = 0.3  # a GPU figure under this fraction of its roofline is a warning
NO_CAUSE = "no known cause: the engine's fast paths are on"
HOST_BOUND = 0.8  # a prefill whose forward took this fraction of its time to queue waited on the host
GPU = {"batches": (1, 64), "ttft_lens": (1024, 8192), "decode_input_len": 128, "output_len": 128, "layers": None}
CPU = {"batches": (1, 4), "ttft_lens": (64, 256), "decode_input_len": 32, "output_len": 8, "layers": 4}
SCALED_DOWN_NOTE = ("scaled down on CPU: at most {layers} layers, batches {batches}, prompts of {ttft_lens} tokens, "
                    "{output_len} decode steps, ceilings from a 64 MiB copy and a 1024² matmul; the fractions describe "
                    "this CPU, not a GPU (above 1: the model's larger matmuls ran faster than the small ceiling one)")


def _host_bound(r: dict[str, Any]) -> list[str]:
    """The cause of a slow time to first token (:func:`~dockyard.bench.latency.ttft`'s ``r``) that its own
    figures show: its forward took nearly all of it to queue on the host."""
    if r["forward_host_seconds"] < HOST_BOUND * r["seconds"]:
        return []
    return [f"the prefill of {r['input_len']:,} tokens waited on the host: queueing its eager forward took "
            f"{1e3 * r['forward_host_seconds']:,.1f} of its {1e3 * r['seconds']:,.1f} ms"]


def _likely_causes(llm: LLM, path: str) -> list[str]:
    """What keeps a GPU run far from its roofline, as far as the engine can tell."""
    causes = []
    runner = llm.engine.runner
    if runner.graphs is None:
        causes.append(f"decode steps run eagerly (no CUDA graphs): {runner.eager_reason or 'not captured'}")
    kv = runner.kv_cache[0]  # one layer's cache: [K/V entries, blocks, block size, heads, head dim]
    q = torch.empty(1, llm.spec.num_attention_heads, kv.shape[-1], dtype=llm.dtype, device=llm.device)
    if decode_backend(q, kv) == "reference":
        causes.append("decode attention runs the reference (PyTorch) kernel, not Triton")
    unfused = [name for name, m in llm.model.named_modules() if getattr(m, "use_fused", True) is False]
    if unfused:
        causes.append(f"MoE experts run the reference loop, not the fused kernel ({unfused[0]} and "
                      f"{len(unfused) - 1} more)")
    if path == "transformers":
        causes.append("the generic (transformers) path: HF's modules, without dockyard's fused kernels"
                      + (" (decode in CUDA graphs)" if runner.graphs is not None else ""))
    return causes


def _engine_config(ctx: GateContext, scale: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The config that runs (the dummy gate's choice, at most ``scale['layers']`` layers) and the layer note."""
    cfg = ctx.dummy.config
    layers = int(text_config(cfg)["num_hidden_layers"])
    if scale["layers"] is not None and layers > scale["layers"]:
        cfg, layers = with_layers(cfg, scale["layers"]), scale["layers"]
    shapes = ("" if ctx.dummy.true_shapes else
              f", reduced shapes as in the dummy gate ({'; '.join(ctx.dummy.reductions)})")
    return cfg, f"{layers} of {ctx.spec.num_hidden_layers} layers{shapes}"


def run(ctx: GateContext) -> Outcome:
    if ctx.spec is None or ctx.dummy is None:
        return Outcome("skip", "no engine ran with dummy weights (the dummy gate did not pass)", hard=False)
    on_gpu = ctx.machine.device == "cuda"
    scale = GPU if on_gpu else CPU
    dtype = ctx.dtype or serving_dtype(ctx)
    device = torch.device(ctx.machine.device)
    cfg, layer_note = _engine_config(ctx, scale)
    t = text_config(cfg)
    max_len = int(t.get("max_position_embeddings") or ctx.spec.max_model_len)
    ttft_lens = sorted({min(n, max_len - 1) for n in scale["ttft_lens"]})
    decode_len = scale["decode_input_len"] + scale["output_len"]
    plan = plan_memory(ctx.spec, dtype)
    kv_tokens = (plan.kv_tokens_that_fit(ctx.machine.device_bytes) if on_gpu
                 else (1 << 30) // max(1, plan.kv_bytes_per_token))  # the engine's CPU KV budget: 1 GiB
    big = max(1, min(scale["batches"][1], kv_tokens // (decode_len + 16)))
    batches = sorted({1, big})
    # Routed experts are counted on the device from the first graph capture on: installed before the engine starts.
    counter = RoutedExpertCounter(device) if ctx.spec.moe is not None else None
    count_routed_experts(counter)
    ctx.step("loading the model with dummy weights")
    # An earlier gate's engine kept alive only by reference cycles would hold device memory while this engine
    # sizes its KV cache and is timed: collected first.
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    try:
        with tempfile.TemporaryDirectory(prefix="dockyard-perf-") as tmp:
            config_path = Path(tmp) / "config.json"
            config_path.write_text(json.dumps({**t, "architectures": cfg.get("architectures")}))
            llm = LLM(str(config_path), load_format="dummy", dtype=dtype, device=ctx.machine.device,
                      seed=ctx.options.seed, max_num_seqs=max(batches),
                      max_num_batched_tokens=max(max(ttft_lens), 256),
                      max_model_len=min(max_len, max(max(ttft_lens), decode_len) + 16), **ctx.impl_kwargs)
        ctx.step("measuring the device's copy bandwidth and matmul rate")
        ceilings = measure(llm.device, llm.dtype, scaled_down=not on_gpu)
        bandwidth, rate = ceilings["copy_bytes_per_s"], ceilings["matmul_flops_per_s"]
        rng = random.Random(ctx.options.seed)
        decode_rate(llm, 1, 16, 4, rng)  # warm-up: kernels compiled, graphs replayed once
        decode = []
        for batch in batches:
            ctx.step(f"decode at batch {batch}")
            decode.append(with_decode_roofline(decode_rate(llm, batch, scale["decode_input_len"], scale["output_len"],
                                                           rng, counter), bandwidth))
        count_routed_experts(None)  # as bench latency: the prefills run without the routing counter
        prefill = []
        for n in ttft_lens:
            ctx.step(f"time to first token of {n} tokens")
            prefill.append(with_ttft_roofline(ttft(llm, n, rng, repeat=3 if on_gpu else 1), rate))
        runner = llm.engine.runner
        path = ctx.spec.model_impl
        causes = _likely_causes(llm, path) if on_gpu else [
            "on a CPU neither CUDA graphs nor the Triton kernels run: the GPU's hot path was not measured"]
        graphs = runner.graphs.sizes if runner.graphs is not None else None
        weights = weight_read_bytes(llm)
        del llm
    finally:
        count_routed_experts(None)
    evidence: dict[str, Any] = {
        "device": ctx.machine.hardware_line, "dtype": dtype_name(dtype), "path": path, "layers_run": layer_note,
        "scaled_down": not on_gpu,
        "copy_bytes_per_s": bandwidth, "matmul_flops_per_s": rate, "weight_read_bytes": weights,
        "cuda_graphs": graphs, "decode": decode, "ttft": prefill, "warn_below": WARN_BELOW,
    }
    if not on_gpu:
        evidence["scaled_down_note"] = SCALED_DOWN_NOTE.format(**scale)
    # (figure, its likely causes): a decode figure the engine's causes, a prefill also its own host-bound time.
    low = [(f"decode batch {r['batch']}: {r['fraction_of_roofline']:.2f}", causes) for r in decode
           if r["fraction_of_roofline"] < WARN_BELOW]
    low += [(f"TTFT {r['input_len']}: MFU {r['mfu']:.2f}", _host_bound(r) + causes) for r in prefill
            if r["mfu"] < WARN_BELOW]
    evidence["warnings"] = ([f"{item} of the roofline, under {WARN_BELOW}; likely: {'; '.join(why or [NO_CAUSE])}"
                             for item, why in low] if on_gpu else [])
    if on_gpu:
        causes = [c for r in prefill for c in _host_bound(r)] + causes
    evidence["likely_causes"] = causes or [NO_CAUSE]
    logger.info("performance: %s", json.dumps({"decode": decode, "ttft": prefill}))
    parts = [f"decode b{r['batch']} {r['tokens_per_s']:,.1f} tok/s ({r['fraction_of_roofline']:.2f} of roofline)"
             for r in decode]
    parts += [f"TTFT {r['input_len']:,} {1e3 * r['seconds']:,.1f} ms (MFU {r['mfu']:.2f})" for r in prefill]
    where = "GPU" if on_gpu else "CPU, scaled down"
    summary = f"{'; '.join(parts)} ({where}, {layer_note}, dummy weights)"
    if evidence["warnings"]:
        first = (low[0][1] or [NO_CAUSE])[0]
        summary += f"; WARNING: {len(evidence['warnings'])} figures under {WARN_BELOW} of the roofline: {first}"
    return Outcome("pass", summary, evidence, hard=False)
