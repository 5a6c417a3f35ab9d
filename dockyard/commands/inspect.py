"""``dockyard inspect``: a model's spec, memory plan and features, from its metadata alone.

The CLI refuses an absurd or broken config before this module (and torch, which the memory plan needs) loads
(``dockyard.cli.precheck``).
"""

from __future__ import annotations

import argparse
import json
import sys

from dockyard.commands.features import print_features, read_features, show_refusal
from dockyard.engine_args import model_source_kwargs
from dockyard.errors import DockyardError
from dockyard.memory import GiB
from dockyard.model_source import resolve_model
from dockyard.onboard.machine import detect_machine
from dockyard.run_plan import RunTarget, plan_for_run


def run(args: argparse.Namespace) -> int:
    """Print (or dump as JSON) the model's spec, memory plan, features and implementation path."""
    found = read_features(args)
    try:
        source = getattr(args, "resolved_source", None) or resolve_model(args.model, **model_source_kwargs(args))
        spec = source.spec
        machine = detect_machine("auto", args.device_memory)
        target = RunTarget.for_machine(machine.device, args.device_memory is not None)
        plan, fp8_why = plan_for_run(source, target, args.dtype, max_num_batched_tokens=args.max_num_batched_tokens)
    except DockyardError as exc:
        show_refusal(found, args.json, exc)  # what the config asks for, before the one-line error
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
                   "memory_plan": plan.to_dict(), "fit": fit, "features": [f.to_dict() for f in found.features],
                   "nearest_family": found.near.to_dict() if found.near else None,
                   "unrecognised_keys": found.unknown,
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
    print_features(found)
    return 0
