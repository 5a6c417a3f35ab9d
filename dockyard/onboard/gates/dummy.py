"""Gate 4, dummy: the engine starts with dummy weights at true shapes and answers a first request.

What runs must fit the memory this gate may use (``--dummy-memory``, else most of what is free).
When the whole model does not, the ladder is: fewer layers (every layer has the same shapes, so
one true-shape layer proves as much as eighty), then a smaller vocabulary, then narrower layers.
Each step taken is written into the evidence, and ``true_shapes`` says whether the layer and
embedding shapes that ran are the model's own.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from dockyard.model_impl import with_standard_names
from dockyard.onboard.context import GateContext, Outcome
from dockyard.onboard.machine import available_now
from dockyard.spec import language_model_config

logger = logging.getLogger(__name__)

GiB = 1024**3
ENGINE = {"max_num_seqs": 4, "max_num_batched_tokens": 256, "block_size": 16, "num_kv_blocks": 32}
MAX_NEW_TOKENS = 4
VOCAB_STEPS = (32768, 8192, 2048, 512)
WIDTH_DIVISORS = (2, 4, 8, 16, 32, 64)
MARGIN = 1 * GiB  # left unplanned below what is available: allocator slack, transient copies while loading


def _text(cfg: dict[str, Any]) -> dict[str, Any]:
    """The dict holding the language model's sizes (text_config of multimodal wrappers)."""
    text = cfg.get("text_config")
    if isinstance(text, dict) and "hidden_size" not in cfg:
        # Its class defaults are part of a text_config's meaning: make them explicit before editing sizes.
        full = language_model_config(cfg)
        text.update({k: v for k, v in full.items() if k not in text and k != "architectures"})
        return text
    return cfg


def _with_layers(cfg: dict[str, Any], layers: int) -> dict[str, Any]:
    out = copy.deepcopy(cfg)
    t = _text(out)
    t["num_hidden_layers"] = layers
    if isinstance(t.get("layer_types"), list):
        t["layer_types"] = t["layer_types"][:layers]
    return out


def _with_vocab(cfg: dict[str, Any], vocab: int) -> dict[str, Any]:
    out = copy.deepcopy(cfg)
    t = _text(out)
    t["vocab_size"] = vocab
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = t.get(key)
        if isinstance(value, list):
            t[key] = [v for v in value if isinstance(v, int) and v < vocab] or None
        elif isinstance(value, int) and value >= vocab:
            t[key] = None
    return out


