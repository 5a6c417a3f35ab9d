"""Paged decode attention: the Triton kernel vs the reference decode path, on a CUDA device.

    PYTHONPATH=. python benchmarks/attention_kernels.py [--out DIR] [--quick]

Imports only torch, triton and the two attention modules (the device machine may lack dockyard's
other dependencies). Shapes: Llama-3.1-8B attention (32 query heads, 8 KV heads, head_dim 128,
block size 16), batch 1/8/64 × context 128/1k/8k/32k, bfloat16 and float32. For each shape:

- correctness: ‖out − ref‖ / ‖ref‖ against the reference decode path run in float32 on the same
  (rounded) inputs, over all rows where that fits in memory, else over a few rows;
- timing (``triton.testing.do_bench``: CUDA events, warm-up, L2 flushed before each call, median)
  of the kernel called eagerly, of its replay from a CUDA graph (the capture itself checks that a
  call makes no host synchronization), and of the reference decode path where its gathered,
  head-repeated copies of K and V fit in memory;
- achieved bandwidth = bytes of K and V the step must read / kernel time, against the measured
  device-to-device copy bandwidth (bytes read + written / time) of the same run;
- the host's cost of one eager call, and its breakdown (``--launch-only`` for just that).

Then a sweep of the tuning knobs (splits, the float32 product mode, and with ``--sweep-configs``
tile size × warps × pipeline stages) on a few shapes, timed as CUDA-graph replays, and
a correctness pass over the other features (sliding window, soft-cap, sinks, GQA ratios 1 and 8,
head_dim 64 and 256). Results go to ``DIR/attention_kernels.json``; a table is printed last.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback

import torch
import triton
import triton.testing

from dockyard.ops.attention import AttentionMetadata, _decode_attention
from dockyard.ops.triton_attention import decode_kv_bytes, default_num_splits, paged_decode_attention

HQ, HKV, D, BS = 32, 8, 128, 16  # Llama-3.1-8B attention
BATCHES = (1, 8, 64)
CONTEXTS = (128, 1024, 8192, 32768)
REF_MEMORY_LIMIT = 24 << 30  # bytes of the reference's gathered K/V copies we allow
SUBSET_ROWS = 4


def log(*args: object) -> None:
    print(*args, flush=True)


def bench(fn) -> float:
    """Median milliseconds of ``fn`` (events, L2 flushed before each call)."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3)


