"""The memory plan of the run a command would make: the dtype and FP8 path the engine would choose on the
target device, and the bytes the checkpoint stores.

``dockyard inspect`` and the onboarding's fit and capacity gates plan through :func:`plan_for_run`, so they
give the same figures for the same model and target. The target is a GPU when the machine has one or when
a device size was given (``--device-memory`` describes a GPU of that size); a GPU that is not on this machine
is assumed to have FP8 tensor cores (the evidence says so), since the FP8 path cannot be probed there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dockyard.memory import MemoryPlan, kept_gguf_weights, kept_int4_weights, plan_memory, storage_of
from dockyard.model_loader import resolve_dtype
from dockyard.ops.fp8_kv import resolve_kv_cache_dtype
from dockyard.weights.fp8 import choose_fp8_path
from dockyard.weights.mxfp4 import source_mxfp4_path

# The engine's defaults (dockyard.engine.llm.LLM): the plan is for the engine as it would start.
MAX_NUM_BATCHED_TOKENS = 2048
MAX_NUM_SEQS = 64


@dataclass(frozen=True)
class RunTarget:
    """Where the planned run happens: ``device_type`` cpu | cuda, and whether that device is this machine's."""

    device_type: str
    present: bool  # False: a GPU described by its size only (``--device-memory`` on a machine without one)

    @classmethod
    def for_machine(cls, machine_device: str, device_memory_given: bool) -> RunTarget:
        """A given device size means a GPU of that size; else the machine's own device."""
        if machine_device == "cuda":
            return cls("cuda", True)
        return cls("cuda", False) if device_memory_given else cls("cpu", True)


def run_dtype(dtype: str | torch.dtype, checkpoint_dtype: str, target: RunTarget) -> torch.dtype:
    """The dtype the engine would run in on ``target`` (``auto``: float32 on CPU, the checkpoint's on a GPU)."""
    return resolve_dtype(dtype, checkpoint_dtype, torch.device(target.device_type))


def fp8_path(source: Any, target: RunTarget, tp_size: int = 1) -> tuple[bool, str]:
    """(native, why) for an FP8 checkpoint on ``target``: the engine's own choice where the device is here."""
    if source.fp8 is None:
        return False, "not an FP8 checkpoint"
    return choose_fp8_path(source.fp8, torch.device(target.device_type), tp_size, assume_fp8_gpu=not target.present)


def kept_as_stored(source: Any, device: torch.device, tp_size: int = 1, assume_gpu: bool = False
                   ) -> tuple[frozenset[str], dict[str, tuple[int, int]], bool | None]:
    """What a run on ``device`` holds as the checkpoint stores it, the loader's own choice: (GGUF weights kept as
    blocks, int4 weights kept as int4, whether MXFP4 experts stay MXFP4 — None: not an MXFP4 checkpoint)."""
    mxfp4 = source_mxfp4_path(source, device, tp_size, assume_gpu=assume_gpu)
    return (kept_gguf_weights(source, device, tp_size, assume_gpu),
            kept_int4_weights(source, device, tp_size, assume_gpu), None if mxfp4 is None else mxfp4[0])


def plan_for_run(source: Any, target: RunTarget, dtype: str | torch.dtype = "auto", tp_size: int = 1,
                 max_num_batched_tokens: int = MAX_NUM_BATCHED_TOKENS,
                 max_num_seqs: int = MAX_NUM_SEQS, kv_cache_dtype: str = "auto") -> tuple[MemoryPlan, str]:
    """(the plan, why the FP8 path was chosen) for ``source`` (a ``model_source.ModelSource``) on ``target``;
    ``kv_cache_dtype`` as ``--kv-cache-dtype`` (fp8: 1 byte per cached element)."""
    spec = source.spec
    native, why = fp8_path(source, target, tp_size)
    run = run_dtype(dtype, spec.torch_dtype, target)
    blocks, int4, mxfp4 = kept_as_stored(source, torch.device(target.device_type), tp_size, not target.present)
    storage = storage_of(source, native, blocks, int4, mxfp4)
    plan = plan_memory(spec, run, kv_cache_dtype=resolve_kv_cache_dtype(kv_cache_dtype, run),
                       max_num_batched_tokens=max_num_batched_tokens,
                       max_num_seqs=max_num_seqs, device_type=target.device_type, storage=storage)
    return plan, why
