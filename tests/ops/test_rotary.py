"""RotaryEmbedding against transformers' own rope code, and against a float64 hand reference."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from dockyard.errors import ConfigError
from dockyard.ops.rotary import RotaryEmbedding, get_rope
from dockyard.spec import RopeSpec

HEAD_DIM = 16
Q_HEADS, KV_HEADS = 4, 2
# A flat batch of two sequences: a prefill of 37 tokens and 5 tokens at positions 100..104.
POSITIONS = torch.cat([torch.arange(0, 37), torch.arange(0, 5) + 100])
TOL = 1e-5


def _qk(dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    t = POSITIONS.numel()
    q = torch.randn(t, Q_HEADS, HEAD_DIM, generator=gen)
    k = torch.randn(t, KV_HEADS, HEAD_DIM, generator=gen)
    return q.to(dtype), k.to(dtype)


def _spec(params: dict) -> RopeSpec:
    """RopeSpec from an HF rope_parameters dict (field names are HF's keys)."""
    skip = ("rope_type", "rope_theta", "partial_rotary_factor")
    rest = {key: v for key, v in params.items() if key not in skip}
    return RopeSpec(rope_type=params["rope_type"], theta=params["rope_theta"], **rest)


def _hf_rotate(
    params: dict, max_pos: int, q: torch.Tensor, k: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k rotated by transformers' LlamaRotaryEmbedding + apply_rotary_pos_emb (fresh module per call)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = transformers.LlamaConfig(
        hidden_size=64, num_attention_heads=Q_HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
        max_position_embeddings=max_pos, rope_parameters=dict(params),  # HF edits the dict it is given
    )
    cos, sin = LlamaRotaryEmbedding(config)(q, POSITIONS[None])  # [1, T, rotary_dim]
    rd = cos.shape[-1]
    q_rot, k_rot = apply_rotary_pos_emb(q[None, ..., :rd], k[None, ..., :rd], cos, sin, unsqueeze_dim=2)
    return torch.cat([q_rot[0], q[..., rd:]], -1), torch.cat([k_rot[0], k[..., rd:]], -1)


def _reference_f64(x: torch.Tensor, positions: torch.Tensor, theta: float, rotary_dim: int) -> torch.Tensor:
    """Pair (x[i], x[i + rotary_dim/2]) as a complex number, times exp(1j * pos * theta^(-2i/rotary_dim))."""
    x = x.double()
    half = rotary_dim // 2
    inv_freq = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / rotary_dim)
    angle = positions.double()[:, None] * inv_freq[None, :]
    turn = torch.polar(torch.ones_like(angle), angle)[:, None, :]
    z = torch.complex(x[..., :half], x[..., half:rotary_dim]) * turn
    return torch.cat([z.real, z.imag, x[..., rotary_dim:]], dim=-1)


# (id, HF rope_parameters, HF max_position_embeddings = our max_position, partial_rotary_factor)
CASES = [
    ("default", {"rope_type": "default", "rope_theta": 10000.0}, 128, None),
    ("linear", {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}, 128, None),
    ("linear-partial", {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}, 128, 0.5),
    # max(POSITIONS) + 1 = 105: at most 256 → plain frequencies; over 64 → rescaled base. HF's dynamic
    # threshold is max_position_embeddings (it ignores original_max_position_embeddings); ours falls back
    # to max_position when the spec has no original length.
    ("dynamic-below", {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, 256, None),
    ("dynamic-above", {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, 64, None),
    ("dynamic-above-partial", {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 3.0}, 64, 0.5),
    # theta 5e5, original 64: pair 0 keeps its frequency, pair 1 is blended, pairs 2+ are divided.
    ("llama3", {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, 256, None),
    ("llama3-partial", {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, 256, 0.75),
    # original 2048 puts the ramp over pairs 2..6 of 8.
    ("yarn", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
              "original_max_position_embeddings": 2048}, 8192, None),
    ("yarn-mscale", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 1.0,
                     "mscale_all_dim": 0.5, "original_max_position_embeddings": 2048}, 8192, None),
    ("yarn-explicit", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "attention_factor": 1.3,
                       "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False,
                       "original_max_position_embeddings": 2048}, 8192, None),
    ("yarn-no-original", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}, 128, None),
    ("yarn-partial", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                      "original_max_position_embeddings": 2048}, 8192, 0.5),
]