def _with_width(cfg: dict[str, Any], divisor: int) -> dict[str, Any]:
    """Narrower layers: KV heads (and with them query heads, q/kv ratio kept), hidden and MLP ÷ divisor."""
    out = copy.deepcopy(cfg)
    t = _text(out)
    heads = int(t["num_attention_heads"])
    kv = int(t.get("num_key_value_heads") or heads)
    head_dim = int(t.get("head_dim") or t["hidden_size"] // heads)
    ratio = max(1, heads // kv)
    new_kv = max(1, kv // divisor)
    new_heads = new_kv * ratio
    if new_heads == heads:  # a single KV head already: fewer query heads instead
        new_heads = max(1, heads // divisor)
        new_kv = new_heads if kv == heads else 1
    t.update(num_attention_heads=new_heads, num_key_value_heads=new_kv, head_dim=head_dim,
             hidden_size=max(64, int(t["hidden_size"]) // divisor // 8 * 8),
             intermediate_size=max(64, int(t["intermediate_size"]) // divisor // 8 * 8))
    return out


def _plan(cfg: dict[str, Any], dtype: torch.dtype, device_type: str) -> tuple[int, Any]:
    """(bytes the engine adds for ``cfg`` as this gate starts it, its spec)."""
    from dockyard.memory import plan_memory
    from dockyard.model_source import spec_for_config

    spec = spec_for_config(cfg)
    plan = plan_memory(spec, dtype, max_num_batched_tokens=ENGINE["max_num_batched_tokens"],
                       max_num_seqs=ENGINE["max_num_seqs"], device_type=device_type)
    kv = ENGINE["num_kv_blocks"] * ENGINE["block_size"] * plan.kv_bytes_per_token
    # The process overhead is already paid (this process runs): count what loading adds.
    return plan.weight_bytes + plan.activation_peak_bytes + kv, spec


def choose_config(cfg: dict[str, Any], layers: int, budget: int, dtype: torch.dtype,
                  device_type: str) -> tuple[dict[str, Any] | None, list[str], int]:
    """The config to run within ``budget`` bytes, the reductions made, and the bytes it needs."""
    reductions: list[str] = []
    cfg = with_standard_names(cfg)  # a generic-path config may keep its sizes under its own names (n_layer)
    total_layers = int(_text(cfg)["num_hidden_layers"])
    if layers < total_layers:
        reductions.append(f"layers {total_layers} → {layers} (asked for)")
    candidate = _with_layers(cfg, layers)
    need, _ = _plan(candidate, dtype, device_type)
    if need <= budget:
        return candidate, reductions, need
    one, _ = _plan(_with_layers(cfg, 1), dtype, device_type)
    two, _ = _plan(_with_layers(cfg, 2), dtype, device_type)
    per_layer = max(1, two - one)
    fit_layers = min(layers, int((budget - (one - per_layer)) // per_layer))
    if fit_layers >= 1:
        reductions.append(f"layers {total_layers} → {fit_layers} to fit {budget / GiB:.2f} GiB")
        candidate = _with_layers(cfg, fit_layers)
        return candidate, reductions, _plan(candidate, dtype, device_type)[0]
    reductions.append(f"layers {total_layers} → 1 (one true-shape layer alone does not fit "
                      f"{budget / GiB:.2f} GiB)")
    base = _with_layers(cfg, 1)
    vocab = int(_text(cfg)["vocab_size"])
    for new_vocab in VOCAB_STEPS:
        if new_vocab >= vocab:
            continue
        candidate = _with_vocab(base, new_vocab)
        need, _ = _plan(candidate, dtype, device_type)
        if need <= budget:
            reductions.append(f"vocab {vocab} → {new_vocab}")
            return candidate, reductions, need
    base = _with_vocab(base, min(vocab, VOCAB_STEPS[-1]))
    if min(vocab, VOCAB_STEPS[-1]) < vocab:
        reductions.append(f"vocab {vocab} → {VOCAB_STEPS[-1]}")
    for divisor in WIDTH_DIVISORS:
        candidate = _with_width(base, divisor)
        need, _ = _plan(candidate, dtype, device_type)
        if need <= budget:
            t = _text(candidate)
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
    from dockyard import SamplingParams

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
    from dockyard import LLM

    if ctx.spec is None or ctx.raw is None:
        return Outcome("skip", "no validated spec (inspect did not pass)")
    from dockyard.onboard.gates.fit import serving_dtype

    spec, machine = ctx.spec, ctx.machine

    dtype = ctx.dtype or serving_dtype(ctx)
    budget, budget_source = memory_budget(ctx)
    layers = min(ctx.options.num_layers or spec.num_hidden_layers, spec.num_hidden_layers)
    # GGUF metadata and config.json alike: the dict ModelSpec was built from.
    raw_cfg = ctx.raw.config
    cfg, reductions, need = choose_config(raw_cfg, layers, budget, dtype, machine.device)
    evidence: dict[str, Any] = {"budget_bytes": budget, "budget_source": budget_source, "dtype": str(dtype)
                                .removeprefix("torch."), "reductions": reductions, "total_layers":
                                spec.num_hidden_layers, "engine": ENGINE}
    if cfg is None:
        return Outcome("fail", f"even the smallest reduction needs {need / GiB:.2f} GiB, more than the "
                               f"{budget / GiB:.2f} GiB budget ({budget_source})", evidence)
    t = _text(cfg)
    true_shapes = not any(r.startswith(("vocab", "width")) for r in reductions)
    run_layers = int(t["num_hidden_layers"])
    evidence.update(layers=run_layers, true_shapes=true_shapes, bytes_needed=need)
    ctx.dummy.update(layers=run_layers, total_layers=spec.num_hidden_layers, true_shapes=true_shapes,
                     reductions=reductions, config=cfg)
    t0 = time.perf_counter()
    engine_kwargs = {"dtype": dtype, "device": machine.device, "load_format": "dummy", "seed": ctx.options.seed,
                     **ENGINE, **ctx.options.impl_kwargs}
    with tempfile.TemporaryDirectory(prefix="dockyard-dummy-") as tmp:
        if reductions:
            config_path = Path(tmp) / "config.json"
            config_path.write_text(json.dumps({**t, "architectures": cfg.get("architectures")}))
            llm = LLM(str(config_path), **engine_kwargs)
        else:
            llm = LLM(ctx.options.model, **engine_kwargs)
        load_s = time.perf_counter() - t0
        num_params = sum(p.numel() for p in llm.model.parameters())
        shapes = {name: list(p.shape) for name, p in llm.model.named_parameters()
                  if ".layers." not in name or ".layers.0." in name}
        request = first_request(llm)
        del llm
    evidence.update(load_seconds=load_s, num_parameters_run=num_params, parameter_shapes=shapes,
                    first_request=request)
    ctx.dummy.update(load_seconds=load_s, first_request=request, num_parameters_run=num_params)
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
