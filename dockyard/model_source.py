"""Resolve what the user named as MODEL into a spec, a weights source and a tokenizer.

MODEL may be: nothing (the bundled SmolLM2-135M-Instruct GGUF), a ``.gguf`` file, a directory
with ``config.json`` (+ safetensors, FP8 ones dequantized on load or kept FP8 on capable GPUs, else
dummy weights), or a ``config.json`` file (dummy weights at true shapes).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dockyard.errors import DockyardError, WeightsError
from dockyard.model_path import locate_model
from dockyard.spec import ModelSpec, read_config_json
from dockyard.tokenizer import TOKENIZER_FILES, load_tokenizer
from dockyard.weights import fp8
from dockyard.weights.dummy import iter_dummy
from dockyard.weights.fp8 import FP8Config
from dockyard.weights.gguf import GGUFFile
from dockyard.weights.safetensors_dir import iter_safetensors, safetensors_files

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "dummy")


@dataclass
class ModelSource:
    """A resolved model: its spec and where its weights and tokenizer come from."""

    name: str
    spec: ModelSpec
    kind: str  # "gguf" | "safetensors" | "dummy"
    path: Path
    gguf: Any = None  # dockyard.weights.gguf.GGUFFile for kind == "gguf"
    fp8: Any = None  # dockyard.weights.fp8.FP8Config when quantization_config is fp8 (see weights/fp8.py)
    quantization: str | None = None  # quantization_config.quant_method, as the config names it

    @property
    def has_real_weights(self) -> bool:
        return self.kind != "dummy"

    def iter_weights(self, model: nn.Module, dtype: torch.dtype, seed: int = 0,
                     native_fp8: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Checkpoint tensors for ``model`` (dummy ones at its shapes for kind == 'dummy').

        FP8 checkpoints: the weights named in ``native_fp8`` (checkpoint names, see
        ``weights.fp8.convert_to_fp8_linears``) come as stored with their scale grids; the rest dequantized."""
        if self.kind == "gguf":
            return self.gguf.iter_tensors(dtype)
        if self.kind == "safetensors":
            if self.fp8 is not None:
                if native_fp8:
                    return fp8.native_fp8(iter_safetensors(self.path), self.fp8, native_fp8, dtype)
                return fp8.dequantize_fp8(iter_safetensors(self.path), self.fp8, dtype)
            return iter_safetensors(self.path)

        return iter_dummy(model, seed)

    def load_tokenizer(self) -> Any:
        """The HF tokenizer for this model (cached conversion for GGUF); None if it ships none."""
        if self.gguf is not None:
            return load_tokenizer(self.path.parent, gguf_file=self.path.resolve())  # absolute: not joined again
        if not any((self.path / f).exists() for f in TOKENIZER_FILES):
            logger.warning("%s has no tokenizer files (%s): prompts must be token ids",
                           self.path, ", ".join(TOKENIZER_FILES))
            return None
        return load_tokenizer(self.path)


def resolve_model(model: str | Path | None = None, load_format: str = "auto") -> ModelSource:
    """Turn a MODEL argument into a :class:`ModelSource`, or a DockyardError saying what is wrong."""
    if load_format not in LOAD_FORMATS:
        raise DockyardError(f"load_format={load_format!r} is not one of {', '.join(LOAD_FORMATS)}")
    path = locate_model(model)
    if path.is_file() and path.suffix == ".gguf":
        gguf = GGUFFile(path)
        spec = ModelSpec.from_hf_config(gguf.hf_config(), name=path.stem)
        kind = "dummy" if load_format == "dummy" else "gguf"
        return ModelSource(name=path.stem, spec=spec, kind=kind, path=path, gguf=gguf)
    if path.is_file():
        config_file, model_dir = path, path.parent
    else:
        config_file, model_dir = path / "config.json", path
    config = read_config_json(config_file)
    name = model_dir.resolve().name if config_file.name == "config.json" else config_file.stem
    spec = ModelSpec.from_hf_config(config, name=name)
    kind, fp8 = "dummy", None
    quant = config.get("quantization_config")
    method = None
    if isinstance(quant, dict):
        method = str(quant.get("quant_method") or quant.get("fmt") or "unknown")
    if load_format == "auto" and path.is_dir():
        if safetensors_files(model_dir):
            kind = "safetensors"
            if method is not None and method != "fp8":
                raise WeightsError(
                    f"{model_dir} holds a quantized checkpoint (quantization_config.quant_method={method!r}), "
                    "which dockyard cannot load yet; use an unquantized (bf16/fp16/fp32) checkpoint, or "
                    "--load-format dummy to run the architecture on dummy weights"
                )
    if method == "fp8":
        try:
            fp8 = FP8Config.from_quantization_config(quant, model_dir)
        except WeightsError:
            if kind == "safetensors":
                raise
            # Dummy weights do not read the checkpoint's scales: the FP8 settings only matter to the plan.
            logger.info("quantization_config is fp8 with settings the loader refuses; dummy weights ignore it")
    return ModelSource(name=name, spec=spec, kind=kind, path=model_dir, fp8=fp8, quantization=method)
