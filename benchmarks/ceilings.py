"""Measured ceilings of the device a benchmark runs on: copy bandwidth and matmul rate.

Results are compared with a roofline built from these numbers, never from a datasheet.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _timeit(fn, device: torch.device, repeat: int = 7, inner: int = 10) -> float:
    """Median seconds of one ``fn()``: on CUDA timed with events around ``inner`` back-to-back calls
    (so launch and synchronization overheads do not count), after a warm-up."""
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3 / inner)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int | None = None) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), over 1 GiB on CUDA (far past
    the L2 cache)."""
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 28)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = _timeit(lambda: dst.copy_(src), device)
    return 2 * nbytes / seconds


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int | None = None) -> float:
    """Dense matmul throughput in FLOP/s at a square size that saturates the device."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = _timeit(lambda: a @ b, device, inner=1 if device.type != "cuda" else 10)
    return 2 * n**3 / seconds


def measure(device: torch.device, dtype: torch.dtype, devices: int = 1) -> dict[str, float]:
    """Copy bandwidth and matmul rate of ``device``, times ``devices`` (tensor parallel: every rank's
    GPU reads its shard and multiplies at the same rates)."""
    return {"copy_bytes_per_s": devices * copy_bandwidth(device),
            "matmul_flops_per_s": devices * matmul_rate(device, dtype)}


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model options every engine benchmark takes (model path, weights, device, dtype, eager mode)."""
    p.add_argument("--model", default=None, help="HF config/checkpoint/GGUF (default: the bundled model)")
    p.add_argument("--load-format", default="auto", choices=("auto", "dummy"))
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--no-async-scheduling", action="store_true",
                   help="apply each step's tokens before the next step starts (default on CUDA: overlap them)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="split the model over N GPUs (rooflines then count N devices' ceilings)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--kv-cache-dtype", default="auto", help="auto | fp8 | fp8_e4m3 (EngineArgs.kv_cache_dtype)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The ``LLM`` keyword arguments of :func:`add_model_args`' options."""
    return {"load_format": args.load_format, "device": args.device, "dtype": args.dtype, "seed": args.seed,
            "enforce_eager": args.enforce_eager, "tensor_parallel_size": args.tensor_parallel_size,
            "async_scheduling": False if args.no_async_scheduling else None,
            "kv_cache_dtype": args.kv_cache_dtype}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
