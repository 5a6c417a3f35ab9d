"""Linear layers whose weights stay quantized in memory: GGUF blocks (:class:`GGUFLinear`) and int4 groups
(:class:`Int4Linear`), multiplied by the Triton kernels of :mod:`dockyard.ops.triton_quant`.

Which path a quantized checkpoint takes (:func:`choose_quant_path`): on a CUDA GPU with Triton, in one process,
the projections of attention and dense MLPs (the model's ``fp8_linear_names()``: Linears that are only ever
called) whose checkpoint format is kept become these modules before loading (:func:`convert_to_quant_linears`);
the loaders yield those weights as :class:`~dockyard.ops.quant_format.GGUFBlocks` /
:class:`~dockyard.ops.quant_format.Int4Weight` and :func:`dockyard.weights.loader.load_weights` hands them to
:meth:`QuantLinear.load_quantized`. By default the kept formats are those whose streaming GEMV was measured
faster than the dequantize-on-load path at batch 1 (:data:`GEMV_BEATS_BF16_ON_CUDA`), the rest are dequantized on load;
``DOCKYARD_QUANT_NATIVE=1`` keeps every format the kernels read (an error where they cannot run; on a CPU it is
allowed, and the modules compute with PyTorch on the weight dequantized per call — the reference math, for
tests), ``=0`` none. On a CPU the default dequantizes: reading the weight is not the bottleneck there. The
choice is made at batch 1: from two rows on the kept path is slower than bf16 matmuls (the GEMV decodes the
weight again for each row; more rows dequantize it for cuBLAS), the price of holding a third of the bytes.

A converted module whose checkpoint tensor turns out unquantized (a GGUF file mixes F16/F32 tensors in)
or quantized in a block type the kernels do not read (Q4_1, Q2_K, ...) keeps that weight dense in the model
dtype. ``nbytes()`` is what the module holds, for the memory plan.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from torch import nn

from dockyard.errors import WeightsError
from dockyard.ops.dispatch import fused_ops_enabled, triton_installed
from dockyard.ops.quant_format import GGUFBlocks, Int4Weight, dequantize_int4
from dockyard.weights.gguf_metadata import KERNEL_BLOCK_TYPES

logger = logging.getLogger(__name__)

QUANT_NATIVE_ENV = "DOCKYARD_QUANT_NATIVE"  # auto (default) | 0 (always dequantize on load) | 1 (keep quantized)
KERNEL_GGUF_TYPES = frozenset(int(q) for q in KERNEL_BLOCK_TYPES)  # the GGUF block types the kernels read
INT4_FORMAT = -1  # triton_quant.INT4
KERNEL_FORMATS = frozenset({"int4", *(GGMLQuantizationType(q).name for q in KERNEL_GGUF_TYPES)})
# Whether each format's streaming GEMV beat the dequantize-on-load path (the bf16 weight through dockyard's bf16
# GEMV or cuBLAS, whichever is faster) over a Llama-3.1-8B layer's projections at batch 1 on an H200
# (benchmarks/RESULTS.md, "streaming GEMV"): those that did stay quantized on CUDA by default; the others, whose
# decoding costs more than the bytes they save, are dequantized on load there.
GEMV_BEATS_BF16_ON_CUDA = {"int4": True, "Q4_0": True, "Q4_K": True, "Q5_0": False, "Q8_0": False, "Q5_K": False,
                           "Q6_K": False}
CUDA_DEFAULT_FORMATS = frozenset(f for f, faster in GEMV_BEATS_BF16_ON_CUDA.items() if faster)
CUDA_DEQUANTIZED_FORMATS = KERNEL_FORMATS - CUDA_DEFAULT_FORMATS


def dequantize_gguf(blocks: GGUFBlocks, dtype: torch.dtype) -> torch.Tensor:
    """The real weight [N, K] of GGUF block rows, by the ``gguf`` package, in ``dtype`` on the blocks' device."""
    rows = blocks.data.detach().cpu().numpy()
    values = gguf_dequantize(rows, GGMLQuantizationType(blocks.qtype)).astype(np.float32)
    return torch.from_numpy(values.reshape(blocks.shape)).to(device=blocks.data.device, dtype=dtype)


