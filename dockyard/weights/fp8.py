"""FP8 checkpoints (``quantization_config.quant_method == "fp8"``): pair each FP8 weight with its scale,
then dequantize it on load to the model dtype, or keep it FP8 for the native matmul.

A quantized weight ``X.weight`` is stored as ``torch.float8_e4m3fn`` beside a float scale named
``X.weight_scale_inv`` (DeepSeek-V3, Qwen3-FP8) or ``X.weight_scale``; either way the real weight is
``weight.float() * scale``. The config (:class:`~dockyard.weights.quant_config.FP8Config`, read without torch)
says how the scale is laid out: with ``weight_block_size
[bn, bk]`` it holds one value per bn × bk block (``(ceil(rows / bn), ceil(cols / bk))``, the last
blocks ragged when a dimension is not a multiple of the block); without it, one value for the whole
tensor or one per output row. Pairing is strict: an FP8 weight without its scale, a scale without
its FP8 weight, or a scale of the wrong shape is a :class:`WeightsError` naming the tensors.

Two paths (:func:`choose_fp8_path`): :func:`dequantize_fp8` (everywhere; weights in memory at the model
dtype) and :func:`native_fp8` (CUDA with FP8 tensor cores, one process): the projections of attention
and dense MLPs become :class:`~dockyard.ops.fp8_linear.Fp8Linear` modules
(:func:`convert_to_fp8_linears`) that receive the checkpoint's e4m3 bytes and scales unchanged, and
multiply with the FP8 kernel; any other FP8 weight is still dequantized.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dockyard.errors import WeightsError
from dockyard.ops.fp8_linear import GROUP, Fp8Linear, native_fp8_unavailable
from dockyard.weights.quant_config import FP8Config
from dockyard.weights.safetensors_dir import safetensors_files

logger = logging.getLogger(__name__)

# Scale names, tried in this order: "X.weight_scale_inv" and "X.weight_scale" both belong to "X.weight".
SCALE_SUFFIXES = ("weight_scale_inv", "weight_scale")
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)


def storage_dtype(config: FP8Config) -> torch.dtype:
    """The torch dtype ``config``'s quantized weights are stored in."""
    return getattr(torch, config.storage_dtype_name)


def scale_owner(name: str) -> str | None:
    """The weight name a scale tensor belongs to ("X.weight_scale_inv" -> "X.weight"), None if not a scale."""
    for suffix in SCALE_SUFFIXES:
        if name == suffix or name.endswith("." + suffix):
            return name[: -len(suffix)] + "weight"
    return None


def check_scale_shape(weight_name: str, weight: torch.Tensor, scale_name: str, scale: torch.Tensor,
                      config: FP8Config) -> None:
    """Raise WeightsError naming both tensors unless ``scale`` fits ``weight`` under ``config``."""
    rows = weight.shape[0] if weight.dim() else 1
    if config.block is not None:
        bn, bk = config.block
        if weight.dim() != 2:
            raise WeightsError(
                f"FP8 weight {weight_name} has shape {tuple(weight.shape)}, but weight_block_size "
                f"{list(config.block)} scales need a 2-D weight; the checkpoint does not match its config.json"
            )
        want = (math.ceil(weight.shape[0] / bn), math.ceil(weight.shape[1] / bk))
        if tuple(scale.shape) == want:
            return
        expected = f"{want} (one per {bn}x{bk} block)"
    else:
        if scale.numel() == 1 or tuple(scale.shape) in ((rows,), (rows, 1)):
            return
        expected = f"() or (1,) per tensor, or ({rows},) / ({rows}, 1) per output row"
    raise WeightsError(
        f"scale {scale_name} has shape {tuple(scale.shape)}, but FP8 weight {weight_name} of shape "
        f"{tuple(weight.shape)} needs {expected} under quantization_config.weight_block_size="
        f"{list(config.block) if config.block else None}; the scale does not belong to this weight, or "
        "config.json's weight_block_size does not match the checkpoint: re-download or re-export it"
    )


