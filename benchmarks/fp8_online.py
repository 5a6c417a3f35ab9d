"""Online FP8 (``--quantization fp8`` on an unquantized checkpoint) on one GPU with FP8 tensor cores.

    PYTHONPATH=. python benchmarks/fp8_online.py > fp8_online.json

``LLM`` on ``benchmarks/configs/llama-3.1-8b.json`` with the same dummy bf16 weights (seed 0) twice: as they
are, and with ``quantization="fp8"`` (every attention and MLP projection quantized to e4m3 in 128 x 128
blocks after loading, ``weights.fp8_quantize.quantize_linears_fp8``, served by the native FP8 kernel). For
each (``fp8_matmul.run_llm``): load seconds, weight bytes, Fp8Linear modules, CUDA graphs, prefill logits of
a 64-token prompt, batch-1 greedy decode of 128 tokens (median of 3, prefill subtracted). Reported: the
logits' rmse(online - bf16) / rmse(bf16), the decode speed-up, and the ceilings measured in the same run
(copy bandwidth, bf16 matmul rate) with each run's weight-read roofline (weight bytes / copy bandwidth).
"""

from __future__ import annotations

import json
import sys
import time

import torch
from fp8_matmul import CONFIG, log, rel_rms, require_fp8_gpu, run_llm  # noqa: E402

from dockyard.bench.ceilings import copy_bandwidth, matmul_rate


def main() -> None:
    device = require_fp8_gpu()
    t0 = time.perf_counter()
    report: dict = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__}
    report["copy_bytes_per_s"] = copy_bandwidth(device)
    report["bf16_matmul_flops_per_s"] = matmul_rate(device, torch.bfloat16)
    log(f"copy {report['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
        f"bf16 matmul {report['bf16_matmul_flops_per_s'] / 1e12:.0f} TFLOP/s")
    prompt = torch.randint(0, 128000, (64,), generator=torch.Generator().manual_seed(1)).tolist()
    runs = [run_llm(CONFIG, "bf16", "auto", prompt, load_format="dummy"),
            run_llm(CONFIG, "online_fp8", "auto", prompt, load_format="dummy", quantization="fp8")]
    logits = [r.pop("_logits") for r in runs]
    tokens = [r.pop("tokens") for r in runs]
    for r in runs:
        roofline_ms = r["weight_bytes"] / report["copy_bytes_per_s"] * 1e3
        r["roofline_ms_per_token"] = roofline_ms
        r["fraction_of_roofline"] = roofline_ms / r["decode_ms_per_token"]
    report["runs"] = runs
    report["prefill_logits_rel_rms_online_fp8_vs_bf16"] = rel_rms(logits[1], logits[0])
    report["greedy_tokens_equal_before_first_difference"] = next(
        (i for i, (a, b) in enumerate(zip(*tokens)) if a != b), len(tokens[0]))
    report["decode_speedup_online_fp8_vs_bf16"] = runs[0]["decode_ms_per_token"] / runs[1]["decode_ms_per_token"]
    report["seconds"] = time.perf_counter() - t0
    json.dump(report, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
