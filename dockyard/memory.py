"""Memory plan: what a model needs, computed from its spec alone.

Weight bytes come from instantiating the registered model class on the ``meta`` device (no
memory is touched) with one layer of each kind, each counted as often as the spec has it, so the
plan counts exactly the parameters the engine will load, at the cost of a few layers. The KV
cache, activation peak and overhead follow from the spec and the engine's batch limits.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import torch

from dockyard.errors import ConfigError
from dockyard.registry import build_model
from dockyard.spec import PER_LAYER_FIELDS, ModelSpec

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

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["fixed_bytes"] = self.fixed_bytes
        return out


def count_parameters(spec: ModelSpec, dtype: torch.dtype) -> tuple[int, dict[str, int]]:
    """(number of parameters, bytes by dtype) of the model class for ``spec``, built on meta."""
    numel, by_dtype, _ = _count(spec, dtype)
    return numel, dict(by_dtype)


def active_parameters(spec: ModelSpec, dtype: torch.dtype = torch.bfloat16) -> int:
    """Parameters one token runs through: all of them, less the routed experts it is not sent to."""
    return _count(spec, dtype)[2]


@functools.lru_cache(maxsize=64)
def _count(spec: ModelSpec, dtype: torch.dtype) -> tuple[int, dict[str, int], int]:
    kinds = layer_kinds(spec)
    model = _build_on_meta(sample_spec(spec, kinds), dtype)
    by_dtype: Counter[str] = Counter()
    numel = routed = 0
    seen = set()
    for name, p in model.named_parameters():  # tied parameters are yielded once
        match = _LAYER_PARAMETER.match(name)
        times = 1 if match is None else kinds[int(match.group(1))][1]
        if match is not None:
            seen.add(int(match.group(1)))
        numel += p.numel() * times
        by_dtype[str(p.dtype).removeprefix("torch.")] += p.numel() * p.element_size() * times
        if ".experts." in name:  # routed experts (shared experts live under shared_expert[s])
            routed += p.numel() * times
    if len(seen) != len(kinds):  # a model class whose layers are not model.layers.N would be miscounted
        raise RuntimeError(f"{type(model).__name__}: decoder layers not found under model.layers")
    idle = 0 if spec.moe is None else routed * (spec.moe.num_experts - spec.moe.top_k) // spec.moe.num_experts
    return numel, dict(by_dtype), numel - idle


# ---- counting from one layer of each kind ----
# Two layers of a model differ only through the spec's per-layer fields, so the parameters of a
# model are those of a copy with one layer of each kind, each layer counted as often as its kind
# occurs: a 1,000-layer config costs what a 2-layer one does, and the count is the built model's.
_LAYER_PARAMETER = re.compile(r"model\.layers\.(\d+)\.")


def layer_kinds(spec: ModelSpec) -> list[tuple[int, int]]:
    """(first layer, number of layers) of each distinct kind of layer in ``spec``, in layer order."""
    columns = [getattr(spec, f) for f in PER_LAYER_FIELDS if getattr(spec, f)]
    if not columns:
        return [(0, spec.num_hidden_layers)]
    first: dict[tuple[Any, ...], int] = {}
    counts: Counter[tuple[Any, ...]] = Counter()
    for i, kind in enumerate(zip(*columns)):
        first.setdefault(kind, i)
        counts[kind] += 1
    return [(i, counts[kind]) for kind, i in first.items()]


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
) -> MemoryPlan:
    """The memory plan of ``spec`` at ``dtype`` for the given engine limits."""
    kv_dtype = kv_cache_dtype or dtype
    numel, by_dtype, active = _count(spec, dtype)
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
        dtype=str(dtype).removeprefix("torch."),
        num_parameters=numel,
        active_parameters=active,
        weight_bytes=sum(by_dtype.values()),
        weight_bytes_by_dtype=dict(by_dtype),
        kv_cache_dtype=str(kv_dtype).removeprefix("torch."),
        kv_bytes_per_token=kv_per_token,
        activation_peak_bytes=tokens * per_token + logits,
        overhead_bytes=OVERHEAD_BYTES.get(device_type, OVERHEAD_BYTES["cpu"]),
        max_num_batched_tokens=tokens,
        max_model_len=max_model_len or spec.max_model_len,
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
