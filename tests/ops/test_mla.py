"""MLA (DeepSeek-V2/V3 multi-head latent attention) against transformers' eager attention, and its paged path."""

from __future__ import annotations

import pytest
import torch

from dockyard.ops.attention import Attention, AttentionMetadata, forward_context
from dockyard.ops.mla import MLAAttention, MLAPagedAttention, deinterleave, mla_softmax_scale
from dockyard.ops.rotary import get_rope
from dockyard.spec import ModelSpec
from tests.helpers import rel_rmse

transformers = pytest.importorskip("transformers")

HIDDEN, HEADS, KV_RANK, Q_RANK, NOPE, ROPE, V_DIM = 64, 4, 32, 48, 16, 8, 16
MAX_POS = 2560  # = 64 × 40: the YaRN factor and the context lengths agree (no HF warning)
TOKENS, OFFSET = 40, 100  # positions OFFSET .. OFFSET + TOKENS - 1: rope at nontrivial angles
TOL = 1e-5

YARN = {"rope_type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 64}
# mscale ≠ mscale_all_dim: YaRN's cos/sin attention factor differs from 1 too (V3's values are 1, 1).
YARN_UNEQUAL = {**YARN, "mscale": 1.0, "mscale_all_dim": 0.8}
# DeepSeek-V2-Lite's rope_scaling (beta values spelled out).
YARN_V2_LITE = {"rope_type": "yarn", "factor": 40.0, "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32,
                "beta_slow": 1, "original_max_position_embeddings": 64}
DEFAULT = {"rope_type": "default"}


def hf_config(model_type: str, q_lora_rank: int | None, rope: dict, **extra):
    return transformers.AutoConfig.for_model(
        model_type, hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=HEADS,
        kv_lora_rank=KV_RANK, q_lora_rank=q_lora_rank, qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE,
        v_head_dim=V_DIM, num_hidden_layers=1, vocab_size=100, intermediate_size=64, moe_intermediate_size=32,
        n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
        rope_scaling=dict(rope), max_position_embeddings=MAX_POS, **extra,
    )


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Weights randn·fan_in^-½, norm weights 1 + 0.1·randn, biases 0.1·randn."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "layernorm" in name:
                p.copy_(1 + 0.1 * noise)
            elif p.dim() == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise * p.shape[1] ** -0.5)


def build(model_type: str, q_lora_rank: int | None, rope: dict, seed: int = 0, **extra):
    """(HF model, its layer-0 attention randomized, our MLAAttention with the same weights, spec)."""
    config = hf_config(model_type, q_lora_rank, rope, **extra)
    hf_model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    hf_attn = hf_model.model.layers[0].self_attn
    randomize(hf_attn, seed)
    arch = "DeepseekV3ForCausalLM" if model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"
    spec = ModelSpec.from_hf_config({**config.to_dict(), "architectures": [arch]})
    rotary = get_rope(spec.rope, spec.mla.qk_rope_head_dim, spec.max_position_embeddings)
    interleave = extra.get("rope_interleave")
    ours = MLAAttention(spec, rotary, rope_interleave=interleave).eval()
    ours.load_state_dict(hf_attn.state_dict(), strict=True)  # the names are the checkpoint's
    return hf_model, hf_attn, ours, spec


