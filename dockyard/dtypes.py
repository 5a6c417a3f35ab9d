"""The dtype names dockyard accepts and prints, in one place: the CLIs' choices, the engine's
``dtype=`` argument, the spellings a config.json may use, and how a torch dtype is written in
reports and logs.

Nothing here imports torch: the CLI builds its parsers from these names before torch is loaded.
"""

from __future__ import annotations

from typing import Any

RUN_DTYPES = ("float32", "bfloat16", "float16")  # what a run may compute in (torch attribute names)
DTYPE_CHOICES = ("auto", *RUN_DTYPES)  # `auto`: float32 on the CPU, the checkpoint's dtype on a GPU
# config.json's torch_dtype / dtype spellings → the run dtype they mean.
DTYPE_ALIASES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}


def dtype_name(dtype: Any) -> str:
    """A torch dtype (or its string) as dockyard writes it: ``bfloat16``, not ``torch.bfloat16``."""
    return str(dtype).removeprefix("torch.")
