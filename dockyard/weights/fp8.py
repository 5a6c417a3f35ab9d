"""FP8 checkpoints (``quantization_config.quant_method == "fp8"``): pair each FP8 weight with its scale
and dequantize it on load to the model dtype.

A quantized weight ``X.weight`` is stored as ``torch.float8_e4m3fn`` beside a float scale named
``X.weight_scale_inv`` (DeepSeek-V3, Qwen3-FP8) or ``X.weight_scale``; either way the real weight is
``weight.float() * scale``. The config says how the scale is laid out: with ``weight_block_size
[bn, bk]`` it holds one value per bn × bk block (``(ceil(rows / bn), ceil(cols / bk))``, the last
blocks ragged when a dimension is not a multiple of the block); without it, one value for the whole
tensor or one per output row. Pairing is strict: an FP8 weight without its scale, a scale without
its FP8 weight, or a scale of the wrong shape is a :class:`WeightsError` naming the tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dockyard.errors import WeightsError

# Scale names, tried in this order: "X.weight_scale_inv" and "X.weight_scale" both belong to "X.weight".
SCALE_SUFFIXES = ("weight_scale_inv", "weight_scale")
FORMATS = {"e4m3": torch.float8_e4m3fn}  # quantization_config.fmt -> the dtype its weights are stored in
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)


@dataclass(frozen=True)
class FP8Config:
    """What an fp8 ``quantization_config`` says about its weights."""

    block: tuple[int, int] | None = None  # weight_block_size; None: per-tensor or per-channel scales
    fmt: str = "e4m3"

    @property
    def storage_dtype(self) -> torch.dtype:
        return FORMATS[self.fmt]

    @classmethod
    def from_quantization_config(cls, quant: dict[str, Any], where: str | Path) -> FP8Config:
        """Validate an fp8 ``quantization_config``; refuse what dequantize-on-load cannot honour."""
        fmt = quant.get("fmt") or "e4m3"
        if fmt not in FORMATS:
            raise WeightsError(
                f"{where}: quantization_config.fmt={fmt!r} is not supported; dockyard loads FP8 checkpoints "
                f"stored as {', '.join(FORMATS)} ({', '.join(str(d) for d in FORMATS.values())}); use such a "
                "checkpoint, an unquantized one, or --load-format dummy"
            )
        scheme = quant.get("activation_scheme") or "dynamic"
        if scheme != "dynamic":
            raise WeightsError(
                f"{where}: quantization_config.activation_scheme={scheme!r} is not supported; dockyard "
                "dequantizes FP8 weights on load and keeps activations in the model dtype, which honours "
                "only 'dynamic' activation scaling (static input scales would be ignored); use a checkpoint "
                "with activation_scheme 'dynamic', an unquantized one, or --load-format dummy"
            )
        block = quant.get("weight_block_size")
        if block is None:
            return cls(None, fmt)
        if (not isinstance(block, (list, tuple)) or len(block) != 2
                or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
            raise WeightsError(
                f"{where}: quantization_config.weight_block_size={block!r} must be two positive integers "
                "[rows, cols] (or absent for per-tensor / per-channel scales); fix config.json"
            )
        return cls((block[0], block[1]), fmt)


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


def dequantize_fp8(weights: Iterable[tuple[str, torch.Tensor]], config: FP8Config,
                   dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Wrap a checkpoint's ``(name, tensor)`` stream: each FP8 weight comes out dequantized to ``dtype``
    under its own name, its scale is consumed, every other tensor passes through unchanged.

    A weight and its scale may come in either order (or from different shards); a missing scale, an
    orphan scale, a second scale for one weight, a scale beside a non-FP8 weight, an FP8 weight of
    another format than the config's, or a misshapen scale raises WeightsError naming the tensors.
    """
    weights_waiting: dict[str, torch.Tensor] = {}  # FP8 weights whose scale has not come yet
    scales_waiting: dict[str, tuple[str, torch.Tensor]] = {}  # weight name -> (scale name, scale)
    plain: dict[str, torch.dtype] = {}  # names (and dtypes) of tensors passed through, for error messages
    paired: dict[str, str] = {}  # FP8 weight name -> the scale it was dequantized with

    def pair(weight_name: str, weight: torch.Tensor, scale_name: str, scale: torch.Tensor) -> torch.Tensor:
        check_scale_shape(weight_name, weight, scale_name, scale, config)
        paired[weight_name] = scale_name
        return dequantize(weight, scale, config.block, dtype)

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
                yield owner, pair(owner, weights_waiting.pop(owner), name, tensor)
            else:
                scales_waiting[owner] = (name, tensor)
        elif tensor.dtype in FP8_DTYPES:
            if tensor.dtype != config.storage_dtype:
                raise WeightsError(
                    f"FP8 weight {name} is stored as {tensor.dtype}, but quantization_config.fmt={config.fmt!r} "
                    f"means {config.storage_dtype}; fix config.json's fmt or re-export the checkpoint"
                )
            if name in scales_waiting:
                scale_name, scale = scales_waiting.pop(name)
                yield name, pair(name, tensor, scale_name, scale)
            else:
                weights_waiting[name] = tensor
        else:
            if name in scales_waiting:
                raise WeightsError(
                    f"scale {scales_waiting[name][0]} belongs to {name}, which is stored as {tensor.dtype}, "
                    "not FP8; the checkpoint's weights and scales do not match: re-download or re-export it"
                )
            plain[name] = tensor.dtype
            yield name, tensor
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
