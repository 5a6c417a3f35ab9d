"""The ``dockyard`` command: generate | inspect | models | serve | onboard | eval | bench.

Generated text goes to stdout and nothing else does; logs go to stderr. Errors a user can
cause print one clear line and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

from dockyard.bench import add_bench_parser
from dockyard.commands.features import read_features, show_refusal
from dockyard.engine_args import MODEL_SOURCE_FIELDS, EngineArgs, add_vllm_refusals, field_help, model_source_kwargs
from dockyard.errors import DockyardError
from dockyard.eval.cli import add_eval_parser
from dockyard.model_path import check_model_path
from dockyard.model_source import resolve_model
from dockyard.onboard.cli import add_onboard_parser
from dockyard.server.cli import add_serve_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dockyard", description="Onboard, run and serve LLMs.")
    parser.add_argument("--log-level", default=os.environ.get("DOCKYARD_LOG_LEVEL", "WARNING"),
                        help="logging level for stderr (default WARNING)")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for one prompt; prints only the text")
    gen.add_argument("prompt", help="the prompt text")
    sampling = gen.add_argument_group("Sampling", "this prompt's SamplingParams (random draws seeded by --seed)")
    sampling.add_argument("--chat", action="store_true",
                          help="wrap the prompt as a user message in the chat template")
    sampling.add_argument("--system", default=None, help="system message (with --chat)")
    sampling.add_argument("--max-tokens", type=int, default=128)
    sampling.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    sampling.add_argument("--top-p", type=float, default=1.0)
    sampling.add_argument("--top-k", type=int, default=0)
    sampling.add_argument("--min-p", type=float, default=0.0)
    sampling.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    EngineArgs.add_cli_args(gen)
    add_vllm_refusals(gen)

    models = sub.add_parser("models", help="list the supported architectures (docs/supported-models.md)")
    models.add_argument("--configs", action="append", default=[], metavar="DIR",
                        help="a directory of <name>/config.json (repeatable): run the equivalence gate on one "
                             "config per architecture and list the unsupported ones")
    models.add_argument("--write", default=None, metavar="PATH", help="write the page to PATH instead of stdout")
    models.add_argument("--catches", action="store_true",
                        help="print only the mutation check by family: feature, the level that catches its "
                             "ablation, error over tolerance (needs --configs)")

    ins = sub.add_parser("inspect", help="print the model's spec and memory plan")
    ins.add_argument("model", nargs="?", default=None, help=field_help("model"))
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    EngineArgs.add_cli_args(ins, only=("dtype", "max_num_batched_tokens", *MODEL_SOURCE_FIELDS))
    ins.add_argument("--device-memory", type=float, default=None, metavar="GiB",
                     help="plan for a GPU of this much memory (default: this machine's device)")

    add_serve_parser(sub)
    add_onboard_parser(sub)
    add_eval_parser(sub)
    add_bench_parser(sub)
    return parser


# Each command's entry (module:function), imported when that command runs: building the parser and refusing bad
# arguments never loads torch, the engine or FastAPI (dockyard/commands/).
COMMANDS = {"generate": "dockyard.commands.generate:run", "inspect": "dockyard.commands.inspect:run",
            "models": "dockyard.commands.models:run", "serve": "dockyard.server.app:serve",
            "onboard": "dockyard.commands.onboard:run", "eval": "dockyard.commands.eval:run",
            "bench": "dockyard.bench:cmd_bench"}


def precheck(args: argparse.Namespace) -> None:
    """What a command refuses before its module, and torch, load: ``onboard`` a MODEL path that does not exist
    (no report folder is made), ``inspect`` an absurd or broken config (read as metadata only; the source it
    resolves is kept as ``args.resolved_source`` for the command, so a GGUF's header is parsed once), ``generate``
    a model it cannot resolve (a missing path, a file that is not a model, an architecture it cannot run)."""
    if args.command == "onboard":
        check_model_path(args.model, args.revision, args.download_dir)
    elif args.command == "generate":
        resolve_model(args.model, args.load_format, **model_source_kwargs(args))
    elif args.command == "inspect":
        found = read_features(args)
        try:
            args.resolved_source = resolve_model(args.model, **model_source_kwargs(args))
        except DockyardError as exc:
            show_refusal(found, args.json, exc)  # what the config asks for, before the one-line error
            raise


def command_entry(command: str) -> Callable[[argparse.Namespace], int]:
    """The function that carries out ``command`` (its module imported now)."""
    module, _, function = COMMANDS[command].partition(":")
    return getattr(importlib.import_module(module), function)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dockyard`` console command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        precheck(args)
        return command_entry(args.command)(args)
    except DockyardError as exc:
        print(f"dockyard {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
