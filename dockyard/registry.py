"""Registry: HF ``architectures[0]`` → dockyard model class, and what each class supports.

Model modules are imported lazily so that ``dockyard inspect`` on a config stays cheap.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from torch import nn

from dockyard.errors import UnsupportedArchitectureError
from dockyard.ops.activation import ACTIVATION_NAMES
from dockyard.spec import ROPE_TYPES, ModelSpec


@dataclass(frozen=True)
class ModelEntry:
    """Where an architecture's implementation lives and what it implements.

    ``features`` are the keys of ``dockyard.onboard.config_features`` this class computes (the inspect
    gate names every feature a config asks for that no family lists); ``model_types`` are the HF
    ``model_type`` values of the configs it runs.
    """

    module: str
    class_name: str
    family: str
    features: frozenset[str] = frozenset()
    model_types: frozenset[str] = frozenset()
    example: str = ""  # a published model of this family (docs/supported-models.md)

    def load(self) -> type[nn.Module]:
        return getattr(importlib.import_module(self.module), self.class_name)


# What the shared decoder (dockyard/models/llama.py) computes for every family built on it.
_DECODER = frozenset({
    "mha", "gqa", "mqa", "sliding_window", "interleaved_sliding_window", "attention_bias", "qkv_bias", "mlp_bias",
    "qk_norm", "attn_softcap", "query_pre_attn_scalar", "attention_sinks", "partial_rotary", "local_rope_base",
    "post_norms", "tied_embeddings", "embedding_scale", "final_softcap", "granite_multipliers",
    *(f"rope:{t}" for t in ROPE_TYPES), *(f"activation:{a}" for a in ACTIVATION_NAMES),
})
_MOE = frozenset({"moe", "moe_shared_experts", "moe_dense_layers", "moe_grouped_routing", "moe_sigmoid_scoring"})


def _entry(module: str, class_name: str, family: str, model_types: set[str], extra: frozenset[str] = frozenset(),
           example: str = "") -> ModelEntry:
    return ModelEntry(f"dockyard.models.{module}", class_name, family, _DECODER | extra, frozenset(model_types),
                      example)


_GEMMA3 = ("llama", "LlamaForCausalLM", "gemma3", {"gemma3", "gemma3_text"})
_DEEPSEEK = ("deepseek", "DeepseekForCausalLM", "deepseek", {"deepseek_v2", "deepseek_v3", "kimi_k2"}, _MOE | {"mla"})

MODEL_REGISTRY: dict[str, ModelEntry] = {
    "LlamaForCausalLM": _entry("llama", "LlamaForCausalLM", "llama", {"llama"}, example="meta-llama/Llama-3.1-8B"),
    "MistralForCausalLM": _entry("llama", "LlamaForCausalLM", "llama", {"mistral"},
                                 example="mistralai/Mistral-7B-v0.1"),
    "GraniteForCausalLM": _entry("llama", "LlamaForCausalLM", "granite", {"granite"},
                                 example="ibm-granite/granite-3.0-2b-instruct"),
    "Qwen2ForCausalLM": _entry("llama", "LlamaForCausalLM", "qwen2", {"qwen2"}, example="Qwen/Qwen2.5-7B-Instruct"),
    "Qwen3ForCausalLM": _entry("llama", "LlamaForCausalLM", "qwen3", {"qwen3"}, example="Qwen/Qwen3-8B"),
    "Gemma2ForCausalLM": _entry("llama", "LlamaForCausalLM", "gemma2", {"gemma2"}, example="google/gemma-2-2b-it"),
    "Gemma3ForCausalLM": _entry(*_GEMMA3, example="google/gemma-3-1b-it"),
    "Gemma3ForConditionalGeneration": _entry(*_GEMMA3, example="google/gemma-3-27b-it"),
    "Olmo2ForCausalLM": _entry("llama", "LlamaForCausalLM", "olmo2", {"olmo2"}, example="allenai/OLMo-2-0425-1B"),
    "Phi3ForCausalLM": _entry("llama", "Phi3ForCausalLM", "phi3", {"phi3"}, frozenset({"fused_qkv"}),
                              example="microsoft/Phi-4-mini-instruct"),
    "MixtralForCausalLM": _entry("moe", "MixtralForCausalLM", "mixtral", {"mixtral"}, _MOE,
                                 example="mistralai/Mixtral-8x7B-v0.1"),
    "Qwen2MoeForCausalLM": _entry("moe", "MoEForCausalLM", "qwen2_moe", {"qwen2_moe"}, _MOE,
                                  example="Qwen/Qwen1.5-MoE-A2.7B-Chat"),
    "Qwen3MoeForCausalLM": _entry("moe", "MoEForCausalLM", "qwen3_moe", {"qwen3_moe"}, _MOE,
                                  example="Qwen/Qwen3-30B-A3B"),
    "GptOssForCausalLM": _entry("moe", "GptOssForCausalLM", "gpt_oss", {"gpt_oss"}, _MOE | {"clamped_swiglu"},
                                example="openai/gpt-oss-20b"),
    "DeepseekV2ForCausalLM": _entry(*_DEEPSEEK, example="deepseek-ai/DeepSeek-V2-Lite"),
    "DeepseekV3ForCausalLM": _entry(*_DEEPSEEK, example="deepseek-ai/DeepSeek-V3"),
}


def supported_architectures() -> list[str]:
    """Every architecture name dockyard can run, sorted."""
    return sorted(MODEL_REGISTRY)


def get_model_entry(architecture: str) -> ModelEntry:
    """The registry entry for ``architecture``, or an error that lists what is supported."""
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"architecture {architecture!r} is not supported by dockyard yet; supported: "
            f"{', '.join(supported_architectures())}"
        ) from None


def build_model(spec: ModelSpec) -> nn.Module:
    """Instantiate the model class for ``spec`` (on the current default device and dtype)."""
    return get_model_entry(spec.architecture).load()(spec)
