"""The quantization a checkpoint uses and what dockyard does with it, as the fit and features gates report it.

One verdict per model: ``scheme`` (a GGUF file's llama.cpp type and block formats, or the
``quantization_config`` in words, ``config_features.quantization_scheme``), ``handling`` (``native``: kept
as stored and computed on in that form; ``dequantized``: expanded to the run dtype on load; ``refused``:
dockyard does not load it; ``none``: an unquantized checkpoint) and ``why``, from the same decisions the
engine takes (the memory plan's storage, ``run_plan.fp8_path``, ``engine_args.QUANTIZATION_METHODS``).
"""

from __future__ import annotations

from dockyard.engine_args import MXFP4_METHOD, QUANTIZATION_METHODS
from dockyard.memory import MXFP4_HELD, MemoryPlan
from dockyard.model_source import ModelSource
from dockyard.onboard.config_features import Feature
from dockyard.run_plan import RunTarget, fp8_path

HANDLINGS = ("native", "dequantized", "refused", "none")


def quantization_verdict(source: ModelSource, features: list[Feature], plan: MemoryPlan,
                         target: RunTarget) -> dict[str, str]:
    """``{"scheme", "handling", "why"}`` for ``source`` (its config ``features``) run as ``plan`` on ``target``."""
    dummy = "" if source.has_real_weights else " (this run uses dummy weights; that is what real ones get)"
    if source.gguf is not None:
        scheme = source.gguf.quantization_name()
        kept = [k for k in plan.weight_bytes_by_dtype if k.startswith("GGUF ")]
        if kept:
            return {"scheme": scheme, "handling": "native", "why": plan.weight_format + dummy}
        return {"scheme": scheme, "handling": "dequantized",
                "why": f"every tensor dequantized to {plan.dtype} on load by the gguf package{dummy}"}
    quantized = [f for f in features if f.key.startswith("quantized:")]
    if not quantized:
        return {"scheme": "none", "handling": "none",
                "why": f"an unquantized checkpoint ({source.spec.torch_dtype}), held in {plan.dtype}"}
    method = quantized[0].key.split(":", 1)[1]
    scheme = quantized[0].detail or method
    if method == "fp8" and source.fp8 is not None:
        native, why = fp8_path(source, target)
        return {"scheme": scheme, "handling": "native" if native else "dequantized",
                "why": f"{plan.weight_format}: {why}{dummy}"}
    if method == MXFP4_METHOD and MXFP4_HELD in plan.weight_bytes_by_dtype:  # experts kept (weights.mxfp4)
        return {"scheme": scheme, "handling": "native", "why": f"{plan.weight_format}{dummy}"}
    if method in QUANTIZATION_METHODS:
        kept = "int4+scales" in plan.weight_bytes_by_dtype  # int4 projections held as int4 (memory.kept_int4_weights)
        return {"scheme": scheme, "handling": "native" if kept else "dequantized",
                "why": f"{plan.weight_format}{dummy}"}
    return {"scheme": scheme, "handling": "refused",
            "why": f"dockyard does not load quant_method {method!r} checkpoints yet (it loads "
                   f"{', '.join(QUANTIZATION_METHODS)}); the architecture runs on dummy weights only"}
