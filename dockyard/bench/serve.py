"""``dockyard bench serve``: drive any OpenAI-compatible endpoint and report latencies like vLLM's ``bench serve``.

Requests go to ``/v1/completions`` with ``stream: true`` (and ``stream_options.include_usage``, so the
server counts the tokens), each on a thread of its own with the standard library's HTTP client,
started at a request rate (Poisson arrivals, or all at once for ``inf``) under an optional
concurrency cap. From the Server-Sent Events of each request: TTFT (request sent → first text),
ITL (gaps between later chunks), TPOT ((latency − TTFT) / (output tokens − 1)) and E2E latency.
Prompts come from a random dataset (token ids drawn from a seeded generator, sent as token-id
lists, so no tokenizer is needed on the client) or a ShareGPT-format JSON file (each entry's first
human turn is the prompt; ``--sharegpt-output-len`` tokens are asked for).

The printed table and the ``--save-result`` JSON use vLLM's field names (``mean_ttft_ms``,
``p99_itl_ms``, ``request_throughput``, ``ttfts``, ...).
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dockyard.bench.args import check_plot_path
from dockyard.bench.plot import plot_serve
from dockyard.errors import DockyardError

PERCENTILES = (50, 90, 99)
METRICS = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
           "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}


@dataclass
class BenchRequest:
    """One prompt of the dataset: what is sent and how many tokens it asks for."""

    prompt: str | list[int]
    prompt_len: int
    output_len: int


@dataclass
class RequestResult:
    """What one request measured (seconds)."""

    success: bool = False
    error: str = ""
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_len: int = 0
    output_tokens: int = 0
    text: str = ""


def random_dataset(num_prompts: int, input_len: int, output_len: int, seed: int,
                   vocab_size: int = 1000) -> list[BenchRequest]:
    """Prompts of ``input_len`` random token ids (ids 10..vocab_size, clear of most special tokens)."""
    rng = random.Random(seed)
    return [BenchRequest([rng.randrange(10, vocab_size) for _ in range(input_len)], input_len, output_len)
            for _ in range(num_prompts)]


def sharegpt_dataset(path: Path, num_prompts: int, output_len: int, seed: int) -> list[BenchRequest]:
    """The first human turn of each ShareGPT conversation (shuffled with ``seed``), ``num_prompts`` of them."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DockyardError(f"--dataset-path {path}: cannot read it as JSON ({exc}); give a ShareGPT-format file "
                            "(a list of {\"conversations\": [{\"from\": \"human\", \"value\": ...}, ...]})") from None
    prompts = []
    for entry in data if isinstance(data, list) else []:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        first = next((t.get("value") for t in turns or [] if isinstance(t, dict) and t.get("from") == "human"), None)
        if isinstance(first, str) and first.strip():
            prompts.append(first)
    if not prompts:
        raise DockyardError(f"--dataset-path {path} holds no ShareGPT conversation with a human turn")
    random.Random(seed).shuffle(prompts)
    return [BenchRequest(p, len(p.split()), output_len) for p in prompts[:num_prompts]]


def _connection(base: urllib.parse.SplitResult, timeout: float) -> http.client.HTTPConnection:
    conn_cls = http.client.HTTPSConnection if base.scheme == "https" else http.client.HTTPConnection
    return conn_cls(base.hostname or "127.0.0.1", base.port, timeout=timeout)


