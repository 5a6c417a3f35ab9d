"""Speculative decoding speed: tokens/s with and without it, and the acceptance it got.

Two measurements, one JSON object each:

* ``--ngram``: the bundled model (or ``--model``) on prompts it continues by copying (code editing,
  a list, summarising its own input), greedy, n-gram proposals vs none.
* ``--oracle``: the verify machinery's cost on its own. An oracle proposer proposes the target's own
  greedy continuation (from a run without speculation), each proposed token replaced by another with
  probability 1 - p, for p in ``--p`` and k in ``--k``, at each batch size of ``--batch-sizes``.
  The measured acceptance rate is reported beside the nominal p (it is lower when the speculative run's
  greedy tokens drift from the reference run's). The device's copy bandwidth and bf16 matmul rate,
  measured in the same run, give the batch-1 roofline: weight bytes / copy bandwidth per target forward.

    python3 benchmarks/spec_decode.py --ngram
    python3 benchmarks/spec_decode.py --oracle --model benchmarks/configs/llama-3.1-8b.json --load-format dummy
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import random
import time

import torch

from dockyard import LLM, SamplingParams
from dockyard.bench.ceilings import measure
from dockyard.engine.llm_engine import LLMEngine
from dockyard.engine.sequence import Sequence
from dockyard.engine.spec_decode import Proposal
from dockyard.engine.speculative_config import SpeculativeConfig

COPY_PROMPTS = [
    "Rename the variable total to result in this code and print the whole code again.\n"
    "def mean(values):\n    total = 0\n    for v in values:\n        total += v\n    return total / len(values)\n"
    "\nAnswer:\ndef mean(values):\n",
    "Repeat this list exactly: apples, pears, plums, cherries, apples, pears, plums, cherries, apples,",
    "Summarise the text by repeating its key sentences. Text: The river rises in the hills. The river flows "
    "through the town. The river reaches the sea. Summary: The river rises in the hills.",
    "for i in range(10):\n    print(i * 2)\nfor j in range(10):\n    print(j * 2)\nfor k in range(10):\n",
]


KV_CACHE_BYTES = 8 << 30  # per engine (the oracle runs two on one model)


class OracleProposer:
    """Proposes each sequence's reference greedy continuation, each token corrupted with probability 1 - p."""

    def __init__(self, reference: dict[tuple[int, ...], list[int]], p: float, vocab_size: int, seed: int = 0) -> None:
        self.reference, self.p, self.vocab_size = reference, p, vocab_size
        self.rng = random.Random(seed)

    def propose(self, seqs: list[Sequence], max_tokens: list[int]) -> list[Proposal]:
        out = []
        for seq, k in zip(seqs, max_tokens, strict=True):
            ref = self.reference[tuple(seq.prompt_token_ids)]
            n = len(seq.output_token_ids)
            tokens = []
            for t in ref[n:n + k]:
                if self.rng.random() >= self.p:  # corrupted: any other token
                    t = (t + 1 + self.rng.randrange(self.vocab_size - 1)) % self.vocab_size
                tokens.append(t)
            out.append(Proposal(tokens))
        return out

    def release(self, seqs: list[Sequence]) -> None:
        """Nothing is kept per sequence."""


