"""MXFP4 checkpoints (gpt-oss as published): the expert weights kept as stored, or dequantized on load.

The format is :mod:`dockyard.ops.mxfp4_format`'s (gpt-oss's ``quantization_config.quant_method: mxfp4``):
each expert weight ``X`` comes as ``X_blocks`` (e2m1 nibbles) and ``X_scales`` (e8m0, one per 32 values).
Modules named in ``modules_to_not_convert`` (attention, router, embeddings, lm_head) are stored in bf16 and
pass through unchanged.

:func:`choose_mxfp4_path` decides where the experts stay MXFP4: on a CUDA GPU of compute capability 9.0 or
later (Hopper) with Triton, the fused MoE kernel can dequantize them in registers (``ops/triton_moe.py``), so
the model holds 4.25 bits per expert weight instead of 16. ``DOCKYARD_QUANT_NATIVE`` (the switch of every
quantized-weight path, ``ops.quant_linear``) chooses: ``1`` keeps them there (and on a CPU, where the experts
compute with PyTorch on weights dequantized per call: the reference math, for tests), ``0`` dequantizes them
on load to the model's dtype, and ``auto`` (the default) does what :data:`MXFP4_KEPT_BY_DEFAULT` says: for now
dequantize, since the MXFP4 kernel is still slower than the bf16 one (benchmarks/RESULTS.md) — keeping them
pays where memory is short (gpt-oss-120b on one 141 GB GPU).

:func:`dequantize_mxfp4` wraps a safetensors stream: each ``…_blocks`` is paired with its ``…_scales`` (in
any order, across shards) and comes out as the plain ``…`` weight in the model's dtype, except the pairs
named in ``keep``, which pass through as stored (checked); an unpaired or mis-shaped tensor is a
``WeightsError`` naming it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from dockyard.engine_args import MXFP4_METHOD
from dockyard.errors import WeightsError
from dockyard.ops.dispatch import triton_installed
from dockyard.ops.mxfp4_format import BLOCKS_SUFFIX, SCALES_SUFFIX, check_mxfp4_pair, dequantize_mxfp4_tensor
from dockyard.ops.quant_linear import QUANT_NATIVE_ENV

# The fused MoE kernel's MXFP4 variant has been measured on Hopper (benchmarks/RESULTS.md); older GPUs dequantize.
MXFP4_KERNEL_CAPABILITY = (9, 0)
# Whether ``auto`` keeps the experts MXFP4 where the kernel runs: not while it is slower than the bf16 fused MoE
# on the dequantized experts (benchmarks/RESULTS.md), so keeping them pays only where memory is short.
MXFP4_KEPT_BY_DEFAULT = False


def choose_mxfp4_path(device: torch.device, tp_size: int = 1, assume_gpu: bool = False) -> tuple[bool, str]:
    """(keep, why): whether an MXFP4 checkpoint's experts stay MXFP4 on ``device`` (module docstring).
    ``assume_gpu``: plan for a CUDA GPU that is not on this machine, taken to be a Hopper with Triton."""
    setting = os.environ.get(QUANT_NATIVE_ENV, "auto").strip().lower()
    if setting in ("0", "off", "false", "no"):
        return False, f"{QUANT_NATIVE_ENV}={setting}"
    if setting not in ("auto", "", "1", "on", "true", "yes"):
        raise WeightsError(f"{QUANT_NATIVE_ENV}={setting!r} is not one of auto, 0, 1")
    forced = setting not in ("auto", "")
    if not forced and not MXFP4_KEPT_BY_DEFAULT:
        return False, (f"the MXFP4 fused MoE kernel is slower than the bf16 one for now; {QUANT_NATIVE_ENV}=1 keeps "
                       "the experts MXFP4 on a Hopper GPU (less memory)")
    why_not = None
    if tp_size > 1:
        why_not = f"tensor parallelism (tensor_parallel_size={tp_size}) keeps dequantize-on-load"
    elif assume_gpu:
        return True, "MXFP4 experts in the fused MoE kernel, assuming a Hopper GPU with Triton"
    elif device.type == "cpu" and forced:
        return True, f"forced by {QUANT_NATIVE_ENV}={setting} (PyTorch reference math on the CPU)"
    elif device.type != "cuda":
        why_not = f"device {device} is not a CUDA GPU"
    elif not triton_installed():
        why_not = "Triton is not installed"
    elif torch.cuda.get_device_capability(device) < MXFP4_KERNEL_CAPABILITY:
        why_not = (f"the GPU's compute capability {torch.cuda.get_device_capability(device)} is older than Hopper "
                   f"{MXFP4_KERNEL_CAPABILITY}")
    if why_not is None:
        return True, f"MXFP4 experts dequantized in the fused MoE kernel on {device}"
    if forced:
        raise WeightsError(f"{QUANT_NATIVE_ENV}={setting} asks to keep the MXFP4 experts, but {why_not}; unset it "
                           f"(or set {QUANT_NATIVE_ENV}=0) to dequantize them on load")
    return False, why_not


def source_mxfp4_path(source: Any, device: torch.device, tp_size: int = 1, assume_gpu: bool = False
                      ) -> tuple[bool, str] | None:
    """:func:`choose_mxfp4_path` for a ``model_source.ModelSource`` whose experts may be held MXFP4: an MXFP4
    checkpoint (or its config with dummy weights) on dockyard's own gpt-oss classes; None for any other."""
    if source.quantization != MXFP4_METHOD or source.kind == "gguf" or source.spec.model_impl != "dockyard":
        return None
    return choose_mxfp4_path(device, tp_size, assume_gpu)


def mxfp4_held_weights(model: nn.Module) -> frozenset[str]:
    """The weights ``X`` that ``model`` holds as MXFP4 parameters ``X_blocks`` / ``X_scales`` (uint8)."""
    params = dict(model.named_parameters())
    return frozenset(name.removesuffix(BLOCKS_SUFFIX) for name, p in params.items()
                     if name.endswith(BLOCKS_SUFFIX) and p.dtype == torch.uint8
                     and name.removesuffix(BLOCKS_SUFFIX) + SCALES_SUFFIX in params)


def dequantize_mxfp4(weights: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype,
                     keep: frozenset[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
    """The stream with every ``X_blocks`` / ``X_scales`` pair replaced by the dequantized ``X``, except for the
    ``X`` in ``keep`` (checkpoint names), whose pair passes through as stored; other tensors pass through."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        for suffix in (BLOCKS_SUFFIX, SCALES_SUFFIX):
            if name.endswith(suffix):
                base = name[: -len(suffix)]
                parts = pending.setdefault(base, {})
                if suffix in parts:
                    raise WeightsError(f"{name} appears twice in the checkpoint")
                parts[suffix] = tensor
                if len(parts) == 2:
                    del pending[base]
                    blocks, scales = parts[BLOCKS_SUFFIX], parts[SCALES_SUFFIX]
                    if base in keep:
                        check_mxfp4_pair(blocks, scales, base)
                        yield base + BLOCKS_SUFFIX, blocks
                        yield base + SCALES_SUFFIX, scales
                    else:
                        yield base, dequantize_mxfp4_tensor(blocks, scales, dtype, base)
                break
        else:
            yield name, tensor
    if pending:
        missing = [base + (SCALES_SUFFIX if BLOCKS_SUFFIX in parts else BLOCKS_SUFFIX)
                   for base, parts in sorted(pending.items())]
        raise WeightsError(f"MXFP4 checkpoint: {len(missing)} tensor(s) missing their pair: {', '.join(missing)} "
                           "(each weight is stored as <name>_blocks with <name>_scales); the checkpoint is incomplete")
