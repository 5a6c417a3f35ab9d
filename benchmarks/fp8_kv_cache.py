"""FP8 KV cache: logit error against a bf16 cache, and the decode kernel's time on each cache.

    PYTHONPATH=. python benchmarks/fp8_kv_cache.py [--model benchmarks/configs/llama-3.1-8b.json]

1. Logits: the model (dummy weights, bf16) driven through the paged cache (``testing.paged_logits``:
   a prompt prefilled in chunks, then single decode tokens) with a bf16 cache and with an FP8 cache
   (scales calibrated as the engine does); relative rms of the FP8 logits against the bf16 ones.
2. The Triton decode kernel on the model's attention shapes at several (batch, context) points, bf16
   and FP8 caches of the same values: time per call, and the K/V bytes it must read over that time
   against the copy bandwidth measured in the same run.

The end-to-end figure is ``benchmarks/throughput.py --kv-cache-dtype fp8`` against ``auto``.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import torch

from dockyard import LLM
from dockyard.bench.ceilings import copy_bandwidth
from dockyard.ops import fp8_kv
from dockyard.ops.triton_attention import decode_kv_bytes, paged_decode_attention
from dockyard.testing import paged_logits, rel_rmse


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
    torch.cuda.empty_cache()
    return result


def time_call(fn, iters: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters / 1e3


def kernel_times(q_heads: int, kv_heads: int, head_dim: int, points: list[tuple[int, int]], copy_bw: float) -> list:
    rows = []
    dev = torch.device("cuda")
    for batch, context in points:
        blocks_per_seq = -(-context // 16)
        num_blocks = batch * blocks_per_seq + 1
        gen = torch.Generator(device=dev).manual_seed(batch + context)
        bf16 = torch.randn(2, num_blocks, 16, kv_heads, head_dim, generator=gen, device=dev, dtype=torch.bfloat16)
        k_scale = fp8_kv.calibration_scale(bf16[0], fp8_kv.K_SCALE_HEADROOM)
        v_scale = fp8_kv.calibration_scale(bf16[1], fp8_kv.V_SCALE_HEADROOM)
        fp8 = torch.stack([fp8_kv.quantize(bf16[0], k_scale), fp8_kv.quantize(bf16[1], v_scale)])
        tables = torch.randperm(num_blocks - 1, device=dev)[: batch * blocks_per_seq].view(batch, blocks_per_seq) + 1
        lens = torch.full((batch,), context, device=dev)
        q = torch.randn(batch, q_heads, head_dim, generator=gen, device=dev, dtype=torch.bfloat16)
        scale = head_dim**-0.5
        decode_bf16 = functools.partial(paged_decode_attention, q, bf16, tables, lens, scale)
        decode_fp8 = functools.partial(paged_decode_attention, q, fp8, tables, lens, scale, k_scale=k_scale,
                                       v_scale=v_scale)
        t_bf16, t_fp8 = time_call(decode_bf16), time_call(decode_fp8)
        dequantized = torch.stack([fp8[0].float() * k_scale, fp8[1].float() * v_scale]).to(torch.bfloat16)
        err = rel_rmse(decode_fp8().float(), paged_decode_attention(q, dequantized, tables, lens, scale).float())
        err_vs_bf16 = rel_rmse(decode_fp8().float(), decode_bf16().float())
        row = {"batch": batch, "context": context}
        for name, t, size in (("bf16", t_bf16, 2), ("fp8", t_fp8, 1)):
            kv = decode_kv_bytes([context] * batch, kv_heads, head_dim, size)
            row[name] = {"us": round(t * 1e6, 1), "kv_bytes": kv, "fraction_of_copy_bw": round(kv / t / copy_bw, 3)}
        row["speedup"] = round(t_bf16 / t_fp8, 2)
        row["rel_rmse_vs_dequantized_cache"] = err
        row["rel_rmse_vs_bf16_cache"] = err_vs_bf16
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="benchmarks/configs/llama-3.1-8b.json")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--decodes", type=int, default=32)
    p.add_argument("--parts", nargs="+", default=["logits", "kernel"], choices=("logits", "kernel"))
    args = p.parse_args()
    copy_bw = copy_bandwidth(torch.device("cuda"))
    result = {"device": torch.cuda.get_device_name(), "copy_GB_per_s": round(copy_bw / 1e9, 1)}
    if "logits" in args.parts:
        result["logits"] = logit_error(args.model, args.prompt_len, args.decodes)
        print(json.dumps(result), file=sys.stderr, flush=True)
    if "kernel" in args.parts:
        result["kernel"] = kernel_times(32, 8, 128, [(1, 32768), (8, 8192), (64, 2048), (256, 1024)], copy_bw)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
