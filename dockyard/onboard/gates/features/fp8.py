"""The FP8 trial: the trial model's decoder projections quantized to e4m3 with 128×128 block scales
(``weights/fp8_quantize.py``), written as an FP8 checkpoint and loaded through ``LLM``; its logits against the
unquantized model's within a bound set by a noise control, and which path ran (native FP8 matmul when a
parameter stayed ``float8_e4m3fn``, else dequantized on load). An FP8 checkpoint adds what the real gate
showed on its own weights."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import torch
from safetensors.torch import save_file

from dockyard.dtypes import dtype_name
from dockyard.engine.llm import LLM
from dockyard.onboard.context import GateContext
from dockyard.onboard.gates.features.trial_model import (
    TRIAL_ENGINE,
    Trials,
    dummy_model,
    error_text,
    row,
)
from dockyard.testing import rel_rmse

# The quantizer is looked up on its module at call time (tests replace it there to break it on purpose).
from dockyard.weights import fp8_quantize
from dockyard.weights.fp8_quantize import E4M3_MAX, FP8_BLOCK, FP8_LOGITS_BOUND, fp8_quantization_config

logger = logging.getLogger(__name__)

FP8_NOISE_FACTOR = 3.0  # FP8 logits may move this many times what FP8-sized weight noise moves them ...
FP8_MAX_BOUND = 0.5  # ... but never half as much as the logits themselves (a broken path gives ~1)


def _quantizable(name: str, tensor: torch.Tensor) -> bool:
    """What FP8 checkpoints quantize: the decoder's projections (embeddings, norms, routers and LM head stay)."""
    return tensor.dim() == 2 and name.startswith("model.layers.") and name.endswith("_proj.weight")


def _prefill_logits(model: torch.nn.Module, prompts: list[list[int]], device: torch.device) -> torch.Tensor:
    """Float32 logits of each prompt's uncached prefill, concatenated, on the CPU."""
    with torch.no_grad():
        return torch.cat([model.compute_logits(model(torch.tensor(ids, device=device),
                                                     torch.arange(len(ids), device=device))).float().cpu()
                          for ids in prompts])


def _rounding_rms(weight: torch.Tensor) -> float:
    """Root mean square of what rounding ``weight`` to e4m3 changes (one scale for the whole tensor, in
    float64): the size of FP8's error, worked out apart from the quantizer the trial checks."""
    w = weight.detach().double()
    scale = w.abs().max().clamp(min=1e-12) / E4M3_MAX
    rounded = (w / scale).float().to(torch.float8_e4m3fn).double() * scale
    return float((rounded - w).pow(2).mean().sqrt())


def run_fp8_trial(ctx: GateContext, trials: Trials) -> dict[str, Any]:
    """Quantize the trial model to an FP8 checkpoint, load it through ``LLM``, compare its logits with the
    unquantized model's. Raises when the checkpoint cannot be made; a failed load or forward is
    returned as ``error`` in the evidence.

    The bound: FP8_LOGITS_BOUND (tests/weights/test_fp8.py, a 2-layer Llama) where this model is as
    tolerant, else FP8_NOISE_FACTOR times what a control gives, capped at FP8_MAX_BOUND. The control is
    the unquantized model with Gaussian noise of each weight's e4m3 rounding-error rms added (computed
    apart from the quantizer, so a broken quantizer does not widen the bound): how much
    this architecture's logits move under weight noise of FP8's size (depth, experts whose routing
    flips and attention all amplify it). A broken FP8 path (a lost or misapplied scale, a wrong
    kernel) moves them by about their own size, a ratio near 1.
    """
    device = ctx.machine.device
    dtype = ctx.dtype if device == "cuda" and ctx.dtype is not None else torch.float32
    cpu = torch.device("cpu")
    t0 = time.perf_counter()
    reference = dummy_model(trials.spec, cpu, trials.seed)
    control = dummy_model(trials.spec, cpu, trials.seed)
    noisy = dict(control.named_parameters())
    generator = torch.Generator().manual_seed(trials.seed)
    tensors: dict[str, torch.Tensor] = {}
    quantized = 0
    for name, param in reference.named_parameters():
        weight = param.detach().contiguous()
        if _quantizable(name, weight):
            tensors[name], tensors[name + "_scale_inv"] = fp8_quantize.quantize_fp8_blocks(weight, FP8_BLOCK)
            rms = _rounding_rms(weight)
            with torch.no_grad():
                noisy[name].add_(torch.randn(weight.shape, generator=generator) * rms)
            quantized += 1
        else:
            tensors[name] = weight
    if not quantized:
        raise ValueError("the model has no decoder projection (model.layers.*_proj.weight) to quantize")
    folder = trials.workdir / "fp8"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**trials.config,
                                                    "quantization_config": fp8_quantization_config(FP8_BLOCK)}))
    save_file(tensors, str(folder / "model.safetensors"))
    expected = _prefill_logits(reference, trials.prompts, cpu)
    noise_ratio = rel_rmse(_prefill_logits(control, trials.prompts, cpu), expected)
    bound = min(FP8_MAX_BOUND, max(FP8_LOGITS_BOUND, FP8_NOISE_FACTOR * noise_ratio))
    evidence: dict[str, Any] = {"device": device, "dtype": dtype_name(dtype), "format": "e4m3 (float8_e4m3fn)",
                                "weight_block_size": list(FP8_BLOCK), "scale_name": "weight_scale_inv",
                                "quantized_weights": quantized,
                                "reference": "the same dummy weights unquantized, float32 on the CPU",
                                "noise_control_ratio": noise_ratio, "bound": bound,
                                "bound_rule": f"max({FP8_LOGITS_BOUND}, {FP8_NOISE_FACTOR} × noise control), "
                                              f"at most {FP8_MAX_BOUND}",
                                **trials.setup()}
    logger.info("FP8 trial: %d projections quantized (e4m3, %s blocks), loading at %s on %s; noise control %.3f, "
                "bound %.3f", quantized, "x".join(map(str, FP8_BLOCK)), dtype_name(dtype), device, noise_ratio,
                bound)
    try:
        llm = LLM(str(folder), dtype=dtype, device=device, seed=trials.seed, max_model_len=trials.max_len,
                  **TRIAL_ENGINE, **trials.impl)
        try:
            held = [t for t in (*llm.model.parameters(), *llm.model.buffers()) if t.dtype == torch.float8_e4m3fn]
            logits = _prefill_logits(llm.model, trials.prompts, llm.device)
        finally:
            llm.shutdown()
    except Exception as exc:  # noqa: BLE001 - an FP8 load or forward failure is the finding
        logger.exception("FP8 trial failed")
        evidence.update(error=error_text(exc), seconds=time.perf_counter() - t0)
        return evidence
    ratio = rel_rmse(logits, expected)
    evidence.update(path="native FP8 matmul" if held else "dequantized on load", fp8_tensors_in_memory=len(held),
                    rmse_ratio=ratio, passed=bool(0 < ratio < bound), seconds=time.perf_counter() - t0)
    return evidence