def dequantize_quantized(value: GGUFBlocks | Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """A quantized checkpoint weight as a dense tensor [N, K] in ``dtype`` (dequantize-on-load)."""
    if isinstance(value, GGUFBlocks):
        return dequantize_gguf(value, dtype)
    return dequantize_int4(value, dtype)


class QuantLinear(nn.Module):
    """A projection whose ``weight`` is loaded by :meth:`load_quantized`: until then an empty uint8
    placeholder (so the strict loader counts it missing when the checkpoint lacks it), then the quantized
    bytes (``is_quantized``), or a dense weight when the checkpoint stored it so. ``bias`` is a plain
    parameter in the model dtype. Subclasses say which quantized layout they take."""

    layout: type = object

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype or torch.get_default_dtype()
        self.weight = nn.Parameter(torch.empty(0, dtype=torch.uint8, device=device), requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=self.dtype, device=device), requires_grad=False)
                     if bias else None)
        self.format: int | None = None  # None: dense weight (or not loaded yet)

    @property
    def is_quantized(self) -> bool:
        return self.format is not None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.format_name()}")

    def format_name(self) -> str:
        if self.format is None:
            return "dense"
        return "int4" if self.format == INT4_FORMAT else GGMLQuantizationType(self.format).name

    def _set_weight(self, tensor: torch.Tensor) -> None:
        self.weight = nn.Parameter(tensor.to(self.weight.device), requires_grad=False)

    def load_quantized(self, value: object, name: str) -> None:
        """Take checkpoint weight ``name``: the subclass's quantized layout, or a dense tensor. Raises
        WeightsError naming it when its shape is not [out_features, in_features]."""
        shape = tuple(value.shape) if isinstance(value, (torch.Tensor, GGUFBlocks)) else (
            (value.out_features, value.in_features) if isinstance(value, Int4Weight) else None)
        if shape != (self.out_features, self.in_features):
            raise WeightsError(f"{name}: checkpoint weight {type(value).__name__} of shape {shape} does not fit "
                               f"the model's projection [{self.out_features}, {self.in_features}]; check that "
                               "the checkpoint belongs to this config")
        if isinstance(value, torch.Tensor):
            self.format = None
            self._set_weight(value.to(self.dtype))
        elif isinstance(value, self.layout):
            self._load_layout(value, name)
        else:
            raise WeightsError(f"{name}: {type(self).__name__} takes {self.layout.__name__} or a dense tensor, "
                               f"not {type(value).__name__}; the loader and the converted modules disagree")

    def _load_layout(self, value: object, name: str) -> None:
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes this module holds (weight as stored, scales, zeros, permutation, bias)."""
        return sum(t.numel() * t.element_size() for t in [*self.parameters(), *self.buffers()])

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The real weight [N, K] in input-feature order, in ``dtype`` (the reference path)."""
        raise NotImplementedError

    def operand(self) -> object:
        """The Triton kernels' view of the quantized weight (``triton_quant.QuantOperand``)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.format is None:
            return F.linear(x, self.weight, self.bias)
        if fused_ops_enabled(x):
            from dockyard.ops.triton_quant import quant_linear  # Triton is an optional dependency

            return quant_linear(x, self.operand(), self.bias, getattr(self, "perm", None))
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)


class GGUFLinear(QuantLinear):
    """A projection holding a GGUF weight's block rows as stored (uint8 [N, bytes per row]) and its type."""

    layout = GGUFBlocks

    def _load_layout(self, value: GGUFBlocks, name: str) -> None:
        if value.qtype not in KERNEL_GGUF_TYPES:
            logger.info("%s: GGUF type %s has no kernel; dequantized on load to %s", name,
                        GGMLQuantizationType(value.qtype).name, self.dtype)
            self.format = None
            self._set_weight(dequantize_gguf(value, self.dtype))
            return
        self.format = int(value.qtype)
        self._set_weight(value.data.contiguous())

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_gguf(GGUFBlocks(self.weight, self.format, (self.out_features, self.in_features)), dtype)

    def operand(self) -> object:
        from dockyard.ops.triton_quant import QuantOperand  # Triton is an optional dependency

        return QuantOperand(self.weight, self.format, (self.out_features, self.in_features))