def dequantize(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None,
               dtype: torch.dtype) -> torch.Tensor:
    """``weight.float() * scale`` with the scale expanded over its blocks (ragged at the edges), as ``dtype``.

    ``block`` None: ``scale`` is one value, or one per output row. The product is computed in float32.
    """
    w = weight.float()
    scale = scale.float()
    if block is None:
        out = w * (scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1, *([1] * (w.dim() - 1))))
        return out.to(dtype)
    (rows, cols), (bn, bk) = w.shape, block
    gr, gc = scale.shape
    # Pad to whole blocks, view each block as its own (bn, bk) tile, scale the tiles, crop the padding.
    padded = F.pad(w, (0, gc * bk - cols, 0, gr * bn - rows))
    tiles = padded.view(gr, bn, gc, bk).mul_(scale.view(gr, 1, gc, 1))
    return tiles.view(gr * bn, gc * bk)[:rows, :cols].to(dtype)


def _paired(weights: Iterable[tuple[str, torch.Tensor]], config: FP8Config) -> Iterator[
        tuple[str, torch.Tensor, str | None, torch.Tensor | None]]:
    """The pairing behind :func:`dequantize_fp8` and :func:`native_fp8`: yields ``(name, tensor, None, None)``
    for every plain tensor and ``(weight_name, fp8_weight, scale_name, scale)`` for every FP8 weight once
    its scale has come (shape checked); raises WeightsError on any pairing problem."""
    weights_waiting: dict[str, torch.Tensor] = {}  # FP8 weights whose scale has not come yet
    scales_waiting: dict[str, tuple[str, torch.Tensor]] = {}  # weight name -> (scale name, scale)
    plain: dict[str, torch.dtype] = {}  # names (and dtypes) of tensors passed through, for error messages
    paired: dict[str, str] = {}  # FP8 weight name -> the scale it was paired with

    def pair(weight_name: str, weight: torch.Tensor, scale_name: str, scale: torch.Tensor
             ) -> tuple[str, torch.Tensor, str, torch.Tensor]:
        check_scale_shape(weight_name, weight, scale_name, scale, config)
        paired[weight_name] = scale_name
        return weight_name, weight, scale_name, scale

    for name, tensor in weights:
        owner = scale_owner(name)
        if owner is not None:
            first = scales_waiting[owner][0] if owner in scales_waiting else paired.get(owner)
            if first is not None:
                raise WeightsError(
                    f"FP8 weight {owner} has two scales, {first} and {name}; a checkpoint carries one scale "
                    "per weight: re-export it"
                )
            if owner in plain:
                raise WeightsError(
                    f"scale {name} belongs to {owner}, which is stored as {plain[owner]}, not FP8; the "
                    "checkpoint's weights and scales do not match: re-download or re-export it"
                )
            if owner in weights_waiting:
                yield pair(owner, weights_waiting.pop(owner), name, tensor)
            else:
                scales_waiting[owner] = (name, tensor)
        elif tensor.dtype in FP8_DTYPES:
            if tensor.dtype != storage_dtype(config):
                raise WeightsError(
                    f"FP8 weight {name} is stored as {tensor.dtype}, but quantization_config.fmt={config.fmt!r} "
                    f"means {storage_dtype(config)}; fix config.json's fmt or re-export the checkpoint"
                )
            if name in scales_waiting:
                scale_name, scale = scales_waiting.pop(name)
                yield pair(name, tensor, scale_name, scale)
            else:
                weights_waiting[name] = tensor
        else:
            if name in scales_waiting:
                raise WeightsError(
                    f"scale {scales_waiting[name][0]} belongs to {name}, which is stored as {tensor.dtype}, "
                    "not FP8; the checkpoint's weights and scales do not match: re-download or re-export it"
                )
            plain[name] = tensor.dtype
            yield name, tensor, None, None
    problems = []
    if weights_waiting:
        problems.append(
            f"FP8 weights without a scale ({len(weights_waiting)}): "
            + ", ".join(f"{n} (no {n}_scale_inv or {n}_scale)" for n in sorted(weights_waiting))
        )
    if scales_waiting:
        problems.append(
            f"scales without an FP8 weight ({len(scales_waiting)}): "
            + ", ".join(f"{s} (no {n} in the checkpoint)" for n, (s, _) in sorted(scales_waiting.items()))
        )
    if problems:
        raise WeightsError(
            "FP8 checkpoint is not strictly paired: " + " | ".join(problems)
            + "; every FP8 weight needs its scale and every scale its weight: the checkpoint is incomplete or "
            "mixes files from different exports; re-download it"
        )


