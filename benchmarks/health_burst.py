"""/health latency while a burst of chat requests arrives: does the event loop stay responsive?

    python benchmarks/health_burst.py                   # starts `dockyard serve` (bundled model) on a free port
    python benchmarks/health_burst.py --url http://127.0.0.1:8000 --api-key KEY   # a running server

A thread probes ``GET /health`` every ``--interval`` seconds, each probe on a new connection (so
accepting connections is measured too), first for ``--idle-seconds`` with the server idle (the
floor: what a probe costs with nothing else to do), then while ``--num-requests`` chat requests
are sent at once (the official ``openai`` client, ``--max-tokens`` each, greedy) until the last is
answered. Reported: probes, p50 / p99 / max latency idle and during the burst, non-200 probes, the
burst's duration and the engine steps it took (from ``/metrics``). The target (issue 16) is p99
under 100 ms during a burst of 64.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import urlparse

import openai


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def probe(host: str, port: int) -> tuple[float, int]:
    """One GET /health on a new connection: (seconds, status); status 0 if the connection failed."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request("GET", "/health")
        status = conn.getresponse().status
    except OSError:
        status = 0
    finally:
        conn.close()
    return time.perf_counter() - t0, status


class Prober(threading.Thread):
    """Probes /health every ``interval`` s until stopped; keeps (seconds, status) pairs."""

    def __init__(self, host: str, port: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.host, self.port, self.interval = host, port, interval
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append(probe(self.host, self.port))
            self.stop.wait(self.interval)


def summary(samples: list[tuple[float, int]]) -> dict[str, float]:
    lat = sorted(s for s, _ in samples)
    if not lat:
        return {"probes": 0}

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000

    return {"probes": len(lat), "p50_ms": round(pct(0.50), 2), "p99_ms": round(pct(0.99), 2),
            "max_ms": round(lat[-1] * 1000, 2), "non_200": sum(1 for _, st in samples if st != 200)}


def engine_steps(host: str, port: int) -> float:
    """``dockyard:engine_steps_total`` from /metrics."""
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    for line in text.splitlines():
        if line.startswith("dockyard:engine_steps_total"):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


def start_server(model: str | None, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dockyard.cli", "serve", "--port", str(port), "--max-num-seqs", "64"]
    if model:
        cmd += ["--model", model]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))


def wait_ready(host: str, port: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe(host, port)[1] == 200:
            return
        time.sleep(0.2)
    raise SystemExit(f"the server at {host}:{port} did not become ready within {timeout:.0f}s")


async def burst(base_url: str, api_key: str, model: str, n: int, max_tokens: int) -> float:
    async with openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=600) as client:
        async def one(i: int) -> None:
            await client.chat.completions.create(
                model=model, max_tokens=max_tokens, temperature=0,
                messages=[{"role": "system", "content": "You are a helpful assistant."},
                          {"role": "user", "content": f"Request {i}: write a short poem about the number {i}."}])

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (default: start `dockyard serve` on a free port)")
    ap.add_argument("--model", help="MODEL for the started server (default: the bundled one)")
    ap.add_argument("--api-key", default=os.environ.get("DOCKYARD_API_KEY", "none"))
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--interval", type=float, default=0.01, help="seconds between /health probes")
    ap.add_argument("--idle-seconds", type=float, default=2.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    proc = None
    if args.url:
        url = urlparse(args.url)
        host, port = url.hostname or "127.0.0.1", url.port or 80
    else:
        host, port = "127.0.0.1", free_port()
        proc = start_server(args.model, port)
    try:
        wait_ready(host, port)
        base_url = f"http://{host}:{port}/v1"
        model = openai.OpenAI(base_url=base_url, api_key=args.api_key).models.list().data[0].id
        idle = Prober(host, port, args.interval)
        idle.start()
        time.sleep(args.idle_seconds)
        idle.stop.set()
        idle.join()
        steps_before = engine_steps(host, port)
        busy = Prober(host, port, args.interval)
        busy.start()
        seconds = asyncio.run(burst(base_url, args.api_key, model, args.num_requests, args.max_tokens))
        busy.stop.set()
        busy.join()
        steps = engine_steps(host, port) - steps_before
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    result = {"num_requests": args.num_requests, "max_tokens": args.max_tokens, "burst_s": round(seconds, 2),
              "engine_steps": steps,
              "idle": summary(idle.samples), "burst": summary(busy.samples),
              "load_avg_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for phase in ("idle", "burst"):
        s = result[phase]
        print(f"{phase:5s}: {s['probes']} probes, p50 {s.get('p50_ms')} ms, p99 {s.get('p99_ms')} ms, "
              f"max {s.get('max_ms')} ms, non-200 {s.get('non_200')}")
    print(f"burst of {args.num_requests} chat requests x {args.max_tokens} tokens answered in {seconds:.1f}s "
          f"({steps:.0f} engine steps); "
          f"load average {result['load_avg_1m']} on {result['cpus']} CPUs")


if __name__ == "__main__":
    main()
