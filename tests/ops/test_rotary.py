"""RotaryEmbedding against transformers' own rope code, and against a float64 hand reference."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from dockyard import spec as spec_module
from dockyard.errors import ConfigError
from dockyard.ops import rotary
from dockyard.ops.rotary import RotaryEmbedding, get_rope
from dockyard.spec import ModelSpec, RopeSpec

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
    with pytest.raises(ConfigError, match="'bogus' is not supported.*longrope"):
        get_rope(RopeSpec(rope_type="bogus"), HEAD_DIM, 128)


def test_rope_types_come_from_spec() -> None:
    assert rotary.ROPE_TYPES is spec_module.ROPE_TYPES


def test_bad_rotary_dim_raises() -> None:
    with pytest.raises(ConfigError, match="rotary_dim=7"):
        RotaryEmbedding(RopeSpec(), HEAD_DIM, 128, rotary_dim=7)


# ---- longrope (Phi-3 / Phi-3.5 / Phi-4-mini) ----
# A small Phi-3: head_dim 64 / 4 = 16, pre-trained on 64 positions, extended to 256 (factor 4).
PHI3_ORIG, PHI3_MAX = 64, 256
SHORT_POSITIONS = torch.cat([torch.arange(0, 37), torch.arange(0, 5) + 50])  # max + 1 = 55 <= 64
LONG_POSITIONS = torch.cat([torch.arange(0, 37), torch.arange(0, 5) + 196])  # max + 1 = 201 > 64


def _factors(n: int) -> tuple[list[float], list[float]]:
    """Distinct, Phi-like per-pair factors: short ones near 1, long ones growing to ~(max / orig)."""
    short = [1.0 + 0.05 * i for i in range(n)]
    long = [1.0 + 3.5 * i / max(n - 1, 1) + 0.01 * i * i for i in range(n)]
    return short, long


def _phi3_config(partial: float = 1.0, **rope_extra: float):
    """transformers' Phi3Config with a v4-style longrope ``rope_scaling`` (Phi3Config rewrites it)."""
    transformers = pytest.importorskip("transformers")
    short, long = _factors(int(HEAD_DIM * partial) // 2)
    return transformers.Phi3Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=Q_HEADS,
        num_key_value_heads=KV_HEADS, max_position_embeddings=PHI3_MAX, original_max_position_embeddings=PHI3_ORIG,
        partial_rotary_factor=partial, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        rope_scaling={"type": "longrope", "short_factor": short, "long_factor": long, **rope_extra},
    )


def _our_rope(hf_config) -> RotaryEmbedding:
    """Our rotary embedding, built the way the engine does: HF config dict → ModelSpec → get_rope."""
    spec = ModelSpec.from_hf_config({**hf_config.to_dict(), "architectures": ["Phi3ForCausalLM"]})
    assert spec.rope.rope_type == "longrope"
    assert spec.rope.original_max_position_embeddings == PHI3_ORIG
    return get_rope(spec.rope, spec.head_dim, spec.max_position_embeddings, spec.rotary_dim)


