"""Measured ceilings of the device a benchmark runs on: copy bandwidth and matmul rate.

Results are compared with a roofline built from these numbers, never from a datasheet. ``dockyard bench
latency|throughput``, the onboarding performance gate and the kernel benchmarks in ``benchmarks/`` all
measure them here.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _timeit(fn: Callable[[], object], device: torch.device, repeat: int = 7, inner: int = 10) -> float:
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


def measure(device: torch.device, dtype: torch.dtype, devices: int = 1, scaled_down: bool = False) -> dict[str, float]:
    """Copy bandwidth and matmul rate of ``device``, times ``devices`` (tensor parallel: every rank's
    GPU reads its shard and multiplies at the same rates). ``scaled_down`` (CPU only): a 64 MiB copy and a
    1024² matmul, still past the caches but quick on a busy machine."""
    small = scaled_down and device.type != "cuda"
    return {"copy_bytes_per_s": devices * copy_bandwidth(device, 1 << 26 if small else None),
            "matmul_flops_per_s": devices * matmul_rate(device, dtype, 1024 if small else None)}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU), so a host timer covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
