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

    def load(self) -> type[nn.Module]:
        return getattr(importlib.import_module(self.module), self.class_name)


_LLAMA = ModelEntry(
    "dockyard.models.llama", "LlamaForCausalLM", "llama",
    features=frozenset({
        "mha", "gqa", "mqa", "sliding_window", "attention_bias", "mlp_bias", "tied_embeddings",
        *(f"rope:{t}" for t in ROPE_TYPES), *(f"activation:{a}" for a in ACTIVATION_NAMES),
    }),
    model_types=frozenset({"llama", "mistral"}),
)

MODEL_REGISTRY: dict[str, ModelEntry] = {
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,
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
