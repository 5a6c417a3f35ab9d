"""GGUF files' metadata: the HF-style config, the tensor catalogue and names, read without torch.

A GGUF file (llama.cpp's format) holds key/value metadata and tensors, many quantized. :class:`GGUFFile` opens
one (its header parsed by :mod:`dockyard.weights.gguf_header`: numpy only, memory-mapped, the token lists left
undecoded unless asked for, once per file per process) and answers what a resolved model, ``dockyard inspect``
and the memory plan ask before any weight is read; :mod:`dockyard.weights.gguf` reads its tensors into torch.
Nothing here is a per-family table of dockyard's own; each fact comes from the library that owns it:

- **config**: transformers' GGUF config mapping (``transformers.integrations.ggml.GGUF_CONFIG_MAPPING`` and
  its defaults) read key by key from the metadata, so :class:`~dockyard.spec.ModelSpec` is built the same
  way for every format. transformers' own ``load_gguf_checkpoint`` is not called: it parses every metadata
  value, the whole token list included (seconds for a 262k vocabulary). The section of an architecture is
  the mapping key that names it without ``-``/``_`` (``qwen2moe`` → ``qwen2_moe``); an architecture that
  both ``gguf`` and transformers know but the mapping lacks (``olmo2``) reads the standard LLM keys (the
  ``llama`` section). :data:`_EXTRA_CONFIG_KEYS` adds the keys the mapping leaves out but llama.cpp
  writes (the head size where the mapping does not take it, MoE expert widths, Gemma 2 soft-caps); rope
  scaling keys and Llama 3's ``rope_freqs`` tensor become ``rope_scaling`` (:func:`llama3_rope_scaling`), as do
  Phi-3's longrope factor tensors; a rope dimension below the head size is ``partial_rotary_factor``.
  transformers' tables are imported when a file's config is first built, not with this module: importing
  transformers would cost every command that resolves a ``config.json`` a second it has no use for, and its
  model tables import torch.
- **tensor names**: ``gguf``'s tensor-name map for the architecture (``gguf.get_tensor_name_map``), asked
  for each parameter name of the model being loaded, as transformers' loader does; per-expert names
  (``mlp.experts.3.gate_proj``) are looked up without the index and take their slice of the stacked GGUF
  tensor (``ffn_gate_exps``, experts first).

:data:`KERNEL_BLOCK_TYPES` lists the block formats the GPU kernels read in-kernel
(:meth:`GGUFFile.kernel_quantized_weights` names the weights stored in one of them).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from gguf import MODEL_ARCH_NAMES, GGMLQuantizationType, LlamaFileType, get_tensor_name_map
from gguf.quants import dequantize

from dockyard.errors import InvalidModelFileError, ModelNotFoundError, UnsupportedArchitectureError
from dockyard.weights.gguf_header import GGUFTensor, read_header

GGUF_MAGIC = b"GGUF"

Q = GGMLQuantizationType
# The block formats the GPU kernels dequantize in-kernel (ops/triton_quant.py): what llama.cpp users run.
KERNEL_BLOCK_TYPES = frozenset({Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K})

# Metadata keys llama.cpp writes that transformers' mapping leaves out: "{arch}.<key>" -> HF config key.
# Each is taken only where the mapping does not already read that GGUF key.
_EXTRA_CONFIG_KEYS = {
    "attention.key_length": "head_dim",
    "expert_feed_forward_length": "moe_intermediate_size",
    "expert_shared_feed_forward_length": "shared_expert_intermediate_size",
    "attn_logit_softcapping": "attn_logit_softcapping",
    "final_logit_softcapping": "final_logit_softcapping",
}
# GGUF "{arch}.rope.scaling.<key>" -> HF rope_scaling key.
_ROPE_SCALING_KEYS = {
    "factor": "factor",
    "original_context_length": "original_max_position_embeddings",
    "attn_factor": "attention_factor",
    "yarn_beta_fast": "beta_fast",
    "yarn_beta_slow": "beta_slow",
}
_EOS_KEYS = ("eos_token_id", "eot_token_id", "eom_token_id")
ROPE_FREQS = "rope_freqs.weight"
# Phi-3's longrope factors: config, not weights (llama.cpp stores them as tensors).
LONGROPE_FACTORS = {"long_factor": "rope_factors_long.weight", "short_factor": "rope_factors_short.weight"}
CONFIG_TENSORS = frozenset({ROPE_FREQS, *LONGROPE_FACTORS.values()})
# llama.cpp's converter writes Llama 3's rope factors against this original context when the config names none.
_LLAMA3_ORIGINAL_CONTEXT = 8192
_EXPERT_INDEX = re.compile(r"\.experts\.(\d+)\.")


def _squash(name: str) -> str:
    return name.replace("-", "").replace("_", "")


class GGUFFile:
    """One opened GGUF file: its metadata, config and tensor catalogue (memory-mapped; nothing dequantized but the
    small config tensors; :func:`dockyard.weights.gguf.iter_tensors` reads the weights)."""

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
            self._header = read_header(self.path)
        except Exception as exc:  # the parser fails in many ways (ValueError, struct.error, ...) on bad input
            raise InvalidModelFileError(
                f"{self.path} is not a valid GGUF file ({type(exc).__name__}: {exc}); it may be truncated "
                "or corrupt: download it again"
            ) from exc
        self._tensors = {t.name: t for t in self._header.tensors}
        self._config: dict[str, Any] | None = None

    # ---- metadata ----
    def get(self, key: str, default: Any = None) -> Any:
        """The value of metadata ``key`` (scalars as Python values, arrays as lists), or ``default``."""
        try:
            return self._header.get(key, default)
        except Exception as exc:  # an array is decoded here, on first request: bad bytes fail here
            raise InvalidModelFileError(f"{self.path}: metadata key {key!r} is unreadable ({exc})") from exc

    @property
    def architecture(self) -> str:
        """``general.architecture``: llama.cpp's name of the architecture (``llama``, ``qwen2moe``, ...)."""
        arch = self.get("general.architecture")
        if not isinstance(arch, str):
            raise InvalidModelFileError(
                f"{self.path} has no general.architecture metadata; is it a model file?"
            )
        return arch

    def _section(self) -> tuple[str, str]:
        """(transformers' GGUF config mapping section, HF model_type) of this file's architecture."""
        # transformers on first use (see the module docstring); its model tables import torch
        from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        arch = self.architecture
        section = next((k for k in GGUF_CONFIG_MAPPING if k not in ("general", "tokenizer")
                        and _squash(k) == _squash(arch)), None)
        model_type = section
        if section is None and arch in MODEL_ARCH_NAMES.values() and arch in CONFIG_MAPPING_NAMES:
            section, model_type = "llama", arch  # the standard LLM keys; the names are the same in llama.cpp
        if arch == "llama" and self.get(f"{arch}.expert_count"):
            model_type = "mixtral"  # llama.cpp writes Mixtral as llama with experts
        if model_type is not None and f"{model_type}_text" in CONFIG_MAPPING_NAMES:
            model_type = f"{model_type}_text"  # a GGUF holds the text model of a multimodal family
        if section is None or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            known = sorted(k for k in GGUF_CONFIG_MAPPING if k in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
                           or f"{k}_text" in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
            raise UnsupportedArchitectureError(
                f"{self.path}: GGUF architecture {arch!r} is not supported: it maps to no causal-LM class of "
                f"transformers (the decoders dockyard runs); readable: {', '.join(known)}, and the llama.cpp "
                "architectures transformers has a causal-LM class of the same name for; convert the model from its "
                "HF checkpoint instead"
            )
        return section, model_type

    def _require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise InvalidModelFileError(
                f"{self.path} lacks required metadata key {key!r}; the file is incomplete, convert it again"
            )
        return value

    def hf_config(self) -> dict[str, Any]:
        """An HF ``config.json``-style dict built from the metadata (a fresh copy each call)."""
        if self._config is None:
            self._config = self._build_config()
        return dict(self._config)

    def _build_config(self) -> dict[str, Any]:
        # transformers on first use (see the module docstring)
        from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        arch = self.architecture
        section, model_type = self._section()
        mapping = GGUF_CONFIG_MAPPING[section]
        # The sizes every decoder states; named here so a file missing one says which.
        for required in ("block_count", "attention.head_count", "embedding_length"):
            self._require(f"{arch}.{required}")
        cfg: dict[str, Any] = {}
        for gguf_key, hf_key in [*mapping.items(), *((k, v) for k, v in _EXTRA_CONFIG_KEYS.items()
                                                     if k not in mapping)]:
            value = self.get(f"{arch}.{gguf_key}") if hf_key else None
            if value is not None:
                cfg.setdefault(hf_key, value)
        for gguf_key, hf_key in GGUF_CONFIG_MAPPING["tokenizer"].items():
            value = self.get(f"tokenizer.{gguf_key}")
            if value is not None:
                cfg[hf_key] = int(value)
        if model_type == "mixtral":  # the llama section has no expert keys; Mixtral's config names them so
            cfg["num_local_experts"] = int(self._require(f"{arch}.expert_count"))
            cfg["num_experts_per_tok"] = int(self._require(f"{arch}.expert_used_count"))
        for key, value in GGUF_CONFIG_DEFAULTS_MAPPING.get(model_type, {}).items():
            cfg.setdefault(key, value)
        kv_heads = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
        if isinstance(kv_heads, list):  # per-layer counts
            if len(set(kv_heads)) != 1:
                raise UnsupportedArchitectureError(
                    f"{self.path}: per-layer KV head counts {sorted(set(kv_heads))} are not supported"
                )
            kv_heads = kv_heads[0]
        cfg["num_key_value_heads"] = int(kv_heads)
        embd = self._tensors.get("token_embd.weight")
        vocab = int(embd.shape[-1]) if embd is not None and len(embd.shape) > 1 else cfg.get("vocab_size")
        if vocab is None:
            vocab = self._header.array_length("tokenizer.ggml.tokens")
        if vocab is None:
            raise InvalidModelFileError(
                f"{self.path}: cannot tell the vocabulary size (no token_embd.weight, "
                f"{arch}.vocab_size or token list); the file is incomplete, convert it again"
            )
        cfg.pop("_model_name_or_path", None)
        cfg.update({
            "architectures": [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]],
            "model_type": model_type,
            "vocab_size": int(vocab),
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "torch_dtype": "float32",
        })
        scaling = {hf_key: value for gguf_key, hf_key in _ROPE_SCALING_KEYS.items()
                   if (value := self.get(f"{arch}.rope.scaling.{gguf_key}")) is not None}
        scaling_type = self.get(f"{arch}.rope.scaling.type")
        if scaling_type not in (None, "none"):
            cfg["rope_scaling"] = {"rope_type": scaling_type, **scaling}
        if ROPE_FREQS in self._tensors and (llama3 := self._rope_freqs_scaling(cfg)) is not None:
            cfg["rope_scaling"] = llama3
        if all(name in self._tensors for name in LONGROPE_FACTORS.values()):
            cfg["rope_scaling"] = {**scaling, "rope_type": "longrope",
                                   **{key: self._small_tensor(name).tolist() for key, name in LONGROPE_FACTORS.items()}}
            original = cfg["rope_scaling"].get("original_max_position_embeddings")
            if original is not None:  # where HF's Phi-3 config keeps it
                cfg["original_max_position_embeddings"] = int(original)
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        rotary = self.get(f"{arch}.rope.dimension_count")
        if rotary is not None and int(rotary) < head_dim and "partial_rotary_factor" not in cfg:
            cfg["partial_rotary_factor"] = int(rotary) / head_dim
        eos = list(dict.fromkeys(int(e) for e in (self.get(f"tokenizer.ggml.{k}") for k in _EOS_KEYS)
                                 if e is not None))
        if eos:
            cfg["eos_token_id"] = eos[0] if len(eos) == 1 else eos
        name = self.get("general.name")
        cfg["_name_or_path"] = str(name) if name else self.path.stem
        return cfg

    def _rope_freqs_scaling(self, cfg: dict[str, Any]) -> dict[str, Any] | None:
        """Llama 3's rope scaling, recovered from the per-frequency factors llama.cpp stores as ``rope_freqs``
        (None when every factor is 1: no scaling)."""
        factors = self._small_tensor(ROPE_FREQS)
        if np.all(factors == 1.0):
            return None
        head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
        scaling = llama3_rope_scaling(factors, float(cfg.get("rope_theta", 10000.0)), head_dim)
        if scaling is None:
            raise UnsupportedArchitectureError(
                f"{self.path}: tensor {ROPE_FREQS} holds per-frequency rope factors that are not Llama 3's rope "
                "scaling (factor, low/high frequency factors); dockyard runs only that kind; convert the model "
                "from its HF checkpoint instead"
            )
        return scaling

    def _small_tensor(self, name: str) -> np.ndarray:
        """A 1-D tensor that holds config values (rope factors), as float64."""
        tensor = self._tensors[name]
        return np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float64).reshape(-1)

    def chat_template(self) -> str | None:
        """The chat template the file carries (``tokenizer.chat_template``), or None."""
        template = self.get("tokenizer.chat_template")
        return template if isinstance(template, str) and template else None


    # ---- tensors ----
    @property
    def tensors(self) -> list[GGUFTensor]:
        """The file's tensors (name, GGML type, shape fastest-first, memory-mapped data)."""
        return self._header.tensors

    def name_map(self, hf_names: Iterable[str]) -> dict[str, list[tuple[str, int | None]]]:
        """GGUF tensor name → [(HF name, expert index or None)] for the parameter names ``hf_names`` of the model
        being loaded (``weights.gguf.native_parameter_names``: dockyard's native model's), through ``gguf``'s
        tensor-name map of this architecture."""
        arch = self.architecture
        arch_id = next((k for k, v in MODEL_ARCH_NAMES.items() if v == arch), None)
        if arch_id is None:
            raise UnsupportedArchitectureError(
                f"{self.path}: the gguf package has no tensor-name map for architecture {arch!r}; upgrade gguf"
            )
        layers = int(self._require(f"{arch}.block_count"))
        names = get_tensor_name_map(arch_id, layers)
        out: dict[str, list[tuple[str, int | None]]] = {}
        for hf_name in hf_names:
            base, dot, suffix = hf_name.rpartition(".")
            if not dot or suffix not in ("weight", "bias"):
                base, suffix = hf_name, ""
            expert = _EXPERT_INDEX.search(base + ".")
            if expert is not None:
                base = (base + ".").replace(expert.group(0), ".experts.", 1).rstrip(".")
            gguf_name = names.get_name(base)
            if gguf_name is not None:
                key = f"{gguf_name}.{suffix}" if suffix else gguf_name
                out.setdefault(key, []).append((hf_name, int(expert.group(1)) if expert else None))
        return out

    def kernel_quantized_weights(self, hf_names: Iterable[str]) -> dict[str, str]:
        """HF name → GGML type name of each of ``hf_names`` that is a 2-D weight (an expert's slice counts) stored
        in a block format of :data:`KERNEL_BLOCK_TYPES`: the weights ``weights.gguf.iter_tensors`` can yield as
        ``GGUFBlocks``."""
        out: dict[str, str] = {}
        for gguf_name, targets in self.name_map(hf_names).items():
            t = self._tensors.get(gguf_name)
            if t is None or t.tensor_type not in KERNEL_BLOCK_TYPES:
                continue
            for hf_name, expert in targets:
                if len(t.shape) == (2 if expert is None else 3):
                    out[hf_name] = t.tensor_type.name
        return out

    def block_sizes(self, hf_names: Iterable[str]) -> dict[str, tuple[str, int, int]]:
        """HF name → (GGML type, elements, stored bytes) of each of ``hf_names`` (weights kept as blocks; an
        expert's share of its stacked tensor)."""
        out: dict[str, tuple[str, int, int]] = {}
        for gguf_name, targets in self.name_map(hf_names).items():
            t = self._tensors.get(gguf_name)
            for hf_name, expert in targets:
                if t is not None:
                    parts = 1 if expert is None else int(t.shape[-1])  # experts are the outermost GGUF dim
                    out[hf_name] = (t.tensor_type.name, int(t.n_elements) // parts, int(t.n_bytes) // parts)
        return out

    def quantization_name(self) -> str:
        """The file's quantization in llama.cpp's words (``Q4_K_M``, from ``general.file_type``) and the block
        types its tensors use, largest share first."""
        by_type = sorted(self.stored_bytes().items(), key=lambda kv: -kv[1])
        blocks = ", ".join(name for name, _ in by_type)
        file_type = self.get("general.file_type")
        try:
            name = LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_") if file_type is not None else None
        except ValueError:
            name = None
        return f"GGUF {name} ({blocks})" if name else f"GGUF ({blocks})"

    def stored_bytes(self) -> dict[str, int]:
        """Bytes of tensor data by GGML type (``Q4_1``, ``F32``, ...): each tensor's blocks as stored."""
        out: dict[str, int] = {}
        for t in self._header.tensors:
            out[t.tensor_type.name] = out.get(t.tensor_type.name, 0) + int(t.n_bytes)
        return out



def llama3_rope_scaling(factors: np.ndarray, theta: float, head_dim: int,
                        original_context: int = _LLAMA3_ORIGINAL_CONTEXT) -> dict[str, Any] | None:
    """The HF ``rope_scaling`` (``llama3``) whose per-frequency factors are ``factors``, or None when no such
    setting reproduces them.

    llama.cpp stores Llama 3's scaling as the factor each rotary frequency is divided by: 1 for short
    wavelengths, ``factor`` for long ones, and between them ``1 / ((1 - s) / factor + s)`` with ``s``
    linear in ``1 / wavelength``. ``factor`` is the largest; the smooth part fixes the low and high
    frequency factors for the given original context; the result is checked against every factor.
    """
    factor = float(factors.max())
    freqs = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if len(factors) != len(freqs) or factor <= 1.0:
        return None
    inv_wavelen = freqs / (2 * math.pi)
    smooth = (factors > 1.0 + 1e-6) & (factors < factor * (1 - 1e-6))
    low, high = 1.0, 4.0  # Llama 3.1's own, when fewer than two factors lie between the extremes
    if smooth.sum() >= 2:
        s = (1.0 / factors[smooth] - 1.0 / factor) / (1.0 - 1.0 / factor)
        slope, intercept = np.polyfit(inv_wavelen[smooth], s, 1)
        span = original_context / slope  # high - low
        low = -intercept * span
        high = low + span
    smooth_pos = np.clip((original_context * inv_wavelen - low) / (high - low), 0.0, 1.0)
    expected = 1.0 / ((1.0 - smooth_pos) / factor + smooth_pos)
    if not np.allclose(expected, factors, rtol=1e-4, atol=0):
        return None
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(low),
            "high_freq_factor": float(high), "original_max_position_embeddings": original_context}
