"""FP8 KV cache: keys and values stored as float8 e4m3 with one float32 scale per tensor per layer.

The format is vLLM's: a layer's cache holds ``e4m3(clamp(x / scale, ±448))`` and a read is the e4m3
value times ``scale``, with one scale for K and one for V per attention layer (``Attention.k_scale``,
``Attention.v_scale``, 0-dim float32 tensors on the model's device, read by the kernels through a
pointer so captured CUDA graphs see the calibrated values). Where the scales come from:

- the checkpoint, when it stores them beside each attention block (``…self_attn.k_scale`` /
  ``v_scale``, ``…k_proj.output_scale`` / ``v_proj.output_scale``, or one ``…self_attn.kv_scale`` for
  both: the names vLLM reads, written by llm-compressor and ModelOpt exports); :func:`split_kv_scales`
  takes them out of the weight stream before the strict load;
- else calibration at start-up, vLLM's ``calculate_kv_scales`` rule: one forward pass (no cache)
  over ``CALIBRATION_TOKENS`` seeded token ids, scale = max|x| / ``K_SCALE_HEADROOM`` for keys and
  max|x| / ``V_SCALE_HEADROOM`` for values, so later values up to 448 / 200 = 2.24× (keys) and
  4.48× (values) the calibrated maximum still fit; larger ones saturate at ±448.

Scales are per tensor, so a tensor-parallel rank's slice of heads shares its layer's scales.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from dockyard import engine_args
from dockyard.errors import ConfigError, WeightsError
from dockyard.ops.fp8_format import E4M3_MAX, FP8_DTYPE

# ``--kv-cache-dtype`` choices → the cache's storage dtype (None: the model's dtype).
KV_CACHE_DTYPES: dict[str, torch.dtype | None] = {
    name: None if name == "auto" else FP8_DTYPE for name in engine_args.KV_CACHE_DTYPES}
# vLLM's K_SCALE_CONSTANT and V_SCALE_CONSTANT: calibrated scale = amax / headroom.
K_SCALE_HEADROOM = 200.0
V_SCALE_HEADROOM = 100.0
CALIBRATION_TOKENS = 256


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV cache's storage dtype for ``--kv-cache-dtype name``."""
    try:
        chosen = KV_CACHE_DTYPES[name]
    except KeyError:
        raise ConfigError(f"kv_cache_dtype={name!r} is not one of {', '.join(KV_CACHE_DTYPES)}") from None
    return model_dtype if chosen is None else chosen


def latent_cache_refusal(model_name: str, choice: str) -> ConfigError:
    """The error for an FP8 cache asked of a model that caches one latent per token (MLA): not supported."""
    return ConfigError(f"{model_name}: kv_cache_dtype={choice!r} is not supported for its KV cache of one latent per "
                       "token (multi-head latent attention); use --kv-cache-dtype auto")


