"""``dockyard onboard``: run the gates, print the summary table, exit with the verdict's status."""

from __future__ import annotations

import argparse
import json
import sys

from dockyard.engine.threads import configure_threads
from dockyard.onboard.context import OnboardOptions
from dockyard.onboard.runner import run_onboard, summary_table


def run(args: argparse.Namespace) -> int:
    """Run the gates; print progress on stderr and the summary table; return the exit status."""
    configure_threads(args.num_threads)

    options = OnboardOptions(
        model=args.model, out=args.out, weights=args.weights, device=args.device,
        device_memory_gib=args.device_memory, dtype=args.dtype, num_layers=args.num_layers,
        dummy_memory_gib=args.dummy_memory,
        skip=tuple(args.skip), compile_backend=args.compile_backend, model_impl=args.model_impl,
        trust_remote_code=args.trust_remote_code, kv_cache_dtype=args.kv_cache_dtype, revision=args.revision,
        download_dir=args.download_dir, tokenizer=args.tokenizer, generation_config=args.generation_config,
    )
    run = run_onboard(options, progress=sys.stderr)
    table = summary_table(run)
    if args.json:
        print(table, file=sys.stderr)
        json.dump(run.report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(table)
    return run.exit_code
