"""``dockyard bench``: benchmarks shipped in the package.

``latency`` (decode tokens/s per batch size, time to first token per prompt length) and ``throughput``
(offline requests to completion) load a model in this process and compare every figure with the
roofline measured in the same run; ``serve`` drives any OpenAI-compatible endpoint. Each takes
``--plot PATH``. The repository's ``benchmarks/latency.py`` and ``throughput.py`` call the same code.
"""

from __future__ import annotations

import argparse
import importlib

from dockyard.bench.args import add_latency_args, add_throughput_args
from dockyard.bench.serve import add_bench_serve_args

# Each benchmark's entry (module:function), imported when it runs: latency and throughput load torch and the
# engine, which building the CLI's parser must not (the same scheme as dockyard.cli.COMMANDS).
COMMANDS = {"latency": "dockyard.bench.latency:cmd_bench_latency",
            "throughput": "dockyard.bench.throughput:cmd_bench_throughput",
            "serve": "dockyard.bench.serve:cmd_bench_serve"}


def add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``bench latency|throughput|serve`` on the CLI's subparsers."""
    bench = subparsers.add_parser("bench", help="benchmarks: latency, throughput (in this process), serve (an "
                                                "OpenAI endpoint)")
    sub = bench.add_subparsers(dest="bench_command", required=True)
    latency = sub.add_parser("latency", help="decode tokens/s per batch size and TTFT per prompt length, against "
                                             "the roofline measured in the same run",
                             description="Load MODEL, measure the device's copy bandwidth and matmul rate, then time "
                                         "decode at each --batch-sizes and time to first token at each --input-lens; "
                                         "each figure is reported as a fraction of its roofline.")
    add_latency_args(latency)
    throughput = sub.add_parser("throughput", help="offline throughput of random requests run to completion, "
                                                   "against the roofline",
                                description="Run --num-prompts random requests through MODEL to completion and "
                                            "report requests/s, tokens/s and the fraction of the roofline "
                                            "(compute and memory floors measured in the same run).")
    add_throughput_args(throughput)
    serve = sub.add_parser("serve", help="drive an OpenAI-compatible endpoint and report TTFT/TPOT/ITL/E2E",
                           description="Send streamed completions to --base-url at --request-rate (or all at once) "
                                       "and print TTFT, TPOT, ITL and end-to-end latency (mean, median, p50, p90, "
                                       "p99) and throughput; --save-result writes vLLM's bench-serve JSON.")
    add_bench_serve_args(serve)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the chosen benchmark."""
    module, _, function = COMMANDS[args.bench_command].partition(":")
    return getattr(importlib.import_module(module), function)(args)
