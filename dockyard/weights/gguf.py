"""GGUF tensors under HF names, dequantized to torch or kept as blocks (the metadata: :mod:`.gguf_metadata`).

- **tensor names**: :meth:`GGUFFile.name_map` for each parameter name of the model being loaded (dockyard's
  native model's by default, :func:`native_parameter_names`); GGUF names it does not know are yielded unchanged.
- **tensor transforms**: transformers' tensor processors (``TENSOR_PROCESSORS``): llama.cpp's q/k row
  order for rotary pairs undone for ``llama``, Gemma's norms stored as ``w + 1`` turned back into ``w``,
  Qwen-MoE's shared-expert gate given its row dimension.

GGUF lists dims fastest-first; tensors come out in HF's [out, in] layout. Weights named in
``keep_quantized`` come as :class:`~dockyard.ops.quant_format.GGUFBlocks` (the raw block rows, with the same
row order transforms applied to whole rows) for the GPU kernels that dequantize in-kernel
(:data:`~dockyard.weights.gguf_metadata.KERNEL_BLOCK_TYPES` lists the block formats they read).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from gguf.quants import dequantize
from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

from dockyard.errors import WeightsError
from dockyard.ops.quant_format import GGUFBlocks
from dockyard.registry import build_model
from dockyard.spec import ModelSpec
from dockyard.weights.gguf_metadata import CONFIG_TENSORS, KERNEL_BLOCK_TYPES, GGUFFile


def native_parameter_names(gguf: GGUFFile) -> list[str]:
    """The parameter names of dockyard's native model for ``gguf`` (built on the meta device)."""
    with torch.device("meta"):
        model = build_model(ModelSpec.from_hf_config(gguf.hf_config()))
    return list(model.state_dict())


def iter_tensors(gguf: GGUFFile, dtype: torch.dtype = torch.float32, keep_quantized: frozenset[str] = frozenset(),
                 hf_names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor | GGUFBlocks]]:
    """Yield ``(hf_name, tensor)`` for every tensor of ``gguf``, dequantized to ``dtype`` in HF layout; the HF
    names in ``keep_quantized`` (see :meth:`GGUFFile.kernel_quantized_weights`) as :class:`GGUFBlocks` instead.

    ``hf_names``: the parameter names of the model being loaded (default: dockyard's native model's).
    GGUF names the map does not know are yielded unchanged, so the loader reports them as unexpected;
    rope factor tensors (``rope_freqs``, Phi-3's ``rope_factors_long/short``) are part of the config
    (:meth:`GGUFFile.hf_config`), not weights.
    """
    cfg = gguf.hf_config()
    processor = TENSOR_PROCESSORS.get(gguf.architecture, TensorProcessor)(config=cfg)
    targets = gguf.name_map(native_parameter_names(gguf) if hf_names is None else hf_names)
    for t in gguf.tensors:
        if t.name in CONFIG_TENSORS:
            continue
        dests = targets.get(t.name, [(t.name, None)])
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if any(hf_name in keep_quantized for hf_name, _ in dests):
            yield from _blocks(gguf, t, shape, dests, processor)
            continue
        try:
            array = dequantize(t.data, t.tensor_type)
        except NotImplementedError as exc:
            raise WeightsError(
                f"{gguf.path}: tensor {t.name!r} has GGML type {t.tensor_type.name}, which dockyard cannot "
                "dequantize; use a GGUF quantized as Q4_0, Q4_1, Q8_0, a K-quant, F16, BF16 or F32"
            ) from exc
        array = np.ascontiguousarray(array).reshape(shape)
        array = processor.process(weights=array, name=t.name).weights
        if not array.flags.writeable:  # a view of the read-only memory map (F32)
            array = array.copy()
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        for hf_name, expert in dests:
            yield hf_name, (tensor if expert is None else tensor[expert]).to(dtype)


def _blocks(gguf: GGUFFile, t: Any, shape: tuple[int, ...], dests: list[tuple[str, int | None]],
            processor: TensorProcessor) -> Iterator[tuple[str, GGUFBlocks]]:
    """The block rows of tensor ``t`` for each of its HF names (its whole-row transforms applied)."""
    experts = any(e is not None for _, e in dests)
    if t.tensor_type not in KERNEL_BLOCK_TYPES or len(shape) != (3 if experts else 2):
        raise WeightsError(
            f"{gguf.path}: tensor {t.name!r} ({t.tensor_type.name}, shape {list(shape)}) was asked for as "
            f"GGUF blocks, but only 2-D weights in {', '.join(sorted(q.name for q in KERNEL_BLOCK_TYPES))} "
            "stay quantized; ask GGUFFile.kernel_quantized_weights which do"
        )
    rows = np.ascontiguousarray(t.data).reshape(*shape[:-1], -1)
    # llama's q/k row order is a permutation of whole rows: the same processor moves the block rows.
    rows = np.ascontiguousarray(processor.process(weights=rows, name=t.name).weights)
    data = torch.from_numpy(rows.copy())
    for hf_name, expert in dests:
        part = data if expert is None else data[expert]
        yield hf_name, GGUFBlocks(data=part, qtype=int(t.tensor_type), shape=(shape[-2], shape[-1]))
