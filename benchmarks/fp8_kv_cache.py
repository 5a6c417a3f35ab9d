"""FP8 KV cache vs bf16 KV: the decode kernel's read bandwidth, its error, and end-to-end throughput.

    PYTHONPATH=. python benchmarks/fp8_kv_cache.py --out DIR            # the GPU run (kernel + throughput)
    PYTHONPATH=. python benchmarks/fp8_kv_cache.py --parts logits       # logits of an FP8 vs a bf16 cache
    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/fp8_kv_cache.py --smoke   # the script itself, on a CPU

1. ``kernel``: the Triton decode kernel on Llama-3.1-8B's attention shapes (32 query heads, 8 KV heads, 128
   dims, 16-token blocks) at several (batch, context) points, a bf16 cache and an FP8 cache of the same
   values. Each time is a CUDA-graph replay of calls over ``R`` disjoint block tables whose K/V together
   exceed the L2 cache several times, divided by ``R``; "of copy bw" is the K/V bytes a call must read over
   that time against the copy bandwidth measured in the same run. The FP8 kernel is timed at every tile of
   ``TILES`` and at half and twice the default split count where it splits; every variant's output is
   checked against float64 attention over the dequantized cache (4 sequences). The tile with the lowest
   geometric-mean time becomes the process's FP8 tile (``triton_attention.DECODE_TILES[1]``) for part 2.
2. ``throughput``: ``dockyard bench throughput``'s workload (Llama-3.1-8B config, dummy weights) with a
   bf16 and with an FP8 cache, then a KV-capacity-bound point: the same workload with the KV cache given
   ``--kv-cache-bytes`` for both (the FP8 pool then holds twice the tokens, so twice the sequences run).
   Output tokens per engine step (the mean decode batch) and preemptions show what the pool allowed.
3. ``logits`` (not in the default run): the model (dummy weights, bf16) driven through the paged cache
   (``testing.paged_logits``: a prompt prefilled in chunks, then single decodes) with a bf16 and an FP8 cache
   (scales calibrated as the engine does); relative rms of the FP8 logits against the bf16 ones.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
from pathlib import Path

import torch

from dockyard import LLM
from dockyard.bench.args import add_throughput_args
from dockyard.bench.ceilings import copy_bandwidth, matmul_rate
from dockyard.bench.throughput import run_throughput
from dockyard.ops import fp8_kv
from dockyard.ops import triton_attention as ta
from dockyard.testing import paged_logits, rel_rmse

Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
POINTS = [(1, 32768), (8, 8192), (64, 2048), (256, 1024)]
TILES = [(64, 4, 3), (64, 8, 3), (128, 4, 3), (128, 8, 3), (128, 4, 2)]
L2_MULTIPLE_BYTES = 512 << 20  # K/V bytes per timed graph, far past the L2 cache


def log(record: dict) -> None:
    print(json.dumps(record), file=sys.stderr, flush=True)


# ---------------------------------------------------------------- part 1: the kernel
def per_call_seconds(calls: list, device: torch.device, replays: int = 10) -> float:
    """Seconds per call: a CUDA graph of all ``calls`` replayed (on a CPU, plain calls: the smoke run)."""
    for call in calls:  # compile, and warm up outside the capture
        call()
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) / 1e3 / replays / len(calls)


def float64_decode(q: torch.Tensor, cache: torch.Tensor, scales: tuple[float, float], table: torch.Tensor,
                   seq_lens: list[int], scale: float) -> torch.Tensor:
    """Decode attention in float64 of the first sequences of ``table`` over the cache's values times ``scales``."""
    out = []
    for i, n in enumerate(seq_lens):
        blocks = table[i, : -(-n // BLOCK)].long()
        k, v = (cache[j][blocks].double().reshape(-1, KV_HEADS, HEAD_DIM)[:n].repeat_interleave(Q_HEADS // KV_HEADS, 1)
                * scales[j] for j in (0, 1))
        p = torch.softmax(torch.einsum("hd,lhd->hl", q[i].double(), k) * scale, dim=1)
        out.append(torch.einsum("hl,lhd->hd", p, v).cpu())
    return torch.stack(out)


def kernel_point(batch: int, context: int, copy_bw: float, device: torch.device, smoke: bool) -> dict:
    """bf16 vs FP8 caches of the same values at one (batch, context): times, bandwidth, errors."""
    blocks_per_seq = -(-context // BLOCK)
    fp8_bytes = ta.decode_kv_bytes([context] * batch, KV_HEADS, HEAD_DIM, 1)
    tables_count = 1 if smoke else max(1, math.ceil(L2_MULTIPLE_BYTES / fp8_bytes))
    num_blocks = tables_count * batch * blocks_per_seq + 1
    gen = torch.Generator(device=device).manual_seed(batch * 100_003 + context)
    bf16 = torch.randn(2, num_blocks, BLOCK, KV_HEADS, HEAD_DIM, generator=gen, device=device, dtype=torch.bfloat16)
    bf16[0] *= 4  # keys wider than values, as in a model
    k_scale = fp8_kv.calibration_scale(bf16[0], fp8_kv.K_SCALE_HEADROOM)
    v_scale = fp8_kv.calibration_scale(bf16[1], fp8_kv.V_SCALE_HEADROOM)
    fp8 = torch.stack([fp8_kv.quantize(bf16[0], k_scale), fp8_kv.quantize(bf16[1], v_scale)])
    order = torch.randperm(num_blocks - 1, generator=gen, device=device) + 1
    tables = order[: tables_count * batch * blocks_per_seq].view(tables_count, batch, blocks_per_seq).to(torch.int32)
    lens = torch.full((batch,), context, device=device, dtype=torch.int32)
    q = torch.randn(batch, Q_HEADS, HEAD_DIM, generator=gen, device=device, dtype=torch.bfloat16)
    scale = HEAD_DIM**-0.5
    checked = min(batch, 4)
    reference = float64_decode(q, fp8, (float(k_scale), float(v_scale)), tables[0], [context] * checked, scale)
    reference_bf16 = float64_decode(q, bf16, (1.0, 1.0), tables[0], [context] * checked, scale)
    default_splits = ta.default_num_splits(batch, KV_HEADS, blocks_per_seq * BLOCK, device)

    def run(cache: torch.Tensor, query: torch.Tensor, **knobs) -> dict:
        scales = {"k_scale": k_scale, "v_scale": v_scale} if fp8_kv.is_fp8(cache) else {}
        calls = [lambda t=t: ta.paged_decode_attention(query, cache, t, lens, scale, **scales, **knobs) for t in tables]
        seconds = per_call_seconds(calls, device)
        out = calls[0]()[:checked].double().cpu()
        kv = ta.decode_kv_bytes([context] * batch, KV_HEADS, HEAD_DIM, cache.element_size())
        ref = reference if fp8_kv.is_fp8(cache) else reference_bf16
        return {**{k: v for k, v in knobs.items()}, "us": round(seconds * 1e6, 2),
                "of_copy_bw": round(kv / seconds / copy_bw, 3), "rel_err_vs_float64": rel_rmse(out, ref),
                "rel_err_vs_bf16_values": rel_rmse(out, reference_bf16)}

    row = {"batch": batch, "context": context, "tables": tables_count, "default_splits": default_splits,
           "kv_bytes_bf16": 2 * fp8_bytes, "kv_bytes_fp8": fp8_bytes,
           "bf16": run(bf16, q), "fp8_default": run(fp8, q), "fp8_f16_query": run(fp8, q.half())}
    row["fp8_tiles"] = [run(fp8, q, block_n=b, num_warps=w, num_stages=s) for b, w, s in TILES]
    if default_splits > 1:
        row["fp8_splits"] = [run(fp8, q, num_splits=n) for n in (max(1, default_splits // 2), 2 * default_splits)]
    row["speedup_default"] = round(row["bf16"]["us"] / row["fp8_default"]["us"], 3)
    log({k: v for k, v in row.items() if k not in ("fp8_tiles", "fp8_splits")})
    return row


def best_tile(rows: list[dict]) -> tuple[int, int, int]:
    """The tile of ``TILES`` with the lowest geometric-mean time over the points."""
    def geomean(i: int) -> float:
        return math.exp(sum(math.log(r["fp8_tiles"][i]["us"]) for r in rows) / len(rows))
    return TILES[min(range(len(TILES)), key=geomean)]


def kernel_part(device: torch.device, copy_bw: float, smoke: bool) -> dict:
    points = [(2, 40)] if smoke else POINTS
    rows = [kernel_point(b, c, copy_bw, device, smoke) for b, c in points]
    result = {"points": rows, "default_tile_fp8": list(ta.DECODE_TILES[1])}
    if device.type == "cuda":
        tile = best_tile(rows)
        ta.DECODE_TILES[1] = tile  # the FP8 tile of this process's throughput runs
        result["chosen_tile_fp8"] = list(tile)
        log({"chosen_tile_fp8": tile})
    return result


# ---------------------------------------------------------------- part 2: throughput
def throughput_part(model: str, kv_cache_bytes: str, smoke: bool) -> list[dict]:
    runs = []
    workload = ["--num-prompts", "4", "--input-len", "8", "24", "--output-len", "4", "8"] if smoke else []
    memory = [("full", [])] + ([] if smoke else [("kv_bound", ["--kv-cache-memory-bytes", kv_cache_bytes])])
    for label, budget in memory:
        for kv_dtype in ("auto", "fp8"):
            parser = argparse.ArgumentParser()
            add_throughput_args(parser)
            model_args = [] if smoke else ["--model", model, "--load-format", "dummy"]
            argv = [*model_args, "--kv-cache-dtype", kv_dtype, *budget, *workload]
            result = run_throughput(parser.parse_args(argv))
            engine = result["engine"]
            summary = {"point": label, "argv": argv, "kv_cache_dtype": kv_dtype,
                       "elapsed_s": result["elapsed_s"], "output_tokens_per_s": result["output_tokens_per_s"],
                       "total_tokens_per_s": result["total_tokens_per_s"], "kv_blocks": engine["kv_blocks_total"],
                       "steps": result["roofline"]["steps"], "preemptions": engine["num_preemptions"],
                       "output_tokens_per_step": round(result["output_tokens"] / result["roofline"]["steps"], 1),
                       "roofline": result["roofline"]}
            log(summary)
            runs.append(summary)
            gc.collect()
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
    for label, _ in memory:
        pair = {r["kv_cache_dtype"]: r for r in runs if r["point"] == label}
        log({"point": label, "fp8_over_bf16_output_tokens":
             round(pair["fp8"]["output_tokens_per_s"] / pair["auto"]["output_tokens_per_s"], 3)})
    return runs


# ---------------------------------------------------------------- part 3: logits
def logit_error(model_path: str, prompt_len: int, decodes: int) -> dict:
    llm = LLM(model_path, load_format="dummy", dtype="bfloat16", num_kv_blocks=16, max_num_seqs=1,
              max_num_batched_tokens=prompt_len, enforce_eager=True)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, llm.spec.vocab_size, (prompt_len + decodes,), generator=gen).tolist()
    chunks = [prompt_len // 2, prompt_len - prompt_len // 2] + [1] * decodes
    blocks = -(-len(ids) // 16) + 1
    ref = paged_logits(llm.model, ids, chunks, block_size=16, num_blocks=blocks).float()
    fp8 = paged_logits(llm.model, ids, chunks, block_size=16, num_blocks=blocks,
                       kv_cache_dtype=fp8_kv.FP8_DTYPE).float()
    layers = llm.engine.runner.attention_layers
    result = {"prompt_len": prompt_len, "decodes": decodes,
              "rel_rmse_all": rel_rmse(fp8, ref), "rel_rmse_decode": rel_rmse(fp8[-decodes:], ref[-decodes:]),
              "argmax_agreement": float((fp8.argmax(-1) == ref.argmax(-1)).float().mean()),
              "k_scale_range": [min(float(m.k_scale) for m in layers), max(float(m.k_scale) for m in layers)],
              "v_scale_range": [min(float(m.v_scale) for m in layers), max(float(m.v_scale) for m in layers)]}
    del llm
    gc.collect()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="benchmarks/configs/llama-3.1-8b.json")
    p.add_argument("--parts", nargs="+", default=["kernel", "throughput"], choices=("kernel", "throughput", "logits"))
    p.add_argument("--kv-cache-bytes", default="16G", help="the KV cache of the capacity-bound throughput point")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--decodes", type=int, default=32)
    p.add_argument("--smoke", action="store_true", help="tiny shapes and workload (a CPU under TRITON_INTERPRET=1)")
    p.add_argument("--out", type=Path, default=None, help="also write the result as DIR/fp8_kv_cache.json")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    if device.type == "cuda":
        copy_bw = copy_bandwidth(device)
        result["copy_GB_per_s"] = round(copy_bw / 1e9, 1)
        result["bf16_matmul_TFLOP_per_s"] = round(matmul_rate(device, torch.bfloat16) / 1e12, 1)
    else:
        copy_bw = float("nan")
    log(result)
    if "kernel" in args.parts:
        result["kernel"] = kernel_part(device, copy_bw, args.smoke)
    if "throughput" in args.parts:
        result["throughput"] = throughput_part(args.model, args.kv_cache_bytes, args.smoke)
    if "logits" in args.parts:
        result["logits"] = logit_error(args.model, args.prompt_len, args.decodes)
        log(result["logits"])
    text = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fp8_kv_cache.json").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
