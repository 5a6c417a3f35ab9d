"""GGUF files: HF-style config from the metadata, dequantized tensors under HF names.

A GGUF file (llama.cpp's format) holds key/value metadata and tensors, many quantized. This
module turns the metadata into an HF ``config.json``-style dict (so :class:`~dockyard.spec.ModelSpec`
is built the same way for every format) and yields every tensor dequantized, renamed to the HF
convention and shaped like HF's (GGUF lists dims fastest-first, i.e. reversed). llama.cpp's
converter reorders the rows of ``attn_q`` / ``attn_k`` so that each rotary pair sits on adjacent
rows; :func:`_unpermute_rotary` undoes that so the weights match HF's half-split rotary layout.

Supported architectures are rows of :data:`ARCHITECTURES`; add a row (and any extra tensor names)
to support another llama-like architecture.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

from dockyard.errors import (
    InvalidModelFileError,
    ModelNotFoundError,
    UnsupportedArchitectureError,
    WeightsError,
)

GGUF_MAGIC = b"GGUF"

# Tensors outside the blocks: GGUF base name -> HF name (without the .weight/.bias suffix).
_TOP_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Tensors of block i: GGUF "blk.{i}.<key>" -> HF "model.layers.{i}.<value>".
_LLAMA_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_TOP_RE = re.compile(r"^(\w+)\.(weight|bias)$")


@dataclass(frozen=True)
class GGUFArch:
    """How one GGUF ``general.architecture`` maps onto an HF model class."""

    hf_architecture: str
    model_type: str
    # llama.cpp's converter interleaves rotary pairs in attn_q/attn_k rows for this architecture.
    permute_qk: bool
    # Config values the metadata does not carry (fixed for the architecture).
    fixed_config: dict[str, Any] = field(default_factory=dict)
    block_tensors: dict[str, str] = field(default_factory=lambda: dict(_LLAMA_BLOCK_TENSORS))


ARCHITECTURES: dict[str, GGUFArch] = {
    "llama": GGUFArch("LlamaForCausalLM", "llama", permute_qk=True, fixed_config={"hidden_act": "silu"}),
}

# GGUF "{arch}.rope.scaling.<key>" -> HF rope_scaling key.
_ROPE_SCALING_KEYS = {
    "factor": "factor",
    "original_context_length": "original_max_position_embeddings",
    "attn_factor": "attention_factor",
    "yarn_beta_fast": "beta_fast",
    "yarn_beta_slow": "beta_slow",
}


class GGUFFile:
    """One opened GGUF file (memory-mapped; tensors are dequantized one at a time on iteration)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise ModelNotFoundError(f"GGUF file not found: {self.path}; check the path")
        if self.path.is_dir():
            raise InvalidModelFileError(f"{self.path} is a directory, not a GGUF file; name the .gguf file")
        try:
            with open(self.path, "rb") as fh:
                magic = fh.read(4)
        except OSError as exc:
            raise InvalidModelFileError(f"cannot read {self.path} ({exc}); check its permissions") from exc
        if magic != GGUF_MAGIC:
            raise InvalidModelFileError(
                f"{self.path} is not a valid GGUF file: it does not start with the GGUF magic bytes "
                f"(found {magic!r}); pass a .gguf file written by llama.cpp's converter"
            )
        try:
            self._reader = GGUFReader(self.path)
        except Exception as exc:  # the parser fails in many ways (ValueError, IndexError, ...) on bad input
            raise InvalidModelFileError(
                f"{self.path} is not a valid GGUF file ({type(exc).__name__}: {exc}); it may be truncated "
                "or corrupt: download it again"
            ) from exc
        self._config: dict[str, Any] | None = None

    # ---- metadata ----
    def get(self, key: str, default: Any = None) -> Any:
        """The value of metadata ``key`` (scalars as Python values, arrays as lists), or ``default``."""
        fld = self._reader.fields.get(key)
        if fld is None:
            return default
        try:
            return fld.contents()
        except Exception as exc:
            raise InvalidModelFileError(f"{self.path}: metadata key {key!r} is unreadable ({exc})") from exc

    @property
    def architecture(self) -> str:
        arch = self.get("general.architecture")
        if not isinstance(arch, str):
            raise InvalidModelFileError(
                f"{self.path} has no general.architecture metadata; is it a model file?"
            )
        return arch

    def _arch(self) -> GGUFArch:
        arch = self.architecture
        if arch not in ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"{self.path}: GGUF architecture {arch!r} is not supported; supported: "
                f"{', '.join(sorted(ARCHITECTURES))}"
            )
        return ARCHITECTURES[arch]

    def _require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise InvalidModelFileError(
                f"{self.path} lacks required metadata key {key!r}; the file is incomplete, convert it again"
            )
        return value

    def _tensor_rows(self, name: str) -> int | None:
        for t in self._reader.tensors:
            if t.name == name:
                return int(t.shape[-1]) if len(t.shape) > 1 else None
        return None

    def hf_config(self) -> dict[str, Any]:
        """An HF ``config.json``-style dict built from the metadata (a fresh copy each call)."""
        if self._config is None:
            self._config = self._build_config()
        return dict(self._config)

    def _build_config(self) -> dict[str, Any]:
        arch_name = self.architecture
        arch = self._arch()

        def key(suffix: str) -> str:
            return f"{arch_name}.{suffix}"

        heads = int(self._require(key("attention.head_count")))
        kv_heads = self.get(key("attention.head_count_kv"), heads)
        if isinstance(kv_heads, list):  # per-layer counts
            if len(set(kv_heads)) != 1:
                raise UnsupportedArchitectureError(
                    f"{self.path}: per-layer KV head counts {sorted(set(kv_heads))} are not supported"
                )
            kv_heads = kv_heads[0]
        tokens = self.get("tokenizer.ggml.tokens")
        vocab = (self._tensor_rows("token_embd.weight") or self.get(key("vocab_size"))
                 or (len(tokens) if tokens else None))
        if vocab is None:
            raise InvalidModelFileError(
                f"{self.path}: cannot tell the vocabulary size (no token_embd.weight, "
                f"{key('vocab_size')} or token list); the file is incomplete, convert it again"
            )
        cfg: dict[str, Any] = {
            "architectures": [arch.hf_architecture],
            "model_type": arch.model_type,
            **arch.fixed_config,
            "vocab_size": int(vocab),
            "hidden_size": int(self._require(key("embedding_length"))),
            "intermediate_size": int(self._require(key("feed_forward_length"))),
            "num_hidden_layers": int(self._require(key("block_count"))),
            "num_attention_heads": heads,
            "num_key_value_heads": int(kv_heads),
            "max_position_embeddings": int(self._require(key("context_length"))),
            "rms_norm_eps": float(self._require(key("attention.layer_norm_rms_epsilon"))),
            "rope_theta": float(self.get(key("rope.freq_base"), 10000.0)),
            "tie_word_embeddings": not any(t.name == "output.weight" for t in self._reader.tensors),
            "torch_dtype": "float32",
        }
        head_dim = self.get(key("attention.key_length"))
        if head_dim is not None:
            cfg["head_dim"] = int(head_dim)
        scaling_type = self.get(key("rope.scaling.type"))
        if scaling_type not in (None, "none"):
            scaling: dict[str, Any] = {"rope_type": scaling_type}
            for gguf_key, hf_key in _ROPE_SCALING_KEYS.items():
                value = self.get(key(f"rope.scaling.{gguf_key}"))
                if value is not None:
                    scaling[hf_key] = value
            cfg["rope_scaling"] = scaling
        for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("pad_token_id", "padding_token_id")):
            value = self.get(f"tokenizer.ggml.{gguf_key}")
            if value is not None:
                cfg[hf_key] = int(value)
        eos = [self.get(f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id", "eom_token_id")]
        eos = list(dict.fromkeys(int(e) for e in eos if e is not None))
        if eos:
            cfg["eos_token_id"] = eos[0] if len(eos) == 1 else eos
        name = self.get("general.name")
        cfg["_name_or_path"] = str(name) if name else self.path.stem
        return cfg

    def chat_template(self) -> str | None:
        """The chat template the file carries (``tokenizer.chat_template``), or None."""
        template = self.get("tokenizer.chat_template")
        return template if isinstance(template, str) and template else None

    # ---- tensors ----
    def hf_name(self, gguf_name: str) -> str:
        """The HF name of a GGUF tensor; an unknown name is returned unchanged."""
        block_tensors = self._arch().block_tensors
        m = _BLOCK_RE.match(gguf_name)
        if m and m.group(2) in block_tensors:
            return f"model.layers.{m.group(1)}.{block_tensors[m.group(2)]}.{m.group(3)}"
        m = _TOP_RE.match(gguf_name)
        if m and m.group(1) in _TOP_TENSORS:
            return f"{_TOP_TENSORS[m.group(1)]}.{m.group(2)}"
        return gguf_name

    def stored_bytes(self) -> dict[str, int]:
        """Bytes of tensor data by GGML type (``Q4_1``, ``F32``, ...): each tensor's blocks as stored."""
        out: dict[str, int] = {}
        for t in self._reader.tensors:
            out[t.tensor_type.name] = out.get(t.tensor_type.name, 0) + int(t.n_bytes)
        return out

    def iter_tensors(self, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(hf_name, tensor)`` for every tensor, dequantized to ``dtype`` in HF layout.

        Unknown GGUF names are yielded unchanged, so the loader reports them as unexpected.
        """
        cfg = self.hf_config()
        arch = self._arch()
        heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        for t in self._reader.tensors:
            qtype = t.tensor_type
            try:
                array = dequantize(t.data, qtype)
            except NotImplementedError as exc:
                raise WeightsError(
                    f"{self.path}: tensor {t.name!r} has GGML type {qtype.name}, which dockyard cannot "
                    "dequantize; use a GGUF quantized as Q4_0, Q4_1, Q8_0, a K-quant, F16, BF16 or F32"
                ) from exc
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            if not array.flags.writeable:  # a view of the read-only memory map (F32)
                array = array.copy()
            tensor = torch.from_numpy(np.ascontiguousarray(array)).reshape(shape)
            name = self.hf_name(t.name)
            if arch.permute_qk and ".self_attn.q_proj." in name:
                tensor = _unpermute_rotary(tensor, heads)
            elif arch.permute_qk and ".self_attn.k_proj." in name:
                tensor = _unpermute_rotary(tensor, kv_heads)
            yield name, tensor.to(dtype)


def _unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: per head, rows (pair, 2) -> HF's (2, half).

    llama.cpp's converter maps each head's rows [first half; second half] to the interleaved order
    [x0, x_half, x1, x_half+1, ...]; here each head's rows are viewed as (half, 2) and transposed back.
    Works for weights ([out, in]) and biases ([out]).
    """
    rows = w.shape[0]
    if rows % (2 * n_heads) != 0:
        raise WeightsError(
            f"q/k projection with {rows} rows cannot be split into {n_heads} heads of even size; "
            "the GGUF head counts do not match its tensors"
        )
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
