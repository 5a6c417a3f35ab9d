"""The tensors of a resolved model's checkpoint, in the form the loader takes them.

A :class:`~dockyard.model_source.ModelSource` is metadata (spec, kind, path, quantization settings; no torch);
:func:`iter_weights` is where its weights are read: the GGUF file's tensors under the model's parameter names,
a safetensors directory's (FP8 pairs dequantized or kept native, int4 modules dequantized or kept as
``Int4Weight``, MXFP4 experts dequantized or kept as stored), or dummy tensors at the model's shapes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from dockyard.engine_args import MXFP4_METHOD
from dockyard.model_source import ModelSource
from dockyard.weights import fp8
from dockyard.weights.dummy import iter_dummy
from dockyard.weights.gguf import iter_tensors
from dockyard.weights.int4 import read_int4
from dockyard.weights.mxfp4 import dequantize_mxfp4, mxfp4_held_weights
from dockyard.weights.safetensors_dir import iter_safetensors


def iter_weights(source: ModelSource, model: nn.Module, dtype: torch.dtype, seed: int = 0,
                 native_fp8: set[str] | None = None, keep_quantized: set[str] | None = None,
                 only: Callable[[str], bool] | None = None) -> Iterator[tuple[str, Any]]:
    """Checkpoint tensors of ``source`` for ``model`` (dummy ones at its shapes for kind == 'dummy'), counted on a
    progress bar on stderr when it is a terminal.

    FP8 checkpoints: the weights named in ``native_fp8`` (checkpoint names, see
    ``weights.fp8.convert_to_fp8_linears``) come as stored with their scale grids; the rest dequantized.
    int4 checkpoints: the weights named in ``keep_quantized`` (checkpoint names) come as
    ``ops.quant_format.Int4Weight``; the rest dequantized (``weights.int4.read_int4``); GGUF files: as
    ``ops.quant_format.GGUFBlocks``. MXFP4 checkpoints: the experts the model holds as MXFP4 blocks come as stored,
    the rest dequantized. ``only`` (safetensors): read just the tensors whose checkpoint names it accepts (a model
    made of part of a checkpoint: the MTP layers)."""
    return tqdm(_tensors(source, model, dtype, seed, native_fp8, keep_quantized, only),
                desc=f"loading {source.kind} weights", unit=" tensors", file=sys.stderr, disable=None, leave=False)


def _tensors(source: ModelSource, model: nn.Module, dtype: torch.dtype, seed: int, native_fp8: set[str] | None,
             keep_quantized: set[str] | None, only: Callable[[str], bool] | None) -> Iterator[tuple[str, Any]]:
    def read(path: Any) -> Iterator[tuple[str, torch.Tensor]]:
        return iter_safetensors(path, cut=None if only is None else lambda name, lazy: lazy[:] if only(name) else None)

    if source.kind == "gguf":  # named after this model's parameters (native or transformers' classes)
        return iter_tensors(source.gguf, dtype, hf_names=model.state_dict().keys(),
                            keep_quantized=frozenset(keep_quantized or ()))
    if source.kind == "safetensors":
        if source.quantization == MXFP4_METHOD:  # gpt-oss's experts: as stored where the model holds them MXFP4
            return dequantize_mxfp4(read(source.path), dtype, mxfp4_held_weights(model))
        if source.fp8 is not None:
            if native_fp8:
                return fp8.native_fp8(read(source.path), source.fp8, native_fp8, dtype)
            return fp8.dequantize_fp8(read(source.path), source.fp8, dtype)
        if source.int4 is not None:
            device = next(model.parameters()).device
            return read_int4(read(source.path), source.int4, dtype, keep_quantized, device)
        return read(source.path)
    return iter_dummy(model, seed)
