"""Mixture-of-experts: routing (``select_experts``), the expert computation (``fused_experts``) and MoE MLP blocks.

Every MoE block makes the same two calls::

    weights, ids = select_experts(router_logits, spec.moe, correction_bias)  # [T, k] float32, [T, k] int64
    out = fused_experts(x, experts, weights, ids)  # out[t] = Σ_j weights[t, j] · expert_{ids[t, j]}(x[t])

``fused_experts`` runs the fused Triton kernels of ``ops/triton_moe.py`` (device-side alignment, grouped GEMM
over stacked expert weights, no host synchronisation) when the bank offers its weights stacked
(``stacked``: a :class:`StackedExperts`) and the fused ops serve the input (``ops.dispatch.fused_ops_enabled``:
CUDA; on a CPU only under the tests' interpreter); otherwise ``moe_reference``, the loop over the experts that
are hit, with the tokens sorted by expert, which stays the oracle and the CPU path. An expert bank is anything
with ``num_experts`` and ``expert_forward(e, x)``. gpt-oss's checkpoints are stacked already; the
per-expert ``ExpertMLP`` banks are stacked after loading on the GPU by ``stack_()``, each expert's Linears
keeping views into the two stacked tensors (``MoEForCausalLM.fuse_projections``).

Parameter names equal the published checkpoint names under a decoder layer's ``mlp.`` prefix:

* ``SparseMoeBlock`` — Mixtral (after ``models/moe.mixtral_checkpoint_name``), Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3:
  ``gate.weight`` [E, H], ``gate.e_score_correction_bias`` [E] (noaux_tc only),
  ``experts.{e}.gate_proj|up_proj|down_proj.weight``, ``shared_expert.*`` + ``shared_expert_gate.weight``
  (Qwen2-MoE), ``shared_experts.*`` (DeepSeek).
* ``GptOssMoeBlock`` — gpt-oss: ``router.weight|bias``, ``experts.gate_up_proj`` [E, H, 2I] (gate/up
  interleaved), ``experts.gate_up_proj_bias`` [E, 2I], ``experts.down_proj`` [E, I, H],
  ``experts.down_proj_bias`` [E, H]; built inside ``mxfp4_expert_banks``, the published MXFP4 pairs
  ``experts.gate_up_proj_blocks|_scales`` and ``experts.down_proj_blocks|_scales`` instead of the two weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from dockyard.distributed.parallel_state import all_reduce
from dockyard.distributed.sharding import Sharder
from dockyard.errors import ConfigError
from dockyard.ops.activation import act_and_mul
from dockyard.ops.dispatch import fused_ops_enabled
from dockyard.ops.linear import gemv_enabled
from dockyard.ops.mxfp4_format import BLOCK as MXFP4_BLOCK
from dockyard.ops.mxfp4_format import BLOCKS_SUFFIX, SCALES_SUFFIX, dequantize_mxfp4_tensor
from dockyard.spec import ModelSpec, MoESpec

# gpt-oss's SwiGLU: glu = gate · σ(α · gate), α fixed by the architecture (HF config ``swiglu_alpha``).
GPT_OSS_SWIGLU_ALPHA = 1.702
# DeepSeek divides the chosen weights by (sum + 1e-20); in float32 the epsilon changes nothing unless the sum is 0.
_NORM_EPS = 1e-20


# ---------------------------------------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------------------------------------
def select_experts(
    router_logits: torch.Tensor, moe: MoESpec, correction_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose ``moe.top_k`` experts per token and their weights from router logits [T, E].

    Scores are ``softmax`` or ``sigmoid`` of the logits (``moe.scoring_func``). The choice uses
    ``scores + correction_bias`` (DeepSeek-V3's ``e_score_correction_bias``; None: no bias), restricted for
    ``group_limited_greedy`` / ``noaux_tc`` to the ``topk_group`` best of ``n_group`` equal expert groups
    (group score: the best expert in the group, resp. the sum of its best two). The weights are the
    *unbiased* scores of the chosen experts, divided by their sum when ``norm_topk_prob``, then multiplied by
    ``routed_scaling_factor`` (as HF's DeepSeek-V3; HF's DeepSeek-V2 ignores ``norm_topk_prob`` and always
    scales, DeepSeek's own V2 code scales only when it does not normalize: the three agree whenever
    ``norm_topk_prob`` is false, as in every released V2 checkpoint).

    Returns (weights [T, k], ids [T, k] int64), best expert first. The math runs in float32 (float64 when the
    logits are float64). Plain greedy softmax routing runs as one fused kernel where the fused ops serve
    (``ops.triton_moe.topk_softmax``).
    """
    if router_logits.dim() != 2 or router_logits.shape[-1] != moe.num_experts:
        raise ValueError(f"router_logits must be [tokens, {moe.num_experts}], got {tuple(router_logits.shape)}")
    k = moe.top_k
    plain = moe.topk_method == "greedy" and correction_bias is None
    if (plain and moe.scoring_func == "softmax" and router_logits.dtype != torch.float64
            and router_logits.stride(-1) == 1 and fused_ops_enabled(router_logits)):
        from dockyard.ops.triton_moe import topk_softmax  # Triton is an optional dependency

        return topk_softmax(router_logits, k, moe.norm_topk_prob, moe.routed_scaling_factor)
    dtype = torch.promote_types(router_logits.dtype, torch.float32)
    logits = router_logits.to(dtype)
    if plain and moe.scoring_func == "softmax" and moe.norm_topk_prob:
        # softmax over all experts, top-k, renormalize == softmax over the k largest logits (gpt-oss's form);
        # choosing on logits also avoids ties that rounding can create among probabilities.
        top_logits, ids = torch.topk(logits, k, dim=-1)
        weights = torch.softmax(top_logits, dim=-1)
        return _scale(weights, moe), ids
    if moe.scoring_func == "softmax":
        scores = torch.softmax(logits, dim=-1)
    elif moe.scoring_func == "sigmoid":
        scores = torch.sigmoid(logits)
    else:
        raise ConfigError(f"scoring_func={moe.scoring_func!r} is not supported; supported: softmax, sigmoid")
    choice = scores if correction_bias is None else scores + correction_bias.to(dtype)
    if moe.topk_method in ("group_limited_greedy", "noaux_tc") and moe.n_group > 1:
        choice = _mask_groups(choice, moe)
    elif moe.topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
        raise ConfigError(f"topk_method={moe.topk_method!r} is not supported; "
                          "supported: greedy, group_limited_greedy, noaux_tc")
    _, ids = torch.topk(choice, k, dim=-1)
    weights = scores.gather(1, ids)
    if moe.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + _NORM_EPS)
    return _scale(weights, moe), ids


