"""Copy checkpoint tensors into a model's parameters, accounting for every one of them.

Every checkpoint tensor must land in a parameter and every parameter must be filled; the
error lists each missing and each unexpected name, so a wrong name map can never leave a
parameter at its random initial value silently.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from dockyard.errors import WeightsError

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
) -> LoadReport:
    """Load ``(name, tensor)`` pairs into ``model``; raise WeightsError on any mismatch if strict.

    Without ``name_map``, the model's own ``map_checkpoint_name(name) -> str | None`` is used when it
    has one: it turns a published checkpoint name into the model's parameter name (None: not a
    weight of this model, e.g. a vision tower), and leaves the model's own names unchanged.
    """
    if name_map is None:
        name_map = getattr(model, "map_checkpoint_name", None)
    params = dict(model.named_parameters(remove_duplicate=False))
    filled: set[int] = set()
    report = LoadReport()
    mismatched: list[str] = []
    for ckpt_name, tensor in weights:
        name = name_map(ckpt_name) if name_map else ckpt_name
        if name is None or ckpt_name.endswith(IGNORED_SUFFIXES):
            report.ignored.append(ckpt_name)
            continue
        param = params.get(name)
        if param is None:
            report.unexpected.append(ckpt_name)
            continue
        if tuple(tensor.shape) != tuple(param.shape):
            mismatched.append(f"{ckpt_name}: checkpoint {tuple(tensor.shape)} vs model {tuple(param.shape)}")
            continue
        with torch.no_grad():
            param.copy_(tensor)
        if id(param) not in filled:
            filled.add(id(param))
            report.loaded += 1
            report.bytes_loaded += param.numel() * param.element_size()
    report.missing = [n for n, p in params.items() if id(p) not in filled]
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
