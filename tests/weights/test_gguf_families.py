"""GGUF files of every family dockyard runs, written here with ``gguf``'s writer from a shrunken HF model,
load into dockyard and give HF's logits on the same (quantized, then dequantized by ``gguf``) weights.

The writer plays llama.cpp's converter: HF names through ``gguf``'s tensor-name map, llama's q/k rows in
rotary-pair order, Gemma's norms stored as ``w + 1``, experts stacked, metadata under llama.cpp's keys.
``gguf`` cannot quantize K-quants, so :func:`quantize_q4_k` packs Q4_K blocks per the published layout
(``block_q4_K``: f16 ``d``, f16 ``dmin``, 12 bytes of 6-bit scales and mins, 128 bytes of 4-bit codes);
the reference weights are ``gguf.quants.dequantize`` of the bytes written, whichever packer wrote them.
"""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

from dockyard.model_loader import load_model
from dockyard.model_source import resolve_model
from dockyard.ops.quant_format import GGUFBlocks
from dockyard.registry import build_model
from dockyard.testing import paged_logits, rel_rmse
from dockyard.weights.checkpoint import iter_weights
from dockyard.weights.gguf import iter_tensors, native_parameter_names
from dockyard.weights.gguf_metadata import KERNEL_BLOCK_TYPES, GGUFFile, llama3_rope_scaling

