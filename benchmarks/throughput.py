"""Offline throughput: N requests with seeded random input/output lengths, run to completion.

    python benchmarks/throughput.py                       # bundled model on CPU, scaled-down defaults
    python benchmarks/throughput.py --model cfg.json --load-format dummy --device cuda --num-prompts 256 \
        --input-len 100 1024 --output-len 100 1024

Prompts are random token ids (like vLLM's random dataset); ``ignore_eos`` makes every request
produce exactly its output length. Prints requests/s, output tokens/s and total tokens/s.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import torch

from dockyard import LLM, SamplingParams
from dockyard.memory import plan_memory

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from ceilings import measure  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    cpu_default = not torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--load-format", default="auto", choices=("auto", "dummy"))
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--num-prompts", type=int, default=32 if cpu_default else 256)
    p.add_argument("--input-len", type=int, nargs=2, default=(32, 256) if cpu_default else (100, 1024))
    p.add_argument("--output-len", type=int, nargs=2, default=(16, 128) if cpu_default else (100, 1024))
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)

    llm = LLM(args.model, load_format=args.load_format, device=args.device, dtype=args.dtype,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
    rng = random.Random(args.seed)
    vocab = llm.spec.vocab_size
    prompts, params = [], []
    for _ in range(args.num_prompts):
        n_in = rng.randint(*args.input_len)
        prompts.append([rng.randrange(vocab) for _ in range(n_in)])
        params.append(SamplingParams(max_tokens=rng.randint(*args.output_len), temperature=0.0, ignore_eos=True))
    # warm-up: one short request through the whole path
    llm.generate([prompts[0][:16]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
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
    ceilings = measure(llm.device, llm.dtype)
    plan = plan_memory(spec, llm.dtype)
    matmul_params = plan.num_parameters - spec.vocab_size * spec.hidden_size * (1 if spec.tie_word_embeddings else 2)
    flops = 2 * matmul_params * (n_in + n_out) + 2 * spec.hidden_size * spec.vocab_size * n_out
    steps = llm.engine.metrics.steps
    compute_floor = flops / ceilings["matmul_flops_per_s"]
    memory_floor = steps * plan.weight_bytes / ceilings["copy_bytes_per_s"]
    floor = max(compute_floor, memory_floor)
    result["roofline"] = {
        **{k: round(v / 1e9, 1) for k, v in ceilings.items()},  # GB/s and GFLOP/s
        "model_flops": flops, "steps": steps, "compute_floor_s": round(compute_floor, 2),
        "memory_floor_s": round(memory_floor, 2), "fraction_of_roofline": round(floor / elapsed, 3),
    }
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        print(f"{args.num_prompts} requests in {elapsed:.2f}s: {result['requests_per_s']} req/s, "
              f"{result['output_tokens_per_s']} output tok/s, {result['total_tokens_per_s']} total tok/s "
              f"({n_in} prompt + {n_out} generated tokens; {llm.device}, {result['dtype']})")
        print(f"roofline: {json.dumps(result['roofline'])}")
    return result


if __name__ == "__main__":
    main()
