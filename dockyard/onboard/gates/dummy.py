"""Gate 4, dummy: the engine starts with dummy weights at true shapes and answers a first request.

What runs must fit the memory this gate may use (``--dummy-memory``, else most of what is free).
When the whole model does not, the ladder is: fewer layers (every layer has the same shapes, so
one true-shape layer proves as much as eighty), then a smaller vocabulary, then narrower layers.
Each step taken is written into the evidence, and ``true_shapes`` says whether the layer and
embedding shapes that ran are the model's own.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from dockyard.dtypes import dtype_name
from dockyard.engine.llm import LLM
from dockyard.engine.sampling_params import SamplingParams
from dockyard.memory import plan_memory
from dockyard.model_impl import with_standard_names
from dockyard.model_source import spec_for_config
from dockyard.onboard.config_surgery import text_config, with_layers, with_vocab, with_width
from dockyard.onboard.context import DummyRun, GateContext, Outcome
from dockyard.onboard.gates.fit import serving_dtype
from dockyard.onboard.machine import available_now

logger = logging.getLogger(__name__)

GiB = 1024**3
ENGINE = {"max_num_seqs": 4, "max_num_batched_tokens": 256, "block_size": 16, "num_kv_blocks": 32}
MAX_NEW_TOKENS = 4
VOCAB_STEPS = (32768, 8192, 2048, 512)
WIDTH_DIVISORS = (2, 4, 8, 16, 32, 64)
MARGIN = 1 * GiB  # left unplanned below what is available: allocator slack, transient copies while loading


def _plan(cfg: dict[str, Any], dtype: torch.dtype, device_type: str, model_impl: str) -> tuple[int, Any]:
    """(bytes the engine adds for ``cfg`` as this gate starts it on ``model_impl``'s path, its spec)."""
    spec = spec_for_config(cfg, model_impl=model_impl)
    plan = plan_memory(spec, dtype, max_num_batched_tokens=ENGINE["max_num_batched_tokens"],
                       max_num_seqs=ENGINE["max_num_seqs"], device_type=device_type)
    kv = ENGINE["num_kv_blocks"] * ENGINE["block_size"] * plan.kv_bytes_per_token
    # The process overhead is already paid (this process runs): count what loading adds.
    return plan.weight_bytes + plan.activation_peak_bytes + kv, spec


def choose_config(cfg: dict[str, Any], layers: int, budget: int, dtype: torch.dtype, device_type: str,
                  model_impl: str = "auto") -> tuple[dict[str, Any] | None, list[str], int]:
    """The config to run within ``budget`` bytes on ``model_impl``'s path, the reductions made, and the bytes
    it needs."""
    reductions: list[str] = []
    cfg = with_standard_names(cfg)  # a generic-path config may keep its sizes under its own names (n_layer)
    total_layers = int(text_config(cfg)["num_hidden_layers"])
    if layers < total_layers:
        reductions.append(f"layers {total_layers} → {layers} (asked for)")
    candidate = with_layers(cfg, layers)
    need, _ = _plan(candidate, dtype, device_type, model_impl)
    if need <= budget:
        return candidate, reductions, need
    one, _ = _plan(with_layers(cfg, 1), dtype, device_type, model_impl)
    two, _ = _plan(with_layers(cfg, 2), dtype, device_type, model_impl)
    per_layer = max(1, two - one)
    fit_layers = min(layers, int((budget - (one - per_layer)) // per_layer))
    if fit_layers >= 1:
        reductions.append(f"layers {total_layers} → {fit_layers} to fit {budget / GiB:.2f} GiB")
        candidate = with_layers(cfg, fit_layers)
        return candidate, reductions, _plan(candidate, dtype, device_type, model_impl)[0]
    reductions.append(f"layers {total_layers} → 1 (one true-shape layer alone does not fit "
                      f"{budget / GiB:.2f} GiB)")
    base = with_layers(cfg, 1)
    vocab = int(text_config(cfg)["vocab_size"])
    for new_vocab in VOCAB_STEPS:
        if new_vocab >= vocab:
            continue
        candidate = with_vocab(base, new_vocab)
        need, _ = _plan(candidate, dtype, device_type, model_impl)
        if need <= budget:
            reductions.append(f"vocab {vocab} → {new_vocab}")
            return candidate, reductions, need
    base = with_vocab(base, min(vocab, VOCAB_STEPS[-1]))
    if min(vocab, VOCAB_STEPS[-1]) < vocab:
        reductions.append(f"vocab {vocab} → {VOCAB_STEPS[-1]}")
    for divisor in WIDTH_DIVISORS:
        candidate = with_width(base, divisor)
        need, _ = _plan(candidate, dtype, device_type, model_impl)
        if need <= budget:
            t = text_config(candidate)
            reductions.append(f"width ÷{divisor}: hidden {t['hidden_size']}, heads {t['num_attention_heads']}/"
                              f"{t['num_key_value_heads']}, intermediate {t['intermediate_size']}")
            return candidate, reductions, need
    return None, reductions, need


def memory_budget(ctx: GateContext) -> tuple[int, str]:
    """Bytes the dummy gate (and the compile trial) may load, and where that number came from: a share of
    the memory available now (what other processes use already subtracted), at least MARGIN below it."""
    if ctx.options.dummy_memory_gib is not None:
        return int(ctx.options.dummy_memory_gib * GiB), "--dummy-memory"
    share = 0.85 if ctx.machine.device == "cuda" else 0.6
    available = available_now(ctx.machine.device)
    budget = max(0, min(int(available * share), available - MARGIN))
    return budget, (f"{share:.0%} of the {available / GiB:.1f} GiB available when the gate started, at least "
                    f"{MARGIN / GiB:.0f} GiB below it")


def _prompt_ids(llm: Any) -> list[int]:
    if llm.tokenizer is not None:
        ids = llm.tokenizer.encode("The quick brown fox jumps over the lazy dog")
        if ids:
            return ids
    return [i % llm.spec.vocab_size for i in range(1, 9)]


def first_request(llm: Any) -> dict[str, Any]:
    """Send one greedy request through the engine; capture the logits it sampled from."""
    captured: list[torch.Tensor] = []
    original = llm.model.compute_logits

    def capture(hidden: torch.Tensor) -> torch.Tensor:
        logits = original(hidden)
        captured.append(logits.detach().float().cpu())
        return logits

    llm.model.compute_logits = capture
    try:
        t0 = time.perf_counter()
        out = llm.generate([_prompt_ids(llm)], SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0,
                                                                ignore_eos=True), use_tqdm=False)[0]
        seconds = time.perf_counter() - t0
    finally:
        del llm.model.compute_logits
    logits = torch.cat(captured) if captured else torch.empty(0)
    finite = bool(logits.numel() and torch.isfinite(logits).all())
    return {
        "prompt_tokens": len(out.prompt_token_ids),
        "output_token_ids": list(out.outputs[0].token_ids),
        "output_text": out.outputs[0].text,
        "logits_shape": list(logits.shape),
        "logits_finite": finite,
        "logits_min": float(logits.min()) if finite else None,
        "logits_max": float(logits.max()) if finite else None,
        "logits_std": float(logits.std()) if finite and logits.numel() > 1 else None,
        "seconds": seconds,
    }


def run(ctx: GateContext) -> Outcome:
    if ctx.spec is None or ctx.raw is None:
        return Outcome("skip", "no validated spec (inspect did not pass)")

    spec, machine = ctx.spec, ctx.machine

    dtype = ctx.dtype or serving_dtype(ctx)
    budget, budget_source = memory_budget(ctx)
    layers = min(ctx.options.num_layers or spec.num_hidden_layers, spec.num_hidden_layers)
    # GGUF metadata and config.json alike: the dict ModelSpec was built from.
    raw_cfg = ctx.raw.config
    cfg, reductions, need = choose_config(raw_cfg, layers, budget, dtype, machine.device,
                                          ctx.impl_kwargs["model_impl"])
    evidence: dict[str, Any] = {"budget_bytes": budget, "budget_source": budget_source, "dtype": dtype_name(dtype),
                                "reductions": reductions, "total_layers": spec.num_hidden_layers, "engine": ENGINE}
    if cfg is None:
        return Outcome("fail", f"even the smallest reduction needs {need / GiB:.2f} GiB, more than the "
                               f"{budget / GiB:.2f} GiB budget ({budget_source})", evidence)
    t = text_config(cfg)
    true_shapes = not any(r.startswith(("vocab", "width")) for r in reductions)
    run_layers = int(t["num_hidden_layers"])
    evidence.update(layers=run_layers, true_shapes=true_shapes, bytes_needed=need)
    ctx.dummy = DummyRun(layers=run_layers, total_layers=spec.num_hidden_layers, true_shapes=true_shapes,
                         reductions=reductions, config=cfg)
    t0 = time.perf_counter()
    engine_kwargs = {"dtype": dtype, "device": machine.device, "load_format": "dummy", "seed": ctx.options.seed,
                     **ENGINE, **ctx.impl_kwargs}
    with tempfile.TemporaryDirectory(prefix="dockyard-dummy-") as tmp:
        if reductions:
            config_path = Path(tmp) / "config.json"
            config_path.write_text(json.dumps({**t, "architectures": cfg.get("architectures")}))
            llm = LLM(str(config_path), **engine_kwargs)
        else:
            llm = LLM(ctx.options.model, **engine_kwargs, **ctx.source_kwargs)
        load_s = time.perf_counter() - t0
        num_params = sum(p.numel() for p in llm.model.parameters())
        shapes = {name: list(p.shape) for name, p in llm.model.named_parameters()
                  if ".layers." not in name or ".layers.0." in name}
        request = first_request(llm)
        del llm
    evidence.update(load_seconds=load_s, num_parameters_run=num_params, parameter_shapes=shapes,
                    first_request=request)
    ctx.dummy.load_seconds, ctx.dummy.first_request, ctx.dummy.num_parameters_run = load_s, request, num_params
    logger.info("dummy run: %d/%d layers, true shapes %s, reductions %s", run_layers, spec.num_hidden_layers,
                true_shapes, reductions)
    ok = request["logits_finite"] and len(request["output_token_ids"]) == MAX_NEW_TOKENS
    shape_note = "true shapes" if true_shapes else "REDUCED shapes"
    layer_note = (f"{run_layers}/{spec.num_hidden_layers} layers" if run_layers < spec.num_hidden_layers
                  else f"all {run_layers} layers")
    extra = "" if not reductions else f" ({'; '.join(reductions)})"
    if ok:
        return Outcome("pass", f"engine started ({shape_note}, {layer_note}{extra}) and answered a first "
                               f"request: {MAX_NEW_TOKENS} tokens, finite logits", evidence)
    return Outcome("fail", f"first request with dummy weights: {len(request['output_token_ids'])} tokens, "
                           f"logits finite: {request['logits_finite']}", evidence)
