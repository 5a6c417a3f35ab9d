"""Gemma-3-270M Q4_K_M (a real GGUF) with its weights kept quantized against the same file dequantized on load.

    PYTHONPATH=. python benchmarks/gemma3_quantized.py --gguf PATH [--out DIR] [--device auto|cuda|cpu]
        [--decode-tokens 128] [--batches 1 16]

The file is loaded twice through ``LLM``: with ``DOCKYARD_QUANT_NATIVE=1`` (the projections stored in a block
type the kernels read stay GGUF blocks: :class:`~dockyard.ops.quant_linear.GGUFLinear`, Triton kernels on CUDA,
PyTorch reference math on a CPU) and with ``=0`` (every weight dequantized to the run dtype by ``gguf``). For
each: the projections kept quantized by block type, the bytes the model holds, the logits of a few prompts
(prefilled but for the last token, which is a decode step), and greedy decode tokens/s at each batch size
(``--decode-tokens`` new tokens per request after a warm-up, the one-token run subtracted, median of 3; CUDA graphs
as the engine captures them).

The two paths compute with the same real weights (the blocks' values), so their logits differ only by rounding:
the dequantized path holds each weight rounded to the run dtype, and both round activations to it. Rounding to
p significant bits has an rms relative error of 2^-p / sqrt(3) * sqrt(E[1/m^2]) <= 2^-p / sqrt(3) per value; each
quantized matmul contributes that for its weights and again for its input, and independent contributions add in
quadrature over the ``M`` quantized projections, so the bound is 2 * sqrt(2 * M) * 2^-p / sqrt(3) (p = 8 for
bfloat16; 24 for float32 on a CPU, where both paths use ``gguf``'s dequantized values and agree to rounding).
A misread block (a wrong nibble order, scale or offset) changes weights by their own magnitude, an error of
order one, far above the bound.

Writes ``DIR/gemma3_quantized.json`` and ``DIR/gemma3_quantized.txt`` (the short summary, also printed).
Exit status 1 when a path's logits exceed the bound.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from dockyard import LLM, SamplingParams
from dockyard.ops.quant_linear import QUANT_NATIVE_ENV, QuantLinear
from dockyard.testing import paged_logits

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of",
           "In 1492, Columbus sailed"]
PATHS = {"quantized": "1", "dequantized": "0"}


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def held_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def prompt_logits(llm: LLM, prompts: list[list[int]]) -> list[torch.Tensor]:
    """float32 logits of every prompt position through the paged KV cache: all but the last token as one prefill,
    the last as a decode step (one row: the GEMV path on CUDA)."""
    with torch.no_grad():
        return [paged_logits(llm.model, ids, [len(ids) - 1, 1]).float().cpu() for ids in prompts]


def decode_rate(llm: LLM, prompt: list[int], batch: int, new_tokens: int) -> dict:
    """Greedy decode of ``new_tokens`` per request for ``batch`` copies of ``prompt`` (median of 3, the one-token
    run subtracted): tokens per second over the batch, and the first request's tokens."""
    many = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    prompts = [prompt] * batch
    llm.generate(prompts, many, use_tqdm=False)  # warm-up (compiles, graphs)
    seconds, tokens = {}, []
    for key, params in (("many", many), ("one", one)):
        runs = []
        for _ in range(3):
            sync(llm.device)
            t0 = time.perf_counter()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            sync(llm.device)
            runs.append(time.perf_counter() - t0)
            if key == "many":
                tokens = list(outputs[0].outputs[0].token_ids)
        seconds[key] = statistics.median(runs)
    per_step = (seconds["many"] - seconds["one"]) / (new_tokens - 1)
    return {"batch": batch, "new_tokens": new_tokens, "seconds": seconds["many"], "ms_per_step": per_step * 1e3,
            "tokens_per_s": batch / per_step, "tokens": tokens}