def dequantize_fp8(weights: Iterable[tuple[str, torch.Tensor]], config: FP8Config,
                   dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Wrap a checkpoint's ``(name, tensor)`` stream: each FP8 weight comes out dequantized to ``dtype``
    under its own name, its scale is consumed, every other tensor passes through unchanged.

    A weight and its scale may come in either order (or from different shards); a missing scale, an
    orphan scale, a second scale for one weight, a scale beside a non-FP8 weight, an FP8 weight of
    another format than the config's, or a misshapen scale raises WeightsError naming the tensors.
    """
    for name, tensor, _, scale in _paired(weights, config):
        yield name, (tensor if scale is None else dequantize(tensor, scale, config.block, dtype))


# ---- the native path: FP8 weights kept as they are, in dockyard.ops.fp8_linear.Fp8Linear modules ----

FP8_NATIVE_ENV = "DOCKYARD_FP8_NATIVE"  # auto (default) | 0 (always dequantize) | 1 (native, or an error)
NATIVE_SCALE_SUFFIX = "weight_scale_inv"  # the Fp8Linear parameter every checkpoint scale is loaded into


def native_block(config: FP8Config, in_features: int) -> tuple[int, int]:
    """The scale block an :class:`~dockyard.ops.fp8_linear.Fp8Linear` uses for ``config``: its
    weight_block_size, else (1, in_features): one scale per output row (per-tensor scales repeated)."""
    return config.block if config.block is not None else (1, in_features)


def scale_grid(weight: torch.Tensor, scale: torch.Tensor, config: FP8Config) -> torch.Tensor:
    """A checkpoint scale as the float32 grid of :func:`native_block`: a block grid as is, a per-output-row
    scale as a column (rows, 1), a per-tensor scale repeated into that column. The values are unchanged."""
    scale = scale.float()
    if config.block is not None:
        return scale.contiguous()
    rows = weight.shape[0]
    return (scale.reshape(1, 1).expand(rows, 1) if scale.numel() == 1 else scale.reshape(rows, 1)).contiguous()


def choose_fp8_path(config: FP8Config, device: torch.device, tp_size: int = 1,
                    assume_fp8_gpu: bool = False) -> tuple[bool, str]:
    """(native, why): whether an FP8 checkpoint's projections stay FP8 on ``device``.

    ``DOCKYARD_FP8_NATIVE``: ``auto`` (default) is native on a CUDA device with FP8 tensor cores
    (compute capability >= 8.9) and Triton, without tensor parallelism, for scale blocks the kernel
    takes; ``0`` always dequantizes on load; ``1`` asks for native and raises a WeightsError where it
    cannot be had, except that on a CPU it is allowed (Fp8Linear then computes the same quantized
    math with PyTorch, slowly: for tests). ``assume_fp8_gpu``: plan for a CUDA GPU that is not on this
    machine, taken to have FP8 tensor cores and Triton (the device is not probed)."""
    setting = os.environ.get(FP8_NATIVE_ENV, "auto").strip().lower()
    if setting in ("0", "off", "false", "no"):
        return False, f"{FP8_NATIVE_ENV}={setting}"
    if setting not in ("auto", "", "1", "on", "true", "yes"):
        raise WeightsError(f"{FP8_NATIVE_ENV}={setting!r} is not one of auto, 0, 1")
    forced = setting != "auto" and setting != ""
    why_not = None
    if tp_size > 1:
        why_not = f"tensor parallelism (tensor_parallel_size={tp_size}) keeps dequantize-on-load for now"
    elif config.block is not None and config.block[1] % GROUP:
        why_not = (f"weight_block_size {list(config.block)}: the FP8 kernel needs scale blocks whose width is a "
                   f"multiple of {GROUP}")
    elif not (forced and device.type == "cpu") and not assume_fp8_gpu:
        why_not = native_fp8_unavailable(device)
    if why_not is None:
        if assume_fp8_gpu:
            return True, ("FP8 kernel, assuming a GPU with FP8 tensor cores (compute capability >= 8.9); on an "
                          "older GPU the checkpoint is dequantized on load")
        return True, ("forced by " + FP8_NATIVE_ENV + "=1 (PyTorch reference math on the CPU)"
                      if device.type == "cpu" else f"FP8 kernel on {device}")
    if forced:
        raise WeightsError(f"{FP8_NATIVE_ENV}={setting} asks for native FP8 matmuls, but {why_not}; unset it "
                           f"(or set {FP8_NATIVE_ENV}=0) to dequantize the checkpoint on load")
    return False, why_not


def checkpoint_fp8_weights(model_dir: str | Path) -> set[str]:
    """Names of the weights in a safetensors checkpoint that carry a scale (read from the headers only)."""
    from safetensors import safe_open

    names: set[str] = set()
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            names.update(owner for owner in map(scale_owner, f.keys()) if owner is not None)
    return names


def convert_to_fp8_linears(model: nn.Module, fp8_weights: set[str], config: FP8Config,
                           dtype: torch.dtype) -> set[str]:
    """Replace each projection Linear of ``model`` whose checkpoint weight is in ``fp8_weights`` (checkpoint
    names) by an empty :class:`~dockyard.ops.fp8_linear.Fp8Linear` on the same device; returns the checkpoint
    names converted (their weights and scales are then loaded as they are, see :func:`native_fp8`).

    Only the modules the model lists in ``fp8_linear_names()`` (projections that are only ever called)
    are candidates; FP8 weights of other modules (MoE expert banks, MLA) stay dequantized on load."""
    candidates = set(getattr(model, "fp8_linear_names", lambda: [])())
    name_map = getattr(model, "map_checkpoint_name", lambda n: n)
    converted: set[str] = set()
    for ckpt_name in sorted(fp8_weights):
        mapped = name_map(ckpt_name)
        if mapped is None or not mapped.endswith(".weight") or mapped[: -len(".weight")] not in candidates:
            continue
        module_name = mapped[: -len(".weight")]
        linear = model.get_submodule(module_name)
        if type(linear) is not nn.Linear:
            continue
        parent_name, _, attr = module_name.rpartition(".")
        fp8 = Fp8Linear(linear.in_features, linear.out_features, native_block(config, linear.in_features),
                        bias=linear.bias is not None, bias_dtype=dtype, device=linear.weight.device)
        setattr(model.get_submodule(parent_name), attr, fp8)
        converted.add(ckpt_name)
    left = sorted(fp8_weights - converted)
    if left:
        logger.info("FP8 checkpoint: %d FP8 weights outside the FP8 projections (%s, ...) dequantized on load to %s: "
                    "MoE expert banks and MLA take no FP8 weights yet", len(left), left[0], dtype)
    return converted


def native_fp8(weights: Iterable[tuple[str, torch.Tensor]], config: FP8Config, native: set[str],
               dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Like :func:`dequantize_fp8` (same strict pairing), but the FP8 weights named in ``native`` come out as
    stored, followed by their scale as ``<prefix>.weight_scale_inv`` in the grid layout of :func:`scale_grid`
    (a checkpoint's ``weight_scale`` and ``weight_scale_inv`` both multiply); the rest are dequantized."""
    for name, tensor, _, scale in _paired(weights, config):
        if scale is None:
            yield name, tensor
        elif name in native:
            yield name, tensor
            yield name[: -len("weight")] + NATIVE_SCALE_SUFFIX, scale_grid(tensor, scale, config)
        else:
            yield name, dequantize(tensor, scale, config.block, dtype)
