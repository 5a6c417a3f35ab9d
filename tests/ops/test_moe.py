"""MoE routing and blocks against transformers' own MoE modules, and a float64 hand check of the routing.

Each HF block is built from a tiny config, its weights randomized, saved with ``save_pretrained`` (which
writes the published per-expert checkpoint names) and loaded into our block through dockyard's strict
loader, so the test checks the parameter names as well as the math.
"""

from __future__ import annotations

import copy
import functools
import math
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from dockyard.models.moe import mixtral_checkpoint_name
from dockyard.ops.moe import (
    ExpertList,
    GptOssExperts,
    GptOssMoeBlock,
    SparseMoeBlock,
    fused_experts,
    gpt_oss_swiglu,
    moe_reference,
    select_experts,
)
from dockyard.spec import ModelSpec, MoESpec
from dockyard.testing import rel_rmse
from dockyard.weights.loader import load_weights

TOKENS, HIDDEN = 24, 64
TOL = 1e-5
COMMON = dict(hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
MLA = dict(kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
DEEPSEEK = dict(intermediate_size=48, moe_intermediate_size=32, n_routed_experts=16, num_experts_per_tok=3,
                first_k_dense_replace=0, n_group=4, topk_group=2, **MLA)

# name: (model_type, architecture, HF config kwargs, extra config.json keys HF's config object does not keep)
CASES = {
    "mixtral": ("mixtral", "MixtralForCausalLM",
                dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2), {}),
    "qwen2_moe": ("qwen2_moe", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=48, moe_intermediate_size=32, shared_expert_intermediate_size=40,
                       num_experts=8, num_experts_per_tok=2, norm_topk_prob=False), {}),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=48, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                       norm_topk_prob=True), {}),
    "deepseek_v2_group": ("deepseek_v2", "DeepseekV2ForCausalLM",
                          dict(DEEPSEEK, n_shared_experts=2, topk_method="group_limited_greedy",
                               routed_scaling_factor=1.7), {}),
    "deepseek_v2_greedy": ("deepseek_v2", "DeepseekV2ForCausalLM",
                           dict(DEEPSEEK, n_shared_experts=2, topk_method="greedy", routed_scaling_factor=1.7), {}),
    # HF's DeepseekV3 router always does noaux_tc with sigmoid; real config.json files say so explicitly.
    "deepseek_v3": ("deepseek_v3", "DeepseekV3ForCausalLM",
                    dict(DEEPSEEK, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True),
                    dict(topk_method="noaux_tc", scoring_func="sigmoid")),
    # swiglu_limit 1.0 (real: 7.0) so that the clamps actually cut values of unit scale. 2I (48) != H (64): a
    # transposed expert layout fails loading by shape instead of passing it.
    "gpt_oss": ("gpt_oss", "GptOssForCausalLM",
                dict(intermediate_size=24, num_local_experts=8, num_experts_per_tok=2, head_dim=16,
                     swiglu_limit=1.0), {}),
}


def _randomize(mlp: nn.Module, gen: torch.Generator) -> None:
    """randn · fan_in^-½ for weights; unit-scale biases; a correction bias of the size of the sigmoid spread."""
    transposed = type(mlp).__name__ == "GptOssMLP"  # gpt-oss stores x @ W ([E, in, out]); the others W @ x
    with torch.no_grad():
        for name, t in mlp.state_dict(keep_vars=True).items():
            if name.endswith("e_score_correction_bias"):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.2)
            elif name.endswith("bias"):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.5)
            else:
                fan_in = t.shape[-2] if transposed and t.dim() == 3 else t.shape[-1]
                t.copy_(torch.randn(t.shape, generator=gen) * fan_in**-0.5)