def _mask_groups(choice: torch.Tensor, moe: MoESpec) -> torch.Tensor:
    """Set the choice scores of experts outside each token's ``topk_group`` best groups to -inf."""
    tokens, experts = choice.shape
    grouped = choice.view(tokens, moe.n_group, experts // moe.n_group)
    if moe.topk_method == "noaux_tc":  # DeepSeek-V3: a group is as good as its best two experts together
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
    else:  # DeepSeek-V2: a group is as good as its best expert
        group_scores = grouped.max(dim=-1).values
    kept = torch.topk(group_scores, moe.topk_group, dim=-1).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
    return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(tokens, experts)


def _scale(weights: torch.Tensor, moe: MoESpec) -> torch.Tensor:
    return weights * moe.routed_scaling_factor if moe.routed_scaling_factor != 1.0 else weights


# ---------------------------------------------------------------------------------------------------------
# Expert computation
# ---------------------------------------------------------------------------------------------------------
@runtime_checkable
class ExpertBank(Protocol):
    """What ``fused_experts`` needs of a set of experts (and, optionally, ``stacked``: a :class:`StackedExperts`
    or None, for the fused kernels)."""

    @property
    def num_experts(self) -> int: ...

    def expert_forward(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``expert`` applied to the rows x [n, H] routed to it → [n, H]."""
        ...


def moe_reference(
    x: torch.Tensor, experts: ExpertBank, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """out[t] = Σ_j topk_weights[t, j] · experts[topk_ids[t, j]](x[t]) for x [T, H]; the plain loop over experts.

    The (token, slot) pairs are sorted by expert so that each expert runs once on a contiguous batch of its
    tokens; the weighted outputs are summed in float32 and returned in x's dtype.
    """
    tokens, hidden = x.shape
    k = topk_ids.shape[-1]
    out = torch.zeros(tokens, hidden, dtype=torch.float32, device=x.device)
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    token_of = order // k
    weight_of = topk_weights.reshape(-1)[order].to(torch.float32)
    counts = torch.bincount(flat_ids, minlength=experts.num_experts).tolist()
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = slice(start, start + count)
        start += count
        if expert >= experts.num_experts:  # ids past the bank: experts held by another rank
            continue
        idx = token_of[rows]
        y = experts.expert_forward(expert, x[idx])
        out.index_add_(0, idx, y.to(torch.float32) * weight_of[rows, None])
    return out.to(x.dtype)


def fused_experts(
    x: torch.Tensor, experts: ExpertBank, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """The MoE expert computation every block calls: Σ_j topk_weights[t, j] · expert_{topk_ids[t, j]}(x[t]).

    x [T, H], topk_weights [T, k], topk_ids [T, k] → [T, H] in x's dtype. Ids ≥ the bank's expert count
    (experts another rank holds) contribute zero. The fused kernels where they serve (module docstring),
    else the reference loop.
    """
    counter = _routed_expert_counter
    stacked = getattr(experts, "stacked", None)
    if stacked is not None and x.dim() == 2 and fused_ops_enabled(x):
        from dockyard.ops.triton_moe import fused_moe  # Triton is an optional dependency

        return fused_moe(x.contiguous(), stacked, topk_weights, topk_ids,
                         stats=None if counter is None else counter.stats)
    if counter is not None:
        counter.add(topk_ids, experts.num_experts)
    return moe_reference(x, experts, topk_weights, topk_ids)


class RoutedExpertCounter:
    """Counts on the device the distinct experts (of the bank, so a rank's own) each ``fused_experts`` call
    routes to, and the calls (``stats``: int64 [distinct, calls]): the expert weights a step reads, for
    benchmarks. The fused path counts inside its alignment kernel (no extra launch), the reference path with
    a few tensor ops; device work only, so CUDA-graph replays count too: install it (``count_routed_experts``)
    before the engine captures."""

    def __init__(self, device: torch.device) -> None:
        self.stats = torch.zeros(2, dtype=torch.int64, device=device)

    def add(self, topk_ids: torch.Tensor, num_experts: int) -> None:
        hit = torch.zeros(num_experts + 1, dtype=torch.int64, device=topk_ids.device)
        hit.index_fill_(0, topk_ids.reshape(-1).clamp(max=num_experts), 1)
        self.stats[0] += hit[:num_experts].sum()
        self.stats[1] += 1

    def read(self) -> tuple[int, int]:
        """(distinct experts summed over calls, calls) so far (a host sync)."""
        distinct, calls = self.stats.tolist()
        return distinct, calls


_routed_expert_counter: RoutedExpertCounter | None = None


def count_routed_experts(counter: RoutedExpertCounter | None) -> None:
    """Make ``fused_experts`` count its routing into ``counter`` (None: stop counting)."""
    global _routed_expert_counter
    _routed_expert_counter = counter


@dataclasses.dataclass(frozen=True)
class StackedExperts:
    """An expert bank's weights as the grouped GEMM reads them (``ops/triton_moe.py``).

    Element (n, k) of expert e's gate (resp. down) weight, as ``y = x @ W.T``, sits at ``e·s_e + n·s_n + k·s_k``
    of ``gate_up`` (``down``) for strides ``(s_e, s_n, s_k)`` in elements; the up weight's element is
    ``up_offset`` further. Biases likewise: ``(s_e, s_n, up offset)``. ``activation`` is ``"silu"`` (SiLU(gate)
    · up) or ``"gpt_oss"`` (its clamped SwiGLU with ``limit`` and ``alpha``).

    MXFP4 weights (``gate_up_scales`` and ``down_scales`` given, ``ops.mxfp4_format``): ``gate_up`` and ``down``
    hold uint8 bytes of two e2m1 values along k (the low nibble the even k), the strides and ``up_offset``
    counted in bytes (``s_k`` = 1); the e8m0 scale of element (n, k) sits at ``e·s_e + n·s_n + k // 32`` of the
    scales for their ``(s_e, s_n, up offset)``.
    """

    gate_up: torch.Tensor
    gate_up_strides: tuple[int, int, int]
    up_offset: int
    down: torch.Tensor
    down_strides: tuple[int, int, int]
    intermediate_size: int
    activation: str
    gate_up_bias: torch.Tensor | None = None
    gate_up_bias_strides: tuple[int, int, int] = (0, 0, 0)
    down_bias: torch.Tensor | None = None
    down_bias_strides: tuple[int, int, int] = (0, 0, 0)
    limit: float | None = None
    alpha: float = GPT_OSS_SWIGLU_ALPHA
    gate_up_scales: torch.Tensor | None = None
    gate_up_scale_strides: tuple[int, int, int] = (0, 0, 0)
    down_scales: torch.Tensor | None = None
    down_scale_strides: tuple[int, int, int] = (0, 0, 0)

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]

    @property
    def is_mxfp4(self) -> bool:
        return self.gate_up_scales is not None


def stack_expert_mlps(experts: list[ExpertMLP]) -> StackedExperts | None:
    """Copy the experts' gate/up weights into one [E, 2I, H] tensor (gate rows then up rows) and their down
    weights into one [E, H, I], and make each expert's Linears views into them (so memory is not doubled and
    the reference path still works). None, with nothing changed, for experts the fused kernel does not run
    (biases, an activation other than SiLU)."""
    first = experts[0]
    if first.act != "silu" or any(m.gate_proj.bias is not None for m in experts):
        return None
    inter, hidden = first.gate_proj.weight.shape
    weight = first.gate_proj.weight
    gate_up = torch.empty(len(experts), 2 * inter, hidden, dtype=weight.dtype, device=weight.device)
    down = torch.empty(len(experts), hidden, inter, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        for e, mlp in enumerate(experts):  # one expert at a time: the old weights are freed as we go
            gate_up[e, :inter].copy_(mlp.gate_proj.weight)
            gate_up[e, inter:].copy_(mlp.up_proj.weight)
            down[e].copy_(mlp.down_proj.weight)
            mlp.gate_proj.weight = nn.Parameter(gate_up[e, :inter], requires_grad=False)
            mlp.up_proj.weight = nn.Parameter(gate_up[e, inter:], requires_grad=False)
            mlp.down_proj.weight = nn.Parameter(down[e], requires_grad=False)
    return StackedExperts(gate_up=gate_up, gate_up_strides=(gate_up.stride(0), hidden, 1), up_offset=inter * hidden,
                          down=down, down_strides=(down.stride(0), inter, 1), intermediate_size=inter,
                          activation="silu")


class ExpertMLP(nn.Module):
    """One gated expert: down(act(gate(x)) * up(x)), as Llama's MLP but with its own intermediate size."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "silu", bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act = hidden_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(act_and_mul(self.gate_proj(x), self.up_proj(x), self.act))


class ExpertList(nn.ModuleList):
    """The routed experts as ``ExpertMLP`` modules (checkpoint names ``experts.{e}.gate_proj.weight`` …)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, hidden_act: str = "silu") -> None:
        super().__init__(ExpertMLP(hidden_size, intermediate_size, hidden_act) for _ in range(num_experts))
        self.stacked: StackedExperts | None = None

    @property
    def num_experts(self) -> int:
        return len(self)

    def expert_forward(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        return self[expert](x)

    def stack_(self) -> None:
        """Stack the weights for the fused kernels (``stack_expert_mlps``), once loaded."""
        if self.stacked is None:
            self.stacked = stack_expert_mlps(list(self))


class LocalExperts(nn.ModuleDict):
    """The contiguous range of routed experts one expert-parallel rank holds, under their global indices
    (``experts.{e}.…``, so checkpoints load by the same names).

    As an expert bank its experts are numbered locally (0 .. held - 1); :meth:`local_ids` turns routed
    global ids into those, sending experts held elsewhere past the bank, which ``moe_reference`` skips.
    """

    def __init__(self, experts: dict[int, nn.Module], total: int) -> None:
        super().__init__({str(e): m for e, m in experts.items()})
        held = sorted(experts)
        if held != list(range(held[0], held[0] + len(held))):
            raise ValueError(f"an expert-parallel rank holds a contiguous range of experts, got {held}")
        self.first = held[0]
        self.total = total
        self._held = [experts[e] for e in held]
        self.stacked: StackedExperts | None = None

    def stack_(self) -> None:
        """Stack the held experts' weights for the fused kernels (``stack_expert_mlps``), once loaded."""
        if self.stacked is None:
            self.stacked = stack_expert_mlps(self._held)

    @property
    def num_experts(self) -> int:
        return len(self._held)

    def expert_forward(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        return self._held[expert](x)

    def local_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Global expert ids [T, k] → local ones; experts held elsewhere → ``num_experts``."""
        local = ids - self.first
        return local.masked_fill((local < 0) | (local >= self.num_experts), self.num_experts)


class MoEGate(nn.Module):
    """The router: logits = x @ weight.T (+ bias), plus DeepSeek-V3's ``e_score_correction_bias`` when asked.

    ``fp32`` computes the logits in float32 whatever x's dtype (DeepSeek does); otherwise they are computed and
    returned in x's dtype (``select_experts`` upcasts them: no separate cast per layer).
    """

    def __init__(self, hidden_size: int, num_experts: int, bias: bool = False, correction_bias: bool = False,
                 fp32: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.bias = nn.Parameter(torch.zeros(num_experts)) if bias else None
        # A parameter (not a buffer) so the weight loader fills it like any other checkpoint tensor.
        self.e_score_correction_bias = (
            nn.Parameter(torch.zeros(num_experts), requires_grad=False) if correction_bias else None
        )
        self.fp32 = fp32
        nn.init.normal_(self.weight, std=hidden_size**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] → router logits [T, E] (float32 with ``fp32``, else x's dtype)."""
        if self.fp32:
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias)
        if gemv_enabled(x, self.weight):  # a decode row: the GEMV kernel, as the model's other projections
            from dockyard.ops.triton_gemv import gemv  # Triton is an optional dependency

            return gemv(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


# ---------------------------------------------------------------------------------------------------------
# MoE MLP blocks
# ---------------------------------------------------------------------------------------------------------
def _require_moe(spec: ModelSpec) -> MoESpec:
    if spec.moe is None:
        raise ConfigError(f"{spec.architecture}: an MoE block needs a config with experts (spec.moe is None)")
    return spec.moe


class SparseMoeBlock(nn.Module):
    """Router + routed experts (+ shared experts): the MoE MLP of Mixtral, Qwen2/3-MoE and DeepSeek-V2/V3.

    ``forward(x [T, H]) -> [T, H]`` (any leading shape is flattened). Qwen2-MoE adds
    ``σ(shared_expert_gate(x)) · shared_expert(x)``; DeepSeek adds ``shared_experts(x)`` unscaled.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        moe = _require_moe(spec)
        self.moe = moe
        hidden = spec.hidden_size
        self.gate = MoEGate(hidden, moe.num_experts, correction_bias=moe.topk_method == "noaux_tc",
                            fp32=moe.router_fp32)
        self.experts = ExpertList(moe.num_experts, hidden, moe.intermediate_size, spec.hidden_act)
        self.shared_expert: ExpertMLP | None = None
        self.shared_expert_gate: nn.Linear | None = None
        self.shared_experts: ExpertMLP | None = None
        if moe.shared_expert_intermediate_size > 0:
            self.shared_expert = ExpertMLP(hidden, moe.shared_expert_intermediate_size, spec.hidden_act)
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)
        if moe.num_shared_experts > 0:
            self.shared_experts = ExpertMLP(hidden, moe.num_shared_experts * moe.intermediate_size,
                                            spec.hidden_act, bias=spec.mlp_bias)
        # Set by ``shard``: the output is this rank's partial sum, all-reduced here.
        self.reduce_results = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, ids = select_experts(self.gate(x), self.moe, self.gate.e_score_correction_bias)
        if isinstance(self.experts, LocalExperts):  # expert parallel: only the experts held here
            ids = self.experts.local_ids(ids)
        out = fused_experts(x, self.experts, weights, ids)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        if self.reduce_results:  # tensor/expert parallel: each rank has a partial sum
            out = all_reduce(out)
        return out.reshape(shape)

    def shard(self, sharder: Sharder, prefix: str) -> None:
        """Expert-parallel: keep this rank's range of whole experts; tensor-parallel: split every expert's
        intermediate features. Shared experts are split in both modes; one all-reduce sums the block."""
        experts = self.experts
        if sharder.parallel.expert_parallel:
            e0, e1 = sharder.parallel.split(experts.num_experts)
            self.experts = LocalExperts({e: experts[e] for e in range(e0, e1)}, experts.num_experts)
            sharder.drop_experts(prefix, experts.num_experts, range(e0, e1))
        else:
            for e, expert in enumerate(experts):
                sharder.gated_mlp(expert, f"{prefix}.experts.{e}", expert.gate_proj.out_features, reduce=False)
        for name in ("shared_expert", "shared_experts"):
            shared = getattr(self, name)
            if shared is not None:
                sharder.gated_mlp(shared, f"{prefix}.{name}", shared.gate_proj.out_features, reduce=False)
        self.reduce_results = True


_build_mxfp4_experts = False


@contextlib.contextmanager
def mxfp4_expert_banks() -> Iterator[None]:
    """``GptOssExperts`` built inside hold their weights as MXFP4 blocks and scales, as gpt-oss's checkpoints
    store them (the dense weights are never allocated)."""
    global _build_mxfp4_experts
    saved, _build_mxfp4_experts = _build_mxfp4_experts, True
    try:
        yield
    finally:
        _build_mxfp4_experts = saved


class GptOssExperts(nn.Module):
    """gpt-oss's experts, stored stacked as in its checkpoints, with biases and a clamped SwiGLU.

    Per expert e: h = x @ gate_up_proj[e] + gate_up_proj_bias[e] (gate = h[..., ::2], up = h[..., 1::2]);
    gate ≤ limit, |up| ≤ limit; y = ((up + 1) · gate · σ(α · gate)) @ down_proj[e] + down_proj_bias[e].

    Built inside :func:`mxfp4_expert_banks` (``mxfp4``), the two weights are held as the published checkpoint
    stores them, ``gate_up_proj_blocks|_scales`` [E, 2I, H/32, 16 | ] and ``down_proj_blocks|_scales``
    [E, H, I/32, 16 | ] (``ops.mxfp4_format``), and the fused kernel dequantizes them in registers; the
    reference loop dequantizes one expert per call.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, limit: float | None,
                 alpha: float = GPT_OSS_SWIGLU_ALPHA) -> None:
        super().__init__()
        self.mxfp4 = _build_mxfp4_experts
        if self.mxfp4:
            for name, rows, k in (("gate_up_proj", 2 * intermediate_size, hidden_size),
                                  ("down_proj", hidden_size, intermediate_size)):
                if k % MXFP4_BLOCK:
                    raise ConfigError(f"gpt-oss MXFP4 experts: {name}'s reduction size {k} is not a multiple of "
                                      f"{MXFP4_BLOCK}; the checkpoint cannot hold it in MXFP4 blocks")
                blocks = torch.empty(num_experts, rows, k // MXFP4_BLOCK, MXFP4_BLOCK // 2, dtype=torch.uint8)
                self.register_parameter(name + BLOCKS_SUFFIX, nn.Parameter(blocks, requires_grad=False))
                scales = torch.empty(num_experts, rows, k // MXFP4_BLOCK, dtype=torch.uint8)
                self.register_parameter(name + SCALES_SUFFIX, nn.Parameter(scales, requires_grad=False))
        else:
            # Left uninitialized: the strict loader fills every parameter (randn here would cost as much as the load).
            self.gate_up_proj = nn.Parameter(torch.empty(num_experts, hidden_size, 2 * intermediate_size))
            self.down_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(num_experts, 2 * intermediate_size))
        self.down_proj_bias = nn.Parameter(torch.zeros(num_experts, hidden_size))
        self.intermediate_size = intermediate_size
        self.limit = limit
        self.alpha = alpha
        # False keeps the reference loop (to compare, or to bisect a numerical difference).
        self.use_fused = True

    @property
    def num_experts(self) -> int:
        return self.gate_up_proj_bias.shape[0]

    def stack_(self) -> None:
        """Once loaded: store each weight with its reduction dimension contiguous (gate/up as [E, 2I, H], down as
        [E, H, I]), which the grouped GEMM streams in long coalesced rows, the parameters becoming transposed
        views (same shapes and names as the checkpoint; the reference path multiplies through them). MXFP4
        blocks are laid out so already."""
        if self.mxfp4:
            return
        with torch.no_grad():
            for name in ("gate_up_proj", "down_proj"):
                weight = getattr(self, name)
                if weight.stride(1) != 1:
                    relaid = weight.detach().transpose(1, 2).contiguous().transpose(1, 2)
                    setattr(self, name, nn.Parameter(relaid, requires_grad=False))

    @property
    def stacked(self) -> StackedExperts | None:
        """The weights through their strides: gate/up [E, H, 2I] with gate and up interleaved, down [E, I, H] (as
        the checkpoint, or re-laid out by ``stack_``), or their MXFP4 blocks [E, 2I, H/2] and [E, H, I/2] bytes;
        None (the reference loop) when ``use_fused`` is off."""
        if not self.use_fused:
            return None
        bias, down_bias = self.gate_up_proj_bias, self.down_proj_bias
        common = dict(intermediate_size=self.intermediate_size, activation="gpt_oss", gate_up_bias=bias,
                      gate_up_bias_strides=(bias.stride(0), 2 * bias.stride(1), bias.stride(1)), down_bias=down_bias,
                      down_bias_strides=(down_bias.stride(0), down_bias.stride(1), 0), limit=self.limit,
                      alpha=self.alpha)
        if self.mxfp4:
            gate_up, down = self.gate_up_proj_blocks, self.down_proj_blocks
            gate_up_scales, down_scales = self.gate_up_proj_scales, self.down_proj_scales
            return StackedExperts(
                gate_up=gate_up, gate_up_strides=(gate_up.stride(0), 2 * gate_up.stride(1), 1),
                up_offset=gate_up.stride(1), down=down, down_strides=(down.stride(0), down.stride(1), 1),
                gate_up_scales=gate_up_scales,
                gate_up_scale_strides=(gate_up_scales.stride(0), 2 * gate_up_scales.stride(1),
                                       gate_up_scales.stride(1)),
                down_scales=down_scales, down_scale_strides=(down_scales.stride(0), down_scales.stride(1), 0),
                **common)
        gate_up, down = self.gate_up_proj, self.down_proj
        return StackedExperts(
            gate_up=gate_up, gate_up_strides=(gate_up.stride(0), 2 * gate_up.stride(2), gate_up.stride(1)),
            up_offset=gate_up.stride(2), down=down, down_strides=(down.stride(0), down.stride(2), down.stride(1)),
            **common)

    def expert_weights(self, expert: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ``expert``'s (gate_up [H, 2I], down [I, H]) as dense matrices in ``dtype``."""
        if not self.mxfp4:
            return self.gate_up_proj[expert].to(dtype), self.down_proj[expert].to(dtype)
        return (dequantize_mxfp4_tensor(self.gate_up_proj_blocks[expert], self.gate_up_proj_scales[expert], dtype),
                dequantize_mxfp4_tensor(self.down_proj_blocks[expert], self.down_proj_scales[expert], dtype))

    def expert_forward(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        gate_up, down = self.expert_weights(expert, x.dtype)
        h = torch.addmm(self.gate_up_proj_bias[expert], x, gate_up)
        return torch.addmm(self.down_proj_bias[expert], gpt_oss_swiglu(h, self.limit, self.alpha), down)


def gpt_oss_swiglu(gate_up: torch.Tensor, limit: float | None, alpha: float = GPT_OSS_SWIGLU_ALPHA) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU over interleaved [g0, u0, g1, u1, …] → [..., I]; limit None: no clamping."""
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    if limit is not None:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


class GptOssMoeBlock(nn.Module):
    """gpt-oss's MoE MLP: a biased router (top-k logits, softmax over the k) and ``GptOssExperts``.

    ``forward(x [T, H]) -> [T, H]`` (any leading shape is flattened).
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        moe = _require_moe(spec)
        # The routing is fixed by the architecture, whatever the config says.
        self.moe = dataclasses.replace(moe, scoring_func="softmax", topk_method="greedy", norm_topk_prob=True,
                                       routed_scaling_factor=1.0, n_group=1, topk_group=1)
        self.router = MoEGate(spec.hidden_size, moe.num_experts, bias=True)
        self.experts = GptOssExperts(moe.num_experts, spec.hidden_size, moe.intermediate_size, spec.swiglu_limit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, ids = select_experts(self.router(x), self.moe)
        return fused_experts(x, self.experts, weights, ids).reshape(shape)

    def shard(self, sharder: Sharder, prefix: str) -> None:
        """Not split yet: a clear refusal instead of a silently replicated block."""
        raise ConfigError(f"{sharder.spec.architecture}: tensor parallelism does not support gpt-oss's stacked "
                          "experts yet; use tensor_parallel_size=1")

