"""Registry: HF ``architectures[0]`` → dockyard model class, and what each class supports.

Model modules are imported lazily so that ``dockyard inspect`` on a config stays cheap.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dockyard.errors import UnsupportedArchitectureError
from dockyard.spec import ModelSpec

if TYPE_CHECKING:  # torch is imported with the model modules, not by reading the registry
    from torch import nn


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


# The features each architecture is proven to compute: every key listed here is present in a config of that
# architecture that `dockyard models` runs through the equivalence gate (docs/supported-models.md), and an
# ablation of it (dockyard/onboard/ablations.py) fails the gate there; tests/test_supported_models.py checks
# both. A feature the code may well handle but no such run exercises is not claimed.
_LLAMA_SHAPE = frozenset({"gqa", "rope:default", "activation:silu"})
_MOE = frozenset({"moe"})
_GEMMA = frozenset({"gqa", "interleaved_sliding_window", "query_pre_attn_scalar", "post_norms",
                    "activation:gelu_pytorch_tanh", "tied_embeddings", "embedding_scale"})
_GEMMA3 = _GEMMA | {"qk_norm", "local_rope_base", "rope:linear"}
_DEEPSEEK_V2 = frozenset({"mla", "rope:yarn", "activation:silu", "moe", "moe_shared_experts",
                          "moe_dense_layers", "moe_grouped_routing"})


def _entry(module: str, class_name: str, family: str, model_types: set[str], features: frozenset[str],
           example: str = "") -> ModelEntry:
    return ModelEntry(f"dockyard.models.{module}", class_name, family, features, frozenset(model_types), example)


MODEL_REGISTRY: dict[str, ModelEntry] = {
    "LlamaForCausalLM": _entry("llama", "LlamaForCausalLM", "llama", {"llama"}, _LLAMA_SHAPE | {
        "mha", "mqa", "rope:llama3", "rope:linear", "rope:yarn", "rope:longrope", "activation:gelu",
        "attention_bias", "mlp_bias", "tied_embeddings"}, example="meta-llama/Llama-3.1-8B"),
    "MistralForCausalLM": _entry("llama", "LlamaForCausalLM", "llama", {"mistral"}, _LLAMA_SHAPE | {"sliding_window"},
                                 example="mistralai/Mistral-7B-v0.1"),
    "GraniteForCausalLM": _entry("llama", "LlamaForCausalLM", "granite", {"granite"},
                                 _LLAMA_SHAPE | {"granite_multipliers", "tied_embeddings"},
                                 example="ibm-granite/granite-3.0-2b-instruct"),
    "Qwen2ForCausalLM": _entry("llama", "LlamaForCausalLM", "qwen2", {"qwen2"},
                               _LLAMA_SHAPE | {"qkv_bias", "tied_embeddings", "rope:yarn"},
                               example="Qwen/Qwen2.5-7B-Instruct"),
    "Qwen3ForCausalLM": _entry("llama", "LlamaForCausalLM", "qwen3", {"qwen3"},
                               _LLAMA_SHAPE | {"qk_norm", "tied_embeddings", "rope:yarn"}, example="Qwen/Qwen3-8B"),
    "Gemma2ForCausalLM": _entry("llama", "LlamaForCausalLM", "gemma2", {"gemma2"},
                                _GEMMA | {"rope:default", "attn_softcap", "final_softcap"},
                                example="google/gemma-2-2b-it"),
    "Gemma3ForCausalLM": _entry("llama", "LlamaForCausalLM", "gemma3", {"gemma3", "gemma3_text"},
                                _GEMMA3 | {"mqa", "rope:default"}, example="google/gemma-3-1b-it"),
    "Gemma3ForConditionalGeneration": _entry("llama", "LlamaForCausalLM", "gemma3", {"gemma3", "gemma3_text"},
                                             _GEMMA3 | {"rope:default"}, example="google/gemma-3-27b-it"),
    "Olmo2ForCausalLM": _entry("llama", "LlamaForCausalLM", "olmo2", {"olmo2"},
                               frozenset({"mha", "gqa", "rope:default", "activation:silu", "qk_norm", "post_norms"}),
                               example="allenai/OLMo-2-0425-1B"),
    "Phi3ForCausalLM": _entry("llama", "Phi3ForCausalLM", "phi3", {"phi3"}, _LLAMA_SHAPE | {
        "mha", "fused_qkv", "partial_rotary", "rope:longrope", "sliding_window", "tied_embeddings"},
        example="microsoft/Phi-4-mini-instruct"),
    "MixtralForCausalLM": _entry("moe", "MixtralForCausalLM", "mixtral", {"mixtral"}, _LLAMA_SHAPE | _MOE,
                                 example="mistralai/Mixtral-8x7B-v0.1"),
    "Qwen2MoeForCausalLM": _entry("moe", "MoEForCausalLM", "qwen2_moe", {"qwen2_moe"}, _MOE | {
        "mha", "gqa", "rope:default", "activation:silu", "qkv_bias", "moe_shared_experts"},
        example="Qwen/Qwen1.5-MoE-A2.7B-Chat"),
    "Qwen3MoeForCausalLM": _entry("moe", "MoEForCausalLM", "qwen3_moe", {"qwen3_moe"}, _LLAMA_SHAPE | _MOE |
                                  {"mqa", "qk_norm", "rope:yarn"}, example="Qwen/Qwen3-30B-A3B"),
    "GptOssForCausalLM": _entry("moe", "GptOssForCausalLM", "gpt_oss", {"gpt_oss"}, _MOE | {
        "gqa", "interleaved_sliding_window", "attention_bias", "attention_sinks", "rope:yarn", "clamped_swiglu"},
        example="openai/gpt-oss-20b"),
    "DeepseekV2ForCausalLM": _entry("deepseek", "DeepseekForCausalLM", "deepseek",
                                    {"deepseek_v2", "deepseek_v3", "kimi_k2"}, _DEEPSEEK_V2,
                                    example="deepseek-ai/DeepSeek-V2-Lite"),
    "DeepseekV3ForCausalLM": _entry("deepseek", "DeepseekForCausalLM", "deepseek",
                                    {"deepseek_v2", "deepseek_v3", "kimi_k2"},
                                    _DEEPSEEK_V2 | {"moe_sigmoid_scoring"}, example="deepseek-ai/DeepSeek-V3"),
}


# Every architecture that the installed transformers implements with its attention interface, when no entry
# above runs it (dockyard.model_impl chooses).
GENERIC_ENTRY = ModelEntry("dockyard.models.generic", "TransformersForCausalLM", "transformers")


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
    """Instantiate the model class for ``spec`` (on the current default device and dtype): its native family,
    or transformers' own class on the generic path (``spec.model_impl``)."""
    if spec.model_impl == "transformers":
        return GENERIC_ENTRY.load()(spec)
    return get_model_entry(spec.architecture).load()(spec)
