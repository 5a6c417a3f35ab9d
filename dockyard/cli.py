"""The ``dockyard`` command: generate | inspect | models | serve | onboard | eval | bench.

Generated text goes to stdout and nothing else does; logs go to stderr. Errors a user can
cause print one clear line and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from dockyard.bench import add_bench_parser, cmd_bench
from dockyard.engine_args import MODEL_SOURCE_FIELDS, EngineArgs, add_vllm_refusals, field_help, model_source_kwargs
from dockyard.errors import DockyardError
from dockyard.eval.cli import add_eval_parser, cmd_eval
from dockyard.onboard.cli import add_onboard_parser, cmd_onboard
from dockyard.server.cli import add_serve_parser, cmd_serve

GiB = 1024**3


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


def cmd_generate(args: argparse.Namespace) -> int:
    from dockyard import LLM, SamplingParams  # the CLI starts without torch: a command's modules load when it runs

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


def cmd_inspect(args: argparse.Namespace) -> int:
    # the CLI starts without torch: a command's modules load when it runs
    from dockyard.model_source import resolve_model
    from dockyard.onboard.config_features import detect_features, nearest_family, unrecognised_keys
    from dockyard.onboard.context import read_raw_model

    config = read_raw_model(args.model, args.revision, args.download_dir).config
    features = detect_features(config)
    near = nearest_family(features, str(config.get("model_type") or ""))
    unknown = unrecognised_keys(config)
    try:
        # metadata only; an absurd config is refused before the engine is imported
        source = resolve_model(args.model, **model_source_kwargs(args))
        # the CLI starts without torch: a command's modules load when it runs
        from dockyard.onboard.machine import detect_machine
        from dockyard.run_plan import RunTarget, plan_for_run

        spec = source.spec
        machine = detect_machine("auto", args.device_memory)
        target = RunTarget.for_machine(machine.device, args.device_memory is not None)
        plan, fp8_why = plan_for_run(source, target, args.dtype, max_num_batched_tokens=args.max_num_batched_tokens)
    except DockyardError:
        if not args.json:  # what the config asks for, before the one-line error
            _print_features(features, near, unknown)
        raise
    fit = None
    if args.device_memory is not None:
        device_bytes = int(args.device_memory * GiB)
        kv_tokens = plan.kv_tokens_that_fit(device_bytes)
        fit = {"device_bytes": device_bytes, "fits": kv_tokens > 0, "kv_tokens": kv_tokens,
               "max_len_fits": kv_tokens >= spec.max_model_len}
    if args.json:
        json.dump({"source": {"kind": source.kind, "path": str(source.path)}, "spec": spec.to_dict(),
                   "target": {"device": target.device_type, "present": target.present, "fp8_path": fp8_why},
                   "memory_plan": plan.to_dict(), "fit": fit, "features": [f.to_dict() for f in features],
                   "nearest_family": near.to_dict() if near else None, "unrecognised_keys": unknown,
                   "path": {"impl": spec.model_impl, "reason": source.impl_reason}},
                  sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"model        {source.name}  ({source.kind}: {source.path})")
    print(f"architecture {spec.architecture}  (model_type {spec.model_type})")
    print(f"path         {spec.model_impl}: {source.impl_reason}")
    print(f"layers {spec.num_hidden_layers}  hidden {spec.hidden_size}  intermediate {spec.intermediate_size}  "
          f"vocab {spec.vocab_size}")
    if spec.model_impl == "transformers":  # the spec holds sizes only: activation, rope, ... are HF's business
        print(f"heads q {spec.num_attention_heads} / kv {spec.num_key_value_heads}  head_dim {spec.head_dim}  "
              f"max positions {spec.max_position_embeddings}  (activation, rope, norms: transformers' class)")
    else:
        print(f"heads q {spec.num_attention_heads} / kv {spec.num_key_value_heads}  head_dim {spec.head_dim}  "
              f"act {spec.hidden_act}  tied embeddings {spec.tie_word_embeddings}")
        rope = spec.rope
        window = f"  sliding window {spec.sliding_window}" if spec.sliding_window else ""
        print(f"rope {rope.rope_type}  theta {rope.theta:g}  factor {rope.factor:g}  "
              f"max positions {spec.max_position_embeddings}{window}")
    where = "this machine's " + target.device_type if target.present else "a GPU of the given size"
    print(f"\nmemory plan ({plan.dtype} on {where})")
    active = (f"  ({plan.active_parameters:,} active per token)"
              if plan.active_parameters != plan.num_parameters else "")
    print(f"  parameters        {plan.num_parameters:,}{active}")
    print(f"  checkpoint        {plan.checkpoint_bytes / GiB:.3f} GiB  ({plan.checkpoint_bytes:,} bytes; "
          f"from {plan.checkpoint_source})")
    print(f"  weights in memory {plan.weight_bytes / GiB:.3f} GiB  ({plan.weight_bytes:,} bytes; {plan.weight_format})")
    max_len = spec.max_model_len
    print(f"  KV cache / token  {plan.kv_bytes_per_token:,} bytes  "
          f"({plan.kv_bytes_per_token * max_len / GiB:.2f} GiB at max length {max_len})")
    if plan.sliding_layers:
        print(f"  KV needed         {plan.kv_bytes_needed(max_len) / GiB:.2f} GiB at max length {max_len}: "
              f"{plan.sliding_layers} of {plan.num_layers} layers keep a {plan.sliding_window}-token window "
              "(the engine allocates the whole context for every layer today)")
    print(f"  activation peak   {plan.activation_peak_bytes / GiB:.3f} GiB  "
          f"(at {plan.max_num_batched_tokens} batched tokens)")
    print(f"  overhead          {plan.overhead_bytes / GiB:.3f} GiB")
    if fit is not None:
        verdict = "fits" if fit["fits"] else "does NOT fit"
        print(f"\non {args.device_memory:g} GiB: {verdict}; room for {fit['kv_tokens']:,} KV tokens")
    print()
    _print_features(features, near, unknown)
    return 0


def _print_features(features: list, near: object, unknown: list[str]) -> None:
    """The architectural features the config asks for, the closest registered family and the keys nobody reads."""
    print("features     " + ", ".join(f.key for f in features if f.kind == "arch"))
    if near is not None:
        missing = ", ".join(f.label for f in near.missing) or "none"
        print(f"family       {near.family} ({', '.join(near.architectures)}): {len(near.covered)} features covered; "
              f"missing: {missing}")
    note = "  (no native family verdict: dockyard cannot tell what they do)" if unknown else ""
    print("unrecognised " + (", ".join(unknown) if unknown else "none") + note)


def cmd_models(args: argparse.Namespace) -> int:
    from pathlib import Path

    # the CLI starts without torch: a command's modules load when it runs
    from dockyard.supported_models import catch_table, render

    configs = [Path(c) for c in args.configs]
    for c in configs:
        if not c.is_dir():
            raise DockyardError(f"--configs {c} is not a directory of <name>/config.json")
    if args.catches and not configs:
        raise DockyardError("--catches runs the mutation check on real configs: give --configs DIR")
    page = catch_table(configs) if args.catches else render(configs)
    if args.write:
        Path(args.write).write_text(page)
        print(f"wrote {args.write}", file=sys.stderr)
    else:
        sys.stdout.write(page)
    return 0


COMMANDS = {"generate": cmd_generate, "inspect": cmd_inspect, "serve": cmd_serve, "onboard": cmd_onboard,
            "models": cmd_models, "eval": cmd_eval, "bench": cmd_bench}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dockyard`` console command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except DockyardError as exc:
        print(f"dockyard {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
