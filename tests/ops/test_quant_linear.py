"""GGUFLinear / Int4Linear: the strict loader hands them quantized weights, a tiny Llama with its projections
kept quantized computes the logits of the same model loaded with the weights dequantized by the references
(``gguf.quants.dequantize``, the int4 formula in float64), fusing quantized projections is exact, and the
path choice follows the device and ``DOCKYARD_QUANT_NATIVE``. On the CPU the modules compute through the
PyTorch reference; one test runs the model through the Triton kernels in the interpreter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from dockyard.errors import WeightsError
from dockyard.ops import quant_linear as ql
from dockyard.ops.dispatch import FUSED_ENV
from dockyard.ops.quant_format import GGUFBlocks
from dockyard.registry import build_model
from dockyard.spec import ModelSpec
from dockyard.testing import paged_logits, rel_rmse
from dockyard.weights.loader import load_weights
from tests.helpers import import_kernels
from tests.ops.quant_helpers import int4_weight

# Every projection's K (64 hidden, 128 intermediate, 64 = 4 heads x 16) a whole number of 32-value blocks.
TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "vocab_size": 97, "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "float32"}
TOKENS = [5, 17, 3, 88, 41, 9, 60, 2]
TINY_PROJECTIONS = [f"model.layers.{i}.{p}" for i in range(2) for p in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
    "mlp.down_proj")]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelSpec.from_hf_config(TINY)).eval()


def _quantized_checkpoint(kind: str) -> tuple[dict, dict]:
    """(checkpoint with the projections quantized, the same with them dequantized by the reference), from one
    random dense model; ``kind`` 'Q8_0' / 'Q4_0' (gguf's quantizer) or 'int4' (group 32, zeros; act-order on
    o_proj and down_proj, which are never fused: each GPTQ module has its own permutation)."""
    dense = {k: v.detach().clone().normal_(0, 0.3) for k, v in _model().state_dict().items()}
    projections = {f"{n}.weight" for n in _model().fp8_linear_names()}
    quantized, reference = dict(dense), dict(dense)
    for i, name in enumerate(sorted(projections)):
        n, k = dense[name].shape
        if kind == "int4":
            act_order = name.endswith(("o_proj.weight", "down_proj.weight"))
            weight, ref = int4_weight(n, k, 32, zeros=True, act_order=act_order, seed=i)
            quantized[name], reference[name] = weight, ref.float()
        else:
            qt = GGMLQuantizationType[kind]
            rows = gguf_quantize(dense[name].numpy(), qt)
            quantized[name] = GGUFBlocks(torch.from_numpy(rows), int(qt), (n, k))
            reference[name] = torch.from_numpy(gguf_dequantize(rows, qt).reshape(n, k).astype(np.float32))
    return quantized, reference


@pytest.mark.parametrize(("kind", "cls"), [("Q8_0", ql.GGUFLinear), ("Q4_0", ql.GGUFLinear), ("int4", ql.Int4Linear)])
def test_quantized_model_equals_reference_dequantization(kind, cls):
    quantized, reference = _quantized_checkpoint(kind)
    ref_model = _model()
    load_weights(ref_model, reference.items())
    model = _model()
    converted = ql.convert_to_quant_linears(model, set(quantized), cls)
    assert len(converted) == 2 * 7  # q/k/v/o, gate/up/down per layer
    report = load_weights(model, quantized.items())
    assert report.loaded == len(quantized) and ql.uses_quantized_weights(model)
    # The memory plan's figure: the bytes as stored (no bias in Llama's projections).
    assert sum(m.nbytes() for m in model.modules() if isinstance(m, cls)) == sum(
        quantized[n].nbytes() for n in converted)
    want = paged_logits(ref_model, TOKENS, [6, 1, 1])
    got = paged_logits(model, TOKENS, [6, 1, 1])
    assert rel_rmse(got, want) < 1e-5
    model.fuse_projections()  # q/k/v and gate/up concatenated as stored bytes
    assert hasattr(model.model.layers[0].self_attn, "qkv_proj")
    assert rel_rmse(paged_logits(model, TOKENS, [6, 1, 1]), want) < 1e-5


def test_quantized_model_through_the_kernels(monkeypatch):
    """The same model with its modules calling the Triton kernels (interpreted on the CPU)."""
    pytest.importorskip("triton")
    interpret = not torch.cuda.is_available()
    tq = import_kernels("dockyard.ops.triton_quant", interpret)
    monkeypatch.setitem(tq.STREAM_CONFIGS, tq.INT4, (32, 128, 4))  # few programs: the interpreter runs them one by one
    monkeypatch.setattr(tq, "GEMM_CONFIG", (16, 64, 64, 4, 1))
    monkeypatch.setenv(FUSED_ENV, "1")
    if interpret:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    quantized, reference = _quantized_checkpoint("int4")
    ref_model, model = _model(), _model()
    load_weights(ref_model, reference.items())
    ql.convert_to_quant_linears(model, set(quantized), ql.Int4Linear)
    load_weights(model, quantized.items())
    monkeypatch.setenv(FUSED_ENV, "0")
    want = paged_logits(ref_model, TOKENS[:4], [3, 1])
    monkeypatch.setenv(FUSED_ENV, "1")
    assert rel_rmse(paged_logits(model, TOKENS[:4], [3, 1]), want) < 1e-5


def test_loader_is_strict_about_quantized_weights():
    quantized, _ = _quantized_checkpoint("Q8_0")
    name = "model.layers.0.self_attn.q_proj.weight"
    model = _model()
    ql.convert_to_quant_linears(model, set(quantized), ql.GGUFLinear)
    with pytest.raises(WeightsError, match=f"missing from checkpoint.*{name}"):
        load_weights(model, ((k, v) for k, v in quantized.items() if k != name))
    wrong = dict(quantized)
    wrong[name] = quantized["model.layers.0.mlp.down_proj.weight"]
    model = _model()
    ql.convert_to_quant_linears(model, set(quantized), ql.GGUFLinear)
    with pytest.raises(WeightsError, match=f"{name}: checkpoint weight GGUFBlocks of shape \\(64, 128\\)"):
        load_weights(model, wrong.items())


def test_unconverted_and_dense_weights():
    """A quantized weight for a plain Linear is dequantized on load; a converted module given a dense tensor
    (a GGUF F16 tensor) or a block type without a kernel (Q4_1) keeps it dense."""
    quantized, reference = _quantized_checkpoint("Q8_0")
    plain = _model()
    load_weights(plain, quantized.items())
    name = "model.layers.1.mlp.up_proj"
    torch.testing.assert_close(plain.get_submodule(name).weight, reference[f"{name}.weight"])
    mixed = dict(quantized)
    mixed["model.layers.0.self_attn.o_proj.weight"] = reference["model.layers.0.self_attn.o_proj.weight"]
    rows = gguf_quantize(reference[f"{name}.weight"].numpy(), GGMLQuantizationType.Q4_1)
    mixed[f"{name}.weight"] = GGUFBlocks(torch.from_numpy(rows), int(GGMLQuantizationType.Q4_1), (128, 64))
    model = _model()
    ql.convert_to_quant_linears(model, set(mixed), ql.GGUFLinear)
    load_weights(model, mixed.items())
    assert model.get_submodule("model.layers.0.self_attn.o_proj").format is None
    up = model.get_submodule(name)
    assert up.format is None and up.weight.dtype == torch.float32
    torch.testing.assert_close(up.weight, torch.from_numpy(
        gguf_dequantize(rows, GGMLQuantizationType.Q4_1).reshape(128, 64).astype(np.float32)))


def test_choose_quant_path(monkeypatch):
    """Default: on CUDA the formats of the measured table, on a CPU nothing; 0: nothing; 1: every format the
    kernels read where they run (or the CPU's reference math), else an error naming why."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv(ql.QUANT_NATIVE_ENV, raising=False)
    assert ql.choose_quant_path(cpu)[0] == frozenset()
    assert ql.choose_quant_path(cuda, assume_gpu=True)[0] == ql.CUDA_DEFAULT_FORMATS
    assert ql.CUDA_DEFAULT_FORMATS == {f for f, faster in ql.GEMV_BEATS_BF16_ON_CUDA.items() if faster}
    assert set(ql.GEMV_BEATS_BF16_ON_CUDA) == ql.KERNEL_FORMATS == {"int4", "Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q5_K",
                                                                    "Q6_K"}
    assert ql.choose_quant_path(cuda, tp_size=2, assume_gpu=True)[0] == frozenset()  # auto: no error under TP
    monkeypatch.setenv(ql.QUANT_NATIVE_ENV, "1")
    assert ql.choose_quant_path(cpu)[0] == ql.KERNEL_FORMATS
    assert ql.choose_quant_path(cuda, assume_gpu=True)[0] == ql.KERNEL_FORMATS
    with pytest.raises(WeightsError, match="tensor parallelism"):
        ql.choose_quant_path(cuda, tp_size=2)
    with pytest.raises(WeightsError, match="not a CUDA GPU"):
        ql.choose_quant_path(torch.device("meta"))
    monkeypatch.setenv(ql.QUANT_NATIVE_ENV, "0")
    assert ql.choose_quant_path(cuda, assume_gpu=True)[0] == frozenset()
    monkeypatch.setenv(ql.QUANT_NATIVE_ENV, "maybe")
    with pytest.raises(WeightsError, match="not one of auto, 0, 1"):
        ql.choose_quant_path(cpu)


def test_model_loader_keeps_what_the_source_can_yield_quantized(monkeypatch):
    """``model_loader._keep_quantized``: the projections a GGUF source reports in a kernel block type become
    GGUFLinear (forced on the CPU), an int4 source's become Int4Linear; without the override on a CPU, or
    with ``DOCKYARD_QUANT_NATIVE=0``, nothing changes. The sources are stand-ins answering the loaders' API."""
    from types import SimpleNamespace

    from dockyard import model_loader

    q_proj = "model.layers.0.self_attn.q_proj.weight"

    class GGUFStandIn:
        def kernel_quantized_weights(self, names):
            return {n: "Q4_K" for n in names if n in (q_proj, "model.embed_tokens.weight")}

    gguf_source = SimpleNamespace(kind="gguf", gguf=GGUFStandIn(), int4=None)
    int4_source = SimpleNamespace(kind="safetensors", gguf=None, int4=object())
    cpu = torch.device("cpu")
    monkeypatch.delenv(ql.QUANT_NATIVE_ENV, raising=False)
    assert model_loader._keep_quantized(_model(), gguf_source, cpu, 1) == set()
    monkeypatch.setenv(ql.QUANT_NATIVE_ENV, "1")
    model = _model()
    assert model_loader._keep_quantized(model, gguf_source, cpu, 1) == {q_proj}
    assert isinstance(model.get_submodule(q_proj[: -len(".weight")]), ql.GGUFLinear)
    model = _model()
    assert len(model_loader._keep_quantized(model, int4_source, cpu, 1)) == 14
    assert all(isinstance(model.get_submodule(n), ql.Int4Linear) for n in TINY_PROJECTIONS)
    monkeypatch.setenv(ql.QUANT_NATIVE_ENV, "0")
    assert model_loader._keep_quantized(_model(), int4_source, cpu, 1) == set()
    # Only the formats the path choice keeps: a Q4_K weight is dequantized where only Q6_K stays quantized.
    monkeypatch.setattr(model_loader, "choose_quant_path", lambda device, tp: (frozenset({"Q6_K"}), "a test's choice"))
    assert model_loader._keep_quantized(_model(), gguf_source, cpu, 1) == set()
    monkeypatch.setattr(model_loader, "choose_quant_path", lambda device, tp: (frozenset({"Q4_K"}), "a test's choice"))
    assert model_loader._keep_quantized(_model(), gguf_source, cpu, 1) == {q_proj}
