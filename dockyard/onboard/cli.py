"""The ``dockyard onboard`` subcommand: its arguments and its entry point.

Kept apart from ``dockyard/cli.py`` so the main CLI only registers it; torch and the gates are
imported when the command runs.
"""

from __future__ import annotations

import argparse

from dockyard.engine_args import MODEL_SOURCE_FIELDS, EngineArgs, field_help
from dockyard.onboard.context import EXIT_CODES, GATE_NAMES


def add_onboard_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``onboard`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "onboard", help="prove the engine runs a model correctly: gates → report",
        description="Run the onboarding gates (inspect, fit, equivalence, dummy, real, features, capacity, "
                    "performance, serve-smoke) for MODEL and write report.md/report.json, accuracy.yaml, tutorial.md "
                    "and one log per gate; report.json and report.md are rewritten after every gate. Exit status: "
                    + ", ".join(f"{code} {verdict}" for verdict, code in EXIT_CODES.items())
                    + " (passed, but named gates or model parts were not proven), 2 bad arguments or a model path "
                    "that does not exist (no report is written).",
    )
    p.add_argument("model", nargs="?", default=None, help=field_help("model"))
    p.add_argument("--out", default=None, help="output directory (default: reports/<model-name>/)")
    p.add_argument("--weights", choices=("auto", "dummy", "real"), default="auto",
                   help="auto: real weights when the model has them; dummy: skip the real gate; real: require them")
    p.add_argument("--device-memory", type=float, default=None, metavar="GiB",
                   help="plan for a GPU of this much memory (default: this machine's GPU, else its RAM)")
    p.add_argument("--num-layers", type=int, default=None, metavar="N",
                   help="layer count of the dummy gate (default: all that fit in memory)")
    p.add_argument("--dummy-memory", type=float, default=None, metavar="GiB",
                   help="memory the dummy gate may use (default: most of the free memory)")
    p.add_argument("--skip", action="append", default=[], choices=GATE_NAMES, metavar="GATE",
                   help=f"do not run GATE (repeatable): {', '.join(GATE_NAMES)}")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend of the features gate "
                                                           "(default inductor)")
    p.add_argument("--json", action="store_true", help="print report.json on stdout (the table goes to stderr)")
    # The engine flags onboarding takes (the plan and the runs use them; the real gate still compares in
    # float32 when that fits).
    EngineArgs.add_cli_args(p, only=("dtype", "device", "num_threads", "kv_cache_dtype", *MODEL_SOURCE_FIELDS))
    return p
