"""The batch-1 GEMV kernel against cuBLAS at Llama-3.1-8B's weight shapes (CUDA).

    PYTHONPATH=. python3 benchmarks/gemv.py [--sweep]

For each shape: the kernel's relative error against float64 ``x @ w.T`` (and cuBLAS's), then the
time of one call, from CUDA-graph replays over enough weight copies to exceed the L2 cache, as
GB/s of weight read; ``--sweep`` also times a grid of (BLOCK_N, BLOCK_K, num_warps). Prints JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from fp8_matmul import time_graph  # noqa: E402

from dockyard.bench.ceilings import copy_bandwidth  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}


def bench_shape(name: str, n: int, k: int, configs: list, gen: torch.Generator, dev: torch.device) -> dict:
    """Errors against float64 and times of cuBLAS and of ``configs`` for one [n, k] weight."""
    from dockyard.ops.triton_gemv import DEFAULT_CONFIG, gemv

    copies = max(1, -(-(256 << 20) // (n * k * 2)))
    ws = [(torch.randn(n, k, generator=gen, device=dev) * k ** -0.5).bfloat16() for _ in range(copies)]
    x = torch.randn(1, k, generator=gen, device=dev).bfloat16()
    exact = x.double() @ ws[0].double().T
    scale = exact.pow(2).mean().sqrt().item()
    row = {"shape": name, "N": n, "K": k, "weight_MB": round(n * k * 2 / 1e6, 1),
           "rel_rms_gemv": (gemv(x, ws[0]).double() - exact).pow(2).mean().sqrt().item() / scale,
           "rel_rms_cublas": (F.linear(x, ws[0]).double() - exact).pow(2).mean().sqrt().item() / scale}
    cublas_ms = time_graph(lambda: [F.linear(x, w) for w in ws], len(ws))
    row["cublas_us"] = round(cublas_ms * 1e3, 2)
    row["cublas_GB_per_s"] = round(n * k * 2 / cublas_ms / 1e6, 1)
    timings = []
    for cfg in configs:
        try:
            ms = time_graph(lambda cfg=cfg: [gemv(x, w, config=cfg) for w in ws], len(ws))
        except Exception as exc:  # noqa: BLE001 - a config the compiler refuses is recorded
            timings.append({"config": cfg, "error": str(exc).splitlines()[0][:100]})
            continue
        timings.append({"config": cfg, "us": round(ms * 1e3, 2), "GB_per_s": round(n * k * 2 / ms / 1e6, 1)})
    best = min((t for t in timings if "us" in t), key=lambda t: t["us"])
    default = next((t for t in timings if tuple(t["config"]) == tuple(DEFAULT_CONFIG)), None)
    return {**row, "default": default, "best": best, "sweep": timings}


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        p.error("this benchmark needs a CUDA GPU")
    from dockyard.ops.triton_gemv import DEFAULT_CONFIG

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    result: dict = {"device": torch.cuda.get_device_name(dev), "copy_GB_per_s": round(copy_bandwidth(dev) / 1e9, 1),
                    "default_config": DEFAULT_CONFIG, "shapes": []}
    configs = list(itertools.product((4, 8, 16), (512, 1024), (4, 8))) if args.sweep else [DEFAULT_CONFIG]
    for name, (n, k) in SHAPES.items():
        row = bench_shape(name, n, k, configs, gen, dev)
        print(json.dumps({key: v for key, v in row.items() if key != "sweep"}), file=sys.stderr, flush=True)
        result["shapes"].append(row if args.sweep else {key: v for key, v in row.items() if key != "sweep"})
    json.dump(result, sys.stdout, indent=1)
    print()
    return result


if __name__ == "__main__":
    main()
