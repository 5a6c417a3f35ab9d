"""Time to first token under `dockyard bench latency`'s engine settings and under the performance gate's, split
into the host's time to launch the prefill and the rest (issue 19: the two disagreed at 1k tokens).

    python benchmarks/ttft_breakdown.py --model benchmarks/configs/llama-3.1-8b.json --input-lens 1024 8192 --json

Per setting one engine is built (dummy weights) and warmed up as both callers warm it (a short decode, then the
decode runs at batch 1 and at the large batch with 128-token prompts), then each prompt length is timed
``--repeats`` times (one prompt, max_tokens 1, as :func:`dockyard.bench.latency.ttft`). For each run: the wall
time, the number of engine steps, and the host time spent inside the prefill's forward call (kernels are
launched asynchronously on CUDA: when it is close to the wall time, the prefill is bound by the host's
launching, not by the GPU). Settings: ``bench`` (the engine `bench latency` builds: the model's max length),
``gate`` (the gate's: max length capped at the longest prompt + 16, its seed), and ``gate-logging`` (the gate's
engine measured inside the onboarding runner's log capture).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from dockyard import LLM, SamplingParams
from dockyard.bench.ceilings import sync
from dockyard.bench.latency import decode_rate, forward_host_times
from dockyard.onboard.runner import _gate_logging


def timed_prefills(llm: LLM, input_len: int, repeats: int, rng: random.Random) -> list[dict]:
    """One ``input_len``-token prompt with max_tokens 1, ``repeats`` times: wall time, steps, forward host time."""
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    runs = []
    with forward_host_times(llm) as host:
        for _ in range(repeats):
            prompt = [rng.randrange(llm.spec.vocab_size) for _ in range(input_len)]
            host.clear()
            steps = llm.engine.metrics.steps
            sync(llm.device)
            t = time.perf_counter()
            llm.generate([prompt], params, use_tqdm=False)
            sync(llm.device)
            runs.append({"wall_ms": round(1e3 * (time.perf_counter() - t), 2),
                         "steps": llm.engine.metrics.steps - steps,
                         "forward_host_ms": [round(1e3 * h, 2) for h in host]})
    return runs


def measure(llm: LLM, input_lens: list[int], repeats: int, batch: int, seed: int) -> dict:
    rng = random.Random(seed)
    decode_rate(llm, 1, 16, 4, rng)
    for b in (1, batch):  # as both callers run before their TTFT: the 128-token prompts of the decode runs
        decode_rate(llm, b, 128, 16, rng)
    out = {"max_model_len": llm.engine.max_model_len, "graphs": llm.engine.runner.graphs is not None}
    for n in input_lens:
        runs = timed_prefills(llm, n, repeats, rng)
        out[str(n)] = {"best_ms": min(r["wall_ms"] for r in runs), "runs": runs}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--input-lens", type=int, nargs="+", default=[1024, 8192])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=64, help="the large decode batch run before the TTFT")
    p.add_argument("--settings", nargs="+", default=["bench", "gate", "gate-logging"])
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    common = dict(load_format="dummy", device=args.device, max_num_seqs=args.batch,
                  max_num_batched_tokens=max(max(args.input_lens), 256))
    gate_len = max(max(args.input_lens), 128 + 128) + 16
    result: dict = {"model": args.model, "torch": torch.__version__}
    for setting in args.settings:
        kwargs = dict(common) if setting == "bench" else dict(common, max_model_len=gate_len, seed=0)
        llm = LLM(args.model, **kwargs)
        if setting == "gate-logging":
            with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "gate.log", "w") as log, _gate_logging(log):
                result[setting] = measure(llm, args.input_lens, args.repeats, args.batch, 0)
        else:
            result[setting] = measure(llm, args.input_lens, args.repeats, args.batch, 0)
        print(json.dumps({setting: {n: result[setting][str(n)]["best_ms"] for n in args.input_lens}}), flush=True)
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
