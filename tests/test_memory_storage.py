"""Memory plans from what the checkpoint stores, against independent counts of what is stored and held.

- FP8 (Qwen3-8B-FP8, DeepSeek-V3): the planned checkpoint bytes against transformers' own FP8 model (its
  ``replace_with_fp8_linear`` on the meta device: the layout transformers loads these checkpoints into),
  and, for a scaled-down Qwen3-8B-FP8, against a checkpoint of dummy FP8 weights written to disk in that
  layout and loaded by the engine (bytes on disk; bytes of the parameters the engine holds, dequantized and
  on the native FP8 path).
- GGUF: planned bytes against the file's size, and the held bytes against the loaded bundled model.
- Gemma 3 sliding-window KV: the planned KV need against the bytes in transformers' cache after a prompt
  longer than the window, and the engine's allocation against its cache tensor.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dockyard import LLM
from dockyard.errors import WeightsError
from dockyard.memory import plan_memory, storage_of
from dockyard.model_source import resolve_model
from dockyard.weights.quant_config import FP8Config
from tests.helpers import llama_parameters
from tests.shared_configs import CONFIGS_DIR

GiB = 1024**3


def _config(name: str, **overrides) -> dict:
    path = CONFIGS_DIR / name / "config.json"
    if not path.exists():
        pytest.skip(f"{path} is not present")
    return {**json.loads(path.read_text()), **overrides}


def _hf_fp8_state(cfg: dict) -> dict[str, torch.Tensor]:
    """transformers' FP8 model for ``cfg`` on meta: its state dict is the checkpoint's tensors and dtypes."""
    from transformers import AutoConfig, AutoModelForCausalLM, FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import replace_with_fp8_linear

    quant = cfg["quantization_config"]
    config = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k not in ("architectures",
                                                                               "quantization_config")})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    keep = ["lm_head", *quant.get("modules_to_not_convert", []), *quant.get("ignored_layers", [])]
    replace_with_fp8_linear(model, modules_to_not_convert=keep,
                            quantization_config=FineGrainedFP8Config(weight_block_size=quant["weight_block_size"]))
    return model.state_dict()


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _plan_of(cfg: dict, tmp_path: Path, dtype=torch.bfloat16, native=False):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    source = resolve_model(tmp_path / "config.json")
    return plan_memory(source.spec, dtype, storage=storage_of(source, native))


@pytest.mark.parametrize("name, overrides", [
    ("Qwen--Qwen3-8B-FP8", {}),  # the whole model (meta: no memory)
    # DeepSeek-V3 at true widths, 3 dense + 2 MoE layers of its 61 (each MoE layer the same 256 experts).
    ("deepseek-ai--DeepSeek-V3", {"num_hidden_layers": 5}),
])
def test_fp8_checkpoint_bytes_match_transformers_fp8_layout(tmp_path, name, overrides):
    cfg = _config(name, **overrides)
    plan = _plan_of(cfg, tmp_path)
    stored = _nbytes(_hf_fp8_state(cfg).values())
    assert abs(plan.checkpoint_bytes - stored) / stored < 0.02, (plan.checkpoint_bytes, stored)
    # Dequantized on load (CPU, or a GPU without FP8 tensor cores): every parameter at the run dtype, about
    # twice what is stored.
    assert plan.weight_bytes == plan.num_parameters * 2 and plan.checkpoint_bytes < 0.6 * plan.weight_bytes


def _qwen3_fp8_bytes_by_hand(cfg: dict, unquantized: Callable[[int, str], bool]) -> int:
    """Qwen3's checkpoint bytes from its config's numbers: bf16 embeddings, lm_head and norms; each decoder
    projection FP8 with a float32 scale per 128 × 128 block, or bf16 where ``unquantized(layer, name)``."""
    h, i, v, head = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * head, cfg["num_key_value_heads"] * head
    shapes = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, q), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    total = 2 * (2 * v * h + h)  # embeddings, lm_head, final norm
    for layer in range(cfg["num_hidden_layers"]):
        total += 2 * (2 * h + 2 * head)  # two norms, q_norm and k_norm
        for name, (rows, cols) in shapes.items():
            if unquantized(layer, name):
                total += 2 * rows * cols
            else:
                total += rows * cols + 4 * math.ceil(rows / 128) * math.ceil(cols / 128)
    return total


@pytest.mark.parametrize("key", ["modules_to_not_convert", "ignored_layers"])
def test_modules_kept_unquantized_are_planned_at_their_stored_dtype(tmp_path, key):
    # Layer 0's attention and every layer's down projection stay bf16, as the config says.
    base = _config("Qwen--Qwen3-8B-FP8")
    cfg = {**base, "quantization_config": {**base["quantization_config"],
                                           key: ["model.layers.0.self_attn", "model.layers.*.mlp.down_proj"]}}
    plan = _plan_of(cfg, tmp_path)
    by_hand = _qwen3_fp8_bytes_by_hand(cfg, lambda layer, name: name == "mlp.down_proj"
                                       or (layer == 0 and name.startswith("self_attn")))
    assert plan.checkpoint_bytes == by_hand
    assert plan.checkpoint_bytes == _nbytes(_hf_fp8_state(cfg).values())  # transformers' own FP8 layout
    everything = _plan_of(base, tmp_path).checkpoint_bytes
    assert everything == _qwen3_fp8_bytes_by_hand(base, lambda layer, name: False)
    assert plan.checkpoint_bytes > everything  # bf16 is more bytes than FP8 plus scales


def test_native_fp8_holds_modules_kept_unquantized_at_the_run_dtype(tmp_path):
    # With every decoder module kept unquantized there is nothing FP8 to keep: the native path holds what the
    # dequantizing path holds; with only layer 0's attention kept, it holds more than with none kept.
    base = _config("Qwen--Qwen3-8B-FP8")

    def held(patterns: list[str], native: bool) -> int:
        quant = {**base["quantization_config"], "modules_to_not_convert": patterns}
        return _plan_of({**base, "quantization_config": quant}, tmp_path, native=native).weight_bytes

    assert held(["model.layers"], native=True) == held([], native=False) == _qwen3_bf16_bytes(base)
    assert held([], native=True) < held(["model.layers.0.self_attn"], native=True) < held([], native=False)


def _qwen3_bf16_bytes(cfg: dict) -> int:
    """Qwen3's parameters at bf16, counted by hand (q_norm and k_norm besides Llama's layout)."""
    return 2 * (llama_parameters(cfg) + cfg["num_hidden_layers"] * 2 * cfg["head_dim"])


def test_unquantized_module_patterns_match_as_transformers_matches_them():
    from transformers.quantizers.quantizers_utils import should_convert_module

    patterns = ["model.layers.*.self_attn", "model.layers.1.mlp", "lm_head", "mlp.gate", "down_proj"]
    fp8 = FP8Config.from_quantization_config({"quant_method": "fp8", "modules_to_not_convert": patterns}, "cfg")
    names = ["model.layers.0.self_attn.q_proj", "model.layers.11.self_attn", "model.layers.1.mlp.up_proj",
             "model.layers.11.mlp.up_proj", "model.layers.2.mlp.gate", "model.layers.2.mlp.gate_proj", "lm_head",
             "model.embed_tokens", "model.layers.3.mlp.experts.7.down_proj", "model.layers.3.mlp.down_projx"]
    assert [fp8.keeps_unquantized(n) for n in names] == [not should_convert_module(n, patterns) for n in names]
    with pytest.raises(WeightsError, match="modules_to_not_convert"):
        FP8Config.from_quantization_config({"quant_method": "fp8", "modules_to_not_convert": "lm_head"}, "cfg")


def test_fp8_plan_matches_a_dummy_fp8_checkpoint_loaded_by_the_engine(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    # Qwen3-8B-FP8 scaled down (2 layers, vocab 4096, widths ÷4) so the engine loads it on a CPU in seconds.
    cfg = _config("Qwen--Qwen3-8B-FP8", num_hidden_layers=2, vocab_size=4096, hidden_size=1024,
                  intermediate_size=3072, num_attention_heads=8, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    state = _hf_fp8_state(cfg)
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for key, t in state.items():
        if key.endswith("weight_scale_inv"):
            tensors[key] = torch.rand(t.shape, generator=gen) * 1e-3 + 1e-4
        else:
            value = torch.randn(t.shape, generator=gen) * (1.0 if t.dtype == torch.float8_e4m3fn else 0.02)
            tensors[key] = value.to(t.dtype)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file(tensors, str(ckpt / "model.safetensors"))
    (ckpt / "config.json").write_text(json.dumps(cfg))
    on_disk = _nbytes(tensors.values())
    config_plan = _plan_of(cfg, tmp_path)
    assert abs(config_plan.checkpoint_bytes - on_disk) / on_disk < 0.02, (config_plan.checkpoint_bytes, on_disk)
    header_plan = plan_memory(resolve_model(ckpt).spec, torch.bfloat16, storage=storage_of(resolve_model(ckpt)))
    assert header_plan.checkpoint_bytes == on_disk  # read from the safetensors headers
    assert os.path.getsize(ckpt / "model.safetensors") > on_disk  # the file adds its header

    def held(llm) -> int:
        return _nbytes(llm.model.parameters())

    for native in (False, True):
        monkeypatch.setenv("DOCKYARD_FP8_NATIVE", "1" if native else "0")
        llm = LLM(str(ckpt), dtype=torch.bfloat16, device="cpu", num_kv_blocks=4)
        planned = plan_memory(llm.spec, torch.bfloat16, storage=storage_of(resolve_model(ckpt), native)).weight_bytes
        assert abs(planned - held(llm)) / held(llm) < 0.02, (native, planned, held(llm))
        assert any(p.dtype == torch.float8_e4m3fn for p in llm.model.parameters()) == native
        del llm


def test_gguf_plan_matches_the_file_and_the_loaded_model(bundled_gguf, bundled_llm):
    source = resolve_model(bundled_gguf)
    plan = plan_memory(source.spec, torch.float32, storage=storage_of(source))
    size = os.path.getsize(bundled_gguf)
    # The file is the tensor data plus metadata (vocabulary, chat template): the plan counts the tensors.
    assert 0.98 * size < plan.checkpoint_bytes <= size, (plan.checkpoint_bytes, size)
    assert set(plan.checkpoint_bytes_by_dtype) >= {"Q4_1", "F32"}
    assert plan.weight_bytes == _nbytes(bundled_llm.model.parameters())  # dequantized to float32 on load


def test_gemma3_kv_plan_per_layer_type_matches_transformers_cache(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    # transformers keeps window - 1 tokens of a sliding layer between steps (the next token brings its own);
    # the plan counts the window, the slots a step writes into: one token per sliding layer apart.
    window, prompt = 64, 256
    cfg = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 256,
           "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 6, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 16, "sliding_window": window, "max_position_embeddings": 4096,
           "torch_dtype": "float32"}
    plan = _plan_of(cfg, tmp_path, dtype=torch.float32)
    assert (plan.num_layers, plan.sliding_layers, plan.sliding_window) == (6, 5, window)
    config = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"})
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        cache = hf(torch.randint(0, 256, (1, prompt)), use_cache=True).past_key_values
    held = sum(_nbytes([layer.keys, layer.values]) for layer in cache.layers)
    assert abs(plan.kv_bytes_needed(prompt) - held) / held < 0.02, (plan.kv_bytes_needed(prompt), held)
    # The engine keeps every layer for the whole context: its cache is kv_bytes_per_token per slot.
    llm = LLM(str(tmp_path / "config.json"), dtype=torch.float32, device="cpu", num_kv_blocks=8, block_size=16,
              max_model_len=128)
    assert _nbytes([llm.engine.runner.kv_cache]) == 8 * 16 * plan.kv_bytes_per_token


def test_gemma3_27b_kv_at_128k_by_hand():
    cfg = _config("google--gemma-3-27b-it")
    source = resolve_model(CONFIGS_DIR / "google--gemma-3-27b-it")
    plan = plan_memory(source.spec, torch.bfloat16, storage=storage_of(source))
    text = cfg["text_config"]
    per_layer_token = 2 * text["num_key_value_heads"] * text["head_dim"] * 2
    full = text["num_hidden_layers"] // text.get("sliding_window_pattern", 6)
    sliding = text["num_hidden_layers"] - full
    context = 131072
    assert plan.kv_bytes_needed(context) == per_layer_token * (full * context + sliding * text["sliding_window"])
    assert plan.kv_bytes_per_token * context / plan.kv_bytes_needed(context) > 5  # what the engine allocates today
