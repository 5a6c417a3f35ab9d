"""CUDA graphs for decode steps: captured replays give what the same engine gives eagerly.

On the CPU the engine never captures (checked here, with the rotary reservation that makes a
forward capturable); the graph-versus-eager comparison runs where a GPU is.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from dockyard import LLM, SamplingParams
from dockyard.engine import cuda_graphs
from dockyard.engine.cuda_graphs import graph_batch_sizes
from dockyard.ops.rotary import get_rope
from dockyard.spec import RopeSpec
from tests.shared_configs import shared_config

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def test_graph_batch_sizes():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(8) == [1, 2, 4, 8]
    assert graph_batch_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert graph_batch_sizes(100)[-3:] == [80, 96, 100]  # the cap itself is always a size


def test_cpu_runs_eagerly(bundled_llm):
    runner = bundled_llm.engine.runner
    assert runner.graphs is None
    assert runner.kv_cache.shape[2] == runner.num_blocks  # no sink block without graphs


@pytest.mark.parametrize(("rope", "capturable"), [
    (RopeSpec(rope_type="default", theta=10000.0), True),
    (RopeSpec(rope_type="llama3", theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=64), True),
    (RopeSpec(rope_type="dynamic", theta=10000.0, factor=2.0, original_max_position_embeddings=64), False),
])
def test_rotary_reserve(rope, capturable):
    """Reserved tables give the same rotation as the general path, past the constructed length too."""
    reserved, general = get_rope(rope, 32, 64), get_rope(rope, 32, 64)
    assert reserved.reserve(200) == capturable
    positions = torch.tensor([0, 5, 63, 64, 150, 199])
    q, k = torch.randn(6, 4, 32), torch.randn(6, 2, 32)
    for a, b in zip(reserved(positions, q, k), general(positions, q, k)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _tiny_llama(tmp_path) -> str:
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
              "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
              "vocab_size": 1024, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 256},
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


@needs_cuda
def test_graphs_equal_eager(tmp_path):
    """Greedy tokens and their logprobs of a padded batch (5 sequences replay the graph of 8) and of
    a lone sequence, with graphs and eagerly, in float32 on the same dummy weights."""
    model = _tiny_llama(tmp_path)
    kwargs = dict(load_format="dummy", device="cuda", dtype="float32", max_num_seqs=8, seed=3,
                  kv_cache_memory_bytes=None, num_kv_blocks=256)
    graphs = LLM(model, **kwargs)
    assert graphs.engine.runner.graphs is not None, graphs.engine.runner.eager_reason
    assert graphs.engine.runner.graphs.sizes == [1, 2, 4, 8]
    eager = LLM(model, enforce_eager=True, **kwargs)
    assert eager.engine.runner.graphs is None and eager.engine.runner.eager_reason == "enforce_eager"
    rng = random.Random(0)
    prompts = [[rng.randrange(1024) for _ in range(n)] for n in (5, 17, 40, 3, 90)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=0)
    for batch in (prompts, prompts[2:3]):
        a = graphs.generate(batch, params, use_tqdm=False)
        b = eager.generate(batch, params, use_tqdm=False)
        for x, y in zip(a, b):
            assert x.outputs[0].token_ids == y.outputs[0].token_ids
            lx = [next(iter(e.values())) for e in x.outputs[0].logprobs]
            ly = [next(iter(e.values())) for e in y.outputs[0].logprobs]
            torch.testing.assert_close(torch.tensor(lx), torch.tensor(ly), atol=1e-4, rtol=1e-4)


def _tiny_dense_mla(tmp_path) -> str:
    """DeepSeek-V2 attention (MLA, YaRN rope) with dense MLPs only: MoE layers would run eagerly."""
    config = {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "hidden_size": 128,
              "intermediate_size": 256, "moe_intermediate_size": 64, "num_hidden_layers": 2,
              "first_k_dense_replace": 2, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
              "num_attention_heads": 4, "num_key_value_heads": 4, "kv_lora_rank": 64, "q_lora_rank": None,
              "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32, "vocab_size": 1024,
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "rope_scaling": {"type": "yarn", "factor": 4.0, "mscale": 0.707, "mscale_all_dim": 0.707,
                               "beta_fast": 32, "beta_slow": 1, "original_max_position_embeddings": 512},
              "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


def _assert_graphs_equal_eager(model: str, max_num_seqs: int, rng: random.Random, lengths: tuple[int, ...],
                               batches: list[slice]) -> None:
    """The model captures its decode steps, and greedy tokens of each batch of prompts equal eager mode's."""
    kwargs = dict(load_format="dummy", device="cuda", dtype="float32", max_num_seqs=max_num_seqs, seed=3,
                  kv_cache_memory_bytes=None, num_kv_blocks=256)
    graphs = LLM(model, **kwargs)
    assert graphs.engine.runner.graphs is not None, graphs.engine.runner.eager_reason
    eager = LLM(model, enforce_eager=True, **kwargs)
    prompts = [[rng.randrange(1024) for _ in range(n)] for n in lengths]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    for batch in batches:
        a = graphs.generate(prompts[batch], params, use_tqdm=False)
        b = eager.generate(prompts[batch], params, use_tqdm=False)
        assert [x.outputs[0].token_ids for x in a] == [y.outputs[0].token_ids for y in b]


