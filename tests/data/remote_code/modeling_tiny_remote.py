"""A remote-code model class for tests/models/test_generic.py: Llama's, loaded from the model directory."""

from transformers import LlamaForCausalLM

from .configuration_tiny_remote import TinyRemoteConfig


class TinyRemoteForCausalLM(LlamaForCausalLM):
    config_class = TinyRemoteConfig