@functools.cache
def _hf_and_ours(case: str, seed: int = 0) -> tuple[nn.Module, nn.Module, dict]:
    """(HF MoE block with random weights, our block loaded from its saved checkpoint, HF state dict).

    Cached: callers must not change the modules (copy them first).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, arch, kwargs, extra = CASES[case]
    config = AutoConfig.for_model(model_type, **COMMON, **kwargs)
    hf_model = AutoModelForCausalLM.from_config(config, experts_implementation="eager").eval()
    hf_mlp = hf_model.model.layers[0].mlp
    _randomize(hf_mlp, torch.Generator().manual_seed(seed))
    spec = ModelSpec.from_hf_config({**config.to_dict(), **extra, "architectures": [arch]})
    assert spec.is_moe_layer(0)
    ours = _wrap(GptOssMoeBlock(spec) if model_type == "gpt_oss" else SparseMoeBlock(spec))
    with tempfile.TemporaryDirectory() as directory:
        hf_model.save_pretrained(directory)
        saved = load_file(str(Path(directory) / "model.safetensors"))
    prefix = "model.layers.0."
    ckpt = {name[len(prefix):]: t for name, t in saved.items()
            if name.startswith(prefix) and name[len(prefix):].startswith(("mlp.", "block_sparse_moe."))}
    load_weights(ours, ckpt.items(), name_map=mixtral_checkpoint_name)  # strict: every name must match
    return hf_mlp, ours.mlp, {k: v.detach() for k, v in hf_mlp.state_dict().items()}


def _wrap(block: nn.Module) -> nn.Module:
    holder = nn.Module()
    holder.mlp = block
    return holder


def _x(seed: int = 1, tokens: int = TOKENS) -> torch.Tensor:
    return torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(seed))


def _hf_out(hf_mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = hf_mlp(x[None])
    if isinstance(out, tuple):  # gpt-oss's MLP also returns its router scores
        out = out[0]
    return out[0]


# ---- against HF ----
@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_block_matches_hf(case: str) -> None:
    hf_mlp, ours, _ = _hf_and_ours(case)
    x = _x()
    ref = _hf_out(hf_mlp, x)
    got = ours(x)
    assert got.shape == x.shape and got.dtype == x.dtype
    err = rel_rmse(got, ref)
    assert err <= TOL, f"{case}: rel rmse {err:.2e}"
    # Leading dims are flattened and restored.
    assert torch.allclose(ours(x.view(2, TOKENS // 2, HIDDEN)).view(TOKENS, HIDDEN), got, atol=1e-6)


@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe", "deepseek_v3"])
@torch.no_grad()
def test_hf_fused_expert_layout(case: str) -> None:
    """HF 5 keeps experts fused: gate_up_proj [E, 2I, H] (gate rows, then up rows) and down_proj [E, H, I]."""
    _, ours, hf_sd = _hf_and_ours(case)
    gate_up, down = hf_sd["experts.gate_up_proj"], hf_sd["experts.down_proj"]
    inter = down.shape[-1]
    for e, expert in enumerate(ours.experts):
        assert torch.equal(expert.gate_proj.weight, gate_up[e, :inter])
        assert torch.equal(expert.up_proj.weight, gate_up[e, inter:])
        assert torch.equal(expert.down_proj.weight, down[e])
    bank = copy.deepcopy(ours.experts)
    bank.stack_()  # the fused kernels' layout is HF's; the experts keep working on views into it
    assert torch.equal(bank.stacked.gate_up, gate_up) and torch.equal(bank.stacked.down, down)
    assert all(e.gate_proj.weight.data_ptr() == bank.stacked.gate_up[i].data_ptr() for i, e in enumerate(bank))
    x = _x()
    assert torch.equal(moe_reference(x, bank, *_routing_for(x)), moe_reference(x, ours.experts, *_routing_for(x)))


def _routing_for(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return torch.rand(x.shape[0], 2, generator=gen), torch.randint(0, 8, (x.shape[0], 2), generator=gen)


@torch.no_grad()
def test_routing_variants_are_exercised() -> None:
    """The HF tests above would not notice a missing group restriction or bias unless they change choices."""
    for case in ("deepseek_v2_group", "deepseek_v3"):
        _, ours, _ = _hf_and_ours(case)
        logits = ours.gate(_x())
        _, ids = select_experts(logits, ours.moe, ours.gate.e_score_correction_bias)
        plain = MoESpec(num_experts=ours.moe.num_experts, top_k=ours.moe.top_k, intermediate_size=1,
                        scoring_func=ours.moe.scoring_func)
        _, plain_ids = select_experts(logits, plain)
        differs = (ids.sort(dim=-1).values != plain_ids.sort(dim=-1).values).any(dim=-1)
        assert differs.sum() >= 3, case


@torch.no_grad()
def test_gpt_oss_clamps_are_exercised() -> None:
    _, ours, _ = _hf_and_ours("gpt_oss")
    h = _x() @ ours.experts.gate_up_proj[0] + ours.experts.gate_up_proj_bias[0]
    limit = ours.experts.limit
    assert (h[:, ::2] > limit).any() and (h[:, 1::2].abs() > limit).any()
    assert (h[:, 1::2] < -limit).any()


def test_gpt_oss_swiglu_hand() -> None:
    gate_up = torch.tensor([[3.0, -5.0, -2.0, 0.5]], dtype=torch.float64)  # (g0, u0, g1, u1)
    got = gpt_oss_swiglu(gate_up, limit=1.0, alpha=1.702)

    def glu(g: float) -> float:
        return g / (1 + math.exp(-1.702 * g))

    want = torch.tensor([[(-1.0 + 1) * glu(1.0), (0.5 + 1) * glu(-2.0)]], dtype=torch.float64)
    assert torch.allclose(got, want, rtol=0, atol=1e-15)


@torch.no_grad()
def test_bf16_block_runs_close_to_fp32() -> None:
    ours = copy.deepcopy(_hf_and_ours("qwen2_moe")[1])
    x = _x()
    ref = ours(x)
    got = ours.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    assert rel_rmse(got, ref) < 5e-2


# ---- the expert computation ----
@torch.no_grad()
def test_moe_reference_matches_dense_float64() -> None:
    """Every expert on every token, then pick: an independent form of Σ_j w[t, j] · expert_{ids[t, j]}(x[t])."""
    torch.manual_seed(0)
    experts = ExpertList(6, HIDDEN, 16).double()
    x = _x().double()
    gen = torch.Generator().manual_seed(3)
    ids = torch.stack([torch.randperm(5, generator=gen)[:3] for _ in range(TOKENS)])  # expert 5: no tokens
    weights = torch.rand(TOKENS, 3, generator=gen, dtype=torch.float64)
    everything = torch.stack([expert(x) for expert in experts])  # [E, T, H]
    want = sum(weights[:, j, None] * everything[ids[:, j], torch.arange(TOKENS)] for j in range(3))
    got = moe_reference(x, experts, weights, ids)
    assert got.dtype == torch.float64
    # moe_reference sums in float32, so compare at float32 precision.
    assert rel_rmse(got, want) < 1e-6
    assert torch.equal(fused_experts(x, experts, weights, ids), got)
    # Zero tokens give zero rows.
    assert moe_reference(x[:0], experts, weights[:0], ids[:0]).shape == (0, HIDDEN)


def test_gpt_oss_experts_default_init_runs() -> None:
    experts = GptOssExperts(4, HIDDEN, 8, limit=7.0)
    assert experts.num_experts == 4
    assert experts.expert_forward(2, _x()).shape == (TOKENS, HIDDEN)


# ---- routing by hand, float64 ----
def _moe(**kw: object) -> MoESpec:
    return MoESpec(intermediate_size=1, **kw)


def _sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def _check(logits: list[float], moe: MoESpec, want_ids: list[int], want_weights: list[float],
           bias: list[float] | None = None) -> None:
    router_logits = torch.tensor([logits], dtype=torch.float64)
    correction = None if bias is None else torch.tensor(bias, dtype=torch.float64)
    weights, ids = select_experts(router_logits, moe, correction)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float64
    assert ids[0].tolist() == want_ids
    assert torch.allclose(weights[0], torch.tensor(want_weights, dtype=torch.float64), rtol=1e-12, atol=0)


def test_select_experts_softmax_hand() -> None:
    logits = [1.0, 3.0, 2.0, 0.0]
    z = sum(math.exp(v) for v in logits)
    _check(logits, _moe(num_experts=4, top_k=2), [1, 2], [math.exp(3) / z, math.exp(2) / z])
    _check(logits, _moe(num_experts=4, top_k=2, routed_scaling_factor=2.0), [1, 2],
           [2 * math.exp(3) / z, 2 * math.exp(2) / z])
    # Renormalized (Mixtral, Qwen3-MoE, gpt-oss): e^3 / (e^3 + e^2) = σ(1).
    _check(logits, _moe(num_experts=4, top_k=2, norm_topk_prob=True), [1, 2], [_sig(1.0), _sig(-1.0)])


def test_select_experts_sigmoid_greedy_hand() -> None:
    logits = [-1.0, 0.5, 2.0, 0.25]
    _check(logits, _moe(num_experts=4, top_k=2, scoring_func="sigmoid"), [2, 1], [_sig(2.0), _sig(0.5)])


def test_select_experts_group_limited_greedy_hand() -> None:
    # Groups {0,1} {2,3} {4,5} {6,7}; group score = best expert: 5, 4, 0, 4.5 → groups 0 and 3 are kept.
    # Plain top-3 would be experts 0, 6, 2; within the kept groups it is 0, 6, 1.
    logits = [5.0, 1.0, 4.0, 3.9, 0.0, 0.0, 4.5, 0.5]
    z = sum(math.exp(v) for v in logits)
    moe = _moe(num_experts=8, top_k=3, topk_method="group_limited_greedy", n_group=4, topk_group=2,
               routed_scaling_factor=16.0)
    _check(logits, moe, [0, 6, 1], [16 * math.exp(v) / z for v in (5.0, 4.5, 1.0)])
    _check(logits, _moe(num_experts=8, top_k=3, routed_scaling_factor=16.0), [0, 6, 2],
           [16 * math.exp(v) / z for v in (5.0, 4.5, 4.0)])


def test_select_experts_noaux_tc_hand() -> None:
    logits = [2.0, -2.0, 1.0, 0.9, 0.0, 0.5, -1.0, 3.0]
    bias = [0.0, 0.0, 0.0, 0.0, 0.3, 0.3, 0.0, -0.5]
    # Biased scores σ(l) + b ≈ .881 .119 | .731 .711 | .800 .923 | .269 .453; group score = sum of the best two:
    # 1.000, 1.442, 1.723, 0.721 → groups 2 and 1 are kept (by best expert alone it would be groups 2 and 0).
    # Best two biased scores there: experts 5 (.923) and 4 (.800). Weights: the unbiased σ(0.5), σ(0) = .5,
    # renormalized, × 2.5.
    moe = _moe(num_experts=8, top_k=2, scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2,
               norm_topk_prob=True, routed_scaling_factor=2.5)
    s5, s4 = _sig(0.5), 0.5
    _check(logits, moe, [5, 4], [2.5 * s5 / (s5 + s4), 2.5 * s4 / (s5 + s4)], bias=bias)
    # Not normalized: the raw sigmoid scores × 2.5.
    raw = _moe(num_experts=8, top_k=2, scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2,
               routed_scaling_factor=2.5)
    _check(logits, raw, [5, 4], [2.5 * s5, 2.5 * s4], bias=bias)
    # Without groups the bias alone decides: 5 (.923) and 0 (.881) rather than the unbiased best 7 and 0.
    flat = _moe(num_experts=8, top_k=2, scoring_func="sigmoid", topk_method="noaux_tc")
    _check(logits, flat, [5, 0], [s5, _sig(2.0)], bias=bias)


def test_select_experts_float32_output() -> None:
    logits = torch.randn(5, 8, dtype=torch.bfloat16)
    weights, ids = select_experts(logits, _moe(num_experts=8, top_k=2, norm_topk_prob=True))
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64 and weights.shape == (5, 2)
    assert torch.allclose(weights.sum(-1), torch.ones(5))


# ---- checkpoint names ----
def test_mixtral_checkpoint_name() -> None:
    assert (mixtral_checkpoint_name("model.layers.3.block_sparse_moe.experts.7.w1.weight")
            == "model.layers.3.mlp.experts.7.gate_proj.weight")
    assert (mixtral_checkpoint_name("model.layers.3.block_sparse_moe.experts.0.w3.weight")
            == "model.layers.3.mlp.experts.0.up_proj.weight")
    assert (mixtral_checkpoint_name("model.layers.3.block_sparse_moe.experts.12.w2.weight")
            == "model.layers.3.mlp.experts.12.down_proj.weight")
    assert mixtral_checkpoint_name("model.layers.3.block_sparse_moe.gate.weight") == "model.layers.3.mlp.gate.weight"
    assert mixtral_checkpoint_name("block_sparse_moe.experts.1.w2.weight") == "mlp.experts.1.down_proj.weight"
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.experts.1.gate_proj.weight",
                 "model.layers.0.feed_forward.w1.weight", "lm_head.weight"):
        assert mixtral_checkpoint_name(name) == name


def test_parameter_names() -> None:
    spec = ModelSpec.from_hf_config({
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", **COMMON, **DEEPSEEK,
        "n_shared_experts": 1, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
    })
    names = {n for n, _ in SparseMoeBlock(spec).named_parameters()}
    assert {"gate.weight", "gate.e_score_correction_bias", "experts.15.gate_proj.weight",
            "experts.0.up_proj.weight", "experts.3.down_proj.weight", "shared_experts.gate_proj.weight"} <= names
    assert not any("shared_expert." in n or ("bias" in n and "correction" not in n) for n in names)
