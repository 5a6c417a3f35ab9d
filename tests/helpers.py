"""Shared test helpers: error metric, paged single-sequence driver, tiny HF reference models."""

from __future__ import annotations

from pathlib import Path

import torch

# The metric and the paged driver are library code now (the onboarding equivalence gate uses them).
from dockyard.onboard.equivalence import paged_logits, rel_rmse

__all__ = ["paged_logits", "rel_rmse", "save_tiny_hf_model"]


def save_tiny_hf_model(hf_model: torch.nn.Module, directory: Path) -> Path:
    """Save an HF model (config + safetensors) so dockyard loads it through its own loader."""
    hf_model.save_pretrained(directory, safe_serialization=True)
    return directory
