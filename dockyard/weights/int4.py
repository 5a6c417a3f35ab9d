"""int4 weight-only checkpoints (AWQ, GPTQ, compressed-tensors ``pack-quantized``) read into one layout.

Each format stores a quantized Linear ``X`` as a few tensors beside each other (its ``quantization_config`` is
read without torch into :class:`~dockyard.weights.quant_config.Int4Config`); :func:`read_int4` pairs them
strictly (a missing or an extra piece names the tensor) and turns each module into the shared
:class:`~dockyard.ops.quant_format.Int4Weight` (4-bit codes, a scale and a zero point per group of input
columns, an optional input permutation). The stream then carries ``X.weight``: the ``Int4Weight`` itself
for the checkpoint names the caller asks to keep quantized (the GPU kernels load those), else its
dequantization (:func:`~dockyard.ops.quant_format.dequantize_int4`) in the model dtype. Every other tensor
(norms, embeddings, biases, unquantized layers) passes through unchanged.

The formats, as their packers write them (``N`` = out_features, ``K`` = in_features, ``G`` = groups):

- **AWQ** (AutoAWQ, ``version: gemm``): ``qweight`` int32 [K, N/8] packed along the *output* dimension,
  nibble ``i`` (bits 4i..4i+3) of word ``c`` holding output column ``8c + AWQ_PACK_ORDER[i]``; ``qzeros``
  int32 [G, N/8] packed the same way; ``scales`` [G, N]. Real weight ``(q - zero) * scale``.
- **GPTQ** (AutoGPTQ / GPTQModel): ``qweight`` int32 [K/8, N] packed along the *input* dimension (nibble
  ``i`` of row ``r`` is input row ``8r + i``); ``qzeros`` int32 [G, N/8] packed along the output dimension
  in order; ``scales`` [G, N]; ``g_idx`` int32 [K], the group of each input row. ``checkpoint_format``
  ``gptq`` (v1) stores each zero point minus one, ``gptq_v2`` stores it as is. With ``desc_act`` the
  groups follow the activation order: the input rows sorted by ``g_idx`` (stably) are the stored columns
  of :class:`Int4Weight`, the sort order its ``perm``. ``group_size: -1`` is one group per row.
- **compressed-tensors** ``pack-quantized`` int4: ``weight_packed`` int32 [N, ceil(K/8)] packed along the
  input dimension, each signed value ``q`` in [-8, 7] stored as ``q + 8``; ``weight_scale`` [N, G];
  ``weight_zero_point`` (asymmetric only) int32 [ceil(N/8), G] packed along the output dimension the same
  way; ``weight_shape`` [2]; ``weight_g_idx`` [K] with ``actorder: group``. Real weight ``(q - zp) * scale``.

MoE expert banks (one Linear per expert in these checkpoints) are always dequantized on load: the
model stacks them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from dockyard.errors import WeightsError
from dockyard.ops.quant_format import INT4_SYMMETRIC_ZERO, Int4Weight, dequantize_int4
from dockyard.weights.quant_config import Int4Config, Int4Scheme
from dockyard.weights.safetensors_dir import safetensors_files

logger = logging.getLogger(__name__)

AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ's GEMM packing: nibble i holds column 8c + AWQ_PACK_ORDER[i]
_NIBBLE_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # bit offset of nibble i of an int32 word


# ---- unpacking ----

def _nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] → int16 [R, C, 8]: nibble i of each word (bits 4i..4i+3), as values 0..15."""
    return ((words.to(torch.int32).unsqueeze(-1) >> _NIBBLE_SHIFTS.to(words.device)) & 0xF).to(torch.int16)


def _awq_columns(words: torch.Tensor) -> torch.Tensor:
    """AWQ's int32 [R, N/8] packed along columns → int16 [R, N] in column order."""
    nib = _nibbles(words)
    out = torch.empty_like(nib)
    out[..., list(AWQ_PACK_ORDER)] = nib
    return out.reshape(words.shape[0], -1)


