"""Checkpoint readers (safetensors, GGUF, dummy) and the strict weight loader."""
