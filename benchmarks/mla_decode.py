"""Absorbed MLA decode (DeepSeek-V2-Lite shapes) on a CUDA device: the latent kernel, graphs, the model's decode.

    PYTHONPATH=. python benchmarks/mla_decode.py --model benchmarks/configs/deepseek-v2-lite.json --out DIR

Every section appends its figures to ``DIR/mla_decode.json`` as soon as they are measured (a run cut
short keeps what it had):

1. ceilings: device-to-device copy bandwidth and the bf16 matmul rate (``ceilings.measure``).
2. kernel: ``paged_mla_decode_attention`` at the model's attention shapes (its heads, latent
   ``kv_lora_rank + qk_rope_head_dim``, block size 16), bfloat16, batch 1/8/64 × context 1k/8k/32k:
   ‖out − ref‖ / ‖ref‖ against :func:`absorbed_decode_reference` in float32 on the same inputs (a
   few rows), the median time (``triton.testing.do_bench``), the latent bytes it must read and that
   over the copy bandwidth; at batch 1 the expanded form (``kv_b_proj`` up-projection of the whole
   context, then SDPA) timed too; a sweep of tile size × warps on two shapes.
3. graphs: the model's config cut to 2 layers, all dense (MoE still runs eagerly), float32 dummy
   weights: whether the engine captures CUDA graphs, and greedy tokens with graphs vs eagerly.
4. model: the whole model, dummy bfloat16 weights, with whatever MoE path this tree has (the engine's
   eager reason is recorded): batch-1 decode tokens/s against its active roofline (the weights one
   token runs through, the embedding table's one row, the latent cache), absorbed, and expanded when
   the engine runs eagerly (captured graphs replay the absorbed form; what a graph step allocates is
   the graph pool's, so the memory probe says nothing there);
   absorbed vs expanded logits through the paged cache (relative RMSE, against the equivalence
   gate's bfloat16 decode bound); at context 8k and 32k the time of a decode step, the latent bytes
   it must read, and the memory it allocates beyond the cache (the expanded form materializes
   every head's keys and values of the context; the absorbed form nothing of the context's size).
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import os
import random
import sys
import time
import traceback

import torch
import triton
import triton.testing

from dockyard import LLM, SamplingParams
from dockyard.memory import plan_memory
from dockyard.onboard.equivalence import TOLERANCES
from dockyard.ops.attention import AttentionMetadata, _attend
from dockyard.ops.mla import MLAPagedAttention, absorbed_decode_reference
from dockyard.ops.triton_attention import mla_num_splits, paged_mla_decode_attention
from dockyard.spec import ModelSpec, read_config_json
from dockyard.testing import paged_logits, rel_rmse

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from dockyard.bench.ceilings import measure, sync  # noqa: E402

BS = 16
RESULTS: dict = {"date": time.strftime("%Y-%m-%d"), "sections": {}}


def log(*args: object) -> None:
    print(*args, flush=True)


def save(out_dir: str) -> None:
    with open(os.path.join(out_dir, "mla_decode.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)


def bench(fn) -> float:
    """Median milliseconds (CUDA events, L2 flushed before each call)."""
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def kernel_section(spec: ModelSpec, copy_bps: float, quick: bool) -> dict:
    """The kernel at the model's attention shapes (``quick``: a smaller tuning sweep)."""
    mla = spec.mla
    heads, rank, rope = spec.num_attention_heads, mla.kv_lora_rank, mla.qk_rope_head_dim
    latent = rank + rope
    scale = 0.1
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    contexts = (1024, 8192, 32768)
    for batch in (1, 8, 64):
        for ctx in contexts:
            blocks = batch * ctx // BS
            cache = torch.randn(1, blocks + 1, BS, 1, latent, device=dev, dtype=torch.bfloat16, generator=gen)
            tables = torch.randperm(blocks, device=dev, generator=gen).view(batch, ctx // BS)
            lens = torch.full((batch,), ctx, device=dev, dtype=torch.int32)
            q = torch.randn(batch, heads, latent, device=dev, dtype=torch.bfloat16, generator=gen)
            out = paged_mla_decode_attention(q, cache, tables, lens, scale, rank)
            check = min(batch, 2)
            meta = AttentionMetadata(torch.zeros(check, dtype=torch.long, device=dev), tables[:check], [1] * check,
                                     [ctx] * check, BS, lens[:check])
            ref = absorbed_decode_reference(q[:check].float(), cache.float(), meta, scale, rank)
            err = ((out[:check].float() - ref).norm() / ref.norm()).item()
            ms = bench(functools.partial(paged_mla_decode_attention, q, cache, tables, lens, scale, rank))
            nbytes = batch * ctx * latent * cache.element_size()
            row = {"batch": batch, "context": ctx, "splits": mla_num_splits(batch, heads, ctx, dev),
                   "rel_err": err, "ms": round(ms, 4), "latent_bytes": nbytes,
                   "bytes_per_s": nbytes / (ms * 1e-3), "fraction_of_copy": round(nbytes / (ms * 1e-3) / copy_bps, 3)}
            if batch == 1 and ctx >= 8192:
                row["expanded_ms"] = round(bench(functools.partial(expanded_decode, q, cache, tables, ctx, spec,
                                                                     scale)), 4)
            log("kernel", row)
            rows.append(row)
            cache = out = None
            torch.cuda.empty_cache()
    return {"rows": rows, "sweep": sweep(spec, scale, quick)}


_KV_B = {}


def expanded_decode(q: torch.Tensor, cache: torch.Tensor, tables: torch.Tensor, ctx: int, spec: ModelSpec,
                    scale: float) -> torch.Tensor:
    """The expanded form of one sequence's decode: up-project its whole context, then SDPA (q's nope
    part stands in for a real one; only the time matters here)."""
    mla = spec.mla
    heads = spec.num_attention_heads
    if "w" not in _KV_B:
        _KV_B["w"] = torch.randn(heads * (mla.qk_nope_head_dim + mla.v_head_dim), mla.kv_lora_rank,
                                 device=q.device, dtype=q.dtype) * mla.kv_lora_rank**-0.5
        _KV_B["attn"] = MLAPagedAttention(heads, mla.kv_lora_rank, mla.qk_nope_head_dim, mla.qk_rope_head_dim,
                                          mla.v_head_dim, scale)
    context = cache[0][tables[0]].reshape(-1, cache.shape[-1])[:ctx]
    k, v = _KV_B["attn"].expand_kv(context, _KV_B["w"])
    q_exp = q[:1, :, : mla.qk_nope_head_dim + mla.qk_rope_head_dim]
    return _attend(q_exp, k, v, scale)


def sweep(spec: ModelSpec, scale: float, quick: bool) -> list[dict]:
    mla = spec.mla
    heads, rank = spec.num_attention_heads, mla.kv_lora_rank
    latent = rank + mla.qk_rope_head_dim
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(1)
    rows = []
    for batch, ctx in ((1, 32768),) if quick else ((1, 32768), (64, 8192)):
        blocks = batch * ctx // BS
        cache = torch.randn(1, blocks, BS, 1, latent, device=dev, dtype=torch.bfloat16, generator=gen)
        tables = torch.randperm(blocks, device=dev, generator=gen).view(batch, ctx // BS)
        lens = torch.full((batch,), ctx, device=dev, dtype=torch.int32)
        q = torch.randn(batch, heads, latent, device=dev, dtype=torch.bfloat16, generator=gen)
        for block_n in (16, 32, 64):
            for warps in (4, 8):
                for stages in ((2,) if quick else (1, 2, 3)):
                    try:
                        ms = bench(functools.partial(paged_mla_decode_attention, q, cache, tables, lens, scale,
                                                     rank, block_n=block_n, num_warps=warps, num_stages=stages))
                    except Exception as e:  # out of shared memory for a large tile, say
                        ms = float("nan")
                        log("sweep failed", block_n, warps, stages, repr(e)[:200])
                    rows.append({"batch": batch, "context": ctx, "block_n": block_n, "warps": warps,
                                 "stages": stages, "ms": round(ms, 4)})
                    log("sweep", rows[-1])
        cache = None
        torch.cuda.empty_cache()
    return rows


def small_config(config: dict, layers: int = 2) -> dict:
    small = copy.deepcopy(config)
    small.update(num_hidden_layers=layers, first_k_dense_replace=layers, intermediate_size=2048)
    return small


def graphs_section(config: dict, out_dir: str) -> dict:
    path = os.path.join(out_dir, "small_config.json")
    with open(path, "w") as f:
        json.dump(small_config(config), f)
    kwargs = dict(load_format="dummy", device="cuda", dtype="float32", max_num_seqs=4, seed=3,
                  kv_cache_memory_bytes=None, num_kv_blocks=256, max_model_len=1024)
    graphs = LLM(path, **kwargs)
    captured = graphs.engine.runner.graphs is not None
    eager = LLM(path, enforce_eager=True, **kwargs)
    rng = random.Random(0)
    prompts = [[rng.randrange(1000) for _ in range(n)] for n in (5, 40, 90)]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    a = [o.outputs[0].token_ids for o in graphs.generate(prompts, params, use_tqdm=False)]
    b = [o.outputs[0].token_ids for o in eager.generate(prompts, params, use_tqdm=False)]
    result = {"captured": captured, "eager_reason": graphs.engine.runner.eager_reason,
              "sizes": graphs.engine.runner.graphs.sizes if captured else None,
              "identical": [list(x) == list(y) for x, y in zip(a, b)], "tokens_each": 32}
    del graphs, eager
    gc.collect()
    torch.cuda.empty_cache()
    return result


def set_absorb(llm: LLM, absorb: bool) -> None:
    for m in llm.model.modules():
        if isinstance(m, MLAPagedAttention):
            m.absorb_decode = absorb


def active_bytes(llm: LLM) -> int:
    """Weights one batch-1 decode step reads: what one token runs through, less all but one row of the embedding."""
    spec = llm.spec
    plan = plan_memory(spec, llm.dtype)
    embed = spec.vocab_size * spec.hidden_size
    return (plan.active_parameters - (0 if spec.tie_word_embeddings else embed - spec.hidden_size)) * llm.dtype.itemsize


def decode_steps(llm: LLM, prompt: list[int], output_len: int, tag: str) -> dict:
    """One sequence: prefill ``prompt`` (a second call with the same prompt takes it from the prefix
    cache), then time the decode steps; the peak memory a decode step allocates beyond what is live
    before it."""
    engine = llm.engine
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    engine.add_request(tag, prompt, params)
    seq = next(s for r in engine.requests.values() if r.request_id == tag for s in r.seqs)
    while not seq.output_token_ids:
        engine.step()
    engine.step()  # one decode step outside the timing and the memory probe (first-call costs)
    sync(llm.device)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    engine.step()
    sync(llm.device)
    extra = torch.cuda.max_memory_allocated() - before
    steps, t = 0, time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    sync(llm.device)
    ms = 1e3 * (time.perf_counter() - t) / max(steps, 1)
    return {"ms_per_step": round(ms, 3), "tokens_per_s": round(1e3 / ms, 1), "steps": steps,
            "step_extra_alloc_bytes": int(extra)}


def model_section(args: argparse.Namespace, copy_bps: float, out: dict, out_dir: str) -> None:
    t0 = time.perf_counter()
    llm = LLM(args.model, load_format="dummy", device="cuda", dtype="bfloat16", seed=0, max_num_seqs=8,
              max_model_len=args.max_model_len, max_num_batched_tokens=8192)
    spec = llm.spec
    out["load_s"] = round(time.perf_counter() - t0, 1)
    out["eager_reason"] = llm.engine.runner.eager_reason
    out["graphs"] = llm.engine.runner.graphs is not None
    weights = active_bytes(llm)
    kv_per_token = plan_memory(spec, llm.dtype).kv_bytes_per_token
    out["active_weight_bytes"] = weights
    out["latent_bytes_per_token_all_layers"] = kv_per_token
    log("model loaded", out)
    save(out_dir)
    rng = random.Random(0)

    # Absorbed vs expanded logits through the paged cache: 48-token prefill, then 16 decode steps.
    ids = [rng.randrange(spec.vocab_size) for _ in range(64)]
    logits = {}
    for absorb in (True, False):
        set_absorb(llm, absorb)
        logits[absorb] = paged_logits(llm.model, ids, [48] + [1] * 16, block_size=16, num_blocks=8).float()
    set_absorb(llm, True)
    out["logits_rel_rmse_decode_rows"] = rel_rmse(logits[True][48:], logits[False][48:])
    out["logits_rel_rmse_prefill_rows"] = rel_rmse(logits[True][:48], logits[False][:48])
    out["equivalence_bound_bf16_decode"] = TOLERANCES["bfloat16"]["decode"]
    out["argmax_agree_decode_rows"] = float((logits[True][48:].argmax(-1) == logits[False][48:].argmax(-1))
                                            .float().mean())
    log("logits", {k: out[k] for k in out if k.startswith(("logits", "argmax"))})
    save(out_dir)

    rows = []
    # CUDA graphs captured at load replay the form they were captured with (absorbed), whatever the flag says
    # afterwards: the expanded form is timed only on an eager engine.
    forms = (True,) if out["graphs"] else (True, False)
    for ctx in args.contexts:
        prompt = [rng.randrange(spec.vocab_size) for _ in range(ctx)]
        for absorb in forms:
            set_absorb(llm, absorb)
            r = decode_steps(llm, prompt, args.output_len, f"ctx{ctx}-{absorb}")
            step_bytes = weights + (ctx + args.output_len // 2) * kv_per_token
            r.update(context=ctx, absorbed=absorb, latent_bytes_per_step=(ctx + args.output_len // 2) * kv_per_token,
                     roofline_bytes_per_step=step_bytes,
                     roofline_tokens_per_s=round(copy_bps / step_bytes, 1),
                     fraction_of_roofline=round(r["tokens_per_s"] * step_bytes / copy_bps, 4))
            log("decode", r)
            rows.append(r)
            out["decode"] = rows
            save(out_dir)
    set_absorb(llm, True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="benchmarks/configs/deepseek-v2-lite.json")
    p.add_argument("--out", default=".")
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 8192, 32768])
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=33024)
    p.add_argument("--sections", nargs="+", default=["kernel", "graphs", "model"])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = torch.device("cuda")
    RESULTS["device"] = torch.cuda.get_device_name(dev)
    RESULTS["versions"] = {"torch": torch.__version__, "triton": triton.__version__}
    ceilings = measure(dev, torch.bfloat16)
    RESULTS["ceilings"] = ceilings
    log("ceilings", ceilings)
    config = read_config_json(args.model)
    spec = ModelSpec.from_hf_config(config)
    for name in args.sections:
        RESULTS["sections"][name] = section = {}
        t0 = time.perf_counter()
        try:
            if name == "kernel":
                section.update(kernel_section(spec, ceilings["copy_bytes_per_s"], args.quick))
            elif name == "graphs":
                section.update(graphs_section(config, args.out))
            elif name == "model":
                model_section(args, ceilings["copy_bytes_per_s"], section, args.out)
        except Exception:
            section["error"] = traceback.format_exc()
            log(section["error"])
        section["seconds"] = round(time.perf_counter() - t0, 1)
        save(args.out)
    log(json.dumps(RESULTS)[:20000])


if __name__ == "__main__":
    main()