def _send(base: urllib.parse.SplitResult, model: str, req: BenchRequest, api_key: str | None,
          timeout: float) -> RequestResult:
    """One streamed completion; the timings of its events."""
    result = RequestResult(prompt_len=req.prompt_len)
    body = json.dumps({"model": model, "prompt": req.prompt, "max_tokens": req.output_len, "temperature": 0,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}})
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    conn = _connection(base, timeout)
    start = time.perf_counter()
    last = start
    try:
        conn.request("POST", base.path.rstrip("/") + "/completions", body=body, headers=headers)
        resp = conn.getresponse()
        if resp.status != 200:
            result.error = f"HTTP {resp.status}: {resp.read()[:300].decode(errors='replace')}"
            return result
        for raw in resp:
            line = raw.decode("utf-8", errors="replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            now = time.perf_counter()
            if event.get("usage"):
                result.output_tokens = int(event["usage"].get("completion_tokens") or 0)
            choices = event.get("choices") or []
            if choices and choices[0].get("text"):
                if result.ttft == 0.0:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
                result.text += choices[0]["text"]
        result.latency = time.perf_counter() - start
        result.success = result.ttft > 0
        if not result.success:
            result.error = "no text came back"
    except (OSError, ValueError, http.client.HTTPException) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
    return result


def run_benchmark(base_url: str, model: str, requests: list[BenchRequest], request_rate: float,
                  max_concurrency: int | None, seed: int, api_key: str | None = None,
                  timeout: float = 600.0) -> tuple[list[RequestResult], float]:
    """Send every request at ``request_rate`` per second (Poisson; inf = at once), at most ``max_concurrency``
    in flight; returns the results in dataset order and the benchmark's duration."""
    base = urllib.parse.urlsplit(base_url)
    if base.scheme not in ("http", "https") or not base.hostname:
        raise DockyardError(f"--base-url {base_url!r} is not an http(s) URL such as http://127.0.0.1:8000/v1")
    rng = random.Random(seed)
    limit = threading.Semaphore(max_concurrency or len(requests) or 1)
    results: list[RequestResult | None] = [None] * len(requests)

    def work(i: int) -> None:
        with limit:
            results[i] = _send(base, model, requests[i], api_key, timeout)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(len(requests), max_concurrency or len(requests)) or 1) as pool:
        for i in range(len(requests)):
            pool.submit(work, i)
            if request_rate != float("inf"):
                time.sleep(rng.expovariate(request_rate))
    return [r or RequestResult(error="not run") for r in results], time.perf_counter() - start


def summarize(results: list[RequestResult], duration: float, requests: list[BenchRequest]) -> dict[str, Any]:
    """vLLM's ``bench serve`` result: counts, throughputs and mean/median/std/p90/p99 of each latency (ms)."""
    ok = [r for r in results if r.success]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    samples = {
        "ttft": [r.ttft for r in ok],
        "tpot": [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1],
        "itl": [x for r in ok for x in r.itl],
        "e2el": [r.latency for r in ok],
    }
    summary: dict[str, Any] = {
        "duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": out_tokens / duration if duration else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration else 0.0,
    }
    for key, values in samples.items():
        ms = [v * 1000 for v in values] or [0.0]
        summary[f"mean_{key}_ms"] = statistics.fmean(ms)
        summary[f"median_{key}_ms"] = statistics.median(ms)
        summary[f"std_{key}_ms"] = statistics.pstdev(ms)
        for p in PERCENTILES:
            summary[f"p{p}_{key}_ms"] = _percentile(ms, p)
    summary.update(input_lens=[r.prompt_len for r in results], output_lens=[r.output_tokens for r in results],
                   ttfts=[r.ttft for r in results], itls=[r.itl for r in results],
                   generated_texts=[r.text for r in results], errors=[r.error for r in results])
    return summary


def _percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    s = sorted(values)
    pos = (len(s) - 1) * p / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def format_summary(summary: dict[str, Any]) -> str:
    """The table ``bench serve`` prints (vLLM's layout)."""
    rows = [("Successful requests:", summary["completed"]), ("Failed requests:", summary["failed"]),
            ("Benchmark duration (s):", f"{summary['duration']:.2f}"),
            ("Total input tokens:", summary["total_input_tokens"]),
            ("Total generated tokens:", summary["total_output_tokens"]),
            ("Request throughput (req/s):", f"{summary['request_throughput']:.2f}"),
            ("Output token throughput (tok/s):", f"{summary['output_throughput']:.2f}"),
            ("Total token throughput (tok/s):", f"{summary['total_token_throughput']:.2f}")]
    lines = ["{s:{c}^60}".format(s=" Serving Benchmark Result ", c="=")]
    lines += [f"{k:<45}{v:>15}" for k, v in rows]
    for key, title in METRICS.items():
        lines.append("{s:{c}^60}".format(s=f" {title} ", c="-"))
        for stat in ("mean", "median", *(f"p{p}" for p in PERCENTILES)):
            label = f"{stat.capitalize() if stat in ('mean', 'median') else stat.upper()} {key.upper()} (ms):"
            lines.append(f"{label:<45}{summary[f'{stat}_{key}_ms']:>15.2f}")
    lines.append("=" * 60)
    return "\n".join(lines)


