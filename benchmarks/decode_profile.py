"""Where a decode step's time goes (CUDA): GPU kernel time and count per step (torch.profiler), wall
time per step, and the host time of scheduling, the runner and the graph replay's input staging.

    python3 benchmarks/decode_profile.py --model benchmarks/configs/llama-3.1-8b.json --batch-sizes 1 256

Prompts of 128 tokens, greedy, ignore_eos; each batch size is prefilled, stepped 5 times, profiled
over 3 steps and timed over 20. Prints one JSON object per batch size.
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
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("this profile needs a CUDA GPU")
    llm = LLM(args.model, load_format="dummy", max_num_seqs=max(args.batch_sizes), max_model_len=args.max_model_len)
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
            **{f"{key}_host_ms": round(v * 50, 3) for key, v in host.items()},
        }
        print(json.dumps({"batch": batch, **results[f"batch{batch}"]}), flush=True)
        while engine.has_unfinished_requests():
            engine.step()
    return results


if __name__ == "__main__":
    main()
