"""Native FP8 matmul (block-scaled e4m3, ``dockyard/ops/triton_fp8.py``): correctness and speed on one GPU.

    PYTHONPATH=. python benchmarks/fp8_matmul.py > fp8_matmul.json     [--no-sweep] [--no-e2e] [--quick]

Needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9, e.g. H100); anywhere else it exits
with status 2 and a message. Progress goes to stderr, one JSON document to stdout. About 3-4 minutes
on an H100 (``--quick``: M 1 and 256 only, no sweep).

(a) correctness at Llama-3.1-8B shapes (N, K) = (6144, 4096) qkv, (4096, 4096) o, (28672, 4096)
    gate_up, (4096, 14336) down, M in 1, 16, 256, 8192: bf16 random activations and weights, the
    weights block-quantized (128 x 128, ``quantize_weight_blocks``), the FP8 op (activation quantizer +
    GEMM, bf16 out) against (i) the dequantized weight in a bf16 ``F.linear`` (what dequantize-on-load
    computes: the difference includes the activations' e4m3 rounding) and (ii) the same quantized
    operands multiplied in float32 by PyTorch (the kernel's own arithmetic error). Max abs and relative
    rms error (rmse(out - ref) / rmse(ref)).
(b) timing, same shapes: the FP8 op (quantize + GEMM), the GEMM alone and bf16 ``F.linear``, each
    captured in a CUDA graph (no launch overhead) over enough copies of the weight to exceed L2 (so
    weights come from HBM, as in a model), CUDA events, warm-up, median of 10 replays. TFLOP/s (2MNK)
    and GB/s (weight + activation + output bytes). Then a sweep of kernel configurations (tiles,
    warps, stages) per M, timed the same way; the best is reported beside the default.
(c) end to end: ``LLM`` on ``benchmarks/configs/llama-3.1-8b.json``. An FP8 checkpoint is written to a
    temporary directory from the dummy bf16 weights (every layer projection quantized in 128 x 128 blocks
    by ``quantize_weight_blocks``; embeddings, norms, lm_head bf16) and loaded through the real FP8
    path, native (Fp8Linear) and with ``DOCKYARD_FP8_NATIVE=0`` (dequantized on load); the same dummy
    weights in bf16 (``load_format="dummy"``) are the baseline. For each: prefill logits of a 64-token
    prompt (compared), batch-1 greedy decode of 128 tokens (after a warm-up; median of 3, prefill
    subtracted), weight bytes, and whether CUDA graphs were captured.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
MS = (1, 16, 256, 8192)
BLOCK = (128, 128)
L2_DEFEAT_BYTES = 256 << 20  # weight copies per timed graph: at least this many bytes (H100 L2: 50 MB)
CONFIG = Path(__file__).parent / "configs" / "llama-3.1-8b.json"
SWEEP = {  # (BLOCK_M, BLOCK_N, num_warps, num_stages) tried per M
    "small": [(16, 32, 4, 4), (16, 64, 4, 4), (16, 64, 4, 6), (16, 128, 4, 4), (32, 64, 4, 4), (16, 128, 8, 3)],
    "medium": [(64, 64, 4, 4), (64, 128, 4, 4), (128, 64, 4, 4), (128, 128, 8, 3), (64, 256, 8, 3)],
    "large": [(128, 128, 8, 3), (128, 128, 8, 4), (128, 256, 8, 3), (256, 128, 8, 3), (64, 128, 4, 4)],
}


def log(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


def require_fp8_gpu() -> torch.device:
    """The CUDA device, or exit 2 saying why the benchmark cannot run here."""
    from dockyard.ops.fp8_linear import native_fp8_unavailable

    device = torch.device("cuda")
    why = native_fp8_unavailable(device) if torch.cuda.is_available() else "no CUDA GPU is available"
    if why is not None:
        print(f"fp8_matmul.py needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9, e.g. H100): {why}",
              file=sys.stderr)
        sys.exit(2)
    return device


def rel_rms(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def time_graph(fn, calls: int, replays: int = 10) -> float:
    """Median milliseconds per call of ``fn`` (which makes ``calls`` calls), replayed from a CUDA graph."""
    for _ in range(2):
        fn()  # compile, warm up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times) / calls


def kernel_benchmarks(device: torch.device, ms: tuple[int, ...], sweep: bool) -> dict:
    from dockyard.ops.fp8_linear import quantize_weight_blocks

    results: dict = {"correctness": [], "timing": [], "sweep": []}
    gen = torch.Generator(device=device).manual_seed(0)
    for shape_name, (n, k) in SHAPES.items():
        w = (torch.randn(n, k, generator=gen, device=device) * k ** -0.5).bfloat16()
        w_q, w_s = quantize_weight_blocks(w, BLOCK)
        w_deq = (w_q.float() * w_s.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]).bfloat16()
        copies = max(2, math.ceil(L2_DEFEAT_BYTES / (n * k)))
        fp8_copies = [(w_q.clone(), w_s.clone()) for _ in range(copies)]
        bf16_copies = [w_deq.clone() for _ in range(copies)]
        for m in ms:
            log(f"(a/b) {shape_name} N={n} K={k} M={m}")
            x = torch.randn(m, k, generator=gen, device=device).bfloat16()
            case = {"shape": shape_name, "M": m, "N": n, "K": k}
            correct, timing, tried = bench_case(x, w_q, w_s, w_deq, fp8_copies, bf16_copies, sweep)
            results["correctness"].append(case | correct)
            results["timing"].append(case | timing)
            if tried is not None:
                timed = [c for c in tried if "ms" in c]
                best = min(timed, key=lambda c: c["ms"]) if timed else None
                results["sweep"].append(case | {"default_gemm_ms": timing["fp8_gemm_only"]["ms"], "best": best,
                                                "tried": tried})
        del fp8_copies, bf16_copies, w, w_q, w_s, w_deq
        torch.cuda.empty_cache()
    return results


def bench_case(x: torch.Tensor, w_q: torch.Tensor, w_s: torch.Tensor, w_deq: torch.Tensor,
               fp8_copies: list[tuple[torch.Tensor, torch.Tensor]], bf16_copies: list[torch.Tensor],
               sweep: bool) -> tuple[dict, dict, list[dict] | None]:
    """Correctness, timing and (optionally) the config sweep of one (M, N, K)."""
    from dockyard.ops.fp8_linear import fp8_matmul_reference
    from dockyard.ops.triton_fp8 import default_config, fp8_linear, fp8_matmul, quantize_activation

    (m, k), n = x.shape, w_q.shape[0]
    out = fp8_linear(x, w_q, w_s, BLOCK)
    ref_bf16 = F.linear(x, w_deq)
    x_q, x_s = quantize_activation(x)
    ref_q = fp8_matmul_reference(x_q, x_s, w_q, w_s, BLOCK, out_dtype=torch.float32)
    correct = {
        "vs_dequantized_bf16_linear": {"max_abs": (out.float() - ref_bf16.float()).abs().max().item(),
                                       "rel_rms": rel_rms(out, ref_bf16)},
        "vs_float32_math_on_quantized_operands": {"max_abs": (out.float() - ref_q).abs().max().item(),
                                                  "rel_rms": rel_rms(out, ref_q)},
        "ref_rms": ref_bf16.float().pow(2).mean().sqrt().item(),
    }
    del ref_q, ref_bf16, out
    copies = len(fp8_copies)
    flops = 2 * m * n * k
    t_fp8 = time_graph(lambda: [fp8_linear(x, q, s, BLOCK) for q, s in fp8_copies], copies)
    t_gemm = time_graph(lambda: [fp8_matmul(x_q, x_s, q, s, BLOCK) for q, s in fp8_copies], copies)
    t_bf16 = time_graph(lambda: [F.linear(x, wc) for wc in bf16_copies], copies)
    bytes_fp8 = n * k + w_s.numel() * 4 + m * k * 2 + m * n * 2  # weight + scales + x in + y out
    bytes_bf16 = n * k * 2 + m * k * 2 + m * n * 2
    timing: dict = {"config": default_config(m, n, k)}
    for key, t, nbytes in (("fp8_quantize_and_gemm", t_fp8, bytes_fp8), ("fp8_gemm_only", t_gemm, bytes_fp8),
                           ("bf16_linear", t_bf16, bytes_bf16)):
        timing[key] = {"ms": t, "tflops": flops / t / 1e9, "gb_per_s": nbytes / t / 1e6}
    timing["speedup_fp8_vs_bf16"] = t_bf16 / t_fp8
    log(f"    fp8 {t_fp8 * 1e3:.1f} us (gemm {t_gemm * 1e3:.1f}) vs bf16 {t_bf16 * 1e3:.1f} us; rel rms vs "
        f"bf16 linear {correct['vs_dequantized_bf16_linear']['rel_rms']:.4f}, vs float32 math "
        f"{correct['vs_float32_math_on_quantized_operands']['rel_rms']:.2e}")
    if not sweep:
        return correct, timing, None
    size = "small" if m <= 16 else "medium" if m <= 512 else "large"
    default = fp8_matmul(x_q, x_s, w_q, w_s, BLOCK)
    tried = []
    for bm, bn, warps, stages in SWEEP[size]:
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
        try:
            agrees = rel_rms(fp8_matmul(x_q, x_s, w_q, w_s, BLOCK, config=cfg), default) < 1e-2
            t = time_graph(lambda cfg=cfg: [fp8_matmul(x_q, x_s, q, s, BLOCK, config=cfg) for q, s in fp8_copies],
                           copies, replays=5)
            tried.append({**cfg, "ms": t, "tflops": flops / t / 1e9, "agrees_with_default": agrees})
        except Exception as exc:  # e.g. out of shared memory for this tile
            tried.append({**cfg, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
    return correct, timing, tried


def write_fp8_checkpoint(directory: Path, device: torch.device) -> dict:
    """The dummy Llama-3.1-8B weights (``LLM(load_format='dummy')``'s, seed 0) with every layer projection
    block-quantized, saved as an FP8 safetensors checkpoint + config.json."""
    from safetensors.torch import save_file

    from dockyard.ops.fp8_linear import quantize_weight_blocks
    from dockyard.registry import build_model
    from dockyard.spec import ModelSpec
    from dockyard.weights.dummy import iter_dummy

    t0 = time.perf_counter()
    config = json.loads(CONFIG.read_text())
    spec = ModelSpec.from_hf_config(config, name="llama-3.1-8b")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            meta = build_model(spec)
    finally:
        torch.set_default_dtype(previous)
    tensors = {}
    for name, t in iter_dummy(meta, seed=0):
        if name.startswith("model.layers.") and name.endswith("_proj.weight"):
            q, s = quantize_weight_blocks(t.to(device), BLOCK)
            tensors[name], tensors[name + "_scale_inv"] = q.cpu(), s.cpu()
        else:
            tensors[name] = t.contiguous()
    save_file(tensors, str(directory / "model.safetensors"))
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(BLOCK)}
    (directory / "config.json").write_text(json.dumps(config))
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return {"seconds": time.perf_counter() - t0, "bytes": nbytes, "tensors": len(tensors)}


def decode_rate(llm, prompt: list[int]) -> dict:  # noqa: ANN001 - dockyard.LLM
    """Batch-1 greedy decode of 128 tokens after a warm-up (median of 3, the 1-token run subtracted):
    {generate_128_s, generate_1_s, decode_ms_per_token, decode_tokens_per_s, tokens}."""
    from dockyard import SamplingParams

    greedy = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    llm.generate([prompt], greedy, use_tqdm=False)  # warm-up
    timings, row = {}, {}
    for key, params in (("t128", greedy), ("t1", one)):
        runs = []
        for _ in range(3):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = llm.generate([prompt], params, use_tqdm=False)
            torch.cuda.synchronize()
            runs.append(time.perf_counter() - t)
        timings[key] = statistics.median(runs)
        if key == "t128":
            row["tokens"] = list(out[0].outputs[0].token_ids)
    per_token = (timings["t128"] - timings["t1"]) / 127
    return row | {"generate_128_s": timings["t128"], "generate_1_s": timings["t1"],
                  "decode_ms_per_token": per_token * 1e3, "decode_tokens_per_s": 1 / per_token}


def run_llm(model: str | Path, label: str, native: str, prompt: list[int], load_format: str = "auto",
            **llm_kwargs: object) -> dict:
    from dockyard import LLM
    from dockyard.ops.fp8_linear import Fp8Linear, uses_native_fp8

    os.environ["DOCKYARD_FP8_NATIVE"] = native
    log(f"(c) {label}: loading")
    t0 = time.perf_counter()
    llm = LLM(model, load_format=load_format, max_model_len=1024, max_num_seqs=1, num_kv_blocks=64, **llm_kwargs)
    load_s = time.perf_counter() - t0
    runner = llm.engine.runner
    row: dict = {
        "label": label, "load_seconds": load_s, "native_fp8": uses_native_fp8(llm.model),
        "fp8_linear_modules": sum(isinstance(m, Fp8Linear) for m in llm.model.modules()),
        "weight_bytes": sum(p.numel() * p.element_size() for p in llm.model.parameters()),
        "cuda_graphs": runner.graphs is not None, "eager_reason": runner.eager_reason,
    }
    ids = torch.tensor(prompt, device=llm.device)
    with torch.no_grad():
        logits = llm.model.compute_logits(llm.model(ids, torch.arange(len(prompt), device=llm.device))).float().cpu()
    row.update(decode_rate(llm, prompt))
    log(f"    {label}: {row['decode_ms_per_token']:.2f} ms/token, graphs {row['cuda_graphs']}, "
        f"Fp8Linear modules {row['fp8_linear_modules']}")
    del llm, runner
    gc.collect()
    torch.cuda.empty_cache()
    return row | {"_logits": logits}


def end_to_end(device: torch.device) -> dict:
    result: dict = {}
    prompt = torch.randint(0, 128000, (64,), generator=torch.Generator().manual_seed(1)).tolist()
    with tempfile.TemporaryDirectory(prefix="dockyard-fp8-") as tmp:
        directory = Path(tmp)
        log("(c) writing the FP8 checkpoint")
        result["checkpoint"] = write_fp8_checkpoint(directory, device)
        runs = [run_llm(directory, "fp8_native", "auto", prompt),
                run_llm(directory, "fp8_dequantized_on_load", "0", prompt)]
    runs.append(run_llm(CONFIG, "bf16_dummy", "auto", prompt, load_format="dummy"))
    logits = {r["label"]: r.pop("_logits") for r in runs}
    native, dequant, bf16 = (logits[k] for k in ("fp8_native", "fp8_dequantized_on_load", "bf16_dummy"))
    tokens = {r["label"]: r.pop("tokens") for r in runs}
    same = next((i for i, (a, b) in enumerate(zip(tokens["fp8_native"], tokens["fp8_dequantized_on_load"]))
                 if a != b), len(tokens["fp8_native"]))
    result["runs"] = runs
    result["prefill_logits_rel_rms"] = {"native_vs_dequantized": rel_rms(native, dequant),
                                        "native_vs_bf16": rel_rms(native, bf16),
                                        "dequantized_vs_bf16": rel_rms(dequant, bf16)}
    result["greedy_tokens_equal_before_first_difference_native_vs_dequantized"] = same
    result["decode_speedup_native_vs_bf16"] = runs[2]["decode_ms_per_token"] / runs[0]["decode_ms_per_token"]
    result["decode_speedup_native_vs_dequantized"] = runs[1]["decode_ms_per_token"] / runs[0]["decode_ms_per_token"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-sweep", action="store_true", help="skip the kernel configuration sweep")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end LLM decode (part c)")
    parser.add_argument("--quick", action="store_true", help="M 1 and 256 only, no sweep")
    args = parser.parse_args()
    device = require_fp8_gpu()
    import triton

    t0 = time.perf_counter()
    report: dict = {
        "device": torch.cuda.get_device_name(device), "capability": list(torch.cuda.get_device_capability(device)),
        "torch": torch.__version__, "triton": triton.__version__, "block": list(BLOCK),
    }
    ms = (1, 256) if args.quick else MS
    report["kernels"] = kernel_benchmarks(device, ms, sweep=not (args.no_sweep or args.quick))
    if not args.no_e2e:
        try:
            report["end_to_end"] = end_to_end(device)
        except Exception as exc:  # keep (a) and (b) when the LLM part fails
            report["end_to_end"] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            log(traceback.format_exc())
    report["seconds"] = time.perf_counter() - t0
    json.dump(report, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