class StepTimer:
    """Wall time inside ``engine.step`` and inside its ``runner.step`` (the forward, the verification and, for a
    verify step, the wait for the device's result), so the host work outside the runner is their difference."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine_s = self.runner_s = 0.0
        self._wrap(engine, "engine_s")
        self._wrap(engine.runner, "runner_s")

    def _wrap(self, obj: object, counter: str) -> None:
        inner = obj.step

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                setattr(self, counter, getattr(self, counter) + time.perf_counter() - t)

        obj.step = timed

    def reset(self) -> None:
        self.engine_s = self.runner_s = 0.0

    def per_step(self, steps: int) -> dict:
        """Milliseconds per step: engine.step, runner.step, and the host work outside the runner."""
        n = max(steps, 1)
        return {"step_ms": round(1e3 * self.engine_s / n, 3), "runner_ms": round(1e3 * self.runner_s / n, 3),
                "outside_runner_ms": round(1e3 * (self.engine_s - self.runner_s) / n, 3)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> tuple[float, list[list[int]], dict]:
    """(seconds, output token ids, engine stats delta) of one batch."""
    engine = llm.engine
    before = engine.stats()
    _sync(llm.device)
    t = time.perf_counter()
    outs = llm.generate([list(p) for p in prompts], params, use_tqdm=False)
    _sync(llm.device)
    seconds = time.perf_counter() - t
    after = engine.stats()
    delta = {k: after[k] - before[k] for k in ("steps", "generation_tokens", "spec_decode_num_draft_tokens",
                                                "spec_decode_num_accepted_tokens", "spec_decode_num_drafts")}
    return seconds, [o.outputs[0].token_ids for o in outs], delta


def _rates(seconds: float, delta: dict) -> dict:
    drafts = delta["spec_decode_num_draft_tokens"]
    return {"tokens_per_s": round(delta["generation_tokens"] / seconds, 1), "steps": delta["steps"],
            "acceptance_rate": round(delta["spec_decode_num_accepted_tokens"] / drafts, 3) if drafts else None,
            "mean_acceptance_length": (round(1 + delta["spec_decode_num_accepted_tokens"]
                                             / delta["spec_decode_num_drafts"], 3)
                                       if delta["spec_decode_num_drafts"] else None)}


def ngram(args: argparse.Namespace) -> dict:
    kwargs = {"device": args.device, "dtype": args.dtype, "load_format": args.load_format}
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    result = {}
    for name, config in (("off", None), ("ngram_k3", {"method": "ngram", "num_speculative_tokens": 3}),
                         ("ngram_k5", {"method": "ngram", "num_speculative_tokens": 5})):
        llm = LLM(args.model, speculative_config=config, **kwargs)
        tok = llm.get_tokenizer()
        prompts = [tok.encode(p) for p in COPY_PROMPTS]
        run(llm, prompts[:1], SamplingParams(temperature=0.0, max_tokens=8))  # warm-up
        for batch in args.batch_sizes:
            seconds, outs, delta = run(llm, (prompts * batch)[:batch], params)
            result[f"{name}_batch{batch}"] = _rates(seconds, delta)
            result.setdefault(f"outputs_batch{batch}", {})[name] = outs
        del llm
        gc.collect()  # the next engine's KV pool is sized from the memory this one leaves
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    for batch in args.batch_sizes:  # greedy exactness on this device, as a fraction of matching tokens
        outs = result.pop(f"outputs_batch{batch}")
        ref = outs["off"]
        for name in ("ngram_k3", "ngram_k5"):
            same = sum(a == b for r, o in zip(ref, outs[name]) for a, b in zip(r, o))
            result[f"{name}_batch{batch}"]["tokens_equal_to_off"] = round(same / sum(len(r) for r in ref), 4)
    return result


def oracle(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else \
        torch.device(args.device)
    ceilings = measure(device, torch.bfloat16, scaled_down=True)  # scaled down on a CPU only
    # The engine captures decode graphs of up to max_num_seqs x (1 + k) rows for its verify steps. No prefix
    # caching: every run prefills its prompts in full, so a run's first token is computed as its reference's was
    # (a prompt served from the cache gets its last row's logits from a one-row step, which can round a near-tie
    # of the dummy weights the other way and send the run off its reference continuation).
    llm = LLM(args.model, load_format=args.load_format, device=args.device, dtype=args.dtype,
              max_num_seqs=args.max_num_seqs or max(args.batch_sizes),
              max_model_len=args.prompt_len + args.max_tokens + 16,
              kv_cache_memory_bytes=KV_CACHE_BYTES, enable_prefix_caching=False,
              speculative_config={"method": "ngram", "num_speculative_tokens": max(args.k)})
    engine = llm.engine
    # The reference: an engine on the same model without speculation (so with async scheduling on CUDA).
    off = LLMEngine(llm.model, llm.spec, llm.tokenizer, dataclasses.replace(engine.config, speculative_config=None),
                    llm.device, llm.dtype, engine.block_manager.num_blocks)
    vocab = llm.spec.vocab_size
    weight_bytes = sum(p.numel() * p.element_size() for p in llm.model.parameters())
    result: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "copy_GBps": round(ceilings["copy_bytes_per_s"] / 1e9, 1),
                    "bf16_matmul_TFLOPs": round(ceilings["matmul_flops_per_s"] / 1e12, 1),
                    "weight_GB": round(weight_bytes / 1e9, 2),
                    "roofline_forwards_per_s_batch1": round(ceilings["copy_bytes_per_s"] / weight_bytes, 1)}
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    timer = StepTimer(engine)
    gen = random.Random(0)
    for batch in args.batch_sizes:
        prompts = [[gen.randrange(100, vocab) for _ in range(args.prompt_len)] for _ in range(batch)]
        llm.engine = off
        run(llm, prompts, SamplingParams(temperature=0.0, max_tokens=4))  # warm-up
        seconds, ref_outs, delta = run(llm, prompts, params)
        result[f"batch{batch}_off"] = _rates(seconds, delta)
        llm.engine = engine
        for k in args.k:
            engine.speculative_config = SpeculativeConfig("ngram", k)
            # The target's own greedy continuation under verify steps of this k: a run whose proposals are all
            # rejected (same row count per step as every run below, so the same numerics; on the GPU a
            # different batch shape may round a near-tie of dummy weights the other way than the run above).
            engine.proposer = OracleProposer({tuple(p): o for p, o in zip(prompts, ref_outs)}, 0.0, vocab)
            reference = {tuple(p): o for p, o in zip(prompts, run(llm, prompts, params)[1])}
            for p in args.p:
                engine.proposer = OracleProposer(reference, p, vocab)
                timer.reset()
                seconds, outs, delta = run(llm, prompts, params)
                row = _rates(seconds, delta) | timer.per_step(delta["steps"])
                row["speedup"] = round(row["tokens_per_s"] / result[f"batch{batch}_off"]["tokens_per_s"], 2)
                same = sum(a == b for r, o in zip(ref_outs, outs) for a, b in zip(r, o))
                row["tokens_equal_to_off"] = round(same / sum(len(r) for r in ref_outs), 4)
                result[f"batch{batch}_k{k}_p{p}"] = row
                print(json.dumps({f"batch{batch}_k{k}_p{p}": row}), flush=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--ngram", action="store_true")
    mode.add_argument("--oracle", action="store_true")
    parser.add_argument("--model", default=None, help="HF config/checkpoint/GGUF (default: the bundled model)")
    parser.add_argument("--load-format", default="auto", choices=("auto", "dummy"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=128, help="oracle: random prompt tokens")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="oracle: the engines' (default: the largest "
                        "batch size)")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--p", type=float, nargs="+", default=[0.0, 0.5, 0.7, 0.9, 1.0])
    args = parser.parse_args(argv)
    result = ngram(args) if args.ngram else oracle(args)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
