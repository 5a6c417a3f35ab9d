"""A remote-code config class for tests/models/test_generic.py: Llama's, under a model_type transformers lacks."""

from transformers import LlamaConfig


class TinyRemoteConfig(LlamaConfig):
    model_type = "tiny_remote"