def add_bench_serve_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``dockyard bench serve`` (vLLM's names)."""
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the endpoint's /v1 URL")
    p.add_argument("--model", default=None, help="the served model name (default: the first of GET /v1/models)")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--dataset-name", choices=("random", "sharegpt"), default="random")
    p.add_argument("--dataset-path", default=None, help="a ShareGPT-format JSON file (with --dataset-name sharegpt)")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--random-input-len", type=int, default=128)
    p.add_argument("--random-output-len", type=int, default=64)
    p.add_argument("--random-vocab-size", type=int, default=1000,
                   help="random prompts draw token ids from [10, this) (keep it within the model's vocabulary)")
    p.add_argument("--sharegpt-output-len", type=int, default=128)
    p.add_argument("--request-rate", type=float, nargs="+", default=[float("inf")], metavar="RATE",
                   help="requests per second, Poisson arrivals (default inf: all at once); several rates run one "
                        "after another (the plot's x axis)")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-result", default=None, metavar="PATH",
                   help="write the result JSON there (a list of results when several --request-rate are given)")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="draw median and p99 TTFT, TPOT and E2E latency against the request rate into PATH")


def _first_model(base_url: str, api_key: str | None) -> str:
    base = urllib.parse.urlsplit(base_url)
    conn = _connection(base, 30.0)
    try:
        conn.request("GET", base.path.rstrip("/") + "/models",
                     headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
        data = json.loads(conn.getresponse().read())
        return data["data"][0]["id"]
    except (OSError, ValueError, KeyError, IndexError, http.client.HTTPException) as exc:
        raise DockyardError(f"cannot list the models at {base_url}/models ({exc}); is the server up? "
                            "pass --model NAME") from None
    finally:
        conn.close()


def cmd_bench_serve(args: argparse.Namespace) -> int:
    """Run the serving benchmark at each request rate, print each table, write the JSON and the plot."""
    if args.num_prompts < 1:
        raise DockyardError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    bad = [r for r in args.request_rate if not r > 0]
    if bad:
        raise DockyardError(f"--request-rate must be > 0 (inf: all at once), got {bad[0]}")
    if args.dataset_name == "sharegpt":
        if not args.dataset_path:
            raise DockyardError("--dataset-name sharegpt needs --dataset-path FILE (a local ShareGPT JSON file)")
        requests = sharegpt_dataset(Path(args.dataset_path), args.num_prompts, args.sharegpt_output_len, args.seed)
    else:
        requests = random_dataset(args.num_prompts, args.random_input_len, args.random_output_len, args.seed,
                                  args.random_vocab_size)
    if args.plot:
        check_plot_path(args.plot)
    model = args.model or _first_model(args.base_url, args.api_key)
    summaries = []
    for rate in args.request_rate:
        results, duration = run_benchmark(args.base_url, model, requests, rate, args.max_concurrency,
                                          args.seed, args.api_key)
        summary = summarize(results, duration, requests)
        summary.update(model_id=model, base_url=args.base_url, dataset_name=args.dataset_name,
                       num_prompts=args.num_prompts, request_rate=rate,
                       max_concurrency=args.max_concurrency, date=time.strftime("%Y%m%d-%H%M%S"))
        print(format_summary(summary))
        first_error = next((r.error for r in results if r.error), "")
        if first_error:
            print(f"dockyard bench serve: {summary['failed']} requests failed at rate {rate}; the first: "
                  f"{first_error}", file=sys.stderr)
        summaries.append(summary)
    if args.save_result:
        saved = summaries[0] if len(summaries) == 1 else summaries
        Path(args.save_result).write_text(json.dumps(saved, indent=2) + "\n")
        print(f"wrote {args.save_result}", file=sys.stderr)
    if args.plot:
        plot_serve(summaries, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0 if all(s["completed"] for s in summaries) else 1