def run_path(gguf: Path, native: str, device: str, batches: list[int], new_tokens: int) -> tuple[dict, list]:
    os.environ[QUANT_NATIVE_ENV] = native
    t0 = time.perf_counter()
    llm = LLM(str(gguf), device=device, max_model_len=512, max_num_seqs=max(batches))
    row: dict = {"load_s": time.perf_counter() - t0, "device": str(llm.device), "dtype": str(llm.dtype),
                 "held_weight_bytes": held_bytes(llm.model),
                 "kept_quantized": dict(Counter(m.format_name() for m in llm.model.modules()
                                                if isinstance(m, QuantLinear) and m.is_quantized)),
                 "cuda_graphs": getattr(llm.engine.runner, "graphs", None) is not None}
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS]
    logits = prompt_logits(llm, prompts)
    row["decode"] = [decode_rate(llm, prompts[0], b, new_tokens) for b in batches]
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row, logits


def logits_bound(dtype: str, matmuls: int) -> float:
    """2 * sqrt(2 * M) * 2^-p / sqrt(3) for p significant bits of the run dtype (see the module docstring)."""
    bits = {"torch.bfloat16": 8, "torch.float16": 11, "torch.float32": 24}[dtype]
    return 2 * math.sqrt(2 * matmuls) * 2.0 ** -bits / math.sqrt(3)


def summary(report: dict) -> str:
    q, d = report["quantized"], report["dequantized"]
    lines = [f"Gemma-3-270M {report['gguf']} on {q['device']} ({q['dtype']}); "
             f"kept quantized: {q['kept_quantized'] or 'nothing'}",
             f"held weight bytes: quantized path {q['held_weight_bytes'] / 1e6:.1f} MB, "
             f"dequantized {d['held_weight_bytes'] / 1e6:.1f} MB",
             "prompt logits, quantized vs dequantized path (rel rms per prompt): "
             + ", ".join(f"{e:.2e}" for e in report["logits_rel_rms"])
             + f"; bound {report['logits_bound']:.2e} -> {'within' if report['within_bound'] else 'EXCEEDED'}"]
    for qd, dd in zip(q["decode"], d["decode"], strict=True):
        lines.append(f"decode batch {qd['batch']}: quantized {qd['tokens_per_s']:.1f} tok/s, dequantized "
                     f"{dd['tokens_per_s']:.1f} tok/s ({qd['tokens_per_s'] / dd['tokens_per_s']:.2f}x); "
                     f"greedy tokens equal: {qd['tokens'] == dd['tokens']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, required=True, help="the Gemma-3-270M Q4_K_M .gguf file")
    parser.add_argument("--out", type=Path, default=Path("."), help="directory for the JSON and the summary")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--decode-tokens", type=int, default=128, help="new tokens per request (at least 2)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()
    if not args.gguf.is_file():
        parser.error(f"--gguf {args.gguf}: no such file; pass the path of the Gemma-3-270M Q4_K_M .gguf")
    if args.decode_tokens < 2:
        parser.error("--decode-tokens must be at least 2 (the one-token run is subtracted)")
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"gguf": args.gguf.name, "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    logits = {}
    for label, native in PATHS.items():
        print(f"loading the {label} path ({QUANT_NATIVE_ENV}={native})", file=sys.stderr, flush=True)
        report[label], logits[label] = run_path(args.gguf, native, args.device, args.batches, args.decode_tokens)
    report["logits_rel_rms"] = [rel_rms(a, b) for a, b in zip(logits["quantized"], logits["dequantized"],
                                                                strict=True)]
    matmuls = sum(report["quantized"]["kept_quantized"].values())
    report["logits_bound"] = logits_bound(report["quantized"]["dtype"], max(matmuls, 1))
    report["within_bound"] = max(report["logits_rel_rms"]) <= report["logits_bound"]
    text = summary(report)
    (args.out / "gemma3_quantized.json").write_text(json.dumps(report, indent=1))
    (args.out / "gemma3_quantized.txt").write_text(text + "\n")
    print(text)
    sys.exit(0 if report["within_bound"] else 1)


if __name__ == "__main__":
    main()