Q = gguf.GGMLQuantizationType
SIZES = {"hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256, "head_dim": 64,
         "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False}
MOE = {"moe_intermediate_size": 256, "num_experts_per_tok": 2}
# family -> (llama.cpp architecture, HF config class, extra config, block format of its 2-D weights)
FAMILIES = {
    "llama": ("llama", transformers.LlamaConfig, {}, Q.Q4_K),
    "mistral": ("llama", transformers.MistralConfig, {"sliding_window": None}, Q.Q8_0),
    "mixtral": ("llama", transformers.MixtralConfig, {"num_local_experts": 4, "num_experts_per_tok": 2}, Q.Q4_0),
    "qwen2": ("qwen2", transformers.Qwen2Config, {"tie_word_embeddings": True}, Q.Q8_0),
    "qwen3": ("qwen3", transformers.Qwen3Config, {}, Q.Q4_K),
    "qwen2_moe": ("qwen2moe", transformers.Qwen2MoeConfig,
                  {**MOE, "num_experts": 4, "shared_expert_intermediate_size": 256}, Q.F16),
    "qwen3_moe": ("qwen3moe", transformers.Qwen3MoeConfig, {**MOE, "num_experts": 4, "norm_topk_prob": True},
                  Q.Q4_K),
    "gemma2": ("gemma2", transformers.Gemma2Config, {"sliding_window": 4, "tie_word_embeddings": True}, Q.Q8_0),
    "gemma3": ("gemma3", transformers.Gemma3TextConfig, {"sliding_window": 4, "tie_word_embeddings": True},
               Q.Q4_K),
    "phi3": ("phi3", transformers.Phi3Config, {}, Q.Q4_0),
    # Phi-3.5 / Phi-4-mini: longrope factors (stored as tensors) and a partial rotary dimension.
    "phi3_longrope": ("phi3", transformers.Phi3Config, {
        "partial_rotary_factor": 0.5, "original_max_position_embeddings": 64, "rope_parameters": {
            "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0 + i / 32 for i in range(16)],
            "long_factor": [2.0 + i / 8 for i in range(16)]}}, Q.Q8_0),
    "olmo2": ("olmo2", transformers.Olmo2Config, {}, Q.F32),
}
PROMPT = [1, 17, 300, 45, 9, 411, 8, 77, 23, 5, 199, 64]


# ---- a Q4_K packer (the published block layout; gguf's Python package has no K-quant quantizer) ----
def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """Rows of ``w`` (last dim a multiple of 256) as Q4_K blocks: uint8 [..., K / 256 * 144]."""
    x = w.astype(np.float32).reshape(-1, 8, 32)  # (super-block, sub-block, value)
    lo, hi = np.minimum(x.min(-1), 0.0), np.maximum(x.max(-1), 0.0)
    sub_scale, sub_min = (hi - lo) / 15.0, -lo
    d = np.maximum(sub_scale.max(-1), 1e-12) / 63.0
    dmin = np.maximum(sub_min.max(-1), 1e-12) / 63.0
    d, dmin = d.astype(np.float16), dmin.astype(np.float16)
    sc = np.clip(np.round(sub_scale / d.astype(np.float32)[:, None]), 0, 63).astype(np.uint8)
    mn = np.clip(np.round(sub_min / dmin.astype(np.float32)[:, None]), 0, 63).astype(np.uint8)
    step = (d.astype(np.float32)[:, None] * sc)[..., None]
    offset = (dmin.astype(np.float32)[:, None] * mn)[..., None]
    q = np.clip(np.round((x + offset) / np.where(step == 0, 1, step)), 0, 15).astype(np.uint8)
    scales = np.zeros((x.shape[0], 12), np.uint8)  # get_scale_min_k4's packing
    scales[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    scales[:, 4:8] = mn[:, 0:4] | ((mn[:, 4:8] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:8] & 0xF) | ((mn[:, 4:8] & 0xF) << 4)
    pairs = q.reshape(-1, 4, 2, 32)  # 64 values per 32 bytes: low nibble the first 32, high the next
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    blocks = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), scales, qs], 1)
    return blocks.reshape(*w.shape[:-1], w.shape[-1] // 256 * 144)


def _encode(w: np.ndarray, qtype: Q) -> tuple[np.ndarray, np.ndarray]:
    """(what the file stores, what ``gguf`` dequantizes it to)."""
    if qtype == Q.F32:
        return w.astype(np.float32), w.astype(np.float32)
    if qtype == Q.F16:
        return w.astype(np.float16), w.astype(np.float16).astype(np.float32)
    raw = quantize_q4_k(w) if qtype == Q.Q4_K else gguf.quants.quantize(w.astype(np.float32), qtype)
    return raw, gguf.quants.dequantize(raw, qtype).reshape(w.shape)


def _permute_like_llama_cpp(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter order for q/k rows: per head, the two rotary halves interleaved."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_model(family: str, seed: int = 0) -> tuple[torch.nn.Module, str, Q]:
    arch, config_cls, extra, qtype = FAMILIES[family]
    config = config_cls(**{**SIZES, **extra})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    gemma = family.startswith("gemma")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms near their neutral value ((1 + w) for Gemma), biases small
                p.copy_(("norm" in name and not gemma) + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model, arch, qtype


def _write(model: torch.nn.Module, arch: str, qtype: Q, path: Path) -> dict[str, np.ndarray]:
    """Write ``model`` as llama.cpp would; return the HF state dict as the file's bytes dequantize to."""
    cfg = model.config
    layers = cfg.num_hidden_layers
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), layers)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny {arch}")
    writer.add_block_count(layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(float(cfg.rope_parameters.get("full_attention", cfg.rope_parameters)["rope_theta"]
                                    if "full_attention" in cfg.rope_parameters else cfg.rope_parameters["rope_theta"]))
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    rope = cfg.rope_parameters
    if rope.get("rope_type") == "longrope":  # llama.cpp's Phi-3 converter: factors as tensors, attn_factor
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        writer.add_rope_dimension_count(int(cfg.partial_rotary_factor * head_dim))
        original = cfg.original_max_position_embeddings
        scale = cfg.max_position_embeddings / original
        writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)))
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], np.float32))
        writer.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], np.float32))
    experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
        if getattr(cfg, "moe_intermediate_size", None):
            writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if getattr(cfg, "shared_expert_intermediate_size", None):
            writer.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    if getattr(cfg, "sliding_window", None):
        writer.add_sliding_window(cfg.sliding_window)
    if getattr(cfg, "attn_logit_softcapping", None):
        writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
    if getattr(cfg, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    reference: dict[str, np.ndarray] = {}
    gemma = arch.startswith("gemma")
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = tensor.numpy().astype(np.float32)
        base, _, suffix = hf_name.rpartition(".")
        fused = suffix not in ("weight", "bias")  # transformers' stacked experts: a parameter without suffix
        if fused:
            base, suffix = hf_name, "weight"
        if base.endswith("mlp.experts.gate_up_proj"):  # transformers' fused experts: gate rows, then up rows
            half = w.shape[1] // 2
            parts = {base.replace("gate_up_proj", "gate_proj"): w[:, :half],
                     base.replace("gate_up_proj", "up_proj"): w[:, half:]}
        else:
            parts = {base: w}
        for part_name, part in parts.items():
            stored = part
            if arch == "llama" and part_name.endswith(("q_proj", "k_proj")):
                heads = cfg.num_attention_heads if part_name.endswith("q_proj") else cfg.num_key_value_heads
                stored = _permute_like_llama_cpp(part, heads)
            if gemma and "norm" in part_name:
                stored = part + 1.0
            if part_name.endswith("shared_expert_gate"):
                stored = part.reshape(-1)
            q = qtype if stored.ndim >= 2 and stored.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0 else Q.F32
            raw, dequantized = _encode(stored, q)
            writer.add_tensor(f"{names.get_name(part_name)}.{suffix}", raw,
                              raw_dtype=None if q in (Q.F32, Q.F16) else q)
            if stored is not part:  # the file's values, back in HF's layout: undo only the layout change
                dequantized = _encode(part, q)[1] if not gemma or "norm" not in part_name else dequantized - 1.0
            reference[f"{part_name}.{suffix}"] = dequantized.reshape(part.shape)
        if fused:
            reference[hf_name] = np.concatenate([reference.pop(f"{n}.weight") for n in parts], 1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return reference


def _logits_vs_hf(family: str, path: Path, model_impl: str = "auto") -> float:
    """Write ``family``'s tiny model to ``path``, load it through dockyard (``model_impl``) and return the
    logits' rel. error against HF on the weights the file dequantizes to."""
    model, arch, qtype = _hf_model(family)
    reference = _write(model, arch, qtype, path)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if name in reference:
                p.copy_(torch.from_numpy(reference[name]))
        ref = model(torch.tensor([PROMPT])).logits[0]
    source = resolve_model(path, model_impl=model_impl)
    # llama.cpp writes Mistral as llama; the same class runs both.
    assert source.spec.architecture == ("LlamaForCausalLM" if family == "mistral" else type(model).__name__)
    ours, report = load_model(source, torch.device("cpu"), torch.float32)
    assert not report.missing and not report.unexpected
    return rel_rmse(paged_logits(ours, PROMPT, [len(PROMPT) - 2, 1, 1]), ref)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_logits_equal_hf(family: str, tmp_path: Path) -> None:
    err = _logits_vs_hf(family, tmp_path / f"{family}.gguf")
    assert err < 1e-4, f"{family} ({FAMILIES[family][3].name}): logits rel. error {err:.2e} vs HF on the same weights"


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_generic_path_reads_gguf(family: str, tmp_path: Path) -> None:
    """transformers' own classes (``--model-impl transformers``) take the same tensors, named after their
    parameters."""
    assert _logits_vs_hf(family, tmp_path / f"{family}.gguf", model_impl="transformers") < 1e-4


def test_q4_k_packer_is_close() -> None:
    """The test's own Q4_K packer quantizes: gguf's dequantization of its blocks is near the input."""
    w = np.random.default_rng(0).standard_normal((8, 512)).astype(np.float32)
    back = gguf.quants.dequantize(quantize_q4_k(w), Q.Q4_K)
    assert back.shape == w.shape and rel_rmse(torch.from_numpy(back), torch.from_numpy(w)) < 0.15


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_K])
def test_llama_every_block_format(qtype: Q, tmp_path: Path) -> None:
    model, arch, _ = _hf_model("llama", seed=1)
    reference = _write(model, arch, qtype, tmp_path / "l.gguf")
    with torch.no_grad():
        model.load_state_dict({k: torch.from_numpy(v) for k, v in reference.items()})
        ref = model(torch.tensor([PROMPT])).logits[0]
    ours, _ = load_model(resolve_model(tmp_path / "l.gguf"), torch.device("cpu"), torch.float32)
    assert rel_rmse(paged_logits(ours, PROMPT, [len(PROMPT)]), ref) < 1e-4


