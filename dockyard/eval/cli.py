"""The ``dockyard eval`` subcommand: accuracy through lm-eval-harness, offline, and its regression check.

Kept apart from ``dockyard/cli.py`` so the main CLI only registers it; lm-eval, torch and the
model are imported when the command runs.
"""

from __future__ import annotations

import argparse
import sys

from dockyard.engine_args import EngineArgs
from dockyard.eval.tasks import TASKS, EvalError


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


def cmd_eval(args: argparse.Namespace) -> int:
    """Run ``dockyard eval``; return the exit status (0 ok, 1 check failed; errors raise EvalError → 2)."""
    # the CLI starts without torch: a command's modules load when it runs
    from dockyard.engine.threads import configure_threads
    from dockyard.eval import runner

    configure_threads(args.num_threads)
    # The engine flags beyond model, dtype and device (which the options and accuracy.yaml record by name).
    engine = {k: v for k, v in EngineArgs.from_cli_args(args).to_kwargs().items()
              if k not in ("dtype", "device", "max_num_seqs")}

    if args.list_tasks:
        print(runner.tasks_table())
        return 0
    if args.check:
        given = [flag for flag, value in (("--tasks", args.tasks), ("--limit", args.limit),
                                          ("--num-fewshot", args.num_fewshot),
                                          ("--apply-chat-template", args.apply_chat_template),
                                          ("--fewshot-as-multiturn", args.fewshot_as_multiturn)) if value]
        if given:
            raise EvalError(f"--check takes the tasks and settings from {args.check}; drop {', '.join(given)}")
        rtol = runner.DEFAULT_RTOL if args.rtol is None else args.rtol
        result = runner.run_check(args.check, rtol=rtol, model=args.model, dtype=args.dtype, device=args.device,
                                  verbose=args.verbose, engine=engine)
        print(runner.results_table(result.run))
        print()
        print(result.table())
        if args.out:
            runner.write_accuracy_yaml(result.run, args.out)
            print(f"wrote {args.out}", file=sys.stderr)
        return 0 if result.passed else 1
    if args.rtol is not None:
        raise EvalError("--rtol is the tolerance of --check; give --check FILE")
    if not args.tasks:
        raise EvalError(f"give --tasks (some of {','.join(TASKS)}), --check FILE or --list-tasks")
    options = runner.EvalOptions(tasks=args.tasks.split(","), model=args.model, limit=args.limit,
                                 num_fewshot=args.num_fewshot,
                                 apply_chat_template=args.apply_chat_template,
                                 fewshot_as_multiturn=args.fewshot_as_multiturn, batch_size=args.batch_size,
                                 dtype=args.dtype, device=args.device, engine=engine)
    run = runner.run_eval(options, verbose=args.verbose)
    print(runner.results_table(run))
    if args.out:
        runner.write_accuracy_yaml(run, args.out)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0