def is_fp8(cache: torch.Tensor) -> bool:
    """Whether a KV cache tensor stores e4m3 values (and so needs its layer's scales)."""
    return cache.dtype == FP8_DTYPE


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` / ``scale`` rounded to e4m3 (nearest even), saturated at ±448 instead of overflowing to NaN."""
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)


def dequantize(cache: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Cached entries in ``dtype``: e4m3 values times ``scale``; a cache in a float dtype as it is."""
    if not is_fp8(cache):
        return cache.to(dtype)
    assert scale is not None, "an FP8 KV cache read without its scale"
    return (cache.float() * scale).to(dtype)


# ---------------------------------------------------------------- scales from the checkpoint
# Checkpoint name suffix beside an attention block → which scales it gives.
_SCALE_SUFFIXES = {
    ".k_scale": ("k",), ".v_scale": ("v",), ".kv_scale": ("k", "v"),
    ".k_proj.output_scale": ("k",), ".v_proj.output_scale": ("v",),
}


def _scale_target(name: str) -> tuple[str, tuple[str, ...]] | None:
    """(the attention block's checkpoint prefix, which scales) of a KV-scale tensor name, else None."""
    for suffix, kinds in _SCALE_SUFFIXES.items():
        if name.endswith(suffix) and ".self_attn" in name:
            return name[: -len(suffix)], kinds
    return None


def split_kv_scales(weights: Iterable[tuple[str, torch.Tensor]], found: dict[str, dict[str, float]]
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """The weight stream without its KV-cache scales, which are collected into ``found``
    (``{attention block prefix: {"k": scale, "v": scale}}``) as they pass."""
    for name, tensor in weights:
        target = _scale_target(name)
        if target is None:
            yield name, tensor
            continue
        if tensor.numel() != 1:
            raise WeightsError(f"{name}: a KV-cache scale must hold one value (one scale per tensor), got shape "
                               f"{tuple(tensor.shape)}; dockyard reads per-tensor FP8 KV scales only")
        value = float(tensor.float().reshape(()))
        if not value > 0 or value == float("inf"):
            raise WeightsError(f"{name} = {value}: a KV-cache scale must be positive and finite")
        prefix, kinds = target
        for kind in kinds:
            found.setdefault(prefix, {})[kind] = value


def apply_kv_scales(model: nn.Module, found: dict[str, dict[str, float]]) -> int:
    """Give each attention layer the checkpoint's scales for it; returns how many layers got them.

    ``found`` is keyed by checkpoint prefix (``model.layers.3.self_attn``), renamed by the model's
    ``map_checkpoint_name``; the layer is the paged attention module (one with ``set_kv_scales``) at
    that path or directly under it. A layer given only one of K and V, or a prefix where the model has
    no attention layer, is a ``WeightsError``."""
    modules = dict(model.named_modules())
    mapper = getattr(model, "map_checkpoint_name", None)
    count = 0
    for prefix, scales in found.items():
        mapped = mapper(prefix + ".k_scale") if mapper is not None else prefix + ".k_scale"
        if mapped is None:  # not part of the text model (a vision tower's attention)
            continue
        module = modules.get(mapped.removesuffix(".k_scale"))
        candidates = [module, *(module.children() if module is not None else ())]
        layer = next((m for m in candidates if hasattr(m, "set_kv_scales")), None)
        if layer is None:
            raise WeightsError(f"{prefix}: the checkpoint has KV-cache scales for it, but the model has no "
                               "attention layer there; check that config.json belongs to these weights")
        if set(scales) != {"k", "v"}:
            raise WeightsError(f"{prefix}: the checkpoint has a KV-cache scale for {'K' if 'k' in scales else 'V'} "
                               "only; an FP8 KV cache needs both (k_scale and v_scale)")
        layer.set_kv_scales(scales["k"], scales["v"], source="checkpoint")
        count += 1
    return count


# ---------------------------------------------------------------- calibration
_CALIBRATING = False


def calibrating() -> bool:
    """Whether a calibration pass is running (attention layers then record their K and V maxima)."""
    return _CALIBRATING


@contextlib.contextmanager
def calibration() -> Iterator[None]:
    """Within: every cache-less attention forward raises its layer's scales to cover what it sees."""
    global _CALIBRATING
    previous, _CALIBRATING = _CALIBRATING, True
    try:
        yield
    finally:
        _CALIBRATING = previous


def calibration_scale(x: torch.Tensor, headroom: float) -> torch.Tensor:
    """amax(|x|) / headroom as a float32 scalar (a tiny floor keeps an all-zero tensor's scale positive)."""
    return (x.detach().abs().amax().float() / headroom).clamp_min(1e-8)


__all__ = ["CALIBRATION_TOKENS", "K_SCALE_HEADROOM", "KV_CACHE_DTYPES", "V_SCALE_HEADROOM",
           "apply_kv_scales", "calibrating", "calibration", "calibration_scale", "dequantize", "is_fp8", "quantize",
           "resolve_kv_cache_dtype", "split_kv_scales"]
