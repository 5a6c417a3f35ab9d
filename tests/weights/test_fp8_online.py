"""Online FP8 (``--quantization fp8`` on an unquantized checkpoint): projections quantized to e4m3 at load.

A bf16 Llama checkpoint is loaded with ``quantization="fp8"`` on the CPU: every attention and MLP projection
becomes an ``Fp8Linear`` (the reference math on a CPU) whose bytes and scales equal the block-by-block
quantizer of ``weights.fp8_quantize`` (a loop over blocks, independent of the vectorized one the loader
uses), and the logits stay within FP8's error of the unquantized model's. Where it cannot run, it is
refused with the reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dockyard.engine.llm import LLM
from dockyard.engine.sampling_params import SamplingParams
from dockyard.errors import ConfigError
from dockyard.model_loader import check_online_fp8
from dockyard.model_source import resolve_model
from dockyard.ops.fp8_linear import Fp8Linear
from dockyard.weights.fp8_quantize import FP8_BLOCK, FP8_ONLINE_LOGITS_BOUND, quantize_fp8_blocks, quantize_linears_fp8
from tests.helpers import rel_rmse, save_tiny_hf_model, unit_scale_llama
from tests.weights.test_fp8 import _logits

PROJECTIONS = [f"model.layers.{i}.{m}" for i in range(2) for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory) -> Path:
    return save_tiny_hf_model(unit_scale_llama(intermediate_size=320).to(torch.bfloat16),
                              tmp_path_factory.mktemp("fp8online") / "bf16")


def _llm(path: Path, **kwargs) -> LLM:
    return LLM(path, dtype="float32", device="cpu", num_kv_blocks=16, max_num_seqs=2, **kwargs)


def test_online_fp8_quantizes_the_projections_and_stays_within_fp8_error(bf16_checkpoint):
    ref = _llm(bf16_checkpoint)
    fp8 = _llm(bf16_checkpoint, quantization="fp8")
    ref_params = dict(ref.model.named_parameters())
    for name in PROJECTIONS:
        module = fp8.model.get_submodule(name)
        assert isinstance(module, Fp8Linear) and module.block == FP8_BLOCK, name
        q, scale = quantize_fp8_blocks(ref_params[name + ".weight"].detach(), FP8_BLOCK)
        assert torch.equal(module.weight.view(torch.uint8), q.view(torch.uint8)), name
        assert torch.equal(module.weight_scale_inv, scale), name
    assert type(fp8.model.lm_head) is torch.nn.Linear  # lm_head, embeddings and norms keep the model dtype
    ratio = rel_rmse(_logits(fp8), _logits(ref))
    print(f"online FP8 (weights and activations e4m3) vs the bf16 checkpoint in float32: rmse ratio {ratio:.4f} "
          f"(bound {FP8_ONLINE_LOGITS_BOUND})")
    assert 0 < ratio < FP8_ONLINE_LOGITS_BOUND
    out = fp8.generate([[1, 17, 300, 42]], SamplingParams(max_tokens=4, temperature=0))  # and it serves requests
    assert len(out[0].outputs[0].token_ids) == 4


def test_per_row_scales(bf16_checkpoint):
    llm = _llm(bf16_checkpoint)
    weight = llm.model.get_submodule(PROJECTIONS[-1]).weight.detach().clone()
    quantize_linears_fp8(llm.model, block=None)
    module = llm.model.get_submodule(PROJECTIONS[-1])
    assert module.block == (1, weight.shape[1]) and module.weight_scale_inv.shape == (weight.shape[0], 1)
    q, scale = quantize_fp8_blocks(weight, (1, weight.shape[1]))
    assert torch.equal(module.weight.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(module.weight_scale_inv, scale)


def test_online_fp8_is_refused_where_it_cannot_run(bf16_checkpoint, tmp_path):
    source = resolve_model(bf16_checkpoint)
    with pytest.raises(ConfigError, match=r"FP8 layers run in one process \(tensor_parallel_size=2\)"):
        check_online_fp8(source, torch.device("cpu"), tp_size=2)
    with pytest.raises(ConfigError, match="transformers path has no FP8 layers"):
        _llm(bf16_checkpoint, quantization="fp8", model_impl="transformers")


def test_online_fp8_of_a_gguf_is_refused(bundled_gguf):
    with pytest.raises(ConfigError, match=r"the GGUF file's weights are already quantized \(GGUF Q4_1"):
        check_online_fp8(resolve_model(bundled_gguf), torch.device("cpu"))
