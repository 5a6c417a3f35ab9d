"""``dockyard bench throughput``: N requests with seeded random input/output lengths, run to completion.

    dockyard bench throughput                       # bundled model on CPU, scaled-down defaults
    dockyard bench throughput --model cfg.json --load-format dummy --device cuda --num-prompts 256 \
        --input-len 100 1024 --output-len 100 1024 --plot tput.png

Prompts are random token ids (like vLLM's random dataset); ``ignore_eos`` makes every request
produce exactly its output length. Prints requests/s, output tokens/s and total tokens/s, the
model-FLOPs utilization they imply (against the bf16 matmul rate measured in the same run), and
with ``--hf-baseline`` HF transformers' ``generate`` on the same config at ``--hf-batch-sizes``
(equal-length prompts of the mean input length, the mean output length, no padding waste): the
best of those is the baseline the engine's output tokens/s is divided by. ``--plot PATH`` draws each
request's end-to-end latency against its arrival order in the batch, with the run's roofline floor.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from typing import Any

import torch

from dockyard import LLM, SamplingParams
from dockyard.bench.args import THROUGHPUT_DEFAULTS, add_throughput_args, fill_defaults, run_and_report
from dockyard.bench.ceilings import measure
from dockyard.bench.hf_baseline import build_hf_model, hf_generate_rate
from dockyard.bench.plot import plot_throughput
from dockyard.engine_args import EngineArgs
from dockyard.memory import plan_memory
from dockyard.model_loader import resolve_device


class StepProfile:
    """Host-side timing of the engine's step phases (a device sync after each model call, so the
    GPU time lands in the phase that launched it): schedule, execute (graph replays separately),
    and the rest of ``step`` (appending tokens, stop checks, block hashing). The syncs defeat async
    scheduling's overlap: a profiled run is slower than a plain one."""

    def __init__(self, engine: Any) -> None:
        self.seconds = {"schedule": 0.0, "execute_graph": 0.0, "execute_eager": 0.0, "step": 0.0}
        self.counts = {"graph_steps": 0, "eager_steps": 0}
        runner, scheduler = engine.runner, engine.scheduler
        device = runner.device

        def timed(fn, key):
            def wrapper(*args, **kwargs):
                t = time.perf_counter()
                out = fn(*args, **kwargs)
                if key != "schedule" and device.type == "cuda":
                    torch.cuda.synchronize(device)
                self.seconds[key] += time.perf_counter() - t
                return out
            return wrapper

        execute_graph = runner._execute_graph

        def execute_graph_counted(*args):
            self.counts["graph_steps"] += 1
            return execute_graph(*args)

        runner._execute_graph = timed(execute_graph_counted, "execute_graph")
        runner.step = timed(runner.step, "execute_eager")  # includes graph steps; subtracted below
        scheduler.schedule = timed(scheduler.schedule, "schedule")
        engine.step = timed(engine.step, "step")
        self.engine = engine
        self.steps_before = engine.metrics.steps

    def summary(self) -> dict:
        s = dict(self.seconds)
        s["execute_eager"] -= s["execute_graph"]
        s["other"] = s["step"] - s["schedule"] - s["execute_graph"] - s["execute_eager"]
        steps = self.engine.metrics.steps - self.steps_before
        counts = {**self.counts, "eager_steps": steps - self.counts["graph_steps"]}
        return {**{k: round(v, 3) for k, v in s.items()}, **counts}


