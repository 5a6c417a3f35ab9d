"""Fused MoE kernels (``dockyard/ops/triton_moe.py``) on the GPU: checked against the reference loop, timed
against it and against one dense GEMM pair of the same total size, and a tile sweep.

    python benchmarks/moe_kernels.py --config benchmarks/configs/qwen3-30b-a3b.json --tokens 1 8 64 512 4096 \\
        [--sweep] [--json]

For each token count T, at the model's hidden size, expert intermediate size, expert count and top-k (read
from the config through ``ModelSpec``), in bfloat16: router logits drawn at random go through
``select_experts``; the fused path and ``moe_reference`` run on the same stacked expert bank. Reported:

- ``rel_rmse`` of fused vs the reference computed in float32 (weights and inputs upcast);
- times (``triton.testing.do_bench``: median, L2 flushed between runs) of the fused path, the reference loop,
  and the dense GEMMs of the same shape ([T·k, H] × [H, 2I], then [T·k, I] × [I, H] with cuBLAS: the same
  FLOPs, one expert's weights);
- bytes the fused path reads (the distinct experts routed to × one expert's weights, plus activations) over
  its time, against the copy bandwidth measured in the same run, and its FLOPs against the bf16 matmul rate.

``--sweep`` times each tile configuration of ``SWEEP`` at each T and prints the fastest (``DEFAULT_CONFIGS``
in ``triton_moe.py`` come from it). At decode sizes a launch costs more host time than the kernels take on
the device, so ``--graph-sweep T ...`` times the way the engine runs them instead: ``GRAPH_CALLS`` fused
calls on different inputs and routings (more weight bytes than the L2 holds) captured in one CUDA graph,
the median replay over the calls; first the gate/up tiles of ``GRAPH_SWEEP_UP`` with the default down tiles,
then the down tiles of ``GRAPH_SWEEP_DOWN`` with the best gate/up ones.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
import triton.testing

from dockyard.ops import triton_moe
from dockyard.ops.moe import ExpertList, moe_reference, select_experts
from dockyard.spec import ModelSpec
from dockyard.testing import rel_rmse

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from dockyard.bench.ceilings import copy_bandwidth, matmul_rate  # noqa: E402

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): both GEMMs take the same one in the sweep.
SWEEP = [cfg for cfg in itertools.product((16, 32, 64), (32, 64, 128), (64, 128), (4, 8), (3,))
         if not (cfg[3] == 8 and cfg[1] == 32)]


# Decode-size sweeps in CUDA graphs: BLOCK_M 16 (one block per expert), N and K tiles, warps, stages.
GRAPH_SWEEP_UP = [(16, n, kk, 4, st) for n in (16, 32, 64, 128) for kk in (128, 256) for st in (3, 4)]
GRAPH_SWEEP_DOWN = [(16, n, kk, 4, st) for n in (32, 64, 128) for kk in (64, 128) for st in (3, 4)]
GRAPH_CALLS = 8


def bench(fn) -> float:  # noqa: ANN001 - any callable
    """Median milliseconds of ``fn`` with the L2 cache flushed between runs."""
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def build_bank(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> ExpertList:
    moe = spec.moe
    bank = ExpertList(moe.num_experts, spec.hidden_size, moe.intermediate_size, spec.hidden_act)
    bank = bank.to(device, dtype)
    with torch.no_grad():
        for p in bank.parameters():
            p.normal_(0.0, p.shape[-1] ** -0.5)
    bank.stack_()
    return bank


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="benchmarks/configs/qwen3-30b-a3b.json")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 512, 4096])
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--sweep-tokens", type=int, nargs="+", default=None, help="token counts to sweep (default all)")
    p.add_argument("--graph-sweep", type=int, nargs="*", default=[], metavar="T",
                   help="token counts whose tiles are swept in CUDA graphs (module docstring)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    device, dtype = torch.device("cuda"), torch.bfloat16
    spec = ModelSpec.from_hf_config(json.load(open(args.config)))
    moe = spec.moe
    hidden, inter, k = spec.hidden_size, moe.intermediate_size, moe.top_k
    bank = build_bank(spec, device, dtype)
    bandwidth, rate = copy_bandwidth(device), matmul_rate(device, dtype)
    result: dict = {"device": torch.cuda.get_device_name(), "config": args.config, "hidden": hidden,
                    "intermediate": inter, "experts": moe.num_experts, "top_k": k,
                    "copy_GB_per_s": round(bandwidth / 1e9, 1), "matmul_TFLOP_per_s": round(rate / 1e12, 1),
                    "rows": []}
    print(json.dumps(result), file=sys.stderr, flush=True)
    gate = torch.randn(moe.num_experts, hidden, device=device, dtype=dtype) * hidden ** -0.5
    for tokens in args.tokens:
        sweep = args.sweep and (args.sweep_tokens is None or tokens in args.sweep_tokens)
        row = measure_row(tokens, spec, bank, gate, bandwidth, rate, sweep)
        result["rows"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    for tokens in args.graph_sweep:
        row = graph_sweep(tokens, spec, bank, gate, bandwidth)
        result.setdefault("graph_sweeps", []).append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    return result


def measure_row(tokens: int, spec: ModelSpec, bank: ExpertList, gate: torch.Tensor, bandwidth: float, rate: float,
                sweep: bool) -> dict:
    """Check and time the fused path at ``tokens`` tokens (module docstring)."""
    moe, device, dtype = spec.moe, gate.device, gate.dtype
    hidden, inter, k = spec.hidden_size, moe.intermediate_size, moe.top_k
    expert_bytes = (bank.stacked.gate_up[0].numel() + bank.stacked.down[0].numel()) * dtype.itemsize
    gen = torch.Generator(device=device).manual_seed(tokens)
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, generator=gen)
    weights, ids = select_experts((x @ gate.T).float(), moe)
    fused = triton_moe.fused_moe(x, bank.stacked, weights, ids)
    ref32 = moe_reference(x.float(), _float_bank(bank), weights, ids)
    ref = moe_reference(x, bank, weights, ids)
    distinct = int(torch.unique(ids).numel())
    row = {"tokens": tokens, "distinct_experts": distinct,
           "rel_rmse_fused_vs_fp32": round(rel_rmse(fused.float(), ref32), 5),
           "rel_rmse_bf16_reference_vs_fp32": round(rel_rmse(ref.float(), ref32), 5)}
    row["fused_ms"] = round(bench(lambda: triton_moe.fused_moe(x, bank.stacked, weights, ids)), 4)
    row["reference_ms"] = round(bench(lambda: moe_reference(x, bank, weights, ids)), 4)
    a1 = torch.randn(tokens * k, hidden, device=device, dtype=dtype)
    w1 = torch.randn(hidden, 2 * inter, device=device, dtype=dtype)
    a2 = torch.randn(tokens * k, inter, device=device, dtype=dtype)
    w2 = torch.randn(inter, hidden, device=device, dtype=dtype)
    row["dense_gemm_ms"] = round(bench(lambda: (a1 @ w1, a2 @ w2)), 4)
    # Weights of the experts hit, x, the intermediate written and read back (the float32 partial sums aside).
    read = distinct * expert_bytes + tokens * hidden * dtype.itemsize + 2 * tokens * k * inter * dtype.itemsize
    flops = 2 * tokens * k * 3 * hidden * inter
    row["bytes_read"] = read
    row["fraction_of_copy_bandwidth"] = round(read / (row["fused_ms"] / 1e3) / bandwidth, 3)
    row["fraction_of_matmul_rate"] = round(flops / (row["fused_ms"] / 1e3) / rate, 3)
    row["speedup_vs_reference"] = round(row["reference_ms"] / row["fused_ms"], 1)
    row["vs_dense_gemm"] = round(row["dense_gemm_ms"] / row["fused_ms"], 2)
    if sweep:
        timings = []
        for cfg in SWEEP:
            if cfg[0] > 16 and tokens * k < 4 * cfg[0]:
                continue  # blocks mostly padding
            try:
                ms = bench(lambda cfg=cfg: triton_moe.fused_moe(x, bank.stacked, weights, ids, (cfg, cfg)))
            except Exception as e:  # noqa: BLE001 - a configuration the device cannot run (shared memory)
                print(f"sweep {tokens} {cfg}: {type(e).__name__}", file=sys.stderr)
                continue
            timings.append((ms, cfg))
        timings.sort()
        row["sweep_best"] = [{"ms": round(ms, 4), "config": cfg} for ms, cfg in timings[:5]]
    return row


def graph_sweep(tokens: int, spec: ModelSpec, bank: ExpertList, gate: torch.Tensor, bandwidth: float) -> dict:
    """Tiles at ``tokens`` tokens timed in CUDA graphs (module docstring): ms per fused call, the fraction of the
    copy bandwidth that the distinct experts' weights read per call make."""
    moe, device, dtype = spec.moe, gate.device, gate.dtype
    expert_bytes = (bank.stacked.gate_up[0].numel() + bank.stacked.down[0].numel()) * dtype.itemsize
    gen = torch.Generator(device=device).manual_seed(1000 + tokens)
    inputs = []
    for _ in range(GRAPH_CALLS):
        x = torch.randn(tokens, spec.hidden_size, device=device, dtype=dtype, generator=gen)
        weights, ids = select_experts(x @ gate.T, moe)
        inputs.append((x, weights, ids))
    distinct = sum(int(torch.unique(ids).numel()) for _, _, ids in inputs) / GRAPH_CALLS
    ref = [moe_reference(x, bank, w, i) for x, w, i in inputs]

    def timed(configs) -> float:
        outs = [triton_moe.fused_moe(x, bank.stacked, w, i, configs) for x, w, i in inputs]  # compile, check
        worst = max(rel_rmse(o.float(), r.float()) for o, r in zip(outs, ref))
        if not worst < 2e-2:
            raise AssertionError(f"tiles {configs}: rel rmse {worst:.3g} against the reference loop")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for x, w, i in inputs:
                triton_moe.fused_moe(x, bank.stacked, w, i, configs)
        return replay_ms(graph, GRAPH_CALLS)

    default_up, default_down = triton_moe.pick_configs(tokens)
    row: dict = {"tokens": tokens, "distinct_experts": distinct, "default": [default_up, default_down]}

    def sweep(candidates, make) -> list[tuple[float, tuple]]:
        out = []
        for cfg in candidates:
            try:
                out.append((timed(make(cfg)), cfg))
            except Exception as e:  # noqa: BLE001 - a configuration the device cannot run (shared memory)
                print(f"graph sweep {tokens} {cfg}: {type(e).__name__}: {str(e)[:100]}", file=sys.stderr)
        return sorted(out)

    row["default_ms"] = round(timed((default_up, default_down)), 4)
    ups = sweep(GRAPH_SWEEP_UP, lambda cfg: (cfg, default_down))
    best_up = ups[0][1] if ups else default_up
    downs = sweep(GRAPH_SWEEP_DOWN, lambda cfg: (best_up, cfg))
    row["up_best"] = [{"ms": round(ms, 4), "config": cfg} for ms, cfg in ups[:5]]
    row["down_best"] = [{"ms": round(ms, 4), "config": cfg} for ms, cfg in downs[:5]]
    best_ms = downs[0][0] if downs else row["default_ms"]
    for key, ms in (("default", row["default_ms"]), ("best", best_ms)):
        row[f"fraction_of_copy_bandwidth_{key}"] = round(distinct * expert_bytes / (ms / 1e3) / bandwidth, 3)
    return row


def replay_ms(graph: torch.cuda.CUDAGraph, calls: int) -> float:
    """Median milliseconds per call of a captured ``graph`` holding ``calls`` calls (after 3 warm replays)."""
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def _float_bank(bank: ExpertList) -> ExpertList:
    copy = ExpertList(bank.num_experts, bank[0].gate_proj.in_features, bank[0].gate_proj.out_features)
    copy.load_state_dict({k: v.float() for k, v in bank.state_dict().items()})
    return copy.to(bank.stacked.gate_up.device)


if __name__ == "__main__":
    main()