def _checkpoint(ctx: GateContext) -> tuple[str, dict[str, Any]] | None:
    """What this run showed about the onboarded checkpoint's own FP8 weights (None: it is not FP8)."""
    if not any(f.key == "quantized:fp8" for f in ctx.features):
        return None
    fp8 = getattr(ctx.source, "fp8", None)
    evidence: dict[str, Any] = {"weight_block_size": list(fp8.block) if fp8 is not None and fp8.block else None,
                                "loaded_and_checked": False}
    if fp8 is None or not ctx.source.has_real_weights:
        return ("this FP8 checkpoint's own weights were not loaded on this run (dummy weights)", evidence)
    if ctx.real.passed:
        evidence["loaded_and_checked"] = True
        return ("the real gate loaded this FP8 checkpoint (every weight paired with its scale) and checked its "
                "output", evidence)
    return "the real gate did not load and check this FP8 checkpoint on this run (see its row)", evidence


def trial_row(ctx: GateContext, trials: Trials | None, setup_error: str | None) -> dict[str, Any]:
    """The FP8 trial on the trial model, plus the real gate's word on an FP8 checkpoint."""
    checkpoint = _checkpoint(ctx)
    trial: dict[str, Any] | None = None
    if trials is None:
        trial_note = f"FP8 trial could not be set up: {setup_error}"
    else:
        try:
            trial = run_fp8_trial(ctx, trials)
        except Exception as exc:  # noqa: BLE001 - the checkpoint could not even be made: say so
            logger.exception("FP8 trial could not be set up")
            trial_note = f"FP8 trial could not be set up: {error_text(exc)}"
    if trial is not None and "error" in trial:
        trial_note = f"FP8 trial: the quantized checkpoint failed to load or run: {trial['error']}"
    elif trial is not None:
        block = "x".join(map(str, trial["weight_block_size"]))
        verdict = "<" if trial["passed"] else "NOT <"
        trial_note = (f"FP8 trial ({trial['path']}, {trial['dtype']}): the shrunken model's "
                      f"{trial['quantized_weights']} projections quantized to e4m3 with {block} block scales; "
                      f"logits vs the unquantized model's: rmse ratio {trial['rmse_ratio']:.3f} {verdict} bound "
                      f"{trial['bound']:.3f} ({trial['bound_rule']}; noise control "
                      f"{trial['noise_control_ratio']:.3f})")
    checkpoint_ok = checkpoint is not None and checkpoint[1]["loaded_and_checked"]
    if (trial is not None and trial.get("passed")) or checkpoint_ok:
        status = "supported"
    else:
        status = "unsupported" if trial is not None else "not-run"
    checkpoint_note = checkpoint[0] if checkpoint is not None else "the checkpoint itself is not FP8"
    return row("FP8", status, f"{trial_note}; {checkpoint_note}", trial=trial,
               checkpoint=checkpoint[1] if checkpoint is not None else None)