def hf_attention(hf_model, hf_attn, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """HF's attention on ``hidden`` [1, T, hidden] at ``positions`` [T], with the kwargs its model passes."""
    captured: dict = {}

    def grab(module, args, kwargs):
        captured.update(kwargs)

    handle = hf_attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            hf_model(input_ids=torch.zeros(1, hidden.shape[1], dtype=torch.long), position_ids=positions[None],
                     use_cache=False)
    finally:
        handle.remove()
    kwargs = {k: v for k, v in captured.items() if k not in ("hidden_states", "past_key_values")}
    with torch.no_grad():
        return hf_attn(hidden_states=hidden, **kwargs)[0]


CASES = {
    "v3-qlora-yarn": ("deepseek_v3", Q_RANK, YARN, {}),
    "v3-qlora-default": ("deepseek_v3", Q_RANK, DEFAULT, {}),
    "v3-qlora-yarn-unequal-mscale": ("deepseek_v3", Q_RANK, YARN_UNEQUAL, {}),
    "v3-no-interleave": ("deepseek_v3", Q_RANK, YARN, {"rope_interleave": False}),
    "v2-lite-default": ("deepseek_v2", None, DEFAULT, {}),
    "v2-lite-yarn": ("deepseek_v2", None, YARN_V2_LITE, {}),
    "v2-qlora-yarn-bias": ("deepseek_v2", Q_RANK, YARN_UNEQUAL, {"attention_bias": True}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_hf_attention(case):
    model_type, q_rank, rope, extra = CASES[case]
    hf_model, hf_attn, ours, _ = build(model_type, q_rank, rope, **extra)
    assert ours.scale == pytest.approx(hf_attn.scaling, rel=1e-12)
    hidden = torch.randn(1, TOKENS, HIDDEN, generator=torch.Generator().manual_seed(1))
    positions = torch.arange(OFFSET, OFFSET + TOKENS)
    ref = hf_attention(hf_model, hf_attn, hidden, positions)[0]
    with torch.no_grad():
        out = ours(positions, hidden[0])
    assert out.shape == (TOKENS, HIDDEN)
    assert rel_rmse(out, ref) <= TOL


def test_parameter_names_and_cache_module():
    _, _, ours, spec = build("deepseek_v3", Q_RANK, YARN)
    assert set(ours.state_dict()) == {
        "q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight", "kv_a_proj_with_mqa.weight",
        "kv_a_layernorm.weight", "kv_b_proj.weight", "o_proj.weight"}
    _, _, lite, _ = build("deepseek_v2", None, DEFAULT)
    assert "q_proj.weight" in lite.state_dict() and not any(k.startswith("q_a") for k in lite.state_dict())
    # The runner finds cache owners by type: exactly one per MLA block, with the latent's cache geometry.
    owners = [m for m in ours.modules() if isinstance(m, Attention)]
    assert owners == [ours.attn] and isinstance(ours.attn, MLAPagedAttention)
    assert (1, ours.attn.num_kv_heads, ours.attn.head_dim) == spec.kv_cache_layout == (1, 1, KV_RANK + ROPE)


def test_softmax_scale():
    spec_rope = ModelSpec.from_hf_config({**hf_config("deepseek_v3", Q_RANK, YARN_V2_LITE).to_dict(),
                                          "architectures": ["DeepseekV3ForCausalLM"]}).rope
    mscale = 0.1 * 0.707 * torch.log(torch.tensor(40.0, dtype=torch.float64)).item() + 1
    assert mla_softmax_scale(24, spec_rope) == pytest.approx(24**-0.5 * mscale**2, rel=1e-12)
    default = ModelSpec.from_hf_config({**hf_config("deepseek_v3", Q_RANK, DEFAULT).to_dict(),
                                        "architectures": ["DeepseekV3ForCausalLM"]}).rope
    assert mla_softmax_scale(24, default) == 24**-0.5


class PagedCache:
    """A one-layer MLA cache and a per-sequence scrambled block table, stepping like the runner does."""

    def __init__(self, spec: ModelSpec, block_size: int = 4, num_blocks: int = 32, seed: int = 0) -> None:
        entries, heads, dim = spec.kv_cache_layout
        self.cache = torch.zeros(entries, num_blocks, block_size, heads, dim)
        self.block_size = block_size
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        self.tables: dict[str, list[int]] = {}
        self.lens: dict[str, int] = {}

    def slot(self, name: str, pos: int) -> int:
        table = self.tables.setdefault(name, [])
        while len(table) * self.block_size <= pos:
            table.append(self.free.pop())
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def step(self, new_tokens: dict[str, int]) -> AttentionMetadata:
        """Metadata for one step that adds ``new_tokens[name]`` tokens to each named sequence."""
        slots, seq_lens = [], []
        for name, n in new_tokens.items():
            start = self.lens.get(name, 0)
            slots += [self.slot(name, p) for p in range(start, start + n)]
            self.lens[name] = start + n
            seq_lens.append(start + n)
        rows = [self.tables[name] for name in new_tokens]
        width = max(len(r) for r in rows)
        return AttentionMetadata(
            slot_mapping=torch.tensor(slots), block_tables=torch.tensor([r + [0] * (width - len(r)) for r in rows]),
            query_lens=list(new_tokens.values()), seq_lens=seq_lens, block_size=self.block_size,
            seq_lens_tensor=torch.tensor(seq_lens),
        )

    def latents(self, name: str) -> torch.Tensor:
        """The cached entries [L, dim] of sequence ``name``, read back through its block table."""
        rows = self.cache[0, self.tables[name]].reshape(-1, self.cache.shape[-1])
        return rows[: self.lens[name]]


@pytest.mark.parametrize("case", ["v3-qlora-yarn", "v2-lite-yarn"])
def test_paged_prefill_chunks_then_decode_matches_no_cache(case):
    model_type, q_rank, rope, extra = CASES[case]
    _, _, ours, spec = build(model_type, q_rank, rope, **extra)
    total = 34
    hidden = torch.randn(total, HIDDEN, generator=torch.Generator().manual_seed(2))
    positions = torch.arange(total)
    with torch.no_grad():
        ref = ours(positions, hidden)  # no forward context: one sequence, no cache

    paged = PagedCache(spec, block_size=4)
    ours.attn.kv_cache = paged.cache
    outs, start = [], 0
    try:
        with torch.no_grad():
            for n in [17, 13, 1, 1, 1, 1]:  # prefill 30 tokens in two chunks, then 4 decode steps
                meta = paged.step({"a": n})
                with forward_context(meta):
                    outs.append(ours(positions[start:start + n], hidden[start:start + n]))
                start += n
    finally:
        ours.attn.kv_cache = None
    assert rel_rmse(torch.cat(outs), ref) <= TOL
    assert sorted(paged.tables["a"]) != paged.tables["a"]  # the block table really is scrambled

    # The cache holds the latent (normalized c_kv, then the roped shared k_pe) and nothing per head.
    assert paged.cache.shape[-2:] == (1, KV_RANK + ROPE)
    with torch.no_grad():
        c_kv, k_pe = ours.kv_a_proj_with_mqa(hidden).split([KV_RANK, ROPE], dim=-1)
        k_pe = deinterleave(k_pe)[:, None, :]
        _, k_pe = ours.rotary_emb(positions, k_pe, k_pe)
        expected = torch.cat([ours.kv_a_layernorm(c_kv), k_pe[:, 0]], dim=-1)
    assert torch.allclose(paged.latents("a"), expected, atol=1e-6, rtol=1e-6)
    used = set(paged.tables["a"])
    unused = [b for b in range(paged.cache.shape[1]) if b not in used]
    assert not paged.cache[0, unused].any()


def test_paged_mixed_batch_matches_no_cache():
    """Two sequences per step: prefill + prefill, chunked prefill + decode, then a decode-only batch."""
    _, _, ours, spec = build("deepseek_v3", Q_RANK, YARN)
    lengths = {"a": 16, "b": 9}
    gen = torch.Generator().manual_seed(3)
    hidden = {k: torch.randn(n, HIDDEN, generator=gen) for k, n in lengths.items()}
    with torch.no_grad():
        refs = {k: ours(torch.arange(n), hidden[k]) for k, n in lengths.items()}

    paged = PagedCache(spec, block_size=4, seed=1)
    ours.attn.kv_cache = paged.cache
    outs: dict[str, list[torch.Tensor]] = {"a": [], "b": []}
    try:
        with torch.no_grad():
            for step in [{"a": 10, "b": 7}, {"a": 5, "b": 1}, {"a": 1, "b": 1}]:
                starts = {k: paged.lens.get(k, 0) for k in step}
                meta = paged.step(step)
                pos = torch.cat([torch.arange(starts[k], starts[k] + n) for k, n in step.items()])
                x = torch.cat([hidden[k][starts[k]:starts[k] + n] for k, n in step.items()])
                with forward_context(meta):
                    out = ours(pos, x)
                for chunk, k in zip(out.split(list(step.values())), step):
                    outs[k].append(chunk)
    finally:
        ours.attn.kv_cache = None
    for k in lengths:
        assert rel_rmse(torch.cat(outs[k]), refs[k]) <= TOL


def run_paged_steps(block: MLAAttention, spec: ModelSpec, steps: list[dict[str, int]], hidden: dict[str, torch.Tensor],
                    *, absorb: bool, block_size: int = 4, device: str | torch.device = "cpu") -> torch.Tensor:
    """The block's outputs over ``steps`` (new tokens per named sequence) through a fresh paged cache
    on ``device``, decode rows absorbed or expanded; ``hidden[name]`` holds each sequence's inputs."""
    paged = PagedCache(spec, block_size=block_size, seed=2)
    block.attn.kv_cache, block.attn.absorb_decode = paged.cache.to(device), absorb
    outs = []
    try:
        with torch.no_grad():
            for step in steps:
                starts = {k: paged.lens.get(k, 0) for k in step}
                meta = paged.step(step)
                meta = AttentionMetadata(meta.slot_mapping.to(device), meta.block_tables.to(device), meta.query_lens,
                                         meta.seq_lens, meta.block_size, meta.seq_lens_tensor.to(device))
                pos = torch.cat([torch.arange(starts[k], starts[k] + n) for k, n in step.items()])
                x = torch.cat([hidden[k][starts[k]:starts[k] + n] for k, n in step.items()])
                with forward_context(meta):
                    outs.append(block(pos.to(device), x.to(device)).cpu())
    finally:
        block.attn.kv_cache, block.attn.absorb_decode = None, True
    return torch.cat(outs)


def test_absorbed_decode_matches_expanded_form(monkeypatch):
    """Decode rows (the leading one-token sequences of a step) take the absorbed form (on the CPU its
    PyTorch version); the same steps with every row expanded give the same outputs."""
    from dockyard.ops import mla

    _, _, ours, spec = build("deepseek_v2", None, YARN_V2_LITE)
    steps = [{"a": 12, "b": 7}, {"a": 1, "b": 1}, {"a": 1, "b": 4}, {"a": 1, "b": 1}]
    gen = torch.Generator().manual_seed(5)
    hidden = {k: torch.randn(20, HIDDEN, generator=gen) for k in ("a", "b")}
    calls = []
    original = mla.absorbed_decode_reference
    monkeypatch.setattr(mla, "absorbed_decode_reference", lambda q, *a: calls.append(q.shape[0]) or original(q, *a))

    def run(absorb: bool) -> torch.Tensor:
        return run_paged_steps(ours, spec, steps, hidden, absorb=absorb)

    expanded = run(absorb=False)
    assert calls == []
    absorbed = run(absorb=True)
    assert calls == [2, 1, 2]
    assert rel_rmse(absorbed, expanded) <= TOL
