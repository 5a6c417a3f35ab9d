"""Where a decode step's time goes (CUDA): GPU kernel time and count per step (torch.profiler), wall
time per step, and the host time of scheduling, the runner and the graph replay's input staging.

    python3 benchmarks/decode_profile.py --model benchmarks/configs/llama-3.1-8b.json --batch-sizes 1 256
    python3 benchmarks/decode_profile.py --model benchmarks/configs/llama-3.1-8b.json --mixed 240 16 512

Prompts of 128 tokens, greedy, ignore_eos; each batch size is prefilled, stepped 5 times, profiled
over 3 steps and timed over 20. Prints one JSON object per batch size. ``--mixed D P L`` profiles
steps that mix D running decodes with P new prompts of L tokens (the offline throughput run's
prefill steps): wall time, GPU time, and the kernels and host ops that take the most time.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from dockyard import LLM, SamplingParams


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256])
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--mixed", type=int, nargs=3, metavar=("DECODES", "PROMPTS", "PROMPT_LEN"))
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--top", type=int, default=25, help="kernels listed per batch size, the most GPU time first")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("this profile needs a CUDA GPU")
    max_seqs = max(args.batch_sizes) if args.mixed is None else args.mixed[0] + args.mixed[1]
    llm = LLM(args.model, load_format="dummy", max_num_seqs=max_seqs, max_model_len=args.max_model_len,
              max_num_batched_tokens=args.max_num_batched_tokens)
    if args.mixed is not None:
        return mixed_profile(llm, *args.mixed)
    engine, runner = llm.engine, llm.engine.runner
    host = {"schedule": 0.0, "execute": 0.0, "graph_run": 0.0}

    def timed(obj, name: str, key: str) -> None:
        fn = getattr(obj, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            host[key] += time.perf_counter() - t
            return out
        setattr(obj, name, wrapper)

    timed(engine.scheduler, "schedule", "schedule")
    timed(runner, "execute", "execute")
    if runner.graphs is not None:
        timed(runner.graphs, "run", "graph_run")
    results = {}
    for batch in args.batch_sizes:
        params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
        for i in range(batch):
            engine.add_request(f"b{batch}-{i}", list(range(100 + i, 228 + i)), params)
        while any(not s.output_token_ids for r in engine.requests.values() for s in r.seqs):
            engine.step()
        for _ in range(5):
            engine.step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                engine.step()
            torch.cuda.synchronize()
        kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        for key in host:
            host[key] = 0.0
        t = time.perf_counter()
        for _ in range(20):
            engine.step()
        torch.cuda.synchronize()
        results[f"batch{batch}"] = {
            "step_ms": round((time.perf_counter() - t) * 50, 3),
            "gpu_ms": round(sum(e.self_device_time_total for e in kernels) / 3e3, 3),
            "kernels_per_step": sum(e.count for e in kernels) / 3,
            # (kernel, launches per step, GPU µs per step), the most time first
            "top_kernels": [(e.key[:80], round(e.count / 3, 1), round(e.self_device_time_total / 3, 1))
                            for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:args.top]],
            **{f"{key}_host_ms": round(v * 50, 3) for key, v in host.items()},
        }
        print(json.dumps({"batch": batch, **results[f"batch{batch}"]}, indent=1), flush=True)
        while engine.has_unfinished_requests():
            engine.step()
    return results


def mixed_profile(llm, decodes: int, prompts: int, prompt_len: int) -> dict:
    """Steps of ``decodes`` running sequences plus ``prompts`` new prompts of ``prompt_len`` tokens."""
    engine = llm.engine
    params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    counter = iter(range(1 << 30))

    def add_prompts() -> list[str]:
        ids = [f"p{next(counter)}" for _ in range(prompts)]
        for n, rid in enumerate(ids):
            engine.add_request(rid, [(7 * n + 11 * len(rid) + j) % 30000 + 100 for j in range(prompt_len)], params)
        return ids

    for i in range(decodes):
        engine.add_request(f"d{i}", [(3 * i + j) % 30000 + 100 for j in range(128)], params)
    while any(not s.output_token_ids for r in engine.requests.values() for s in r.seqs):
        engine.step()
    results = {}
    for rnd in range(4):  # round 0 warms up (kernel compilation), 1 is profiled, 2-3 are timed
        ids = add_prompts()
        torch.cuda.synchronize()
        if rnd == 1:
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                engine.step()
                torch.cuda.synchronize()
            events = prof.key_averages()
            cuda = sorted((e for e in events if e.self_device_time_total > 0), key=lambda e: -e.self_device_time_total)
            cpu = sorted(events, key=lambda e: -e.self_cpu_time_total)
            results["gpu_ms"] = round(sum(e.self_device_time_total for e in cuda) / 1e3, 2)
            results["top_kernels"] = [(e.key[:90], e.count, round(e.self_device_time_total / 1e3, 2))
                                      for e in cuda[:25]]
            results["top_host_ops"] = [(e.key[:90], e.count, round(e.self_cpu_time_total / 1e3, 2))
                                       for e in cpu[:25]]
        else:
            t = time.perf_counter()
            engine.step()
            torch.cuda.synchronize()
            results[f"step{rnd}_ms"] = round((time.perf_counter() - t) * 1e3, 1)
        for rid in ids:  # back to the running decodes alone (the next round's prompts take their places)
            engine.abort_request(rid)
    print(json.dumps({"mixed": [decodes, prompts, prompt_len], **results}, indent=1), flush=True)
    return results


if __name__ == "__main__":
    main()