def make_case(batch: int, context: int, dtype: torch.dtype, device: torch.device, seed: int = 0,
              num_q_heads: int = HQ, num_kv_heads: int = HKV, head_dim: int = D):
    """q, a KV cache with each sequence's blocks scattered at random, block tables, lengths.

    Lengths: ``context`` minus 0..15, so most end mid-block; the table is as wide as the longest.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    lens = [max(1, context - (7 * i) % 16) for i in range(batch)]
    width = -(-max(lens) // BS)
    num_blocks = batch * width + 1
    cache = torch.randn(2, num_blocks, BS, num_kv_heads, head_dim, device=device, dtype=dtype, generator=gen)
    perm = torch.randperm(num_blocks, device=device, generator=gen)
    tables = perm[: batch * width].view(batch, width).clone()
    for i, n in enumerate(lens):  # padding entries point at block 0, as the engine's do
        tables[i, -(-n // BS):] = 0
    q = torch.randn(batch, num_q_heads, head_dim, device=device, dtype=dtype, generator=gen)
    seq_lens = torch.tensor(lens, device=device)
    return q, cache, tables, seq_lens, lens


def metadata(tables: torch.Tensor, seq_lens: torch.Tensor, lens: list[int]) -> AttentionMetadata:
    batch = len(lens)
    return AttentionMetadata(slot_mapping=torch.zeros(batch, dtype=torch.long, device=tables.device),
                             block_tables=tables, query_lens=[1] * batch, seq_lens=lens, block_size=BS,
                             seq_lens_tensor=seq_lens)


def ref_bytes(batch: int, width: int, num_q_heads: int, head_dim: int, element_size: int) -> int:
    """Peak bytes of the reference's gathered K and V (cache dtype, then repeated to every q head)."""
    return 2 * batch * width * BS * head_dim * element_size * (num_q_heads + num_q_heads // 4)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


def check(q, cache, tables, seq_lens, lens, scale, window=None, softcap=None, sinks=None, **options) -> dict:
    """Kernel vs the reference decode path in float32 over all rows, or a subset when memory is short."""
    out = paged_decode_attention(q, cache, tables, seq_lens, scale, window, softcap, sinks, **options)
    torch.cuda.synchronize()
    batch = len(lens)
    rows = list(range(batch))
    if ref_bytes(batch, tables.shape[1], q.shape[1], q.shape[2], 4) > REF_MEMORY_LIMIT:
        rows = sorted({0, batch - 1, batch // 2, batch // 3})[:SUBSET_ROWS]
    idx = torch.tensor(rows, device=q.device)
    sub_lens = [lens[i] for i in rows]
    width = -(-max(sub_lens) // BS)
    meta = metadata(tables[idx, :width], seq_lens[idx], sub_lens)
    # The reference converts the gathered blocks to q's dtype: float32 math on the kernel's own inputs.
    ref = _decode_attention(q[idx].float(), cache, meta, scale, window, softcap,
                            sinks.float() if sinks is not None else None)
    result = {"rel_err": rel_err(out[idx], ref), "rows_checked": len(rows), "finite": bool(out.isfinite().all())}
    del ref
    torch.cuda.empty_cache()
    return result


def graph_replay(fn):
    """Capture ``fn`` in a CUDA graph (fails on any host synchronization); return (replay, output)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


def free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def one_shape(row: dict, batch: int, context: int, dtype: torch.dtype, device: torch.device, copy_bw: float) -> None:
    q, cache, tables, seq_lens, lens = make_case(batch, context, dtype, device, seed=batch + context)
    scale = D**-0.5
    row.update(check(q, cache, tables, seq_lens, lens, scale))
    kv_bytes = decode_kv_bytes(lens, HKV, D, cache.element_size())
    row["kv_bytes"] = kv_bytes
    row["num_splits"] = default_num_splits(batch, HKV, tables.shape[1] * BS, device)

    def call() -> torch.Tensor:
        return paged_decode_attention(q, cache, tables, seq_lens, scale)

    row["triton_ms"] = bench(call)
    replay, graph_out = graph_replay(call)
    replay()
    row["graph_matches_eager"] = bool(torch.equal(graph_out, call()))
    row["triton_graph_ms"] = bench(replay)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(50):  # launches queue behind the GPU work: this is the host's own cost of a call
        call()
    row["host_us_per_call"] = (time.perf_counter() - start) / 50 * 1e6
    torch.cuda.synchronize()
    row["triton_GBps"] = kv_bytes / (row["triton_ms"] * 1e-3) / 1e9
    row["fraction_of_copy_bw"] = row["triton_GBps"] * 1e9 / copy_bw
    row["fraction_graph"] = kv_bytes / (row["triton_graph_ms"] * 1e-3) / copy_bw
    if ref_bytes(batch, tables.shape[1], HQ, D, cache.element_size()) <= REF_MEMORY_LIMIT:
        meta = metadata(tables, seq_lens, lens)
        row["reference_ms"] = bench(lambda: _decode_attention(q, cache, meta, scale, None))
        row["speedup"] = row["reference_ms"] / row["triton_ms"]


def main_shapes(device: torch.device, copy_bw: float, quick: bool) -> list[dict]:
    rows = []
    batches = (1, 8) if quick else BATCHES
    contexts = (128, 1024) if quick else CONTEXTS
    for dtype in (torch.bfloat16, torch.float32):
        for batch in batches:
            for context in contexts:
                row = {"dtype": str(dtype).removeprefix("torch."), "batch": batch, "context": context}
                try:
                    one_shape(row, batch, context, dtype, device, copy_bw)
                except Exception as exc:  # noqa: BLE001 - record and go on to the next shape
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                    traceback.print_exc()
                free()
                log(json.dumps(row))
                rows.append(row)
    return rows


def sweep(device: torch.device, copy_bw: float, quick: bool, configs: bool) -> list[dict]:
    """Time the tuning knobs: splits on bf16 shapes, the float32 product mode, and with ``configs``
    (block_n, warps, stages) too."""
    shapes = [(1, 1024)] if quick else [(1, 8192), (1, 32768), (8, 8192), (64, 1024), (64, 32768)]
    rows = []
    for batch, context in shapes:
        sweep_shape(rows, batch, context, torch.bfloat16, device, copy_bw, "splits")
        free()
        if configs:
            sweep_shape(rows, batch, context, torch.bfloat16, device, copy_bw, "configs")
            free()
    for batch, context in [(1, 1024)] if quick else [(8, 8192), (64, 8192)]:
        sweep_shape(rows, batch, context, torch.float32, device, copy_bw, "fp32 precision")
        free()
    return rows


def sweep_shape(rows: list[dict], batch: int, context: int, dtype: torch.dtype, device: torch.device, copy_bw: float,
                what: str) -> None:
    """Every variant on one shape; the sweep's check runs over a subset of rows only where memory is short."""
    q, cache, tables, seq_lens, lens = make_case(batch, context, dtype, device, seed=1)
    kv_bytes = decode_kv_bytes(lens, HKV, D, cache.element_size())
    scale = D**-0.5
    default = default_num_splits(batch, HKV, tables.shape[1] * BS, device)
    if what == "splits":
        variants = [{"num_splits": s} for s in (1, 2, 4, 8, 16, 32, 64, 128) if s * 256 <= context or s == 1]
    elif what == "configs":
        variants = [{"num_splits": default, "block_n": block_n, "num_warps": warps, "num_stages": stages}
                    for block_n in (32, 64, 128) for warps in (4, 8) for stages in (2, 3, 4)]
    else:
        variants = [{"dot_precision": p} for p in ("ieee", "tf32x3", "ieee", "tf32x3")]
    for options in variants:
        row = {"what": what, "dtype": str(dtype).removeprefix("torch."), "batch": batch, "context": context,
               "default_splits": default, **options}
        try:
            row["rel_err"] = check(q, cache, tables, seq_lens, lens, scale, **options)["rel_err"]
            # Timed as graph replays: eager calls of small shapes measure the host's launch cost instead.
            replay, _ = graph_replay(lambda o=options: paged_decode_attention(q, cache, tables, seq_lens, scale, **o))
            row["ms"] = bench(replay)
            row["fraction_of_copy_bw"] = kv_bytes / (row["ms"] * 1e-3) / copy_bw
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        log(json.dumps(row))
        rows.append(row)


def features(device: torch.device) -> list[dict]:
    """Correctness of the other code paths on the device (one 1-2k-token batch each)."""
    cases = [
        {"name": "sliding window 256", "window": 256},
        {"name": "softcap 50 (Gemma 2)", "softcap": 50.0},
        {"name": "sinks (gpt-oss)", "sinks": True},
        {"name": "window+softcap+sinks", "window": 300, "softcap": 30.0, "sinks": True},
        {"name": "MHA (GQA 1), head_dim 64", "heads": (16, 16), "head_dim": 64},
        {"name": "GQA 8, head_dim 256", "heads": (32, 4), "head_dim": 256},
        {"name": "GQA 8, head_dim 64, fp16", "heads": (64, 8), "head_dim": 64, "dtype": torch.float16},
    ]
    rows = []
    for case in cases:
        for dtype in (case.get("dtype", torch.bfloat16), torch.float32):
            for splits in (1, 5):
                hq, hkv = case.get("heads", (HQ, HKV))
                hd = case.get("head_dim", D)
                row = {"case": case["name"], "dtype": str(dtype).removeprefix("torch."), "num_splits": splits}
                try:
                    q, cache, tables, seq_lens, lens = make_case(8, 1500, dtype, device, seed=3, num_q_heads=hq,
                                                                 num_kv_heads=hkv, head_dim=hd)
                    sinks = torch.randn(hq, device=device, dtype=dtype) if case.get("sinks") else None
                    row.update(check(q * 4, cache, tables, seq_lens, lens, hd**-0.5, case.get("window"),
                                     case.get("softcap"), sinks, num_splits=splits))
                except Exception as exc:  # noqa: BLE001
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                    traceback.print_exc()
                log(json.dumps(row))
                rows.append(row)
    return rows


def table(rows: list[dict], copy_bw: float) -> str:
    lines = [f"copy bandwidth {copy_bw / 1e9:,.0f} GB/s (read + write)",
             "| dtype | batch | context | splits | rel err | reference ms | triton ms | graph ms | host us/call | "
             "speedup | K/V GB/s | of copy bw | graph: of copy bw |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['dtype']} | {r['batch']} | {r['context']} | error: {r['error'][:80]} |")
            continue
        ref = f"{r['reference_ms']:.3f}" if "reference_ms" in r else "n/a (memory)"
        speed = f"{r['speedup']:.1f}x" if "speedup" in r else "–"
        lines.append(f"| {r['dtype']} | {r['batch']} | {r['context']} | {r['num_splits']} | {r['rel_err']:.1e} | "
                     f"{ref} | {r['triton_ms']:.4f} | {r['triton_graph_ms']:.4f} | {r['host_us_per_call']:.0f} | "
                     f"{speed} | {r['triton_GBps']:,.0f} | {r['fraction_of_copy_bw']:.2f} | "
                     f"{r['fraction_graph']:.2f} |")
    return "\n".join(lines)


@triton.jit
def _empty_kernel(x_ptr):
    pass


def host_us(fn, calls: int = 200) -> float:
    """Host microseconds per call of ``fn`` (launches queue behind the GPU; no synchronization inside)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def launch_overhead(device: torch.device) -> dict:
    """Where the host time of one eager call goes (batch 8, context 1k, bf16)."""
    from dockyard.ops import triton_attention as ta

    q, cache, tables, seq_lens, lens = make_case(8, 1024, torch.bfloat16, device)
    scale = D**-0.5
    out = torch.empty_like(q)
    x = torch.empty(16, device=device)
    k, v = cache[0], cache[1]

    def kernel_only() -> None:  # the decode kernel's launch alone, one split, no allocation
        ta._paged_decode_kernel[(8, HKV, 1)](
            q, k, v, tables, seq_lens, q, out, out, out, out, q.stride(0), q.stride(1), cache.stride(1),
            cache.stride(2), cache.stride(3), tables.stride(0), out.stride(0), out.stride(1), scale, 1.0, 0,
            NUM_Q_HEADS=HQ, GROUP=HQ // HKV, GROUP_PAD=16, HEAD_DIM=D, BLOCK_D=D, PAGE_SIZE=BS, BLOCK_N=64,
            USE_WINDOW=False, USE_SOFTCAP=False, USE_SINKS=False, SPLIT=False, DOT_DTYPE=triton.language.bfloat16,
            DOT_PRECISION=None)

    return {
        "empty_triton_kernel_us": host_us(lambda: _empty_kernel[(1,)](x)),
        "torch_empty_us": host_us(lambda: torch.empty(8, HQ, D, device=device, dtype=torch.bfloat16)),
        "torch_add_us": host_us(lambda: x.add_(1.0)),
        "decode_kernel_launch_us": host_us(kernel_only),
        "wrapper_1_split_us": host_us(lambda: paged_decode_attention(q, cache, tables, seq_lens, scale, num_splits=1)),
        "wrapper_4_splits_us": host_us(lambda: paged_decode_attention(q, cache, tables, seq_lens, scale, num_splits=4)),
        "reference_decode_us": host_us(lambda: _decode_attention(q, cache, metadata(tables, seq_lens, lens), scale,
                                                                 None), calls=50),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--quick", action="store_true", help="small shapes only (a smoke test)")
    parser.add_argument("--skip", nargs="*", default=(), choices=("sweep", "features"))
    parser.add_argument("--sweep-configs", action="store_true", help="also sweep block_n × warps × stages")
    parser.add_argument("--launch-only", action="store_true", help="only the host-overhead breakdown")
    args = parser.parse_args()
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    result: dict = {
        "date": time.strftime("%Y-%m-%d"), "device": props.name, "sms": props.multi_processor_count,
        "torch": torch.__version__, "triton": triton.__version__, "command": " ".join(sys.argv),
    }
    log(json.dumps(result))
    t0 = time.time()
    copy_bw = copy_bandwidth(device)
    result["copy_bytes_per_s"] = copy_bw
    log(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s")
    result["launch_overhead"] = launch_overhead(device)
    overhead = {k: round(v, 1) for k, v in result["launch_overhead"].items()}
    log("host overhead per eager call (us): " + json.dumps(overhead))
    out_path = os.path.join(args.out, "attention_kernels.json")
    if args.launch_only:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)
        return 0
    result["shapes"] = main_shapes(device, copy_bw, args.quick)
    if "features" not in args.skip:
        result["features"] = features(device)
    if "sweep" not in args.skip:
        result["sweep"] = sweep(device, copy_bw, args.quick, args.sweep_configs)
    result["elapsed_s"] = time.time() - t0
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    bad = [r for r in result["shapes"] + result.get("features", [])
           if "error" in r or not r.get("finite", False)
           or r["rel_err"] > (1e-5 if r["dtype"] == "float32" else 1e-2) or r.get("graph_matches_eager") is False]
    log("\n" + table(result["shapes"], copy_bw))
    for r in result.get("features", []):
        log(f"feature {r['case']:<28} {r['dtype']:<9} splits {r['num_splits']}: "
            + (r["error"] if "error" in r else f"rel err {r['rel_err']:.1e}"))
    for r in result.get("sweep", []):
        knobs = {k: r[k] for k in ("num_splits", "block_n", "num_warps", "num_stages", "dot_precision") if k in r}
        figures = (r["error"][:60] if "error" in r else
                   f"{r['ms'] * 1e3:8.1f} us  {r['fraction_of_copy_bw']:.2f} of copy bw  rel err {r['rel_err']:.1e}")
        log(f"sweep {r['what']:<14} {r['dtype']:<8} b{r['batch']:<3} ctx {r['context']:<6} {json.dumps(knobs):<70} "
            + figures)
    log(f"{len(bad)} failed checks; wrote {out_path}; {result['elapsed_s']:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
