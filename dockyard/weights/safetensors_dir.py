"""Weights from a safetensors checkpoint directory (one file, or shards with an index).

The listing and the header reading need no torch (a resolved model's metadata uses them); the tensors come
through safetensors' torch reader, which imports torch when :func:`iter_safetensors` first opens a file.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError, safe_open

from dockyard.errors import InvalidModelFileError, ModelNotFoundError

if TYPE_CHECKING:  # annotations only: the checkpoint's listing and headers are read without torch
    import torch

INDEX_FILE = "model.safetensors.index.json"


def safetensors_files(model_dir: str | Path) -> list[Path]:
    """The checkpoint files of ``model_dir``: those the index names, else every *.safetensors."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise InvalidModelFileError(f"{index} is not a valid safetensors index ({exc})") from exc
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise ModelNotFoundError(
                f"{index} names shards that are not in the directory: {', '.join(missing)}; "
                "download the complete checkpoint"
            )
        return files
    return sorted(model_dir.glob("*.safetensors"))


def stored_bytes(model_dir: str | Path) -> dict[str, int]:
    """Bytes of tensor data by stored dtype ("BF16", "F8_E4M3", ...) of the checkpoint, from the file
    headers alone (the format: an 8-byte little-endian header length, then a JSON header giving each
    tensor's dtype and its byte range)."""
    out: Counter[str] = Counter()
    for path in safetensors_files(model_dir):
        try:
            with open(path, "rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(length))
            for name, entry in header.items():
                if name != "__metadata__":
                    start, end = entry["data_offsets"]
                    out[entry["dtype"]] += end - start
        except (OSError, struct.error, ValueError, KeyError, TypeError) as exc:
            raise InvalidModelFileError(f"{path} is not a readable safetensors file ({exc})") from exc
    return dict(out)


def tensor_names(model_dir: str | Path) -> set[str]:
    """The names of every tensor of the checkpoint, from the index (or the file headers) alone."""
    index = Path(model_dir) / INDEX_FILE
    if index.exists():
        safetensors_files(model_dir)  # the index is checked there
        return set(json.loads(index.read_text())["weight_map"])
    names: set[str] = set()
    for path in safetensors_files(model_dir):
        try:
            with safe_open(str(path), framework="pt") as f:
                names.update(f.keys())
        except (SafetensorError, OSError) as exc:
            raise InvalidModelFileError(f"{path} is not a readable safetensors file ({exc})") from exc
    return names


def iter_safetensors(model_dir: str | Path, cut: Callable[[str, Any], torch.Tensor | None] | None = None
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every (name, tensor) of the checkpoint, one shard open at a time.

    ``cut(name, lazy_slice)`` (tensor parallelism) reads only part of a tensor through safetensors'
    ``get_slice`` and returns it, or None to skip the tensor; its name is yielded unchanged.
    """
    files = safetensors_files(model_dir)
    if not files:
        raise ModelNotFoundError(f"no *.safetensors files in {model_dir}")
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    if cut is None:
                        yield name, f.get_tensor(name)
                        continue
                    tensor = cut(name, f.get_slice(name))
                    if tensor is not None:
                        yield name, tensor
        except (SafetensorError, OSError) as exc:
            raise InvalidModelFileError(f"{path} is not a readable safetensors file ({exc})") from exc