def test_kept_quantized_rows(tmp_path: Path) -> None:
    """Weights asked for as GGUF blocks: their rows dequantize (by gguf) to the tensor the dequantized path
    gives, the llama q/k row order undone on the block rows too; experts each get their slice."""
    for family in ("llama", "qwen3_moe"):
        model, arch, qtype = _hf_model(family)
        _write(model, arch, qtype, tmp_path / f"{family}.gguf")
        f = GGUFFile(tmp_path / f"{family}.gguf")
        quantized = f.kernel_quantized_weights(native_parameter_names(f))
        assert "model.layers.0.self_attn.q_proj.weight" in quantized and "model.norm.weight" not in quantized
        if family == "qwen3_moe":
            assert "model.layers.1.mlp.experts.3.down_proj.weight" in quantized
        assert {Q[v] for v in quantized.values()} <= KERNEL_BLOCK_TYPES
        dense = dict(iter_tensors(f))
        kept = dict(iter_tensors(f, keep_quantized=frozenset(quantized)))
        assert set(kept) == set(dense)
        for name in quantized:
            blocks = kept[name]
            assert blocks.data.dtype == torch.uint8 and blocks.shape == tuple(dense[name].shape)
            values = gguf.quants.dequantize(blocks.data.numpy(), Q(blocks.qtype)).reshape(blocks.shape)
            assert torch.equal(torch.from_numpy(values), dense[name]), name
        # The engine's way in: ModelSource.iter_weights, named after the model being loaded.
        source = resolve_model(tmp_path / f"{family}.gguf")
        with torch.device("meta"):
            model = build_model(source.spec)
        loaded = dict(iter_weights(source, model, torch.float32, keep_quantized=set(quantized)))
        assert {n for n, t in loaded.items() if isinstance(t, GGUFBlocks)} == set(quantized)


def test_llama3_rope_freqs_become_rope_scaling() -> None:
    """The factors llama.cpp derives from Llama 3.1's rope_scaling (transformers' llama3 init as the reference)
    give that rope_scaling back."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    config = transformers.LlamaConfig(hidden_size=2048, num_attention_heads=16, max_position_embeddings=131072,
                                      rope_parameters={"rope_theta": 500000.0, **scaling})
    inv_freq, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 500000.0 ** (-torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    factors = (plain / inv_freq.double()).numpy()
    got = llama3_rope_scaling(factors, 500000.0, 128)
    assert got is not None and got["factor"] == pytest.approx(8.0)
    assert got["low_freq_factor"] == pytest.approx(1.0, rel=1e-3)
    assert got["high_freq_factor"] == pytest.approx(4.0, rel=1e-3)
    assert llama3_rope_scaling(np.linspace(1, 3, 64), 500000.0, 128) is None  # not Llama 3's shape
