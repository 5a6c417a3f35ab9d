"""Gate 5, real: real weights load completely and greedy output equals the HF reference.

Loading is strict (``weights.loader``): every checkpoint tensor lands in a parameter and every
parameter is filled, or the load fails naming each missing and unexpected tensor. Then a few
prompts are decoded greedily by dockyard and by HF transformers on the same checkpoint (for a
GGUF file, transformers dequantizes it with its own reader), each stopping at end-of-sequence as it
would serve: dockyard at the ids of config.json plus generation_config.json, transformers' ``generate``
at those of the generation config it reads from the same checkpoint. The token ids, up to and
including the end-of-sequence token, must be equal.
When the reference does not fit in memory (or transformers lacks the architecture), a coherence
check runs instead and the evidence says so. When the gate passes, the loaded model also gets the
onboarding's small accuracy run (``onboard/accuracy.py``: ARC-Easy, 20 questions, lm-eval-harness),
which never changes the gate's status.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

import torch

from dockyard.dtypes import dtype_name
from dockyard.engine.llm import LLM
from dockyard.engine.sampling_params import SamplingParams
from dockyard.errors import DockyardError
from dockyard.onboard.accuracy import run_accuracy
from dockyard.onboard.context import GateContext, Outcome, RealRun
from dockyard.onboard.equivalence import rel_rmse, transformers_support
from dockyard.onboard.gates.fit import ensure_plan
from dockyard.onboard.machine import available_now, ram_bytes

logger = logging.getLogger(__name__)

GiB = 1024**3
MAX_NEW_TOKENS = 32
PLAIN_PROMPTS = ("The quick brown fox", "The three largest cities in Europe are")
CHAT_PROMPT = "What is the capital of France?"
LOGITS_TOLERANCE = 1e-4  # prefill logits, fp32 vs fp32 on the same (dequantized) weights


def _prompts(llm: Any) -> list[tuple[str, list[int]]]:
    tok = llm.tokenizer
    if tok is None:
        vocab = llm.spec.vocab_size
        return [(f"token ids {i}", [(i * 97 + j * 31) % vocab for j in range(8)]) for i in range(3)]
    prompts = [(p, tok.encode(p)) for p in PLAIN_PROMPTS]
    if getattr(tok, "chat_template", None):
        text = llm.apply_chat_template([{"role": "user", "content": CHAT_PROMPT}])
        prompts.append((f"[chat] {CHAT_PROMPT}", tok.encode(text, add_special_tokens=False)))
    else:
        prompts.append(("Once upon a time", tok.encode("Once upon a time")))
    return prompts


def _load_reference(ctx: GateContext) -> Any:
    from transformers import AutoModelForCausalLM

    source = ctx.source
    if source.kind == "gguf":
        return AutoModelForCausalLM.from_pretrained(str(source.path.parent), gguf_file=source.path.name,
                                                    dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(str(source.path), dtype=torch.float32).eval()


def _hf_greedy(hf_model: Any, ids: list[int], max_new: int) -> list[int]:
    """transformers' plain greedy decoding, stopping at the end-of-sequence ids of the generation config it
    read from the checkpoint (its other settings, such as a repetition penalty, left out: ours is plain too)."""
    from transformers import GenerationConfig

    eos = hf_model.generation_config.eos_token_id
    plain = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=eos,
                             pad_token_id=eos if isinstance(eos, int) else (eos or [0])[0])
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                generation_config=plain)
    return out[0, len(ids):].tolist()


def _served_text(llm: Any, ids: list[int], stops: set[int]) -> str:
    """The text a server would return for greedy ``ids``: cut before the stop token, special tokens skipped."""
    end = next((i for i, t in enumerate(ids) if t in stops), len(ids))
    if llm.tokenizer is None:
        return " ".join(map(str, ids[:end]))
    return llm.tokenizer.decode(ids[:end], skip_special_tokens=True)


def _coherent(ids: list[int], text: str) -> tuple[bool, str]:
    if not ids:
        return False, "no tokens"
    distinct = len(set(ids)) / len(ids)
    printable = sum(ch.isprintable() or ch.isspace() for ch in text) / max(1, len(text))
    ok = distinct >= 0.2 and printable >= 0.9 and bool(text.strip())
    return ok, f"{len(ids)} tokens, {distinct:.0%} distinct, {printable:.0%} printable"


def run(ctx: GateContext) -> Outcome:
    opts, source = ctx.options, ctx.source
    if source is None:
        return Outcome("skip", "no validated spec (inspect did not pass)")
    ensure_plan(ctx)
    if opts.weights == "dummy":
        return Outcome("skip", "--weights dummy: real weights were not asked for", hard=False)
    if not source.has_real_weights:
        if opts.weights == "real":
            return Outcome("fail", f"--weights real, but {source.path} has no checkpoint (*.safetensors beside "
                                   "config.json, or a .gguf file)")
        return Outcome("skip", "only dummy weights: the model is a config without a checkpoint", hard=False)
    machine = ctx.machine
    available = available_now(machine.device)
    # fp32 when it fits, so the comparison with the fp32 reference is exact; else the serving dtype.
    dtype, ours_bytes = torch.float32, ctx.plan.num_parameters * 4
    if ours_bytes > available * 0.8:
        dtype, ours_bytes = ctx.dtype, ctx.plan.num_parameters * ctx.dtype.itemsize
    if ours_bytes > available * 0.9:
        return Outcome("fail", f"real weights need {ours_bytes / GiB:.1f} GiB, {available / GiB:.1f} "
                               f"GiB available on this {machine.device}: run on a larger device", hard=False)
    ctx.step(f"loading the real weights ({source.kind}, {str(dtype).removeprefix('torch.')})")
    t0 = time.perf_counter()
    try:
        llm = LLM(opts.model, dtype=dtype, device=machine.device, num_kv_blocks=256, max_num_seqs=8,
                  **ctx.impl_kwargs, **ctx.source_kwargs)
    except DockyardError as exc:
        return Outcome("fail", f"real weights do not load: {exc}", {"error": str(exc)})
    load_s = time.perf_counter() - t0
    report = llm.load_report
    evidence: dict[str, Any] = {
        "checkpoint": {"kind": source.kind, "path": str(source.path)},
        "dtype": dtype_name(dtype),
        "load_seconds": load_s,
        "tensors_loaded": report.loaded,
        "bytes_loaded": report.bytes_loaded,
        "parameters": sum(1 for _ in llm.model.parameters()),
        "missing": report.missing,
        "unexpected": report.unexpected,
        "ignored": report.ignored,
    }
    prompts = _prompts(llm)
    ctx.step(f"greedy decoding of {len(prompts)} prompts with dockyard")
    t0 = time.perf_counter()
    # Greedy with end-of-sequence handling, as served (the generation config's extra EOS ids included).
    outs = llm.generate([ids for _, ids in prompts], SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0),
                        use_tqdm=False)
    gen_s = time.perf_counter() - t0
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    evidence["generation"] = {"prompts": len(prompts), "tokens": generated, "seconds": gen_s,
                              "tokens_per_second": generated / gen_s if gen_s else None,
                              "note": f"greedy, {len(prompts)} prompts batched, {evidence['dtype']}, "
                                      f"{machine.device}"}
    ctx.real = RealRun(load_seconds=load_s, generation=evidence["generation"], tensors_loaded=report.loaded)

    reason = transformers_support(str(ctx.raw.config.get("model_type") or ""))
    hf_bytes = ctx.plan.num_parameters * 4
    free_ram = ram_bytes()[1]
    if reason is None and hf_bytes * 1.3 > free_ram:
        reason = (f"the fp32 HF reference needs ~{hf_bytes * 1.3 / GiB:.1f} GiB, {free_ram / GiB:.1f} GiB RAM free")
    stops = set(ctx.spec.eos_token_ids)
    results = []
    if reason is None:
        ctx.step("loading the transformers reference (float32)")
        t0 = time.perf_counter()
        hf_model = _load_reference(ctx)
        evidence["reference"] = {"library": "transformers", "dtype": "float32",
                                 "load_seconds": time.perf_counter() - t0,
                                 "source": (f"gguf_file={source.path.name}" if source.kind == "gguf"
                                            else "from_pretrained")}
        evidence["reference"]["eos_token_id"] = hf_model.generation_config.eos_token_id
        evidence["eos_token_ids"] = sorted(stops)
        all_equal = True
        ctx.step(f"greedy decoding of {len(prompts)} prompts with transformers")
        for (label, ids), out in zip(prompts, outs):
            ours = list(out.outputs[0].token_ids)
            ref = _hf_greedy(hf_model, ids, MAX_NEW_TOKENS)
            equal = ours == ref
            all_equal &= equal
            diverge = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None if equal else
                           min(len(ours), len(ref)))
            text = _served_text(llm, ours, stops)
            results.append({"prompt": label, "prompt_tokens": len(ids), "ours": ours, "reference": ref,
                            "equal": equal, "first_divergence": diverge, "text": text})
            logger.info("prompt %r: %s (%d tokens) %r", label, "equal" if equal else f"DIFFERS at {diverge}",
                        len(ours), text[:200])
        ids = prompts[0][1]
        with torch.no_grad():
            ref_logits = hf_model(torch.tensor([ids])).logits[0].float()
            mine = llm.model.compute_logits(llm.model(torch.tensor(ids, device=llm.device),
                                                      torch.arange(len(ids), device=llm.device))).float().cpu()
        logits_err = rel_rmse(mine, ref_logits)
        evidence["prefill_logits_rel_err"] = logits_err
        evidence["prefill_logits_tolerance"] = LOGITS_TOLERANCE
        evidence["method"] = "token-for-token equality with the HF reference"
        evidence["prompts"] = results
        del hf_model
        ok = all_equal and (logits_err <= LOGITS_TOLERANCE or dtype != torch.float32)
        verdict = "equal" if all_equal else "DIFFER from"
        summary = (f"{report.loaded} tensors loaded, none missing or unexpected; greedy {len(prompts)} prompts × "
                   f"≤{MAX_NEW_TOKENS} tokens {verdict} the HF reference; prefill logits rel err {logits_err:.1e}")
    else:
        all_ok = True
        for (label, ids), out in zip(prompts, outs):
            ok_one, detail = _coherent(list(out.outputs[0].token_ids), out.outputs[0].text)
            all_ok &= ok_one
            results.append({"prompt": label, "prompt_tokens": len(ids), "ours": list(out.outputs[0].token_ids),
                            "coherent": ok_one, "detail": detail,
                            "text": _served_text(llm, list(out.outputs[0].token_ids), stops)})
        evidence["method"] = f"coherence check only (no HF reference: {reason})"
        evidence["prompts"] = results
        ok = all_ok
        summary = (f"{report.loaded} tensors loaded, none missing or unexpected; coherence check only "
                   f"({reason}): {'coherent' if ok else 'INCOHERENT'}")
    ctx.real.prompts, ctx.real.passed = results, ok
    if ok and llm.tokenizer is not None:
        ctx.step("accuracy run (dockyard eval, a small ARC-Easy subset)")
        ctx.accuracy = run_accuracy(llm, opts.model)
        evidence["accuracy"] = {k: v for k, v in ctx.accuracy.items() if k != "results"}
        if ctx.accuracy["evaluated"]:
            evidence["accuracy"]["tasks"] = ctx.accuracy["results"]["tasks"]
    del llm
    gc.collect()
    return Outcome("pass" if ok else "fail", summary, evidence)
