"""``dockyard generate``: one prompt through the engine, the text on stdout."""

from __future__ import annotations

import argparse
import sys

from dockyard.engine.llm import LLM
from dockyard.engine.sampling_params import SamplingParams
from dockyard.engine_args import EngineArgs


def run(args: argparse.Namespace) -> int:
    """Generate a completion (or one chat turn) for the prompt and write it to stdout."""
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, stop=args.stop,
    )
    engine_args = EngineArgs.from_cli_args(args)
    if sys.stderr.isatty():  # a person is waiting: say what the next seconds go to (the weights get a bar)
        print(f"dockyard generate: loading {engine_args.model or 'the bundled SmolLM2-135M-Instruct'} ...",
              file=sys.stderr)
    llm = LLM(engine_args.model, **engine_args.to_kwargs())
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.prompt})
        out = llm.chat(messages, params, use_tqdm=False)
    else:
        out = llm.generate([args.prompt], params, use_tqdm=False)
    sys.stdout.write(out[0].outputs[0].text + "\n")
    return 0