class Int4Linear(QuantLinear):
    """A projection holding an :class:`Int4Weight`: ``weight`` its packed nibbles, buffers ``scales``,
    ``zeros`` (None: symmetric) and ``perm`` (None: no act-order), and ``group_size``."""

    layout = Int4Weight

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.group_size = 0
        for buffer in ("scales", "zeros", "perm"):
            self.register_buffer(buffer, None)

    def _load_layout(self, value: Int4Weight, name: str) -> None:
        device = self.weight.device
        self.format = INT4_FORMAT
        self.group_size = value.group_size
        self._set_weight(value.packed.contiguous())
        self.scales = value.scales.to(device).contiguous()
        self.zeros = None if value.zeros is None else value.zeros.to(device).contiguous()
        self.perm = None if value.perm is None else value.perm.to(device)

    def as_int4_weight(self) -> Int4Weight:
        return Int4Weight(self.weight, self.scales, self.zeros, self.group_size, self.in_features, self.perm)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_int4(self.as_int4_weight(), dtype)

    def operand(self) -> object:
        from dockyard.ops.triton_quant import INT4, QuantOperand  # Triton is an optional dependency

        return QuantOperand(self.weight, INT4, (self.out_features, self.in_features), self.scales, self.zeros,
                            self.group_size)


def concat_quant_linears(linears: list[nn.Module]) -> QuantLinear | None:
    """One module whose output is the outputs of ``linears`` side by side, holding the same bytes (rows
    concatenated); None where that is not exact: different classes, formats, input sizes, bias presence,
    dense parts, or int4 parts with different group sizes, scale dtypes, zero points or permutations."""
    first = linears[0]
    if not isinstance(first, QuantLinear) or not first.is_quantized:
        return None
    if any(type(lin) is not type(first) or lin.format != first.format or lin.in_features != first.in_features
           or (lin.bias is None) != (first.bias is None) for lin in linears):
        return None
    if isinstance(first, Int4Linear) and any(
            lin.group_size != first.group_size or lin.scales.dtype != first.scales.dtype
            or (lin.zeros is None) != (first.zeros is None) or (lin.perm is None) != (first.perm is None)
            or (lin.perm is not None and not torch.equal(lin.perm, first.perm)) for lin in linears):
        return None
    fused = type(first)(first.in_features, sum(lin.out_features for lin in linears), bias=first.bias is not None,
                        dtype=first.dtype, device=first.weight.device)
    fused.format = first.format
    fused.weight = nn.Parameter(torch.cat([lin.weight.detach() for lin in linears]), requires_grad=False)
    if first.bias is not None:
        fused.bias = nn.Parameter(torch.cat([lin.bias.detach() for lin in linears]), requires_grad=False)
    if isinstance(first, Int4Linear):
        fused.group_size, fused.perm = first.group_size, first.perm
        fused.scales = torch.cat([lin.scales for lin in linears])
        fused.zeros = None if first.zeros is None else torch.cat([lin.zeros for lin in linears])
    return fused


# ---- the choice and the conversion ----

