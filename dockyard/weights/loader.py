"""Copy checkpoint tensors into a model's parameters, accounting for every one of them.

Every checkpoint tensor must land in a parameter and every parameter must be filled; the
error lists each missing and each unexpected name, so a wrong name map can never leave a
parameter at its random initial value silently. A tensor of the wrong shape is named once (not
again as missing); an integer tensor where the model holds floating weights, and a weight with
NaN or infinite values (one ``isfinite().all()`` per tensor as it is copied; off with
``check_finite=False`` or ``DOCKYARD_CHECK_FINITE=0``), are errors naming the tensor.

Weights kept quantized (:class:`~dockyard.ops.quant_format.GGUFBlocks`, :class:`~dockyard.ops.quant_format.Int4Weight`)
go to the :class:`~dockyard.ops.quant_linear.QuantLinear` they belong to (which also takes a dense tensor the
checkpoint stored unquantized); where the model's module is a plain Linear they are dequantized on load.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from dockyard.errors import WeightsError
from dockyard.ops.quant_format import GGUFBlocks, Int4Weight
from dockyard.ops.quant_linear import QuantLinear, dequantize_quantized

# Buffers some checkpoints carry that are recomputed from the config, never loaded.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class LoadReport:
    """What a load consumed: counts and any names that did not match."""

    loaded: int = 0
    bytes_loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def load_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    name_map: Callable[[str], str | None] | None = None,
    strict: bool = True,
    check_finite: bool | None = None,
) -> LoadReport:
    """Load ``(name, tensor)`` pairs into ``model``; raise WeightsError on any mismatch if strict.

    Without ``name_map``, the model's own ``map_checkpoint_name(name) -> str | None`` is used when it
    has one: it turns a published checkpoint name into the model's parameter name (None: not a
    weight of this model, e.g. a vision tower), and leaves the model's own names unchanged.
    ``check_finite`` (None: unless ``DOCKYARD_CHECK_FINITE=0``) refuses NaN and infinite weights.
    """
    if check_finite is None:
        check_finite = os.environ.get("DOCKYARD_CHECK_FINITE", "1") != "0"
    if name_map is None:
        name_map = getattr(model, "map_checkpoint_name", None)
    params = dict(model.named_parameters(remove_duplicate=False))
    filled: set[int] = set()
    report = LoadReport()
    mismatched: list[str] = []
    mismatched_params: set[int] = set()
    not_float: list[str] = []
    not_finite: list[str] = []
    for ckpt_name, tensor in weights:
        name = name_map(ckpt_name) if name_map else ckpt_name
        if name is None or ckpt_name.endswith(IGNORED_SUFFIXES):
            report.ignored.append(ckpt_name)
            continue
        param = params.get(name)
        quantized = isinstance(tensor, (GGUFBlocks, Int4Weight))
        placeholder = param is not None and param.dtype == torch.uint8  # an empty QuantLinear weight
        module = _quant_module(model, name) if quantized or placeholder else None
        if module is not None:
            module.load_quantized(tensor, ckpt_name)
            filled.add(id(param))
            report.loaded += 1
            report.bytes_loaded += module.weight.numel() * module.weight.element_size()
            continue
        if param is None:
            report.unexpected.append(ckpt_name)
            continue
        if quantized:  # a module kept dense: dequantize on load
            tensor = dequantize_quantized(tensor, param.dtype)
        if tuple(tensor.shape) != tuple(param.shape):
            mismatched.append(f"{ckpt_name}: checkpoint {tuple(tensor.shape)} vs model {tuple(param.shape)}")
            mismatched_params.add(id(param))
            continue
        if param.is_floating_point() and not tensor.is_floating_point():
            not_float.append(f"{ckpt_name} ({str(tensor.dtype).removeprefix('torch.')})")
            mismatched_params.add(id(param))
            continue
        with torch.no_grad():
            param.copy_(tensor)
        # Native FP8 weights (1 byte) are skipped: isfinite has no float8 kernel on every device.
        if check_finite and param.is_floating_point() and param.element_size() > 1 \
                and not bool(torch.isfinite(param).all()):
            not_finite.append(ckpt_name)
        if id(param) not in filled:
            filled.add(id(param))
            report.loaded += 1
            report.bytes_loaded += param.numel() * param.element_size()
    report.missing = [n for n, p in params.items() if id(p) not in filled and id(p) not in mismatched_params]
    if not_float:
        raise WeightsError("checkpoint tensors hold integers where the model has floating-point weights: "
                           + ", ".join(not_float) + "; the checkpoint is quantized in a format dockyard does not "
                           "read, or is not a weights file for this model")
    if not_finite:
        raise WeightsError(f"checkpoint tensors hold NaN or infinite values ({len(not_finite)}): "
                           + ", ".join(not_finite) + "; the checkpoint is corrupt (re-download it), or load "
                           "anyway with DOCKYARD_CHECK_FINITE=0")
    if strict and (mismatched or report.missing or report.unexpected):
        parts = []
        if mismatched:
            parts.append("shape mismatch: " + "; ".join(mismatched))
        if report.missing:
            parts.append(f"missing from checkpoint ({len(report.missing)}): " + ", ".join(report.missing))
        if report.unexpected:
            parts.append(
                f"unexpected in checkpoint ({len(report.unexpected)}): " + ", ".join(report.unexpected)
            )
        raise WeightsError(
            "checkpoint does not match the model: " + " | ".join(parts)
            + "; check that config.json belongs to these weights"
        )
    return report


def _quant_module(model: nn.Module, name: str) -> QuantLinear | None:
    """The :class:`QuantLinear` whose ``weight`` parameter ``name`` is, or None."""
    if not name.endswith(".weight"):
        return None
    try:
        module = model.get_submodule(name[: -len(".weight")])
    except AttributeError:
        return None
    return module if isinstance(module, QuantLinear) else None