def _hf_phi3(hf_rope, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
    """cos, sin [T, rotary_dim / 2] and rotated q, k from transformers' Phi3RotaryEmbedding."""
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

    cos, sin = hf_rope(q, positions[None])  # [1, T, rotary_dim], both halves equal
    q_ref, k_ref = apply_rotary_pos_emb(q[None], k[None], cos, sin, unsqueeze_dim=2)
    half = cos.shape[-1] // 2
    return cos[0, :, :half], sin[0, :, :half], q_ref[0], k_ref[0]


def _qk_for(positions: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    t = positions.numel()
    return torch.randn(t, Q_HEADS, HEAD_DIM, generator=gen), torch.randn(t, KV_HEADS, HEAD_DIM, generator=gen)


LONGROPE_CASES = [
    ("full", 1.0, {}),
    ("partial-0.5", 0.5, {}),
    ("partial-0.75", 0.75, {}),  # Phi-4-mini's partial_rotary_factor
    ("explicit-factor", 1.0, {"factor": 2.0}),  # HF prefers the rope dict's factor to 256 / 64
    ("explicit-attention-factor", 0.5, {"attention_factor": 1.25}),
]


@pytest.mark.parametrize("partial,rope_extra", [c[1:] for c in LONGROPE_CASES], ids=[c[0] for c in LONGROPE_CASES])
def test_longrope_matches_transformers(partial: float, rope_extra: dict) -> None:
    """Short, long, then short again through one module each: HF switches per forward, we per call."""
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    hf_config = _phi3_config(partial, **rope_extra)
    hf_rope = Phi3RotaryEmbedding(hf_config)
    ours = _our_rope(hf_config)
    rotary_dim = int(HEAD_DIM * partial)
    assert ours.rotary_dim == rotary_dim
    assert ours.attention_scaling == pytest.approx(hf_rope.attention_scaling, rel=1e-12)
    for positions in (SHORT_POSITIONS, LONG_POSITIONS, SHORT_POSITIONS):
        q, k = _qk_for(positions)
        cos_ref, sin_ref, q_ref, k_ref = _hf_phi3(hf_rope, positions, q, k)
        cos, sin = ours.cos_sin(positions)
        assert cos.shape == (positions.numel(), rotary_dim // 2)
        torch.testing.assert_close(cos, cos_ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(sin, sin_ref, rtol=0, atol=1e-6)
        q_out, k_out = ours(positions, q, k)
        assert (q_out - q_ref).abs().max().item() < TOL
        assert (k_out - k_ref).abs().max().item() < TOL
        assert torch.equal(q_out[..., rotary_dim:], q[..., rotary_dim:])


def test_longrope_attention_factor() -> None:
    """No factor in the config: HF uses max / original = 4, and sqrt(1 + ln 4 / ln 64) scales cos/sin."""
    ours = _our_rope(_phi3_config())
    assert ours.attention_scaling == pytest.approx(math.sqrt(1 + math.log(4) / math.log(64)))
    cos, sin = ours.cos_sin(torch.tensor([0]))
    assert cos[0].tolist() == pytest.approx([ours.attention_scaling] * (HEAD_DIM // 2))
    assert sin[0].tolist() == [0.0] * (HEAD_DIM // 2)
    # Not extended (max == original): no scaling, as HF.
    same = RopeSpec(rope_type="longrope", short_factor=(1.0,) * 8, long_factor=(2.0,) * 8,
                    original_max_position_embeddings=PHI3_MAX)
    assert RotaryEmbedding(same, HEAD_DIM, PHI3_MAX).attention_scaling == 1.0


def test_longrope_switches_past_original_length() -> None:
    """max(positions) + 1 = 64 still uses the short factors; 65 the long ones, for every token of the call."""
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    hf_config = _phi3_config()
    hf_rope = Phi3RotaryEmbedding(hf_config)
    ours = _our_rope(hf_config)
    at_limit = torch.arange(PHI3_ORIG)  # 0..63
    past = torch.arange(PHI3_ORIG + 1)  # 0..64
    q, k = _qk_for(past)
    for positions in (at_limit, past):
        n = positions.numel()
        cos_ref, sin_ref, _, _ = _hf_phi3(hf_rope, positions, q[:n], k[:n])
        cos, sin = ours.cos_sin(positions)
        torch.testing.assert_close(cos, cos_ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(sin, sin_ref, rtol=0, atol=1e-6)
    # Position 10 rotates differently once one token of the call is past the original length.
    short_cos, _ = ours.cos_sin(torch.tensor([10, 63]))
    long_cos, _ = ours.cos_sin(torch.tensor([10, 64]))
    assert not torch.equal(short_cos[0], long_cos[0])
    # A later short call is exactly the short table again.
    again, _ = ours.cos_sin(torch.tensor([10, 63]))
    assert torch.equal(again, short_cos)


def test_longrope_table_grows_past_max_position() -> None:
    """Positions past max_position extend the long table and still match transformers."""
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    hf_config = _phi3_config(0.5)
    positions = torch.tensor([0, 5, 300, 517])
    q, k = _qk_for(positions)
    cos_ref, sin_ref, q_ref, k_ref = _hf_phi3(Phi3RotaryEmbedding(hf_config), positions, q, k)
    ours = _our_rope(hf_config)
    q_out, k_out = ours(positions, q, k)
    assert ours.long_cos is not None and ours.long_cos.shape[0] >= 518
    assert (q_out - q_ref).abs().max().item() < TOL
    assert (k_out - k_ref).abs().max().item() < TOL


def _phi3_raw(short: list[float], long: list[float], partial: float = 1.0, spelling: str = "su") -> dict:
    """A v4 Phi-3 config.json as on the Hub: rope_scaling plus a top-level original length."""
    return {
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": 128, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": Q_HEADS,
        "num_key_value_heads": KV_HEADS, "max_position_embeddings": PHI3_MAX,
        "original_max_position_embeddings": PHI3_ORIG, "partial_rotary_factor": partial, "rope_theta": 10000.0,
        "rope_scaling": {"type": spelling, "short_factor": short, "long_factor": long},
    }


def test_longrope_v4_config_matches_v5() -> None:
    """The Hub's v4 spelling (type "su", original length at top level) gives the same rope as the v5 dict."""
    short, long = _factors(4)
    spec = ModelSpec.from_hf_config(_phi3_raw(short, long, partial=0.5))
    assert spec.rope.rope_type == "longrope" and spec.rope.short_factor == tuple(short)
    v4 = get_rope(spec.rope, spec.head_dim, spec.max_position_embeddings, spec.rotary_dim)
    v5 = _our_rope(_phi3_config(0.5))
    for positions in (SHORT_POSITIONS, LONG_POSITIONS):
        assert all(torch.equal(a, b) for a, b in zip(v4.cos_sin(positions), v5.cos_sin(positions)))


@pytest.mark.parametrize("bad", ["short_factor", "long_factor"])
def test_longrope_factor_length_mismatch_raises(bad: str) -> None:
    """partial 0.5 rotates 8 dims: 4 factors each. The error names the list and both lengths."""
    short, long = _factors(4)
    if bad == "short_factor":
        short = short + [1.0, 1.0]
    else:
        long = long[:3]
    spec = ModelSpec.from_hf_config(_phi3_raw(short, long, partial=0.5))  # the spec cannot know rotary_dim's need
    wrong = len(short) if bad == "short_factor" else len(long)
    with pytest.raises(ConfigError, match=rf"rope_scaling\.{bad} has {wrong} entries but rotary_dim=8 needs 4") as err:
        get_rope(spec.rope, spec.head_dim, spec.max_position_embeddings, spec.rotary_dim)
    assert f"short_factor has {len(short)}" in str(err.value) and f"long_factor has {len(long)}" in str(err.value)


def test_longrope_missing_factors_raise() -> None:
    short, _ = _factors(8)
    raw = _phi3_raw(short, [], spelling="longrope")
    del raw["rope_scaling"]["long_factor"]
    with pytest.raises(ConfigError, match=r"rope_scaling\.long_factor .*required for rope_type='longrope'"):
        ModelSpec.from_hf_config(raw)
    with pytest.raises(ConfigError, match=r"rope_scaling\.long_factor must hold positive numbers"):
        ModelSpec.from_hf_config(_phi3_raw(short, [1.0] * 7 + [0.0]))
    with pytest.raises(ConfigError, match=r"rope_scaling\.short_factor is required"):  # a RopeSpec built by hand
        RotaryEmbedding(RopeSpec(rope_type="longrope"), HEAD_DIM, PHI3_MAX)
