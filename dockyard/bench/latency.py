"""``dockyard bench latency``: decode tokens/s at batch 1..N and time to first token at input 128..32k,
against the roofline.

    dockyard bench latency                      # bundled model on CPU, scaled-down defaults
    dockyard bench latency --model benchmarks/configs/llama-3.1-8b.json --load-format dummy \\
        --batch-sizes 1 8 32 --input-lens 128 1024 8192 32768 --hf-baseline --check-eager --json --plot lat.png

In the same run it measures the device's ceilings (copy bandwidth, bf16 matmul rate,
``dockyard.bench.ceilings``) and reports every figure against its roofline:

- decode at batch B: each step reads every weight once (all but the input embedding) plus the
  batch's K/V; the floor is those bytes over the copy bandwidth, so the roofline is
  ``B / floor`` tokens/s. For MoE models a step reads the routed experts it selects, not all of
  them: the weights are every non-routed-expert weight plus, per MoE layer, the distinct experts
  the router chose in that step, counted on the device during the timed steps (graph replays
  included: ``ops.moe.RoutedExpertCounter``); Measured over the decode steps only (every sequence prefilled first,
  128-token prompts, ``--output-len`` tokens each, ignore_eos);
- time to first token of one prompt of L tokens (one request, max_tokens 1, garbage collector paused; with the
  host's time to queue the prefill's forward, which bounds it when the eager forward's kernels take longer to
  queue than to run): model FLOPs are
  ``2 × matmul parameters × L`` (lm_head once) plus causal attention ``2 × layers × L² × heads ×
  head_dim``; MFU is those FLOPs per second over the measured matmul rate;
- ``--check-eager``: the batch-1 greedy tokens with CUDA graphs equal the tokens of the same
  engine run eagerly;
- ``--hf-baseline``: HF transformers ``generate`` on the same config at batch 1 (random weights);
- ``--plot PATH``: milliseconds per decode step against batch size, with the roofline's floor.

The onboarding performance gate measures with the same functions (:func:`decode_rate`, :func:`ttft`,
:func:`with_decode_roofline`, :func:`with_ttft_roofline`).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import random
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch

from dockyard import LLM, SamplingParams
from dockyard.bench.args import LATENCY_DEFAULTS, add_latency_args, fill_defaults, run_and_report
from dockyard.bench.ceilings import measure, sync
from dockyard.bench.hf_baseline import build_hf_model, hf_generate_rate
from dockyard.bench.plot import plot_latency
from dockyard.engine.llm_engine import EngineConfig, LLMEngine
from dockyard.engine_args import EngineArgs
from dockyard.errors import DockyardError
from dockyard.memory import plan_memory
from dockyard.model_loader import resolve_device
from dockyard.ops.moe import RoutedExpertCounter, count_routed_experts


def weight_read_bytes(llm: LLM) -> int:
    """Bytes of weights one decode step reads: all parameters but the input embedding table
    (only the batch's rows of it are read; a tied lm_head still reads the whole table)."""
    spec = llm.spec
    plan = plan_memory(spec, llm.dtype)
    embed = spec.vocab_size * spec.hidden_size * llm.dtype.itemsize
    return plan.weight_bytes - (0 if spec.tie_word_embeddings else embed)


def routed_expert_bytes(llm: LLM) -> tuple[int, int]:
    """(bytes of all routed experts, bytes of one routed expert) over the model's expert banks; (0, 0) if dense."""
    total, one = 0, 0
    for module in llm.model.modules():
        bank = getattr(module, "experts", None)
        if bank is None or not hasattr(bank, "num_experts"):
            continue
        params = sum(p.numel() * p.element_size() for p in bank.parameters())
        if getattr(bank, "stacked", None) is not None and not hasattr(bank, "gate_up_proj"):
            params = sum(t.numel() * t.element_size() for t in (bank.stacked.gate_up, bank.stacked.down))
        total += params
        one = params // bank.num_experts
    return total, one


def model_flops(llm: LLM, tokens: int) -> float:
    """Forward FLOPs of one prompt of ``tokens`` tokens with logits for the last one (causal attention)."""
    spec = llm.spec
    plan = plan_memory(spec, llm.dtype)
    lm_head = spec.vocab_size * spec.hidden_size
    matmul_params = plan.active_parameters - lm_head * (1 if spec.tie_word_embeddings else 2)
    attention = 2 * spec.num_hidden_layers * tokens * tokens * spec.num_attention_heads * spec.head_dim
    return 2 * matmul_params * tokens + 2 * lm_head + attention


def decode_rate(llm: LLM, batch: int, input_len: int, output_len: int, rng: random.Random,
                counter: RoutedExpertCounter | None = None) -> dict:
    """Decode tokens/s of ``batch`` sequences, timed from the step after the last prefill to the end;
    ``counter``: the MoE routing counter installed in the model (bytes per step from the routing)."""
    engine = llm.engine
    vocab = llm.spec.vocab_size
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    tag = f"lat-{batch}-{rng.random()}"
    for i in range(batch):
        engine.add_request(f"{tag}-{i}", [rng.randrange(vocab) for _ in range(input_len)], params)
    seqs = [s for r in engine.requests.values() if r.request_id.startswith(tag) for s in r.seqs]
    while any(not s.output_token_ids for s in seqs):
        engine.step()
    sync(llm.device)
    generated_before = sum(len(s.output_token_ids) for s in seqs)
    steps_before = engine.metrics.steps
    if counter is not None:
        distinct_before, calls_before = counter.read()
    t = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    sync(llm.device)
    seconds = time.perf_counter() - t
    tokens = sum(len(s.output_token_ids) for s in seqs) - generated_before
    steps = engine.metrics.steps - steps_before
    kv_per_token = plan_memory(llm.spec, llm.dtype).kv_bytes_per_token
    mean_context = input_len + output_len / 2
    weights = weight_read_bytes(llm)
    result = {"batch": batch, "input_len": input_len, "output_len": output_len, "decode_steps": steps,
              "seconds": round(seconds, 4), "tokens_per_s": round(tokens / seconds, 1),
              "ms_per_step": round(1e3 * seconds / steps, 3)}
    if counter is not None:
        distinct_after, calls_after = counter.read()
        calls = calls_after - calls_before
        all_experts, one_expert = routed_expert_bytes(llm)
        distinct = (distinct_after - distinct_before) / max(calls, 1)
        moe_layers = calls / max(steps, 1)
        weights = weights - all_experts + round(distinct * one_expert * moe_layers)
        result.update(distinct_experts_per_layer_step=round(distinct, 2), moe_layer_calls_per_step=round(moe_layers, 2),
                      expert_bytes_per_step=round(distinct * one_expert * moe_layers))
    result["bytes_per_step"] = int(weights + batch * mean_context * kv_per_token)
    return result


@contextlib.contextmanager
def forward_host_times(llm: LLM) -> Iterator[list[float]]:
    """While active, the host's seconds inside each of the model runner's forward calls (``execute``; on CUDA they
    only queue kernels), appended to the yielded list. The runner is wrapped by an instance attribute, not changed."""
    runner = llm.engine.runner
    execute = runner.execute
    times: list[float] = []

    def timed_execute(inputs: Any) -> Any:
        t = time.perf_counter()
        try:
            return execute(inputs)
        finally:
            times.append(time.perf_counter() - t)

    runner.execute = timed_execute
    try:
        yield times
    finally:
        del runner.execute


def ttft(llm: LLM, input_len: int, rng: random.Random, repeat: int = 3) -> dict:
    """Best of ``repeat`` times to the first token of one ``input_len``-token prompt (no prefix-cache hit), each
    timed with Python's garbage collector paused (as ``timeit`` does: a collection is the process's, not the
    engine's), and that run's ``forward_host_seconds`` (:func:`forward_host_times`): a forward host time close to
    the whole time means the prefill waited on the host queueing its eager forward, not on the GPU."""
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    best, host = float("inf"), 0.0
    collecting = gc.isenabled()
    with forward_host_times(llm) as forward_host:
        try:
            for _ in range(repeat):
                prompt = [rng.randrange(llm.spec.vocab_size) for _ in range(input_len)]
                forward_host.clear()
                gc.collect()
                gc.disable()
                sync(llm.device)
                t = time.perf_counter()
                llm.generate([prompt], params, use_tqdm=False)
                sync(llm.device)
                seconds = time.perf_counter() - t
                if collecting:
                    gc.enable()
                if seconds < best:
                    best, host = seconds, sum(forward_host)
        finally:
            if collecting:
                gc.enable()
    return {"input_len": input_len, "seconds": round(best, 4), "forward_host_seconds": round(host, 4),
            "model_flops": model_flops(llm, input_len)}


def eager_matches(llm: LLM, input_len: int, output_len: int, rng: random.Random) -> dict:
    """Greedy tokens of one request on two small engines over the loaded model, one replaying CUDA
    graphs and one eager (neither with prefix caching, so both compute the same prompt the same way)."""
    prompt = [rng.randrange(llm.spec.vocab_size) for _ in range(input_len)]
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    blocks = -(-(input_len + output_len) // 16) + 1
    tokens, captured = {}, None
    for eager in (False, True):
        config = EngineConfig(max_num_seqs=1, max_num_batched_tokens=max(input_len, 16),
                              enable_prefix_caching=False, enforce_eager=eager)
        engine = LLMEngine(llm.model, llm.spec, llm.tokenizer, config, llm.device, llm.dtype, blocks)
        captured = captured if eager else engine.runner.graphs is not None
        engine.add_request("check", prompt, params)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    tokens[eager] = list(out.outputs[0].token_ids)
        del engine
    first_diff = next((i for i, (a, b) in enumerate(zip(tokens[False], tokens[True])) if a != b), None)
    return {"graphs_captured": captured, "tokens": len(tokens[False]), "identical": tokens[False] == tokens[True],
            "first_difference": first_diff}


def with_decode_roofline(r: dict, bandwidth: float) -> dict:
    """``r`` (:func:`decode_rate`) with its roofline: ``batch`` tokens per floor, the floor being the step's bytes
    over the copy ``bandwidth``."""
    roofline = r["batch"] / (r["bytes_per_step"] / bandwidth)
    return {**r, "roofline_tokens_per_s": round(roofline, 1),
            "fraction_of_roofline": round(r["tokens_per_s"] / roofline, 3)}


def with_ttft_roofline(r: dict, rate: float) -> dict:
    """``r`` (:func:`ttft`) with its model FLOP/s and MFU, the fraction of the matmul ``rate`` they reach."""
    return {**r, "tflop_per_s": round(r["model_flops"] / r["seconds"] / 1e12, 3),
            "mfu": round(r["model_flops"] / r["seconds"] / rate, 4)}


def run_latency(args: argparse.Namespace) -> dict:
    """Load the model, measure the ceilings, time decode at each batch size and TTFT at each input length."""
    fill_defaults(args, LATENCY_DEFAULTS, resolve_device(args.device).type == "cuda")
    t0 = time.perf_counter()
    # Installed before the engine captures its graphs, so replays count; MoE models only.
    counter = RoutedExpertCounter(resolve_device(args.device))
    count_routed_experts(counter)
    max_len = max(args.input_lens + [args.decode_input_len + args.output_len]) + 8
    if args.check_eager and args.tensor_parallel_size > 1:
        raise DockyardError("--check-eager builds single-process engines over the loaded model: not with "
                            "--tensor-parallel-size")
    engine_args = EngineArgs.from_cli_args(args, max_num_seqs=max(args.batch_sizes))
    llm = LLM(engine_args.model, **engine_args.to_kwargs())
    load_s = time.perf_counter() - t0
    if max_len > llm.engine.max_model_len:
        raise DockyardError(f"an input of {max_len} tokens does not fit the model's {llm.engine.max_model_len}: "
                            "lower --input-lens or --output-len")
    rng = random.Random(args.seed)
    ceilings = measure(llm.device, llm.dtype, args.tensor_parallel_size)
    bandwidth, rate = ceilings["copy_bytes_per_s"], ceilings["matmul_flops_per_s"]
    runner = llm.engine.runner
    result: dict[str, Any] = {
        "model": llm.source.name, "device": torch.cuda.get_device_name() if llm.device.type == "cuda" else "cpu",
        "dtype": str(llm.dtype).removeprefix("torch."), "torch": torch.__version__,
        "cuda_graphs": runner.graphs.sizes if runner.graphs is not None else None,
        "eager_reason": runner.eager_reason, "load_s": round(load_s, 1),
        "copy_GB_per_s": round(bandwidth / 1e9, 1), "matmul_TFLOP_per_s": round(rate / 1e12, 1),
        "weight_read_bytes": weight_read_bytes(llm),
    }
    decode_rate(llm, 1, 16, 8, rng)  # warm-up
    print(json.dumps(result), file=sys.stderr, flush=True)
    result["decode"] = []
    for batch in args.batch_sizes:
        r = with_decode_roofline(decode_rate(llm, batch, args.decode_input_len, args.output_len, rng,
                                             counter if llm.spec.moe is not None else None), bandwidth)
        result["decode"].append(r)
        print(json.dumps(r), file=sys.stderr, flush=True)
    count_routed_experts(None)
    result["ttft"] = []
    for n in args.input_lens:
        r = with_ttft_roofline(ttft(llm, n, rng), rate)
        result["ttft"].append(r)
        print(json.dumps(r), file=sys.stderr, flush=True)
    if args.check_eager:
        result["eager_check"] = eager_matches(llm, args.decode_input_len, args.output_len, rng)
    if args.hf_baseline:
        device, dtype, config = llm.device, llm.dtype, engine_args.model
        del llm, runner
        gc.collect()
        torch.cuda.empty_cache() if device.type == "cuda" else None
        model = build_hf_model(str(config), device, dtype)
        hf = hf_generate_rate(model, 1, args.decode_input_len, args.output_len)
        result["hf_batch1"] = hf
        result["speedup_vs_hf_batch1"] = round(result["decode"][0]["tokens_per_s"] / hf["output_tokens_per_s"], 2)
        del model
    return result


def print_latency(result: dict, as_json: bool) -> None:
    """The result as JSON, or one line per decode batch and per TTFT length."""
    if as_json:
        json.dump(result, sys.stdout, indent=2)
        print()
        return
    print(json.dumps({k: v for k, v in result.items() if k not in ("decode", "ttft")}))
    for r in result["decode"]:
        print(f"decode batch {r['batch']:>4}: {r['tokens_per_s']:>9.1f} tok/s, {r['ms_per_step']:.3f} ms/step "
              f"({r['fraction_of_roofline']:.2f} of the {r['roofline_tokens_per_s']:.1f} tok/s roofline)")
    for r in result["ttft"]:
        print(f"TTFT {r['input_len']:>6} tokens: {1e3 * r['seconds']:.1f} ms, {r['tflop_per_s']} TFLOP/s "
              f"(MFU {r['mfu']:.2f}; forward queued by the host in {1e3 * r['forward_host_seconds']:.1f} ms)")


def cmd_bench_latency(args: argparse.Namespace) -> int:
    """``dockyard bench latency``."""
    run_and_report(args, run_latency, print_latency, plot_latency)
    return 0


def main(argv: list[str] | None = None) -> dict:
    """The repository script's entry (``benchmarks/latency.py``): the same flags as ``dockyard bench latency``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_latency_args(p)
    return run_and_report(p.parse_args(argv), run_latency, print_latency, plot_latency)
