"""Quantized-weight matmuls (``dockyard/ops/triton_quant.py``): correctness and speed on one GPU.

    PYTHONPATH=. python benchmarks/quant_matmul.py > quant_matmul.json     [--no-sweep] [--no-e2e] [--dequantizers]

Needs a CUDA GPU with Triton (exit status 2 elsewhere). Progress on stderr, one JSON document on stdout.

(a) ceilings measured in the same run: copy bandwidth and the bf16 matmul rate (``ceilings.measure``).
(b) kernel vs reference at Llama-3.1-8B shapes (N, K): (4096, 4096) o for every format, (4096, 14336) down for
    one format of each kernel family; the formats: int4 (group 128 symmetric, group 128 with zeros, group 32 with
    zeros) and GGUF Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K: random codes (K-quant rows: random bytes with finite
    scales), the reference weight dequantized by ``gguf.quants.dequantize`` / the int4 formula
    (``quant_format.dequantize_int4``), the product in float64; relative rms error of the streaming GEMV
    (M 1 and 4) and dequantize + cuBLAS (M 256), bf16 activations and outputs.
(c) timing at the four shapes (qkv 6144 x 4096, o, gate_up 28672 x 4096, down), every format, in CUDA graphs
    over enough weight copies to exceed L2 (``fp8_matmul.time_graph``): first every GEMV configuration of
    ``GEMV_SWEEP`` at M 1 (compiled beforehand in parallel processes); per format the one with the least time
    summed over the four shapes (a layer) is chosen and set for the rest of the run; with it M 1, 2, 4, 8 (GEMV)
    against bf16 ``F.linear`` (cuBLAS) on a dense weight of the same shape (at M 1 also dockyard's bf16 GEMV,
    which a dequantized model runs), and M 16 dequantize + cuBLAS. GEMV: the quantized bytes over the time, as a
    fraction of the copy bandwidth.
(d) end to end: ``LLM`` on ``benchmarks/configs/llama-3.1-8b.json`` with dummy weights: bf16, and the same
    model with every projection (fused qkv, o, fused gate_up, down) replaced after loading by random int4
    (group 128, symmetric) or Q4_K weights in :class:`Int4Linear` / :class:`GGUFLinear` (CUDA graphs
    captured after the swap). Batch-1 greedy decode of 128 tokens (median of 3, prefill subtracted),
    bytes read per step (every parameter but the input embedding, plus the int4 scales) over the copy bandwidth as
    the roofline; logits of the quantized path against the same weights dequantized into a bf16 model (the
    dequantize-on-load path), for the prompt (dequantize + cuBLAS in both) and its first token alone (the GEMV);
    graph vs eager tokens.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback

import numpy as np
import torch
import torch.nn.functional as F
from fp8_matmul import CONFIG, L2_DEFEAT_BYTES, SHAPES, decode_rate, log, rel_rms, time_graph  # noqa: E402
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from torch import nn

from dockyard.bench.ceilings import measure

FORMATS = ("int4_g128_sym", "int4_g128_zeros", "int4_g32_zeros", "Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
# (rows per program, columns per iteration, warps) of the streaming GEMV, tried per format at every shape.
GEMV_SWEEP = [(2, 512, 4), (4, 512, 4), (4, 1024, 4), (8, 512, 4), (8, 1024, 8), (16, 512, 8)]


def random_weight(fmt: str, n: int, k: int, device: torch.device, gen: torch.Generator) -> dict:
    """Random quantized weight of ``fmt`` on ``device``: {'operand', 'int4'|'blocks', 'nbytes'}."""
    from dockyard.ops import triton_quant as tq
    from dockyard.ops.quant_format import GGUFBlocks, Int4Weight

    if fmt.startswith("int4"):
        group = int(fmt.split("_")[1][1:])
        packed = torch.randint(0, 256, (n, k // 2), generator=gen, device=device, dtype=torch.uint8)
        scales = (torch.rand(n, k // group, generator=gen, device=device) * 0.02 / k ** 0.5).half()
        zeros = (torch.randint(0, 16, (n, k // group), generator=gen, device=device, dtype=torch.uint8)
                 if fmt.endswith("zeros") else None)
        weight = Int4Weight(packed, scales, zeros, group, k)
        op = tq.QuantOperand(packed, tq.INT4, (n, k), scales, zeros, group)
        return {"operand": op, "int4": weight, "nbytes": weight.nbytes()}
    qt = GGMLQuantizationType[fmt]
    values, nbytes = GGML_QUANT_SIZES[qt]
    raw = torch.randint(0, 256, (n, k // values, nbytes), generator=gen, device=device, dtype=torch.uint8)
    scale = (torch.rand(n, k // values, generator=gen, device=device) * 1e-3 / k ** 0.5 + 1e-6).half()
    halves = {"Q4_0": (0,), "Q5_0": (0,), "Q8_0": (0,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}[fmt]
    for offset in halves:  # finite float16 scales (d, dmin) at the published offsets
        raw[..., offset:offset + 2] = scale.view(torch.uint8).view(n, k // values, 2)
    data = raw.view(n, -1)
    return {"operand": tq.QuantOperand(data, int(qt), (n, k)), "blocks": GGUFBlocks(data, int(qt), (n, k)),
            "nbytes": data.numel()}


def reference_weight(w: dict) -> torch.Tensor:
    """float64 [N, K] by the independent references (gguf's numpy dequantizer, the int4 formula)."""
    from dockyard.ops.quant_format import dequantize_int4

    if "int4" in w:
        return dequantize_int4(w["int4"], torch.float32).double()
    b = w["blocks"]
    values = gguf_dequantize(b.data.cpu().numpy(), GGMLQuantizationType(b.qtype)).astype(np.float64)
    return torch.from_numpy(values.reshape(b.shape)).to(b.data.device)


def time_each(call, items: list) -> float:
    """Microseconds per ``call(item)``, all items in one CUDA graph (weights from HBM, not L2)."""
    return 1e3 * time_graph(lambda: [call(item) for item in items], len(items))


def _compile_job(job: tuple[str, str, tuple[int, int, int], int]) -> str:
    """Run one (format, shape, config, rows) GEMV once in a worker process, so its Triton binary is in the
    on-disk cache before the timed process asks for it; returns an error text or ''."""
    fmt, shape_name, cfg, m = job
    try:
        from dockyard.ops import triton_quant as tq

        n, k = SHAPES[shape_name]
        w = random_weight(fmt, n, k, torch.device("cuda"), torch.Generator(device="cuda").manual_seed(0))
        tq.quant_gemv(torch.zeros(m, k, device="cuda", dtype=torch.bfloat16), w["operand"], config=cfg)
        torch.cuda.synchronize()
        return ""
    except Exception as exc:  # recorded by the caller; the timed run then compiles (or fails) on its own
        return f"{job}: {type(exc).__name__}: {exc}"[:300]


def precompile(jobs: list) -> list[str]:
    """Compile the sweep's kernels in parallel processes (Triton compiles one at a time per process)."""
    import concurrent.futures
    import multiprocessing
    import os

    workers = max(1, min(12, (os.cpu_count() or 2) - 2))
    try:
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            return [e for e in pool.map(_compile_job, jobs) if e]
    except Exception as exc:  # no pool: the timed loop compiles serially
        return [f"precompile: {type(exc).__name__}: {exc}"[:300]]


def _best(tried: dict) -> tuple:
    """The configuration with the least summed time over the four shapes (one layer's projections)."""
    return min(tried, key=lambda cfg: sum(tried[cfg].values()))


def kernels(device: torch.device, ceilings: dict, sweep: bool) -> dict:
    from dockyard.ops import triton_gemv
    from dockyard.ops import triton_quant as tq

    out: dict = {"correctness": [], "timing": [], "sweep": [], "chosen": {}}
    copy_bw = ceilings["copy_bytes_per_s"]
    gen = torch.Generator(device=device).manual_seed(0)
    configs = GEMV_SWEEP if sweep else []
    t0 = time.perf_counter()
    out["precompile_errors"] = precompile([(fmt, s, cfg, 1) for fmt in FORMATS for s in ("o", "down")
                                           for cfg in configs])
    out["precompile_s"] = time.perf_counter() - t0
    log(f"precompiled in {out['precompile_s']:.1f} s; errors: {out['precompile_errors'][:3]}")
    weights: dict = {}
    for shape_name, (n, k) in SHAPES.items():
        for fmt in FORMATS:
            w = random_weight(fmt, n, k, device, gen)
            copies = [w] + [random_weight(fmt, n, k, device, gen)
                            for _ in range(max(1, -(-L2_DEFEAT_BYTES // w["nbytes"])) - 1)]
            weights[fmt, shape_name] = copies
            # correctness (o for every format; down, K 14336, for one per kernel family): the GEMV at 1 and 4 rows,
            # the dequantizing path
            if shape_name == "o" or (shape_name == "down" and fmt in ("int4_g128_zeros", "Q5_0", "Q4_K", "Q6_K")):
                ref = reference_weight(w)
                for m, path in ((1, "gemv"), (4, "gemv"), (256, "dequantize+cublas")):
                    x = torch.randn(m, k, generator=gen, device=device).bfloat16()
                    got = tq.quant_linear(x, w["operand"])
                    want = x.double() @ ref.T
                    out["correctness"].append({"shape": shape_name, "format": fmt, "M": m, "path": path,
                                               "rel_rms": rel_rms(got, want)})
                del ref
            # (c) the GEMV sweep at one row: every configuration on this shape
            x = torch.randn(1, k, generator=gen, device=device).bfloat16()
            for cfg in configs:
                try:
                    us = time_each(lambda c, x=x, cfg=cfg: tq.quant_gemv(x, c["operand"], config=cfg), copies)
                except Exception as exc:  # a configuration the compiler refuses is recorded, not fatal
                    out["sweep"].append({"format": fmt, "shape": shape_name, "config": cfg,
                                         "error": f"{type(exc).__name__}: {exc}"[:200]})
                    continue
                out["sweep"].append({"format": fmt, "shape": shape_name, "config": cfg, "us": us,
                                     "fraction_of_copy_bw": w["nbytes"] / (us * 1e-6) / copy_bw})
            if shape_name == "o" and fmt == FORMATS[-1]:
                log(f"    correctness so far: max rel rms {max(r['rel_rms'] for r in out['correctness']):.3g}")
        torch.cuda.empty_cache()
    for fmt in FORMATS:
        tried: dict = {}
        for r in out["sweep"]:
            if r["format"] == fmt and "us" in r:
                tried.setdefault(tuple(r["config"]), {})[r["shape"]] = r["us"]
        tried = {cfg: v for cfg, v in tried.items() if len(v) == len(SHAPES)}
        operand_format = weights[fmt, "o"][0]["operand"].format
        if tried:
            out["chosen"][fmt] = _best(tried)
            if operand_format != tq.INT4 or fmt == "int4_g128_sym":  # the int4 entry: the end-to-end run's variant
                tq.STREAM_CONFIGS[operand_format] = out["chosen"][fmt]
        log(f"    {fmt}: best {out['chosen'].get(fmt)} of {len(tried)}")
    # (c) the chosen configuration per format: M 1, 2, 4, 8 (the GEMV) against bf16 on a dense weight (cuBLAS;
    # at M 1 also dockyard's bf16 GEMV, what a dequantized model runs), and M 16 dequantize + cuBLAS.
    for shape_name, (n, k) in SHAPES.items():
        dense = (torch.randn(n, k, generator=gen, device=device) * k ** -0.5).bfloat16()
        copies_dense = [dense] + [dense.clone() for _ in range(max(2, -(-L2_DEFEAT_BYTES // dense.nbytes)) - 1)]
        for fmt in FORMATS:
            copies = weights[fmt, shape_name]
            nbytes = copies[0]["nbytes"]
            cfg = out["chosen"].get(fmt)
            for m in (1, 2, 4, 8, 16):
                x = torch.randn(m, k, generator=gen, device=device).bfloat16()
                row = {"shape": shape_name, "format": fmt, "M": m, "N": n, "K": k, "quant_bytes": nbytes,
                       "bf16_cublas_us": time_each(lambda c, x=x: F.linear(x, c), copies_dense)}
                if m == 1:
                    row["bf16_gemv_us"] = time_each(lambda c, x=x: triton_gemv.gemv(x, c), copies_dense)
                if m <= 8:
                    row["gemv_us"] = time_each(lambda c, x=x, cfg=cfg: tq.quant_gemv(x, c["operand"], config=cfg),
                                               copies)
                    row["gemv_fraction_of_copy_bw"] = nbytes / (row["gemv_us"] * 1e-6) / copy_bw
                else:
                    row["dequant_cublas_us"] = time_each(
                        lambda c, x=x: F.linear(x, tq.dequantize(c["operand"], x.dtype)), copies)
                out["timing"].append(row)
                log("    " + " ".join(f"{key}={v:.4g}" if isinstance(v, float) else f"{key}={v}"
                                      for key, v in row.items()))
        del copies_dense
        torch.cuda.empty_cache()
    del weights
    torch.cuda.empty_cache()
    return out


def dequantizers(device: torch.device, ceilings: dict) -> list[dict]:
    """The dequantizer alone and dequantize + cuBLAS at 16 rows, for the formats kept by default, every shape: bytes
    read (quantized) and written (bf16) over the time, as a fraction of the copy bandwidth."""
    from dockyard.ops import triton_quant as tq

    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for shape_name, (n, k) in SHAPES.items():
        for fmt in ("int4_g128_sym", "int4_g128_zeros", "Q4_0", "Q4_K"):
            w = random_weight(fmt, n, k, device, gen)
            copies = [w] + [random_weight(fmt, n, k, device, gen)
                            for _ in range(max(1, -(-L2_DEFEAT_BYTES // w["nbytes"])) - 1)]
            x = torch.randn(16, k, generator=gen, device=device).bfloat16()
            us = time_each(lambda c: tq.dequantize(c["operand"], torch.bfloat16), copies)
            moved = w["nbytes"] + 2 * n * k  # read as stored, written in bf16
            row = {"shape": shape_name, "format": fmt, "dequantize_us": us,
                   "dequantize_fraction_of_copy_bw": moved / (us * 1e-6) / ceilings["copy_bytes_per_s"],
                   "dequant_cublas_m16_us": time_each(
                       lambda c, x=x: F.linear(x, tq.dequantize(c["operand"], x.dtype)), copies)}
            rows.append(row)
            log("    " + " ".join(f"{key}={v:.4g}" if isinstance(v, float) else f"{key}={v}" for key, v in row.items()))
            del copies, w
        torch.cuda.empty_cache()
    return rows


# ---- (d) end to end ----

PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def quantize_projections(model: nn.Module, fmt: str, gen: torch.Generator) -> int:
    """Replace every projection Linear by a random ``fmt`` module (loaded through ``load_quantized``)."""
    from dockyard.ops.quant_linear import GGUFLinear, Int4Linear

    count = 0
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] not in PROJECTIONS or not isinstance(module, nn.Linear):
            continue
        n, k = module.weight.shape
        w = random_weight(fmt, n, k, module.weight.device, gen)
        cls = Int4Linear if "int4" in w else GGUFLinear
        q = cls(k, n, bias=module.bias is not None, dtype=module.weight.dtype, device=module.weight.device)
        q.load_quantized(w.get("int4", w.get("blocks")), name + ".weight")
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, q)
        count += 1
    gc.collect()
    torch.cuda.empty_cache()
    return count


def step_bytes(model: nn.Module) -> int:
    """Bytes a decode step reads: every parameter but the input embedding table, and the quantized modules'
    scales, zeros and permutations (not the rotary tables: a step reads one row of them)."""
    from dockyard.ops.quant_linear import QuantLinear

    embed = model.model.embed_tokens.weight
    tied = model.lm_head.weight is embed  # a tied lm_head still reads the whole table
    buffers = [b for m in model.modules() if isinstance(m, QuantLinear) for b in m.buffers()]
    tensors = {id(t): t for t in [*model.parameters(), *buffers] if tied or t is not embed}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def load_llm(fmt: str | None, **kwargs) -> object:
    """``LLM`` on the 8B config with dummy weights; with ``fmt`` its projections swapped for random ``fmt``
    weights (seeded: the same weights every time) between loading and the engine's CUDA graph capture."""
    from dockyard import LLM
    from dockyard.engine import llm as llm_module

    original = llm_module.load_model

    def load_then_quantize(*args, **kw):
        model, report = original(*args, **kw)
        quantize_projections(model, fmt, torch.Generator(device="cuda").manual_seed(7))
        return model, report

    if fmt is not None:
        llm_module.load_model = load_then_quantize
    try:
        return LLM(str(CONFIG), load_format="dummy", max_model_len=1024, max_num_seqs=1, num_kv_blocks=64, **kwargs)
    finally:
        llm_module.load_model = original


def prefill(llm, tokens: torch.Tensor) -> torch.Tensor:  # noqa: ANN001 - dockyard.LLM
    """float32 logits of ``tokens`` as one prefill through the model (no engine)."""
    with torch.no_grad():
        return llm.model.compute_logits(llm.model(tokens, torch.arange(len(tokens), device=llm.device))).float()


def run_llm(label: str, fmt: str | None, prompt: list[int], ceilings: dict, eager_check: bool) -> dict:
    from dockyard import SamplingParams

    log(f"(d) {label}: loading")
    llm = load_llm(fmt)
    runner = llm.engine.runner
    row: dict = {"label": label, "cuda_graphs": runner.graphs is not None, "eager_reason": runner.eager_reason,
                 "step_bytes": step_bytes(llm.model)}
    ids = torch.tensor(prompt, device=llm.device)
    # The whole prompt (its rows go through dequantize + cuBLAS) and its first token alone (one row: the GEMV).
    logits, first = prefill(llm, ids), prefill(llm, ids[:1])
    row.update(decode_rate(llm, prompt))
    per_token = row["decode_ms_per_token"] / 1e3
    roofline = ceilings["copy_bytes_per_s"] / row["step_bytes"]
    row.update({"roofline_tokens_per_s": roofline, "fraction_of_roofline": (1 / per_token) / roofline})
    log(f"    {label}: {row['decode_tokens_per_s']:.1f} tok/s, roofline {roofline:.1f}, graphs {row['cuda_graphs']}")
    if fmt is not None:
        from dockyard.ops.quant_linear import QuantLinear

        # The dequantize-on-load path on the same weights: each module's weight dequantized by the reference
        # (gguf's numpy dequantizer / the int4 formula) into a bf16 Linear.
        for name, module in list(llm.model.named_modules()):
            if isinstance(module, QuantLinear):
                dense = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
                dense.weight = nn.Parameter(module.dequantized_weight(torch.bfloat16), requires_grad=False)
                parent, _, attr = name.rpartition(".")
                setattr(llm.model.get_submodule(parent), attr, dense)
        row["prefill_logits_rel_rms_vs_dequantized"] = rel_rms(logits, prefill(llm, ids))
        row["one_row_logits_rel_rms_vs_dequantized"] = rel_rms(first, prefill(llm, ids[:1]))
        log(f"    logits vs dequantized path: rel rms {row['prefill_logits_rel_rms_vs_dequantized']:.3g} (prompt), "
            f"{row['one_row_logits_rel_rms_vs_dequantized']:.3g} (one row)")
    del llm, runner
    gc.collect()
    torch.cuda.empty_cache()
    if eager_check and fmt is not None:
        eager = load_llm(fmt, enforce_eager=True)
        out = eager.generate([prompt], SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True), use_tqdm=False)
        row["graph_tokens_equal_eager_32"] = list(out[0].outputs[0].token_ids) == row["tokens"][:32]
        del eager
        gc.collect()
        torch.cuda.empty_cache()
    return row


def end_to_end(ceilings: dict) -> dict:
    prompt = torch.randint(0, 128000, (64,), generator=torch.Generator().manual_seed(1)).tolist()
    runs = [run_llm("bf16_dummy", None, prompt, ceilings, False),
            run_llm("int4_g128_sym", "int4_g128_sym", prompt, ceilings, True),
            run_llm("Q4_K", "Q4_K", prompt, ceilings, False)]
    for r in runs:
        r.pop("tokens", None)
    bf16 = runs[0]["decode_tokens_per_s"]
    return {"runs": runs, "speedup_vs_bf16": {r["label"]: r["decode_tokens_per_s"] / bf16 for r in runs[1:]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--no-e2e", action="store_true")
    parser.add_argument("--no-kernels", action="store_true")
    parser.add_argument("--dequantizers", action="store_true", help="also time the dequantizers (int4, Q4_0, Q4_K)")
    parser.add_argument("--out", help="also write the JSON here after each part (kept if the run is cut short)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("quant_matmul.py needs a CUDA GPU with Triton", file=sys.stderr)
        sys.exit(2)
    import triton

    device = torch.device("cuda")
    t0 = time.perf_counter()
    ceilings = measure(device, torch.bfloat16)
    report: dict = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
                    "triton": triton.__version__, "ceilings": ceilings}
    log(f"ceilings: copy {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
        f"bf16 {ceilings['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s")
    parts = [("dequantizers", lambda: dequantizers(device, ceilings), not args.dequantizers),
             ("kernels", lambda: kernels(device, ceilings, not args.no_sweep), args.no_kernels),
             ("end_to_end", lambda: end_to_end(ceilings), args.no_e2e)]
    for key, fn, skip in parts:
        if skip:
            continue
        try:
            report[key] = fn()
        except Exception:  # record and go on: one failing part must not lose the others' figures
            report[key + "_error"] = traceback.format_exc()
            log(report[key + "_error"])
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(report, fh, indent=1, default=str)
    report["seconds"] = time.perf_counter() - t0
    print(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
