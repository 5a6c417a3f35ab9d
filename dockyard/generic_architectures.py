"""The decoders the generic path is shown on: architectures the installed transformers implements and no
dockyard family runs, each as a tiny config built from its own transformers config class.

One list serves the parametrized equivalence test (``tests/models/test_generic.py``) and the onboarding runs
behind the generic-path table of ``docs/supported-models.md`` (``scripts/onboard_generic.py``).
"""

from __future__ import annotations

from typing import Any

# Sizes every tiny config gets, under transformers' standard attribute names (the config classes map them
# onto their own: n_embd, n_layer, ffn_dim, ...).
TINY_SIZES: dict[str, Any] = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                              "intermediate_size": 128, "vocab_size": 1000, "max_position_embeddings": 256}

# Grouped-query attention at the tiny sizes (4 query heads share 2 KV heads), with an explicit head size, and
# a sliding window shorter than the equivalence check's sequence.
_GQA = {"num_key_value_heads": 2}
_GQA_HEAD = {**_GQA, "head_dim": 16}
_GQA_WINDOW = {**_GQA, "sliding_window": 8}

# model_type → what its tiny config needs beyond TINY_SIZES (keys of that config class).
GENERIC_EXAMPLES: dict[str, dict[str, Any]] = {
    "gpt_neox": {"rotary_pct": 0.25}, "gpt2": {"n_inner": 128}, "gpt_bigcode": {"multi_query": True, "n_inner": 128},
    "gptj": {"rotary_dim": 8, "n_inner": 128}, "codegen": {"rotary_dim": 8, "n_inner": 128},
    "opt": {"ffn_dim": 128, "word_embed_proj_dim": 64},
    "phi": {"partial_rotary_factor": 0.5}, "persimmon": {"partial_rotary_factor": 0.5},
    "starcoder2": _GQA_WINDOW, "cohere2": _GQA_WINDOW, "olmo3": _GQA_WINDOW, "exaone4": _GQA_WINDOW,
    "cohere": _GQA, "olmo": _GQA, "arcee": _GQA, "apertus": _GQA, "smollm3": _GQA,
    "nemotron": _GQA_HEAD, "glm": _GQA_HEAD, "glm4": _GQA_HEAD, "helium": _GQA_HEAD, "seed_oss": _GQA_HEAD,
    "ernie4_5": _GQA_HEAD, "hunyuan_v1_dense": _GQA_HEAD, "gemma": _GQA_HEAD,
    "granitemoe": {**_GQA, "num_local_experts": 4, "num_experts_per_tok": 2},
}


def tiny_config(model_type: str) -> dict[str, Any]:
    """A config.json dict of ``model_type`` at tiny sizes, from its transformers config class."""
    from transformers import AutoConfig  # kept out of import time: the list above is read without torch

    config = AutoConfig.for_model(model_type, **TINY_SIZES, **GENERIC_EXAMPLES[model_type]).to_dict()
    config["architectures"] = config.get("architectures") or None
    return config
