"""AWQ's and GPTQ's published int4 packing, written independently of dockyard (plain integer arithmetic).

The packers of the int4 loader tests (``test_int4.py``) and of ``benchmarks/int4_load.py``: random 4-bit
codes, float16 scales and zero points per group, and the float64 reference weight ``(q - zero) * scale``
with each input row's group taken from the drawn ``g_idx``; compressed-tensors checkpoints are packed by
compressed-tensors' own ``pack_to_int32``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file

QUANTIZED = re.compile(r"^model\.layers\.\d+\..*_proj\.weight$")  # every layer projection is quantized


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values held in int64 → the int32 with the same bits."""
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def _pack_columns(values: torch.Tensor, order: list[int]) -> torch.Tensor:
    """int [R, C] (0..15) → int32 [R, C/8]: nibble i of word c holds column 8c + order[i]."""
    rows, cols = values.shape
    words = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for c in range(cols // 8):
        for i in range(8):
            words[:, c] |= values[:, 8 * c + order[i]].to(torch.int64) << (4 * i)
    return _to_int32(words)


def _pack_rows(values: torch.Tensor) -> torch.Tensor:
    """int [R, C] → int32 [R/8, C]: nibble i of row r holds row 8r + i (GPTQ's qweight)."""
    rows, cols = values.shape
    words = torch.zeros(rows // 8, cols, dtype=torch.int64)
    for r in range(rows // 8):
        for i in range(8):
            words[r] |= values[8 * r + i].to(torch.int64) << (4 * i)
    return _to_int32(words)


AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def draw_int4(n: int, k: int, group: int, symmetric: bool, act_order: bool, gen: torch.Generator,
          min_zero: int = 0) -> SimpleNamespace:
    """Random codes [N, K], float16 scales and zero points [N, G] (from ``min_zero``: GPTQ v1 stores zero - 1
    in a nibble, so it cannot hold 0), a g_idx [K] (a permutation's groups with act order), and the float64
    reference weight."""
    groups = k // group
    codes = torch.randint(0, 16, (n, k), generator=gen)
    zeros = torch.full((n, groups), 8) if symmetric else torch.randint(min_zero, 16, (n, groups), generator=gen)
    scales = (torch.rand(n, groups, generator=gen) * 0.5 + 0.75) * (k ** -0.5 / 4)
    scales = scales.to(torch.float16)
    if act_order:
        order = torch.randperm(k, generator=gen)
        g_idx = torch.empty(k, dtype=torch.int64)
        g_idx[order] = torch.arange(k) // group
    else:
        g_idx = torch.arange(k) // group
    ref = (codes.double() - zeros.double()[:, g_idx]) * scales.double()[:, g_idx]
    return SimpleNamespace(codes=codes, zeros=zeros, scales=scales, g_idx=g_idx, ref=ref)


def awq_tensors(d: SimpleNamespace) -> dict[str, torch.Tensor]:
    return {"qweight": _pack_columns(d.codes.T, AWQ_ORDER), "qzeros": _pack_columns(d.zeros.T, AWQ_ORDER),
            "scales": d.scales.T.contiguous()}


def gptq_tensors(d: SimpleNamespace, v1: bool = True) -> dict[str, torch.Tensor]:
    stored_zeros = d.zeros - 1 if v1 else d.zeros
    return {"qweight": _pack_rows(d.codes.T), "qzeros": _pack_columns(stored_zeros.T, list(range(8))),
            "scales": d.scales.T.contiguous(), "g_idx": d.g_idx.to(torch.int32)}


def ct_tensors(d: SimpleNamespace, symmetric: bool, act_order: bool) -> dict[str, torch.Tensor]:
    """compressed-tensors' pack-quantized tensors, packed by compressed-tensors itself."""
    # compressed-tensors is a test dependency the GPU machine lacks; only its tests pack with it.
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    out = {"weight_packed": pack_to_int32((d.codes - 8).to(torch.int8), 4),
           "weight_scale": d.scales.contiguous(), "weight_shape": torch.tensor(list(d.codes.shape))}
    if not symmetric:
        out["weight_zero_point"] = pack_to_int32((d.zeros - 8).to(torch.int8), 4, packed_dim=0)
    if act_order:
        out["weight_g_idx"] = d.g_idx.to(torch.int32)
    return out


def ct_config(group: int, symmetric: bool, act_order: bool) -> dict:
    weights = {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": group,
               "actorder": "group" if act_order else None, "dynamic": False}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
            "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None}}}


# (method, group size, symmetric, act order, v1 zeros): each a checkpoint
VARIANTS = {
    "awq-g64": ("awq", 64, False, False, True),
    "gptq-sym-g128": ("gptq", 128, True, False, True),
    "gptq-asym-desc_act-g64": ("gptq", 64, False, True, True),
    "gptq_v2-asym-g32": ("gptq", 32, False, False, False),
    "ct-sym-g128": ("compressed-tensors", 128, True, False, True),
    "ct-asym-g64": ("compressed-tensors", 64, False, False, True),
    # actorder "group" (weight_g_idx): published checkpoints have it; compressed-tensors 0.20 no longer writes it
    "ct-asym-actorder-g32": ("compressed-tensors", 32, False, True, True),
}
MOE_VARIANTS = ("awq-g64", "gptq-asym-desc_act-g64", "ct-asym-actorder-g32")


def quant_config(method: str, group: int, symmetric: bool, act_order: bool, v1: bool) -> dict:
    if method == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}
    if method == "gptq":
        return {"quant_method": "gptq", "bits": 4, "group_size": group, "sym": symmetric, "desc_act": act_order,
                "checkpoint_format": "gptq" if v1 else "gptq_v2"}
    return ct_config(group, symmetric, act_order)


def write_int4(directory: Path, config: dict, state: dict[str, torch.Tensor], variant: str,
               gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Quantize every layer projection of ``state`` under ``variant``; write the checkpoint; return the float64
    reference weights by name."""
    method, group, symmetric, act_order, v1 = VARIANTS[variant]
    tensors, refs = {}, {}
    for name, w in state.items():
        if not QUANTIZED.match(name):
            tensors[name] = w
            continue
        module = name[: -len(".weight")]
        d = draw_int4(*w.shape, group, symmetric, act_order, gen, min_zero=int(method == "gptq" and v1))
        parts = (awq_tensors(d) if method == "awq" else gptq_tensors(d, v1) if method == "gptq"
                 else ct_tensors(d, symmetric, act_order))
        tensors.update({f"{module}.{k}": v for k, v in parts.items()})
        refs[name] = d.ref
    directory.mkdir(parents=True)
    config = dict(config, quantization_config=quant_config(method, group, symmetric, act_order, v1),
                  torch_dtype="float16")
    (directory / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(directory / "model.safetensors"))
    return refs
