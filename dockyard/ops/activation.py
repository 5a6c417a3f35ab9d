"""Gated activations: act(gate) * up over a fused [gate | up] input."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dockyard.errors import ConfigError
from dockyard.ops.dispatch import fused_ops_enabled

_ACTIVATIONS = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}


def get_activation(name: str):  # noqa: ANN201 - returns a tensor function
    """The activation function for an HF ``hidden_act`` name."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(f"hidden_act={name!r} is not supported; supported: {', '.join(_ACTIVATIONS)}") from None


def act_and_mul(gate: torch.Tensor, up: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """act(gate) * up — the MLP gating of Llama-style models (SiLU-and-mul for ``act='silu'``, one
    Triton kernel on CUDA)."""
    if act == "silu" and gate.dim() == 2 and fused_ops_enabled(gate):
        from dockyard.ops.triton_fused import silu_and_mul  # Triton is an optional dependency

        return silu_and_mul(gate, up)
    return get_activation(act)(gate) * up