@pytest.mark.parametrize("params,max_pos,partial", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_matches_transformers(params: dict, max_pos: int, partial: float | None) -> None:
    q, k = _qk()
    hf_params = dict(params, partial_rotary_factor=partial) if partial else params
    q_ref, k_ref = _hf_rotate(hf_params, max_pos, q, k)
    rotary_dim = int(HEAD_DIM * partial) if partial else None
    q_out, k_out = get_rope(_spec(params), HEAD_DIM, max_pos, rotary_dim)(POSITIONS, q, k)
    assert q_out.shape == q.shape and k_out.shape == k.shape
    assert q_out.dtype == torch.float32
    assert (q_out - q_ref).abs().max().item() < TOL
    assert (k_out - k_ref).abs().max().item() < TOL
    if partial:  # the dims past rotary_dim pass through untouched
        assert torch.equal(q_out[..., rotary_dim:], q[..., rotary_dim:])


def test_table_grows_past_max_position() -> None:
    """Positions beyond max_position (104 > 16) still match transformers."""
    q, k = _qk()
    params = {"rope_type": "default", "rope_theta": 10000.0}
    q_ref, k_ref = _hf_rotate(params, 128, q, k)
    rope = RotaryEmbedding(_spec(params), HEAD_DIM, max_position=16)
    q_out, k_out = rope(POSITIONS, q, k)
    assert rope.cos_table.shape[0] >= 105
    assert (q_out - q_ref).abs().max().item() < TOL
    assert (k_out - k_ref).abs().max().item() < TOL


@pytest.mark.parametrize("rotary_dim", [HEAD_DIM, 8])
def test_default_matches_float64_reference(rotary_dim: int) -> None:
    q, k = _qk()
    theta = 10000.0
    q_out, k_out = RotaryEmbedding(RopeSpec(theta=theta), HEAD_DIM, 128, rotary_dim)(POSITIONS, q, k)
    q_ref = _reference_f64(q, POSITIONS, theta, rotary_dim)
    k_ref = _reference_f64(k, POSITIONS, theta, rotary_dim)
    # float32 frequencies and angles at positions ~100: a few 1e-6 of error.
    assert (q_out.double() - q_ref).abs().max().item() < 2e-5
    assert (k_out.double() - k_ref).abs().max().item() < 2e-5


def test_dynamic_threshold_is_original_max_position() -> None:
    """original_max_position_embeddings, when the spec has it, is the length past which the base grows."""
    q, k = _qk()
    q_ref, k_ref = _hf_rotate({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, 64, q, k)
    spec = RopeSpec(rope_type="dynamic", factor=2.0, original_max_position_embeddings=64)
    q_out, k_out = RotaryEmbedding(spec, HEAD_DIM, max_position=4096)(POSITIONS, q, k)
    assert (q_out - q_ref).abs().max().item() < TOL
    assert (k_out - k_ref).abs().max().item() < TOL


def test_dynamic_is_per_call() -> None:
    """Below the threshold it is exactly default, also right after a call that went past it."""
    q, k = _qk()
    rope = RotaryEmbedding(RopeSpec(rope_type="dynamic", factor=2.0), HEAD_DIM, 64)
    default = RotaryEmbedding(RopeSpec(), HEAD_DIM, 64)
    short = POSITIONS[:37]
    scaled, _ = rope(POSITIONS, q, k)
    plain, _ = default(POSITIONS, q, k)
    assert not torch.allclose(scaled, plain)
    out = rope(short, q[:37], k[:37])
    ref = default(short, q[:37], k[:37])
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_yarn_attention_factor() -> None:
    """get_mscale(4) = 0.1 ln 4 + 1 scales cos and sin; with mscale/mscale_all_dim, their ratio does."""
    base = RopeSpec(rope_type="yarn", factor=4.0, original_max_position_embeddings=2048)
    plain = RotaryEmbedding(base, HEAD_DIM, 8192).attention_scaling
    assert plain == pytest.approx(0.1 * math.log(4) + 1)
    both = dataclasses.replace(base, mscale=1.0, mscale_all_dim=0.5)
    ratio = RotaryEmbedding(both, HEAD_DIM, 8192).attention_scaling
    assert ratio == pytest.approx((0.1 * math.log(4) + 1) / (0.05 * math.log(4) + 1))
    # HF tests mscale truthiness: a zero mscale_all_dim means "not given".
    zero = dataclasses.replace(base, mscale=1.0, mscale_all_dim=0.0)
    assert RotaryEmbedding(zero, HEAD_DIM, 8192).attention_scaling == pytest.approx(plain)


def test_positions_in_any_order() -> None:
    q, k = _qk()
    rope = RotaryEmbedding(RopeSpec(rope_type="linear", factor=2.0), HEAD_DIM, 128)
    perm = torch.randperm(POSITIONS.numel(), generator=torch.Generator().manual_seed(1))
    q_sorted, k_sorted = rope(POSITIONS, q, k)
    q_perm, k_perm = rope(POSITIONS[perm], q[perm], k[perm])
    assert torch.equal(q_perm, q_sorted[perm]) and torch.equal(k_perm, k_sorted[perm])


def test_bfloat16_keeps_dtype() -> None:
    q, k = _qk(torch.bfloat16)
    rope = RotaryEmbedding(RopeSpec(), HEAD_DIM, 128)
    q_out, k_out = rope(POSITIONS, q, k)
    assert q_out.dtype == torch.bfloat16 and k_out.dtype == torch.bfloat16
    assert q_out.shape == q.shape and k_out.shape == k.shape
    q_f32, k_f32 = rope(POSITIONS, q.float(), k.float())  # float32 math, one rounding at the end
    assert torch.equal(q_out, q_f32.to(torch.bfloat16)) and torch.equal(k_out, k_f32.to(torch.bfloat16))


def test_tables_stay_float32_under_half_default_dtype() -> None:
    """The engine builds models under torch.set_default_dtype(bfloat16); the tables must not follow."""
    spec = RopeSpec(rope_type="yarn", factor=4.0, original_max_position_embeddings=2048)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        rope_half_default = RotaryEmbedding(spec, HEAD_DIM, 8192)
    finally:
        torch.set_default_dtype(previous)
    rope = RotaryEmbedding(spec, HEAD_DIM, 8192)
    assert rope_half_default.cos_table.dtype == torch.float32
    assert torch.equal(rope_half_default.cos_table, rope.cos_table)
    assert torch.equal(rope_half_default.sin_table, rope.sin_table)


def test_unknown_rope_type_raises() -> None:
    with pytest.raises(ConfigError, match="longrope"):
        get_rope(RopeSpec(rope_type="longrope"), HEAD_DIM, 128)


def test_bad_rotary_dim_raises() -> None:
    with pytest.raises(ConfigError, match="rotary_dim=7"):
        RotaryEmbedding(RopeSpec(), HEAD_DIM, 128, rotary_dim=7)
