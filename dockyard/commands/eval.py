"""``dockyard eval``: accuracy through lm-eval-harness, offline, and its regression check."""

from __future__ import annotations

import argparse
import sys

from dockyard.engine.threads import configure_threads
from dockyard.engine_args import EngineArgs
from dockyard.eval import runner
from dockyard.eval.tasks import TASKS, EvalError


def run(args: argparse.Namespace) -> int:
    """Run ``dockyard eval``; return the exit status (0 ok, 1 check failed; errors raise EvalError → 2)."""
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
