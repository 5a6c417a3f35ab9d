"""Structured-output overhead: end-to-end tokens/s with and without a JSON schema, and the per-step mask cost.

    python benchmarks/structured_output.py                   # bundled model, CPU, batch 1 and 64
    python benchmarks/structured_output.py --model benchmarks/configs/llama-3.1-8b.json --load-format dummy \
        --device cuda --tokenizer DIR                        # a config without a tokenizer: take one from DIR

For each batch size: the same chat prompts (seeded sampling at temperature 0.8, one seed per request, up to
``--max-tokens`` tokens) are generated twice, unconstrained (``ignore_eos``: every request runs its full
length) and held to a JSON schema (ends when the grammar does, or at the length); tokens/s is the
generated tokens over the wall time of ``LLM.generate``. A warm-up run first compiles the grammar (cached
afterwards) and, on CUDA, leaves the graphs captured. The mask cost is the time of each step's
``allowed_token_mask`` (matchers fill their int32 bitmask rows on the host, one copy to the device, unpack
to the [B, V] mask; device synchronized before and after) per step, and its share of the constrained run.
Grammar compile time is printed for the tokenizer (the manager's cache bypassed). On CUDA the copy
bandwidth and bf16 matmul rate are measured in the same run (``ceilings.measure``), and each run's
memory floor (steps × weight bytes / copy bandwidth) is set against its time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import dockyard.engine.sampler as sampler_module
from dockyard import LLM, SamplingParams
from dockyard.structured_output.params import StructuredOutputsParams

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from ceilings import add_model_args, engine_kwargs, measure, sync  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "city": {"type": "string"}, "hobbies": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
    "employed": {"type": "boolean"}}, "required": ["name", "age", "city", "hobbies", "employed"]}
TOPICS = ["a painter", "a sailor", "a baker", "a pilot", "a nurse", "a farmer", "a poet", "a chemist"]


class MaskTimer:
    """Wraps the sampler's ``allowed_token_mask`` to time each call (device synchronized around it)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.calls = 0
        self.seconds = 0.0
        self._inner = sampler_module.allowed_token_mask

    def __call__(self, matchers, vocab_size, device):  # noqa: ANN001, ANN204 - the wrapped function's signature
        sync(self.device)
        t = time.perf_counter()
        out = self._inner(matchers, vocab_size, device)
        sync(self.device)
        if out is not None:
            self.calls += 1
            self.seconds += time.perf_counter() - t
        return out


def run(llm: LLM, prompts: list[str], max_tokens: int, schema: bool) -> dict:
    so = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True) if schema else None
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=max_tokens, ignore_eos=not schema,
                             structured_outputs=so) for i in range(len(prompts))]
    sync(llm.device)
    steps0 = llm.engine.metrics.steps
    t = time.perf_counter()
    outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
    sync(llm.device)
    elapsed = time.perf_counter() - t
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    valid = None
    if schema:
        valid = 0
        for o in outs:
            try:
                json.loads(o.outputs[0].text)
                valid += 1
            except ValueError:
                pass
    return {"seconds": elapsed, "tokens": tokens, "tokens_per_s": tokens / elapsed,
            "steps": llm.engine.metrics.steps - steps0, "parsed_json": valid}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--tokenizer", default=None, help="take the tokenizer from this path")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    kwargs = engine_kwargs(args)
    if args.tokenizer:
        kwargs["tokenizer"] = args.tokenizer
    llm = LLM(args.model, max_num_seqs=max(args.batch_sizes), **kwargs)
    manager = llm.engine.structured_output
    backend = manager.backend()
    timer = MaskTimer(llm.device)
    sampler_module.allowed_token_mask = timer
    result: dict = {"device": torch.cuda.get_device_name() if llm.device.type == "cuda" else "cpu",
                    "vocab": llm.spec.vocab_size, "tokenizer_len": len(llm.get_tokenizer()), "runs": {}}
    weight_bytes = sum(p.numel() * p.element_size() for p in llm.model.parameters())
    if llm.device.type == "cuda":
        result["ceilings"] = measure(llm.device, llm.dtype)
    so = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    t = time.perf_counter()
    backend.compile(so)  # the manager's cache is bypassed; xgrammar's own cache is warm only for this key
    result["compile_ms_first"] = (time.perf_counter() - t) * 1e3
    for batch in args.batch_sizes:
        prompts = [f"Describe {TOPICS[i % len(TOPICS)]} (number {i}) as JSON." for i in range(batch)]
        run(llm, prompts[:2], 4, schema=True)  # warm-up: grammar compiled, graphs captured
        run(llm, prompts[:2], 4, schema=False)
        plain = run(llm, prompts, args.max_tokens, schema=False)
        timer.calls, timer.seconds = 0, 0.0
        constrained = run(llm, prompts, args.max_tokens, schema=True)
        constrained["mask_calls"] = timer.calls
        constrained["mask_ms_per_step"] = timer.seconds / max(timer.calls, 1) * 1e3
        constrained["mask_share_of_time"] = timer.seconds / constrained["seconds"]
        if "ceilings" in result:  # memory floor: every step reads the weights once
            for r in (plain, constrained):
                r["fraction_of_memory_floor"] = (r["steps"] * weight_bytes / result["ceilings"]["copy_bytes_per_s"]
                                                 / r["seconds"])
        result["runs"][batch] = {"plain": plain, "json_schema": constrained,
                                 "ratio": constrained["tokens_per_s"] / plain["tokens_per_s"]}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
