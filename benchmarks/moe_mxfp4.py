"""The fused MoE kernel with MXFP4 experts (dequantized in registers) against the same kernel on the bf16 experts
they dequantize to, at gpt-oss's expert shapes on the GPU: checked against the float64 reference loop, timed,
and set against the bytes-over-bandwidth roofline.

    python benchmarks/moe_mxfp4.py --config benchmarks/configs/gpt-oss-20b.json --tokens 1 8 64 [--sweep] [--json]

For each token count T: an MXFP4 ``GptOssExperts`` bank with random nibbles and scales (around 1/sqrt(K)) and
random biases, and a bf16 bank holding exactly the values they mean (``ops.mxfp4_format`` dequantization,
exact in bf16; re-laid out by ``stack_`` as the engine does); router logits drawn at random go through
gpt-oss's routing. Reported per T:

- ``rel_rmse`` of each path against ``moe_reference`` in float64 on the float64 weights;
- milliseconds per fused call of each path, timed as the engine runs decode: ``CALLS`` calls on different
  inputs and routings captured in one CUDA graph (more weight bytes than the L2 holds), the median replay over
  the calls; also the MXFP4 path with ``ALT_TILES`` (K tiles twice as long: a quarter of the bytes per tile);
- the bytes each call reads (the distinct experts routed to × one expert's weights and biases as held — 17/32
  byte per MXFP4 weight, 2 per bf16 one — plus the activations) over its time, against the copy bandwidth
  measured in the same run; the FLOPs against the bf16 matmul rate;
- with ``--sweep``, the five fastest MXFP4 tiles of ``SWEEP`` (the same for both GEMMs) at each T.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from dockyard.ops import triton_moe
from dockyard.ops.moe import GptOssExperts, moe_reference, mxfp4_expert_banks
from dockyard.ops.mxfp4_format import dequantize_mxfp4_tensor, scale_code_for_rms
from dockyard.spec import ModelSpec
from dockyard.testing import rel_rmse

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from moe_kernels import replay_ms  # noqa: E402

from dockyard.bench.ceilings import copy_bandwidth, matmul_rate  # noqa: E402

CALLS = 8
ALT_TILES = ((16, 64, 256, 4, 3), (16, 64, 256, 4, 3))
# ``--sweep``: MXFP4 tiles (both GEMMs alike) timed in CUDA graphs at each T; BLOCK_K a multiple of 32.
SWEEP = [(16, n, kk, w, st) for n in (32, 64, 128) for kk in (64, 128, 256) for w in (4, 8) for st in (2, 3)
         if not (w == 8 and n == 32)]


@torch.no_grad()
def build_banks(spec: ModelSpec, device: torch.device) -> tuple[GptOssExperts, GptOssExperts, GptOssExperts]:
    """(MXFP4 bank, bf16 bank of the same values, float64 bank of the same values) on ``device``."""
    moe = spec.moe
    experts, hidden, inter = moe.num_experts, spec.hidden_size, moe.intermediate_size
    gen = torch.Generator(device).manual_seed(0)
    with torch.device(device):
        with mxfp4_expert_banks():
            packed = GptOssExperts(experts, hidden, inter, spec.swiglu_limit)
        bf16 = GptOssExperts(experts, hidden, inter, spec.swiglu_limit).to(torch.bfloat16)
        f64 = GptOssExperts(experts, hidden, inter, spec.swiglu_limit).double()
    for name, rows, k in (("gate_up_proj", 2 * inter, hidden), ("down_proj", hidden, inter)):
        blocks = getattr(packed, name + "_blocks")
        blocks.copy_(torch.randint(0, 256, blocks.shape, generator=gen, device=device, dtype=torch.uint8))
        scales = getattr(packed, name + "_scales")
        centre = scale_code_for_rms(k)
        scales.copy_(torch.randint(centre - 2, centre + 3, scales.shape, generator=gen, device=device,
                                   dtype=torch.uint8))
        for e in range(experts):  # one expert at a time: float64 temporaries stay small
            weight = dequantize_mxfp4_tensor(blocks[e], scales[e], torch.float64)
            getattr(f64, name)[e].copy_(weight)
            getattr(bf16, name)[e].copy_(weight)
        # bf16-exact biases too, so the two paths hold the same values.
        bias = (torch.randn(experts, rows, generator=gen, device=device) * 0.5).bfloat16().float()
        for bank in (packed, bf16, f64):
            getattr(bank, name + "_bias").copy_(bias)
    bf16.stack_()
    return packed, bf16, f64


def graph_ms(calls: list) -> float:  # noqa: ANN001 - callables
    """Median milliseconds per call of ``calls`` replayed in one CUDA graph."""
    for call in calls:  # compile outside the capture
        call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return replay_ms(graph, len(calls))


@torch.no_grad()
def measure_row(tokens: int, spec: ModelSpec, banks: tuple, gate: torch.Tensor, bandwidth: float,
                rate: float, sweep: bool = False) -> dict:
    packed, bf16, f64 = banks
    device, hidden, inter, k = gate.device, spec.hidden_size, spec.moe.intermediate_size, spec.moe.top_k
    gen = torch.Generator(device=device).manual_seed(tokens)
    inputs = []
    for _ in range(CALLS):
        x = torch.randn(tokens, hidden, device=device, dtype=gate.dtype, generator=gen)
        top, ids = torch.topk((x @ gate.T).float(), k, dim=-1)  # gpt-oss: softmax over the top-k logits
        inputs.append((x, torch.softmax(top, dim=-1), ids))
    x, weights, ids = inputs[0]
    want = moe_reference(x.double(), f64, weights.double(), ids)
    row: dict = {"tokens": tokens}
    for label, bank in (("mxfp4", packed), ("bf16", bf16)):
        got = triton_moe.fused_moe(x, bank.stacked, weights, ids)
        row[f"rel_rmse_{label}_vs_fp64"] = float(f"{rel_rmse(got.double(), want):.3g}")
    distinct = sum(int(torch.unique(i).numel()) for _, _, i in inputs) / CALLS
    row["distinct_experts"] = distinct
    weights_per_expert = 2 * inter * hidden + hidden * inter
    bias_bytes = (2 * inter + hidden) * 4  # float32 biases (as the MXFP4 bank here holds them; bf16's are half)
    activations = tokens * hidden * 2 + 2 * tokens * k * inter * 2 + tokens * k * hidden * 4 + tokens * hidden * 2
    held = {"mxfp4": weights_per_expert * 17 / 32, "bf16": weights_per_expert * 2}
    flops = 2 * tokens * k * 3 * hidden * inter
    variants = (("mxfp4", packed, None), ("mxfp4_alt_tiles", packed, ALT_TILES), ("bf16", bf16, None))
    for label, bank, configs in variants:
        ms = graph_ms([lambda x=x, w=w, i=i, s=bank.stacked, c=configs: triton_moe.fused_moe(x, s, w, i, c)
                       for x, w, i in inputs])
        read = distinct * (held[label.split("_")[0]] + bias_bytes) + activations
        row[f"{label}_ms"] = round(ms, 4)
        row[f"{label}_bytes"] = int(read)
        row[f"{label}_fraction_of_copy_bandwidth"] = round(read / (ms / 1e3) / bandwidth, 3)
        row[f"{label}_fraction_of_matmul_rate"] = round(flops / (ms / 1e3) / rate, 4)
    if sweep:
        timings = []
        for cfg in SWEEP:
            try:
                ms = graph_ms([lambda x=x, w=w, i=i, c=(cfg, cfg): triton_moe.fused_moe(x, packed.stacked, w, i, c)
                               for x, w, i in inputs])
            except Exception as e:  # noqa: BLE001 - a configuration the device cannot run (shared memory)
                print(f"sweep {tokens} {cfg}: {type(e).__name__}", file=sys.stderr)
                continue
            timings.append((ms, cfg))
        row["mxfp4_sweep_best"] = [{"ms": round(ms, 4), "config": cfg} for ms, cfg in sorted(timings)[:5]]
    row["speedup_mxfp4_vs_bf16"] = round(row["bf16_ms"] / row["mxfp4_ms"], 2)
    row["roofline_ratio_bf16_over_mxfp4_bytes"] = round(row["bf16_bytes"] / row["mxfp4_bytes"], 2)
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="benchmarks/configs/gpt-oss-20b.json")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--sweep", action="store_true", help="time the MXFP4 tiles of SWEEP at each T")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    device = torch.device("cuda")
    spec = ModelSpec.from_hf_config(json.load(open(args.config)))
    banks = build_banks(spec, device)
    bandwidth, rate = copy_bandwidth(device), matmul_rate(device, torch.bfloat16)
    result: dict = {"device": torch.cuda.get_device_name(), "config": args.config, "hidden": spec.hidden_size,
                    "intermediate": spec.moe.intermediate_size, "experts": spec.moe.num_experts,
                    "top_k": spec.moe.top_k, "copy_GB_per_s": round(bandwidth / 1e9, 1),
                    "matmul_TFLOP_per_s": round(rate / 1e12, 1), "rows": []}
    print(json.dumps(result), file=sys.stderr, flush=True)
    gate = torch.randn(spec.moe.num_experts, spec.hidden_size, device=device, dtype=torch.bfloat16)
    gate *= spec.hidden_size ** -0.5
    for tokens in args.tokens:
        row = measure_row(tokens, spec, banks, gate, bandwidth, rate, args.sweep)
        result["rows"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    return result


if __name__ == "__main__":
    main()