def choose_quant_path(device: torch.device, tp_size: int = 1, assume_gpu: bool = False) -> tuple[frozenset[str], str]:
    """(formats, why): the weight formats (:data:`KERNEL_FORMATS` names) a quantized checkpoint's projections
    keep on ``device``; the others are dequantized on load (an empty set: everything is).

    ``DOCKYARD_QUANT_NATIVE``: ``auto`` (default) keeps :data:`CUDA_DEFAULT_FORMATS` on a CUDA device with Triton
    in one process and nothing elsewhere; ``0`` keeps nothing; ``1`` keeps every format the kernels read on a CUDA
    device with Triton, without tensor parallelism, and raises a WeightsError where that cannot be had, except
    that on a CPU it is allowed (PyTorch reference math, for tests). ``assume_gpu``: plan for a CUDA GPU that is
    not on this machine, taken to have Triton (the device is not probed)."""
    setting = os.environ.get(QUANT_NATIVE_ENV, "auto").strip().lower()
    if setting in ("0", "off", "false", "no"):
        return frozenset(), f"{QUANT_NATIVE_ENV}={setting}"
    forced = setting in ("1", "on", "true", "yes")
    if not forced and setting not in ("auto", ""):
        raise WeightsError(f"{QUANT_NATIVE_ENV}={setting!r} is not one of auto, 0, 1")
    why_not = None
    if tp_size > 1:
        why_not = f"tensor parallelism (tensor_parallel_size={tp_size}) keeps dequantize-on-load for now"
    elif assume_gpu:
        pass
    elif device.type == "cpu":
        if forced:
            return KERNEL_FORMATS, f"forced by {QUANT_NATIVE_ENV}={setting} (PyTorch reference math on the CPU)"
        why_not = "on a CPU reading the weights is not the bottleneck"
    elif device.type != "cuda":
        why_not = f"device {device} is not a CUDA GPU"
    elif not triton_installed():
        why_not = "Triton is not installed"
    where = "assuming a CUDA GPU with Triton" if assume_gpu else f"on {device}"
    if why_not is None and forced:
        return KERNEL_FORMATS, f"quantized-weight kernels {where} ({QUANT_NATIVE_ENV}={setting})"
    if why_not is None:
        return CUDA_DEFAULT_FORMATS, (f"quantized-weight kernels {where} for {', '.join(sorted(CUDA_DEFAULT_FORMATS))}"
                                      f" (faster than bf16 at batch 1); {', '.join(sorted(CUDA_DEQUANTIZED_FORMATS))} "
                                      f"dequantized ({QUANT_NATIVE_ENV}=1 keeps them too)")
    if not forced:
        return frozenset(), f"{why_not}; weights dequantized on load"
    raise WeightsError(f"{QUANT_NATIVE_ENV}={setting} asks to keep weights quantized, but {why_not}; unset it "
                       f"(or set {QUANT_NATIVE_ENV}=0) to dequantize the checkpoint on load")


def convert_to_quant_linears(model: nn.Module, weights: set[str], cls: type[QuantLinear]) -> set[str]:
    """Replace each projection ``nn.Linear`` of ``model`` whose ``<module>.weight`` is in ``weights`` (model
    parameter names) by an empty ``cls`` on the same device and dtype; returns the weight names converted.
    Candidates are the modules the model lists in ``fp8_linear_names()`` (projections only ever called)."""
    candidates = set(getattr(model, "fp8_linear_names", lambda: [])())
    converted: set[str] = set()
    for module_name in sorted(candidates):
        if f"{module_name}.weight" not in weights:
            continue
        linear = model.get_submodule(module_name)
        if type(linear) is not nn.Linear:
            continue
        parent_name, _, attr = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr,
                cls(linear.in_features, linear.out_features, bias=linear.bias is not None, dtype=linear.weight.dtype,
                    device=linear.weight.device))
        converted.add(f"{module_name}.weight")
    return converted


def quant_linear_names(model: nn.Module) -> list[str]:
    """Names of the model's projections that may stay quantized (see :func:`convert_to_quant_linears`)."""
    return list(getattr(model, "fp8_linear_names", lambda: [])())


def uses_quantized_weights(model: nn.Module) -> bool:
    """Whether ``model`` multiplies any weight kept quantized (a loaded :class:`QuantLinear`)."""
    return any(isinstance(m, QuantLinear) and m.is_quantized for m in model.modules())


__all__ = ["GGUFLinear", "Int4Linear", "KERNEL_GGUF_TYPES", "QUANT_NATIVE_ENV", "QuantLinear", "choose_quant_path",
           "concat_quant_linears", "convert_to_quant_linears", "dequantize_gguf", "dequantize_quantized",
           "quant_linear_names", "uses_quantized_weights"]