@needs_cuda
def test_mla_graphs_equal_eager(tmp_path):
    """An MLA model captures (its decode is the absorbed Triton kernel) and replays the tokens of eager mode."""
    _assert_graphs_equal_eager(_tiny_dense_mla(tmp_path), 4, random.Random(2), (5, 40, 90), batches=[slice(None)])


@needs_cuda
def test_async_scheduling_with_graphs_equals_synchronous_eager(tmp_path):
    """Graph replays fed their input ids from the in-flight step's argmax on the device give the
    tokens of synchronous eager stepping, also when sequences stop at different steps."""
    model = _tiny_llama(tmp_path)
    kwargs = dict(load_format="dummy", device="cuda", dtype="float32", max_num_seqs=8, seed=3,
                  kv_cache_memory_bytes=None, num_kv_blocks=256)
    fast = LLM(model, **kwargs)
    assert fast.engine.async_scheduling and fast.engine.runner.graphs is not None
    slow = LLM(model, enforce_eager=True, async_scheduling=False, **kwargs)
    rng = random.Random(1)
    prompts = [[rng.randrange(1024) for _ in range(n)] for n in (5, 17, 40, 3, 90, 12)]
    plain = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    reference = slow.generate(prompts, plain, use_tqdm=False)
    # Stop three of them early at a token they are known to produce, one by length.
    params = [plain] * len(prompts)
    for i in (0, 2, 4):
        params[i] = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True,
                                   stop_token_ids=[reference[i].outputs[0].token_ids[5 + i]])
    params[1] = SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True)
    a = fast.generate(prompts, params, use_tqdm=False)
    b = slow.generate(prompts, params, use_tqdm=False)
    assert [x.outputs[0].token_ids for x in a] == [y.outputs[0].token_ids for y in b]
    assert [x.outputs[0].finish_reason for x in a] == [y.outputs[0].finish_reason for y in b]
    assert len(b[1].outputs[0].token_ids) == 7 and b[0].outputs[0].finish_reason == "stop"


def _tiny_moe(tmp_path, family: str) -> str:
    """A two-layer MoE of the family at toy sizes (gpt-oss: its published config shrunk, sinks, sliding
    window and clamped SwiGLU kept)."""
    common = {"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
              "head_dim": 32, "vocab_size": 1024, "max_position_embeddings": 2048, "tie_word_embeddings": False,
              "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if family == "gpt_oss":
        config = {k: v for k, v in shared_config("openai--gpt-oss-20b").items() if k != "quantization_config"}
        config.update(common, intermediate_size=128, num_local_experts=8, num_experts_per_tok=2,
                      experts_per_token=2, sliding_window=32, layer_types=["sliding_attention", "full_attention"])
    else:
        config = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", **common,
                  "intermediate_size": 512, "moe_intermediate_size": 128, "num_experts": 16,
                  "num_experts_per_tok": 4, "norm_topk_prob": True, "rms_norm_eps": 1e-6, "rope_theta": 1e6}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


@needs_cuda
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_moe_graphs_equal_eager(tmp_path, family):
    """MoE models capture (the fused experts make no host sync) and replay the tokens of eager steps."""
    _assert_graphs_equal_eager(_tiny_moe(tmp_path, family), 8, random.Random(0), (5, 17, 40, 3, 90),
                               batches=[slice(None), slice(2, 3)])


def test_a_failed_capture_leaves_the_model_eager_with_its_first_error_as_reason(monkeypatch):
    """capture_decode_graphs on a model whose capture fails (as an HF module's host synchronization makes it):
    no graphs, the first error as the reason, the engine's stream current again. The CUDA calls are stood in for
    on the CPU; the GPU test below makes a real capture fail."""

    class FailingCapture:
        def __init__(self, *args: object) -> None:
            pass

        def capture(self) -> None:
            try:
                raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")
            finally:  # the capture's end then fails about the capture itself, as torch.cuda.graph's does
                raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    current = []
    monkeypatch.setattr(cuda_graphs, "why_not_capturable", lambda *args: None)
    monkeypatch.setattr(cuda_graphs, "DecodeGraphs", FailingCapture)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "engine stream")
    monkeypatch.setattr(torch.cuda, "set_stream", current.append)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    graphs, reason = cuda_graphs.capture_decode_graphs(torch.nn.Linear(2, 2), torch.zeros(1), 0, 16, 4, 64)
    assert graphs is None and current == ["engine stream"]
    assert reason == ("capturing the decode forward of Linear failed (RuntimeError: CUDA error: operation not "
                      "permitted when stream is capturing)")