def run_throughput(args: argparse.Namespace) -> dict:
    """Load the model, run the workload to completion, measure the ceilings; the result."""
    fill_defaults(args, THROUGHPUT_DEFAULTS, resolve_device(args.device).type == "cuda")
    engine_args = EngineArgs.from_cli_args(args)
    llm = LLM(engine_args.model, **engine_args.to_kwargs())
    rng = random.Random(args.seed)
    vocab = llm.spec.vocab_size
    prompts, params = [], []
    for _ in range(args.num_prompts):
        n_in = rng.randint(*args.input_len)
        prompts.append([rng.randrange(vocab) for _ in range(n_in)])
        params.append(SamplingParams(max_tokens=rng.randint(*args.output_len), temperature=0.0, ignore_eos=True))
    # Warm-up: a slice of the same prompts with short outputs, so mixed prefill/decode steps of the
    # workload's shapes have compiled their kernels (Triton specializes on shapes) before the clock starts.
    # (Fresh token ids of the same lengths: the timed prompts must not hit the prefix cache.)
    warm_rng = random.Random(args.seed + 1)
    warm = [[warm_rng.randrange(vocab) for _ in prompt] for prompt in prompts[:32]]
    llm.generate(warm, SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    profile = StepProfile(llm.engine) if args.profile else None
    steps_before = llm.engine.metrics.steps
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=True)
    elapsed = time.perf_counter() - start
    n_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    n_in = sum(len(p) for p in prompts)
    result = {
        "model": llm.source.name, "device": str(llm.device), "dtype": str(llm.dtype).removeprefix("torch."),
        "num_prompts": args.num_prompts, "input_len": list(args.input_len), "output_len": list(args.output_len),
        "elapsed_s": round(elapsed, 2), "requests_per_s": round(args.num_prompts / elapsed, 3),
        "output_tokens_per_s": round(n_out / elapsed, 1), "total_tokens_per_s": round((n_in + n_out) / elapsed, 1),
        "input_tokens": n_in, "output_tokens": n_out, "engine": llm.engine.stats(),
        "torch_threads": torch.get_num_threads(),
    }
    # Roofline: every token's matmuls at the measured rate, and every step reading all weights once
    # at the measured bandwidth; the floor is the larger of the two.
    spec = llm.spec
    ceilings = measure(llm.device, llm.dtype, args.tensor_parallel_size)
    plan = plan_memory(spec, llm.dtype, kv_cache_dtype=llm.engine.runner.kv_cache_dtype)
    lm_head = spec.vocab_size * spec.hidden_size
    matmul_params = plan.active_parameters - lm_head * (1 if spec.tie_word_embeddings else 2)
    # Model FLOPs: the matmuls of every token, the lm_head of every sampled one (attention not counted).
    flops = 2 * matmul_params * (n_in + n_out) + 2 * lm_head * n_out
    steps = llm.engine.metrics.steps - steps_before
    compute_floor = flops / ceilings["matmul_flops_per_s"]
    memory_floor = steps * plan.weight_bytes / ceilings["copy_bytes_per_s"]
    floor = max(compute_floor, memory_floor)
    # KV reads of the decode steps: generated token j of a request (j >= 2) reads its context of I + j - 1
    # tokens, at the cache's bytes per token (1 byte per element with an FP8 KV cache).
    decode_context = sum((p.max_tokens - 1) * len(ids) + p.max_tokens * (p.max_tokens - 1) // 2
                         for ids, p in zip(prompts, params))
    kv_read_bytes = decode_context * plan.kv_bytes_per_token
    result["kv_cache_dtype"] = plan.kv_cache_dtype
    result["roofline"] = {
        **{k: round(v / 1e9, 1) for k, v in ceilings.items()},  # GB/s and GFLOP/s
        "model_flops": flops, "steps": steps, "compute_floor_s": round(compute_floor, 2),
        "memory_floor_s": round(memory_floor, 2), "fraction_of_roofline": round(floor / elapsed, 3),
        "roofline_output_tokens_per_s": round(n_out / floor, 1),
        "kv_read_bytes": kv_read_bytes, "kv_floor_s": round(kv_read_bytes / ceilings["copy_bytes_per_s"], 2),
        "weights_plus_kv_floor_s": round(memory_floor + kv_read_bytes / ceilings["copy_bytes_per_s"], 2),
        "mfu": round(flops / elapsed / ceilings["matmul_flops_per_s"], 3),
    }
    if profile is not None:
        result["profile"] = profile.summary()
    if args.hf_baseline:
        print(json.dumps({k: v for k, v in result.items() if k != "engine"}), file=sys.stderr, flush=True)
        device, dtype = llm.device, llm.dtype
        mean_in, mean_out = n_in // args.num_prompts, n_out // args.num_prompts
        del llm, profile  # the profile's wrappers hold the engine (and its KV cache)
        gc.collect()
        torch.cuda.empty_cache() if device.type == "cuda" else None
        model = build_hf_model(str(engine_args.model), device, dtype)
        runs = []
        for b in args.hf_batch_sizes:
            try:
                runs.append(hf_generate_rate(model, b, mean_in, mean_out, args.seed))
            except torch.OutOfMemoryError as exc:  # a batch HF cannot hold is recorded, not fatal
                runs.append({"batch": b, "error": f"out of memory: {str(exc).splitlines()[0][:120]}"})
                torch.cuda.empty_cache()
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
        best = max((r for r in runs if "output_tokens_per_s" in r), key=lambda r: r["output_tokens_per_s"])
        result["hf"] = {"runs": runs, "best_output_tokens_per_s": best["output_tokens_per_s"],
                        "speedup_output_tokens": round(result["output_tokens_per_s"] / best["output_tokens_per_s"], 2)}
        del model
    return result


def print_throughput(result: dict, as_json: bool) -> None:
    """The result as JSON, or three lines: the rates, the roofline, HF's baseline."""
    if as_json:
        json.dump(result, sys.stdout, indent=2)
        print()
        return
    print(f"{result['num_prompts']} requests in {result['elapsed_s']:.2f}s: {result['requests_per_s']} req/s, "
          f"{result['output_tokens_per_s']} output tok/s, {result['total_tokens_per_s']} total tok/s "
          f"({result['input_tokens']} prompt + {result['output_tokens']} generated tokens; {result['device']}, "
          f"{result['dtype']})")
    print(f"roofline: {json.dumps(result['roofline'])}")
    if "hf" in result:
        print(f"HF transformers: {json.dumps(result['hf'])}")


def cmd_bench_throughput(args: argparse.Namespace) -> int:
    """``dockyard bench throughput``."""
    run_and_report(args, run_throughput, print_throughput, plot_throughput)
    return 0


def main(argv: list[str] | None = None) -> dict:
    """The repository script's entry (``benchmarks/throughput.py``): the same flags as ``dockyard bench throughput``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_throughput_args(p)
    return run_and_report(p.parse_args(argv), run_throughput, print_throughput, plot_throughput)