def _pack_pairs(codes: torch.Tensor) -> torch.Tensor:
    """int codes 0..15 [N, K] → :class:`Int4Weight`'s uint8 [N, ceil(K/2)], low nibble first."""
    codes = codes.to(torch.uint8)
    if codes.shape[1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def _expect_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    if tuple(tensor.shape) != shape:
        raise WeightsError(f"{name} has shape {tuple(tensor.shape)}, but {what} needs {shape}; the checkpoint does "
                           "not match its quantization_config (group size, packing): re-download or re-export it")


def _permutation(g_idx: torch.Tensor, group_size: int, name: str) -> torch.Tensor | None:
    """The input order that makes ``g_idx``'s groups contiguous (None: already in order), checked to give
    every group ``group_size`` members (the last may have fewer)."""
    g_idx = g_idx.to(torch.int64)
    perm = torch.argsort(g_idx, stable=True)
    in_order = torch.arange(g_idx.numel(), device=g_idx.device)
    want = in_order // group_size
    if not torch.equal(g_idx[perm], want):
        raise WeightsError(f"{name} does not assign {group_size} input rows to each group (group_size); the "
                           "checkpoint does not match its quantization_config: re-download or re-export it")
    return None if torch.equal(perm, in_order) else perm


def _g_idx_permutation(name: str, g_idx: torch.Tensor, in_features: int, group_size: int, act_order: bool
                       ) -> torch.Tensor | None:
    """The permutation a module's ``g_idx`` stands for (None: in order), refused when the config has no
    activation order but the rows are reordered."""
    _expect_shape(name, g_idx, (in_features,), "one group index per input row")
    perm = _permutation(g_idx, group_size, name)
    if perm is not None and not act_order:
        raise WeightsError(f"{name} reorders the input rows, but quantization_config says the checkpoint has no "
                           "activation order (desc_act / actorder); fix config.json")
    return perm


def _stored_order(codes: torch.Tensor, scheme: Int4Scheme, group_size: int, g_idx: tuple[str, torch.Tensor] | None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Codes [N, K] in input order → (codes in stored order, perm) given the module's ``g_idx``."""
    if g_idx is None:
        return codes, None
    perm = _g_idx_permutation(*g_idx, codes.shape[1], group_size, scheme.act_order)
    return (codes, None) if perm is None else (codes[:, perm], perm)


def _groups(k: int, group_size: int | None) -> tuple[int, int]:
    size = group_size or k
    return size, -(-k // size)


def awq_to_int4(module: str, parts: dict[str, torch.Tensor], scheme: Int4Scheme) -> Int4Weight:
    """One AWQ GEMM module's qweight / qzeros / scales as an :class:`Int4Weight`."""
    qweight, qzeros, scales = parts["qweight"], parts["qzeros"], parts["scales"]
    k, n = qweight.shape[0], qweight.shape[1] * 8
    size, groups = _groups(k, scheme.group_size)
    _expect_shape(f"{module}.qzeros", qzeros, (groups, n // 8), f"{module}.qweight {tuple(qweight.shape)}")
    _expect_shape(f"{module}.scales", scales, (groups, n), f"{module}.qweight {tuple(qweight.shape)}")
    codes = _awq_columns(qweight).T
    zeros = _awq_columns(qzeros).T
    return Int4Weight(_pack_pairs(codes), scales.T.contiguous(), zeros.to(torch.uint8).contiguous(), size, k)


def gptq_to_int4(module: str, parts: dict[str, torch.Tensor], scheme: Int4Scheme, zeros_minus_one: bool
                 ) -> Int4Weight:
    """One GPTQ module's qweight / qzeros / scales (/ g_idx) as an :class:`Int4Weight`."""
    qweight, qzeros, scales = parts["qweight"], parts["qzeros"], parts["scales"]
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    size, groups = _groups(k, scheme.group_size)
    _expect_shape(f"{module}.qzeros", qzeros, (groups, n // 8), f"{module}.qweight {tuple(qweight.shape)}")
    _expect_shape(f"{module}.scales", scales, (groups, n), f"{module}.qweight {tuple(qweight.shape)}")
    codes = _nibbles(qweight.T).reshape(n, k)  # qweight.T [N, K/8]: nibble i of column r is input row 8r + i
    zeros = _nibbles(qzeros).reshape(groups, n).T + int(zeros_minus_one)
    if int(zeros.max()) > 15:
        raise WeightsError(f"{module}.qzeros holds a zero point of 16 (stored as 15 in the v1 'gptq' format, which "
                           "keeps zero - 1): int4 cannot represent it; re-export the checkpoint in the gptq_v2 format")
    g_idx = (f"{module}.g_idx", parts["g_idx"]) if "g_idx" in parts else None
    codes, perm = _stored_order(codes, scheme, size, g_idx)
    sym = scheme.symmetric and bool((zeros == INT4_SYMMETRIC_ZERO).all())
    return Int4Weight(_pack_pairs(codes), scales.T.contiguous(), None if sym else zeros.to(torch.uint8).contiguous(),
                      size, k, perm)


def compressed_tensors_to_int4(module: str, parts: dict[str, torch.Tensor], scheme: Int4Scheme) -> Int4Weight:
    """One compressed-tensors pack-quantized module as an :class:`Int4Weight`."""
    packed, scales, shape = parts["weight_packed"], parts["weight_scale"], parts["weight_shape"]
    if shape.numel() != 2:
        raise WeightsError(f"{module}.weight_shape={shape.tolist()} is not a 2-D shape; re-export the checkpoint")
    n, k = (int(v) for v in shape.tolist())
    size, groups = _groups(k, scheme.group_size)
    _expect_shape(f"{module}.weight_packed", packed, (n, -(-k // 8)), f"weight_shape {[n, k]}")
    _expect_shape(f"{module}.weight_scale", scales, (n, groups), f"weight_shape {[n, k]}")
    codes = _nibbles(packed).reshape(n, -1)[:, :k]  # stored as q + 8: the codes of Int4Weight already
    zeros = None
    if "weight_zero_point" in parts:
        zp = parts["weight_zero_point"]
        _expect_shape(f"{module}.weight_zero_point", zp, (-(-n // 8), groups), f"weight_shape {[n, k]}")
        zeros = _nibbles(zp.T).reshape(groups, -1)[:, :n].T.to(torch.uint8).contiguous()
    g_idx = (f"{module}.weight_g_idx", parts["weight_g_idx"]) if "weight_g_idx" in parts else None
    codes, perm = _stored_order(codes, scheme, size, g_idx)
    return Int4Weight(_pack_pairs(codes), scales.contiguous(), zeros, size, k, perm)


def _required(config: Int4Config, scheme: Int4Scheme) -> set[str]:
    if config.method == "compressed-tensors":
        need = {"weight_packed", "weight_scale", "weight_shape"}
        need |= set() if scheme.symmetric else {"weight_zero_point"}
        return need | ({"weight_g_idx"} if scheme.act_order else set())
    need = {"qweight", "qzeros", "scales"}
    return need | ({"g_idx"} if config.method == "gptq" and scheme.act_order else set())


def _allowed(config: Int4Config, scheme: Int4Scheme) -> set[str]:
    """The pieces a module may carry: its required ones plus an in-order ``g_idx`` (GPTQ and compressed-tensors
    write one even without an activation order)."""
    optional = {"awq": set(), "gptq": {"g_idx"}, "compressed-tensors": {"weight_g_idx"}}[config.method]
    return _required(config, scheme) | optional


def to_int4(config: Int4Config, module: str, parts: dict[str, torch.Tensor]) -> Int4Weight:
    """The :class:`Int4Weight` of quantized module ``module`` from its checkpoint ``parts`` (by suffix)."""
    scheme = config.scheme_for(module)
    if config.method == "awq":
        return awq_to_int4(module, parts, scheme)
    if config.method == "gptq":
        return gptq_to_int4(module, parts, scheme, config.zeros_minus_one)
    return compressed_tensors_to_int4(module, parts, scheme)


def _split(name: str, pieces: tuple[str, ...]) -> tuple[str, str] | None:
    module, _, suffix = name.rpartition(".")
    return (module, suffix) if module and suffix in pieces else None


def checkpoint_int4_weights(model_dir: str | Path, config: Int4Config) -> set[str]:
    """The ``X.weight`` names of the modules a safetensors checkpoint stores as int4 (read from the headers
    only): what a caller may pass as ``keep_quantized`` to :func:`read_int4`."""
    first_piece = "weight_packed" if config.method == "compressed-tensors" else "qweight"
    names: set[str] = set()
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            names.update(n[: -len(first_piece)] + "weight" for n in f.keys() if n.endswith("." + first_piece))
    return names


def read_int4(weights: Iterable[tuple[str, torch.Tensor]], config: Int4Config, dtype: torch.dtype,
              keep_quantized: set[str] | None = None, device: torch.device | None = None
              ) -> Iterator[tuple[str, torch.Tensor | Int4Weight]]:
    """Wrap a checkpoint's ``(name, tensor)`` stream: each quantized module ``X`` comes out once as
    ``X.weight``: an :class:`Int4Weight` when ``X.weight`` is in ``keep_quantized``, else dequantized to
    ``dtype``. Other tensors pass through unchanged.

    Pieces may come in any order and from any shard. A module missing a piece, carrying one its
    method does not have (or a zero point a symmetric scheme does not), or stored both quantized and as a
    plain ``X.weight`` raises WeightsError naming the tensors. ``device``: where the pieces are unpacked and
    dequantized (the model's; a GPU does it far faster than the host), None: where they were read."""
    keep = keep_quantized or set()
    waiting: dict[str, dict[str, torch.Tensor]] = {}
    done: dict[str, tuple[int, int]] = {}  # converted module -> (in_features, group size)
    plain: set[str] = set()
    dequantized = kept = 0
    for name, tensor in weights:
        split = _split(name, config.pieces)
        if split is None:
            if name.endswith(".weight") and name[: -len(".weight")] in done | waiting.keys():
                raise WeightsError(f"{name} is stored unquantized beside the int4 pieces of the same module; the "
                                   "checkpoint mixes files from different exports: re-download it")
            plain.add(name)
            yield name, tensor
            continue
        module, suffix = split
        if module + ".weight" in plain:
            raise WeightsError(f"{name} is an int4 piece of {module}, whose {module}.weight is stored unquantized; "
                               "the checkpoint mixes files from different exports: re-download it")
        scheme = config.scheme_for(module)
        if suffix not in _allowed(config, scheme):
            raise WeightsError(f"{name}: a {config.method} module with this quantization_config "
                               f"({_describe(scheme)}) has no {suffix!r} tensor; the checkpoint does not match "
                               "its config.json: re-export it")
        if module in done:
            if suffix in _required(config, scheme) or suffix not in _allowed(config, scheme):
                raise WeightsError(f"{name} appears twice in the checkpoint; re-download it")
            # An optional g_idx after the rest: it must keep the input rows in order, as already assumed.
            _g_idx_permutation(name, tensor, *done[module], act_order=False)
            continue
        parts = waiting.setdefault(module, {})
        if suffix in parts:
            raise WeightsError(f"{name} appears twice in the checkpoint; re-download it")
        parts[suffix] = tensor if device is None else tensor.to(device)  # converted where the model lives
        if not _required(config, scheme) <= parts.keys():
            continue
        del waiting[module]
        weight = to_int4(config, module, parts)
        done[module] = (weight.in_features, weight.group_size)
        if module + ".weight" in keep:
            kept += 1
            yield module + ".weight", weight
        else:
            dequantized += 1
            yield module + ".weight", dequantize_int4(weight, dtype)
    if waiting:
        raise WeightsError(
            f"int4 checkpoint ({config.method}) is not strictly paired: "
            + "; ".join(f"{m} has {', '.join(sorted(p))} but no "
                        f"{', '.join(sorted(_required(config, config.scheme_for(m)) - p.keys()))}"
                        for m, p in sorted(waiting.items()))
            + "; the checkpoint is incomplete or mixes exports: re-download it")
    logger.info("%s int4 checkpoint: %d modules dequantized on load to %s, %d kept as int4", config.method,
                dequantized, dtype, kept)


def _describe(scheme: Int4Scheme) -> str:
    group = f"group_size {scheme.group_size}" if scheme.group_size else "one group per row"
    return f"{group}, {'symmetric' if scheme.symmetric else 'zero points'}" + (", act order" if scheme.act_order
                                                                               else "")
