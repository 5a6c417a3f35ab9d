"""Native family vs the generic (transformers) path on the same model: identical greedy tokens, and the speed ratio.

    OMP_NUM_THREADS=2 python benchmarks/generic_vs_native.py            # bundled SmolLM2-135M-Instruct, CPU
    python benchmarks/generic_vs_native.py --model DIR --load-format dummy --device cuda --batch-sizes 1 32

Both paths load the same weights and run the same engine (scheduler, paged KV cache, sampler); only the model
differs: dockyard's own modules, or transformers' classes with attention routed to the paged cache. Per path and
batch size B: B prompts of ``--input-len`` tokens prefilled first, then ``--output-len`` decode steps timed
(ignore_eos, greedy); decode tokens/s = B × decode steps / their time. Prefill: one prompt of ``--input-len``
tokens, max_tokens 1. Each figure is the best of ``--repeats`` runs (a shared machine's noise only slows a run).
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from dockyard import LLM, SamplingParams


def decode_rate(llm: LLM, prompts: list[list[int]], output_len: int, repeats: int) -> tuple[float, list[list[int]]]:
    """Best decode tokens/s over ``repeats`` runs of ``prompts``, and their greedy tokens."""
    best, tokens = 0.0, []
    engine = llm.engine
    for _ in range(repeats):
        for i, p in enumerate(prompts):
            engine.add_request(f"d{i}", p, SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True))
        engine.step()  # prefill every prompt (one step: the token budget holds them all) and sample token 1
        t0 = time.perf_counter()
        done = {}
        while engine.has_unfinished_requests():
            done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
        seconds = time.perf_counter() - t0
        best = max(best, len(prompts) * (output_len - 1) / seconds)
        tokens = [list(done[f"d{i}"]) for i in range(len(prompts))]
    return best, tokens


def prefill_seconds(llm: LLM, prompt: list[int], repeats: int) -> float:
    """Best time of a one-token request on ``prompt`` (prefix caching off so every run computes it)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct GGUF")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="float32 makes greedy ties rare enough to compare tokens on a GPU")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    gen = torch.Generator().manual_seed(0)
    out: dict = {"model": args.model or "bundled SmolLM2-135M-Instruct", "device": args.device, "dtype": args.dtype,
                 "torch_threads": torch.get_num_threads(), "input_len": args.input_len, "output_len": args.output_len}
    tokens: dict[str, dict[int, list[list[int]]]] = {}
    for impl in ("dockyard", "transformers"):
        llm = LLM(args.model, load_format=args.load_format, device=args.device, dtype=args.dtype, model_impl=impl,
                  max_num_seqs=max(args.batch_sizes), max_num_batched_tokens=max(args.batch_sizes) * args.input_len,
                  enable_prefix_caching=False)
        vocab = llm.spec.vocab_size
        runner = llm.engine.runner
        figures: dict = {"model_class": type(llm.model).__name__, "cuda_graphs": runner.graphs is not None,
                         "eager_reason": runner.eager_reason}
        tokens[impl] = {}
        for batch in args.batch_sizes:
            prompts = [torch.randint(0, vocab, (args.input_len,), generator=gen.manual_seed(b)).tolist()
                       for b in range(batch)]
            rate, tokens[impl][batch] = decode_rate(llm, prompts, args.output_len, args.repeats)
            figures[f"decode_tok_s_b{batch}"] = round(rate, 2)
        prompt = torch.randint(0, vocab, (args.input_len,), generator=gen.manual_seed(99)).tolist()
        figures["prefill_s"] = round(prefill_seconds(llm, prompt, args.repeats), 4)
        out[impl] = figures
        del llm, runner
        gc.collect()  # an engine kept only by reference cycles would hold its device memory into the next path's
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    out["identical_greedy_tokens"] = tokens["dockyard"] == tokens["transformers"]
    out["generic_over_native"] = {k: round(out["transformers"][k] / out["dockyard"][k], 3)
                                  for k in out["dockyard"] if k.startswith(("decode_", "prefill_"))}
    print(json.dumps(out, indent=None if args.json else 2))
    return 0 if out["identical_greedy_tokens"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
