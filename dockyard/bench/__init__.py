"""``dockyard bench``: benchmarks shipped in the package (``serve``: any OpenAI-compatible endpoint)."""

from __future__ import annotations

import argparse

from dockyard.bench.serve import add_bench_serve_args, cmd_bench_serve


def add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``bench serve`` on the CLI's subparsers."""
    bench = subparsers.add_parser("bench", help="benchmarks (serve: latency and throughput of an OpenAI endpoint)")
    sub = bench.add_subparsers(dest="bench_command", required=True)
    serve = sub.add_parser("serve", help="drive an OpenAI-compatible endpoint and report TTFT/TPOT/ITL/E2E",
                           description="Send streamed completions to --base-url at --request-rate (or all at once) "
                                       "and print TTFT, TPOT, ITL and end-to-end latency (mean, median, p50, p90, "
                                       "p99) and throughput; --save-result writes vLLM's bench-serve JSON.")
    add_bench_serve_args(serve)
    serve.set_defaults(bench_run=cmd_bench_serve)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the chosen benchmark."""
    return args.bench_run(args)
