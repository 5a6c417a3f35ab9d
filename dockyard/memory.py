"""Memory plan: what a model needs, computed from its spec and what its checkpoint stores.

Weight bytes come from instantiating the registered model class on the ``meta`` device (no
memory is touched) with one layer of each kind, each counted as often as the spec has it, so the
plan counts exactly the parameters the engine will load, at the cost of a few layers. Two weight
figures are kept apart: what the checkpoint *stores* (each tensor in its stored dtype: FP8 weights
with their float32 scale grids, GGUF blocks, bf16) and what the run *holds* on the device (every
parameter at the run dtype, except the projections that stay FP8 on the native FP8 path). The KV
cache is planned per layer type: the engine allocates every layer for the whole context
(``kv_bytes_per_token``), while a sliding-window layer only ever reads its last ``window`` tokens
(``kv_bytes_needed``). Activation peak and overhead follow from the spec and the engine's limits.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from dockyard.dtypes import dtype_name
from dockyard.errors import ConfigError
from dockyard.ops.fp8_linear import scale_grid_shape
from dockyard.ops.moe import mxfp4_expert_banks
from dockyard.ops.quant_linear import choose_quant_path
from dockyard.registry import build_model
from dockyard.spec import PER_LAYER_FIELDS, ModelSpec
from dockyard.weights.fp8 import checkpoint_fp8_weights, native_block, storage_dtype
from dockyard.weights.int4 import checkpoint_int4_weights
from dockyard.weights.quant_config import FP8Config
from dockyard.weights.safetensors_dir import stored_bytes

GiB = 1024**3
TiB = 1024**4
# More than any deployment holds (sixteen 1T-parameter models in float32): a plan beyond this comes
# from a broken config, and is refused before anything is built or allocated.
PLAUSIBLE_MAX_WEIGHT_BYTES = 64 * TiB
# Runtime memory that is not weights, KV or activations: CUDA context and allocator slack on a
# GPU; the interpreter, torch and tokenizer on a CPU.
OVERHEAD_BYTES = {"cuda": int(1.0 * GiB), "cpu": int(0.5 * GiB)}


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes the model needs on a device, and what follows for the KV cache."""

    dtype: str
    num_parameters: int
    active_parameters: int  # per token: MoE models run top_k of their routed experts
    weight_bytes: int
    weight_bytes_by_dtype: dict[str, int]
    kv_cache_dtype: str
    kv_bytes_per_token: int
    activation_peak_bytes: int
    overhead_bytes: int
    max_num_batched_tokens: int
    max_model_len: int
    # What the checkpoint stores (None: unknown), by stored dtype, and where that figure came from.
    checkpoint_bytes: int | None = None
    checkpoint_bytes_by_dtype: dict[str, int] = field(default_factory=dict)
    checkpoint_source: str = "not read"
    weight_format: str = ""  # how the run holds the weights, in words
    num_layers: int = 1
    sliding_layers: int = 0  # layers that attend to the last sliding_window tokens only
    sliding_window: int | None = None

    @property
    def fixed_bytes(self) -> int:
        """Everything but the KV cache."""
        return self.weight_bytes + self.activation_peak_bytes + self.overhead_bytes

    def kv_tokens_that_fit(self, device_bytes: int) -> int:
        """KV-cache tokens left once weights, activations and overhead are placed (0 if none)."""
        return max(0, (device_bytes - self.fixed_bytes) // self.kv_bytes_per_token)

    def bytes_for(self, context_tokens: int) -> int:
        """Total bytes to hold ``context_tokens`` tokens of KV cache plus everything else."""
        return self.fixed_bytes + context_tokens * self.kv_bytes_per_token

    def kv_bytes_needed(self, context_tokens: int) -> int:
        """KV bytes one sequence of ``context_tokens`` needs when each sliding-window layer keeps only its
        window (what the model reads; the engine today allocates ``context_tokens * kv_bytes_per_token``)."""
        per_layer = self.kv_bytes_per_token // self.num_layers
        window = min(context_tokens, self.sliding_window or context_tokens)
        full = self.num_layers - self.sliding_layers
        return per_layer * (full * context_tokens + self.sliding_layers * window)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["fixed_bytes"] = self.fixed_bytes
        return out


def active_parameters(spec: ModelSpec, dtype: torch.dtype = torch.bfloat16) -> int:
    """Parameters one token runs through: all of them, less the routed experts it is not sent to."""
    return _count(spec, dtype)[2]


@functools.lru_cache(maxsize=64)
def _count(spec: ModelSpec, dtype: torch.dtype) -> tuple[int, dict[str, int], int]:
    by_dtype: Counter[str] = Counter()
    numel = routed = 0
    for name, (p, times) in _layer_linears(spec, dtype)[0].items():  # tied parameters are yielded once
        numel += p.numel() * times
        by_dtype[dtype_name(p.dtype)] += p.numel() * p.element_size() * times
        if ".experts." in name:  # routed experts (shared experts live under shared_expert[s])
            routed += p.numel() * times
    idle = 0 if spec.moe is None else routed * (spec.moe.num_experts - spec.moe.top_k) // spec.moe.num_experts
    return numel, dict(by_dtype), numel - idle


# ---- counting from one layer of each kind ----
# Two layers of a model differ only through the spec's per-layer fields, so the parameters of a
# model are those of a copy with one layer of each kind, each layer counted as often as its kind
# occurs: a 1,000-layer config costs what a 2-layer one does, and the count is the built model's.
_LAYER_PARAMETER = re.compile(r"model\.layers\.(\d+)\.")


def layers_by_kind(spec: ModelSpec) -> list[list[int]]:
    """The layer indices of each distinct kind of layer in ``spec``, kinds in order of first appearance."""
    if spec.model_impl == "transformers":  # HF's layers may differ in ways the spec does not describe
        return [[i] for i in range(spec.num_hidden_layers)]
    columns = [getattr(spec, f) for f in PER_LAYER_FIELDS if getattr(spec, f)]
    if not columns:
        return [list(range(spec.num_hidden_layers))]
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, kind in enumerate(zip(*columns)):
        groups.setdefault(kind, []).append(i)
    return list(groups.values())


def layer_kinds(spec: ModelSpec) -> list[tuple[int, int]]:
    """(first layer, number of layers) of each distinct kind of layer in ``spec``, in layer order."""
    return [(layers[0] if layers else 0, len(layers)) for layers in layers_by_kind(spec)]


def sample_spec(spec: ModelSpec, kinds: list[tuple[int, int]]) -> ModelSpec:
    """``spec`` with only the layers ``kinds`` names first, in that order."""
    per_layer = {f: tuple(getattr(spec, f)[i] for i, _ in kinds) for f in PER_LAYER_FIELDS if getattr(spec, f)}
    return spec.replace(num_hidden_layers=len(kinds), **per_layer)


def _build_on_meta(spec: ModelSpec, dtype: torch.dtype) -> torch.nn.Module:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            return build_model(spec)
    except RuntimeError as exc:  # torch refuses a tensor whose byte size overflows 64 bits
        if "overflow" not in str(exc):
            raise
        raise ConfigError(
            f"{spec.name}: a weight of this config has more elements than a tensor can hold (hidden_size="
            f"{spec.hidden_size}, intermediate_size={spec.intermediate_size}, vocab_size={spec.vocab_size}); "
            "fix config.json") from None
    finally:
        torch.set_default_dtype(previous)


def plan_memory(
    spec: ModelSpec,
    dtype: torch.dtype = torch.bfloat16,
    kv_cache_dtype: torch.dtype | None = None,
    max_num_batched_tokens: int = 8192,
    max_num_seqs: int = 256,
    max_model_len: int | None = None,
    device_type: str = "cuda",
    storage: WeightStorage | None = None,
) -> MemoryPlan:
    """The memory plan of ``spec`` at ``dtype`` for the given engine limits; ``storage`` says what the
    checkpoint stores (None: not looked at; every parameter planned at ``dtype``)."""
    kv_dtype = kv_cache_dtype or dtype
    numel, by_dtype, active = _count(spec, dtype)
    stored: dict[str, int] | None = None
    if storage is not None:
        by_dtype = held_weight_bytes(spec, dtype, storage)
        stored = storage.stored_bytes_by_dtype
        if stored is None:
            stored = stored_weight_bytes(spec, storage.fp8, built_at=dtype)
    act_bytes = torch.empty((), dtype=dtype).element_size()
    kv_elem = torch.empty((), dtype=kv_dtype).element_size()
    entries, heads, dim = spec.kv_cache_layout
    kv_per_token = spec.num_hidden_layers * entries * heads * dim * kv_elem
    tokens = max_num_batched_tokens
    # One layer's live tensors at the widest point: residual + normed input + q/k/v + attention
    # output, and the MLP's gate, up and their product; plus float32 logits of the rows sampled.
    per_token = (3 * spec.hidden_size + spec.q_size + 2 * spec.kv_size + 3 * spec.intermediate_size) * act_bytes
    logits = min(max_num_seqs, tokens) * spec.vocab_size * 4 * 2  # logits + probabilities
    plan = MemoryPlan(
        dtype=dtype_name(dtype),
        num_parameters=numel,
        active_parameters=active,
        weight_bytes=sum(by_dtype.values()),
        weight_bytes_by_dtype=dict(by_dtype),
        kv_cache_dtype=dtype_name(kv_dtype),
        kv_bytes_per_token=kv_per_token,
        activation_peak_bytes=tokens * per_token + logits,
        overhead_bytes=OVERHEAD_BYTES.get(device_type, OVERHEAD_BYTES["cpu"]),
        max_num_batched_tokens=tokens,
        max_model_len=max_model_len or spec.max_model_len,
        checkpoint_bytes=None if stored is None else sum(stored.values()),
        checkpoint_bytes_by_dtype=stored or {},
        checkpoint_source="not read" if storage is None else storage.source,
        weight_format=(storage or WeightStorage()).describe(dtype),
        num_layers=spec.num_hidden_layers,
        sliding_layers=sum(spec.layer_sliding_window(i) is not None for i in range(spec.num_hidden_layers)),
        sliding_window=spec.sliding_window,
    )
    check_plausible_size(spec, plan)
    return plan


def check_plausible_size(spec: ModelSpec, plan: MemoryPlan) -> None:
    """Refuse a plan whose weights no device or cluster could hold, naming the sizes behind it."""
    if plan.weight_bytes <= PLAUSIBLE_MAX_WEIGHT_BYTES:
        return
    raise ConfigError(
        f"{spec.name}: the weights would take {plan.weight_bytes / TiB:,.0f} TiB at {plan.dtype} "
        f"({plan.num_parameters:,} parameters from num_hidden_layers={spec.num_hidden_layers}, "
        f"hidden_size={spec.hidden_size}, intermediate_size={spec.intermediate_size}, "
        f"vocab_size={spec.vocab_size}), more than any deployment holds (> {PLAUSIBLE_MAX_WEIGHT_BYTES // TiB} TiB); "
        "fix config.json")


# ---------------------------------------------------------------- bytes as stored and as held
@dataclass(frozen=True)
class WeightStorage:
    """What a checkpoint stores, as far as the plan needs it.

    ``fp8``: the checkpoint's FP8 quantization (None: plain tensors); ``native_fp8``: the run keeps the
    FP8 projections as stored (``weights.fp8.choose_fp8_path``); ``fp8_weights``: the model parameter names
    the checkpoint stores as FP8 (from its headers; None: every Linear weight of the decoder layers, as
    FP8 exports store them); ``stored_bytes_by_dtype``: measured from the files (None: derived from the
    config); ``source``: where the stored figure comes from, in words."""

    fp8: FP8Config | None = None
    native_fp8: bool = False
    fp8_weights: frozenset[str] | None = None
    stored_bytes_by_dtype: dict[str, int] | None = None
    source: str = "config"
    int4_method: str | None = None  # an int4 checkpoint's quant_method (its weights are dequantized on load)
    # A GGUF file: the weights the run keeps as GGUF blocks (HF name -> (GGML type, elements, stored bytes),
    # ``GGUFFile.block_sizes``); every other tensor is dequantized to the run dtype on load.
    gguf_blocks: dict[str, tuple[str, int, int]] | None = None
    # An MXFP4 checkpoint on dockyard's gpt-oss classes: whether the run keeps its experts as stored
    # (``weights.mxfp4.source_mxfp4_path``); None: not such a checkpoint.
    mxfp4_experts: bool | None = None
    # An int4 checkpoint: the weights the run keeps as int4 (HF name -> (elements, bytes held: packed codes, scales,
    # zero points, permutation), ``kept_int4_weights``); the others are dequantized to the run dtype on load.
    int4_kept: dict[str, tuple[int, int]] | None = None

    def describe(self, dtype: torch.dtype) -> str:
        run = dtype_name(dtype)
        if self.mxfp4_experts is not None:
            if self.mxfp4_experts:
                return (f"MXFP4 experts kept as stored ({MXFP4_HELD}, dequantized in the fused MoE kernel); "
                        f"the rest {run}")
            return f"MXFP4 experts dequantized to {run} on load"
        if self.int4_method is not None and self.int4_kept:
            return (f"int4 ({self.int4_method}): {len(self.int4_kept)} projection weights kept as int4 (dequantized "
                    f"in-kernel); the rest dequantized to {run} on load")
        if self.int4_method is not None:
            return f"int4 ({self.int4_method}) dequantized to {run} on load"
        if self.gguf_blocks is not None:
            if not self.gguf_blocks:
                return f"GGUF blocks dequantized to {run} on load"
            types = ", ".join(sorted({q for q, _, _ in self.gguf_blocks.values()}))
            return (f"{len(self.gguf_blocks)} GGUF weights kept as stored blocks ({types}, dequantized in-kernel); "
                    f"the rest dequantized to {run} on load")
        if self.fp8 is None:
            return run
        block = list(self.fp8.block) if self.fp8.block else "per-tensor"
        if self.native_fp8:
            return (f"FP8 {self.fp8.fmt} {block} attention/dense-MLP projections kept as stored (native FP8 "
                    f"matmul); other FP8 weights (MoE experts, MLA) dequantized and the rest held in {run}")
        return f"FP8 {self.fp8.fmt} {block} dequantized to {run} on load"


# How the plan names the bytes of MXFP4 experts held as stored.
MXFP4_HELD = "MXFP4 (e2m1 + e8m0 per 32)"


def _meta_model(spec: ModelSpec, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The registered model class for ``spec`` with one layer of each kind, built on the meta device."""
    return _build_on_meta(sample_spec(spec, layer_kinds(spec)), dtype)


@functools.lru_cache(maxsize=8)
def _layer_linears(spec: ModelSpec, dtype: torch.dtype, mxfp4_experts: bool = False
                   ) -> tuple[dict[str, tuple[torch.Tensor, int]], frozenset[str], frozenset[str]]:
    """(every parameter (meta) of the one-layer-per-kind model built at ``dtype``, with how many layers it
    stands for; the weights of Linear modules inside decoder layers; the weights of the projections the
    native FP8 path may keep FP8). Layer names are those of the real model's first layer of each kind.
    ``mxfp4_experts``: gpt-oss's experts built as MXFP4 blocks (``ops.moe.mxfp4_expert_banks``)."""
    kinds = layer_kinds(spec)
    with mxfp4_expert_banks() if mxfp4_experts else contextlib.nullcontext():
        model = _build_on_meta(sample_spec(spec, kinds), dtype)

    def real(name: str) -> tuple[str, int]:
        match = _LAYER_PARAMETER.match(name)
        if match is None:
            return name, 1
        first, times = kinds[int(match.group(1))]
        return f"model.layers.{first}." + name[match.end():], times

    params: dict[str, tuple[torch.Tensor, int]] = {}
    for name, p in model.named_parameters():
        params[real(name)[0]] = (p, real(name)[1])
    seen = {n for n in params if _LAYER_PARAMETER.match(n)}
    # A native class whose layers are not model.layers.N (the generic path's HF names are whatever HF's are).
    if kinds and spec.num_hidden_layers and not seen and spec.model_impl == "dockyard":
        raise RuntimeError(f"{type(model).__name__}: decoder layers not found under model.layers")
    linears = frozenset(f"{real(name)[0]}.weight" for name, m in model.named_modules()
                        if isinstance(m, nn.Linear) and ".layers." in f".{name}.")
    native = frozenset(f"{real(n)[0]}.weight" for n in getattr(model, "fp8_linear_names", lambda: [])())
    return params, linears, native


def _fp8_bytes(shape: tuple[int, ...], fp8: FP8Config, native: bool) -> int:
    """Bytes of one FP8 weight and its float32 scale: a block grid, or (stored) one value per tensor,
    (native) one per output row."""
    rows, cols = shape[0], math.prod(shape[1:])
    if native:
        scales = math.prod(scale_grid_shape(rows, cols, native_block(fp8, cols)))
    else:
        scales = math.prod(scale_grid_shape(rows, cols, fp8.block)) if fp8.block else 1
    return rows * cols * storage_dtype(fp8).itemsize + 4 * scales


def stored_weight_bytes(spec: ModelSpec, fp8: FP8Config | None, built_at: torch.dtype = torch.float32
                        ) -> dict[str, int]:
    """Bytes by stored dtype of a checkpoint for ``spec`` known only from its config: plain tensors in the
    config's dtype (a parameter the model keeps in a dtype of its own, in that one); with ``fp8``, every
    Linear weight inside the decoder layers (attention, MLP, experts; not the router, norms, embeddings or
    lm_head) as FP8 with its float32 scales, less the modules the quantization config keeps unquantized
    (``FP8Config.unquantized``), which are stored plain. ``built_at``: the meta model to read the shapes from (the one
    the held bytes were counted on, so no second model is built)."""
    plain = getattr(torch, spec.torch_dtype, torch.float32)
    params, linears, _ = _layer_linears(spec, built_at)
    out: Counter[str] = Counter()
    for name, (p, times) in params.items():
        quantized = _fp8_layer_count(spec, name, times, fp8) if fp8 is not None and name in linears else 0
        if quantized:
            out[fp8.storage_dtype_name + "+float32 scales"] += quantized * _fp8_bytes(tuple(p.shape), fp8,
                                                                                              native=False)
        if quantized < times:
            dtype = plain if p.dtype == built_at else p.dtype
            out[dtype_name(dtype)] += p.numel() * dtype.itemsize * (times - quantized)
    return dict(out)


def _fp8_layer_count(spec: ModelSpec, name: str, times: int, fp8: FP8Config) -> int:
    """How many of the ``times`` layers the weight ``name`` (named in the first layer of its kind) stands for
    store it as FP8: all but those whose module the quantization config keeps unquantized."""
    if not fp8.unquantized:
        return times
    module = name.removesuffix(".weight")
    match = _LAYER_PARAMETER.match(module + ".")
    if match is None:
        return 0 if fp8.keeps_unquantized(module) else times
    rest = module[match.end():]
    layers = next(k for k in layers_by_kind(spec) if k and k[0] == int(match.group(1)))
    return sum(not fp8.keeps_unquantized(f"model.layers.{i}.{rest}".rstrip(".")) for i in layers)


def held_weight_bytes(spec: ModelSpec, dtype: torch.dtype, storage: WeightStorage) -> dict[str, int]:
    """Bytes by dtype the run holds on the device: every parameter at ``dtype``, except on the native FP8
    path the projections stored FP8, which stay FP8 with a float32 scale grid (``ops.fp8_linear.Fp8Linear``)."""
    params, linears, native = _layer_linears(spec, dtype, bool(storage.mxfp4_experts))
    kept: set[str] = set()
    if storage.fp8 is not None and storage.native_fp8:
        kept = set(native & (linears if storage.fp8_weights is None else storage.fp8_weights))
    out: Counter[str] = Counter()
    for name, (p, times) in params.items():
        fp8_layers = 0
        if name in kept:
            # From the headers, fp8_weights names each layer's stored FP8 weights; from a config alone, the
            # quantization config's unquantized modules are what stays out.
            fp8_layers = times if storage.fp8_weights is not None else _fp8_layer_count(spec, name, times,
                                                                                        storage.fp8)
            out[storage.fp8.storage_dtype_name + "+float32 scales"] += fp8_layers * _fp8_bytes(
                tuple(p.shape), storage.fp8, True)
        if fp8_layers < times:
            held = MXFP4_HELD if p.dtype == torch.uint8 else dtype_name(p.dtype)  # only MXFP4 experts are uint8
            out[held] += p.numel() * p.element_size() * (times - fp8_layers)
    for qtype, elements, stored in (storage.gguf_blocks or {}).values():  # held as stored, not dequantized
        out[dtype_name(dtype)] -= elements * dtype.itemsize
        out[f"GGUF {qtype}"] += stored
    for elements, held in (storage.int4_kept or {}).values():
        out[dtype_name(dtype)] -= elements * dtype.itemsize
        out["int4+scales"] += held
    return dict(out)


def projection_weight_names(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every layer's weights of the projections that may stay quantized (the model's ``fp8_linear_names``), with
    their shapes."""
    params, _, firsts = _layer_linears(spec, torch.float32)
    first_of = {layers[0]: layers for layers in layers_by_kind(spec) if layers}
    out: dict[str, tuple[int, ...]] = {}
    for name in firsts:
        shape = tuple(params[name][0].shape)
        match = _LAYER_PARAMETER.match(name)
        if match is None:
            out[name] = shape
            continue
        first, rest = int(match.group(1)), name[match.end():]
        out.update((f"model.layers.{i}.{rest}", shape) for i in first_of.get(first, [first]))
    return out


def kept_int4_weights(source: Any, device: torch.device, tp_size: int = 1, assume_gpu: bool = False
                      ) -> dict[str, tuple[int, int]]:
    """HF name -> (elements, bytes held) of the int4 checkpoint weights a run on ``device`` keeps as int4: the
    projections the checkpoint stores as int4 when ``ops.quant_linear.choose_quant_path`` keeps int4 there (what
    ``model_loader`` converts). Held: the packed codes (half a byte each), a scale per group in 2 bytes (as the
    checkpoints store them), a uint8 zero point per group unless symmetric, an int64 permutation with act order."""
    if source.kind != "safetensors" or getattr(source, "int4", None) is None:
        return {}
    formats, _ = choose_quant_path(device, tp_size, assume_gpu)
    if "int4" not in formats:
        return {}
    stored = checkpoint_int4_weights(source.path, source.int4)
    out: dict[str, tuple[int, int]] = {}
    for name, (n, k) in projection_weight_names(source.spec).items():
        if name not in stored:
            continue
        scheme = source.int4.scheme_for(name.removesuffix(".weight"))
        groups = -(-k // (scheme.group_size or k))
        held = n * -(-k // 2) + n * groups * (2 + (not scheme.symmetric)) + 8 * k * scheme.act_order
        out[name] = (n * k, held)
    return out


def kept_gguf_weights(source: Any, device: torch.device, tp_size: int = 1, assume_gpu: bool = False
                      ) -> frozenset[str]:
    """The HF names of a GGUF ``source``'s weights a run on ``device`` holds as blocks: the projections stored in
    a format ``ops.quant_linear.choose_quant_path`` keeps there (what ``model_loader`` converts); none for other
    sources."""
    if source.kind != "gguf":
        return frozenset()
    formats, _ = choose_quant_path(device, tp_size, assume_gpu)
    if not formats:
        return frozenset()
    stored = source.gguf.kernel_quantized_weights(projection_weight_names(source.spec))
    return frozenset(name for name, qtype in stored.items() if qtype in formats)


def storage_of(source: Any, native_fp8: bool = False, gguf_blocks: frozenset[str] = frozenset(),
               int4_kept: dict[str, tuple[int, int]] | None = None, mxfp4_experts: bool | None = None
               ) -> WeightStorage:
    """The :class:`WeightStorage` of a ``model_source.ModelSource``: GGUF blocks and safetensors headers as
    measured from the files, a config alone by its dtype and ``quantization_config``. ``gguf_blocks``: the HF
    names of the weights the run keeps as GGUF blocks (:func:`kept_gguf_weights`); ``int4_kept``: those an int4
    checkpoint's run keeps as int4 (:func:`kept_int4_weights`); ``mxfp4_experts``: see :class:`WeightStorage`."""
    if mxfp4_experts is not None:
        return replace(storage_of(source, native_fp8, gguf_blocks, int4_kept), mxfp4_experts=mxfp4_experts)
    if source.kind == "gguf":
        return WeightStorage(stored_bytes_by_dtype=source.gguf.stored_bytes(), source=f"GGUF file {source.path.name}",
                             gguf_blocks=source.gguf.block_sizes(gguf_blocks))
    if source.kind == "safetensors":
        fp8_weights = None
        if source.fp8 is not None:
            rename = getattr(_meta_model(source.spec, torch.float32), "map_checkpoint_name", lambda n: n)
            mapped = (rename(n) for n in checkpoint_fp8_weights(source.path))
            fp8_weights = frozenset(n for n in mapped if n is not None)
        return WeightStorage(source.fp8, native_fp8 and source.fp8 is not None, fp8_weights,
                             stored_bytes(source.path), "safetensors headers",
                             source.int4.method if source.int4 is not None else None, int4_kept=int4_kept or None)
    if source.fp8 is not None:
        where = f"config.json ({source.spec.torch_dtype}, quantization_config fp8)"
    elif source.quantization is not None:
        where = (f"config.json ({source.spec.torch_dtype}; quantization {source.quantization!r} is not modelled: "
                 "counted as unquantized)")
    else:
        where = f"config.json ({source.spec.torch_dtype})"
    return WeightStorage(source.fp8, native_fp8 and source.fp8 is not None, source=where)
