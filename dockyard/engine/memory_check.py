"""Refuse what cannot fit before loading it.

``LLM`` runs :func:`check_memory_fits` before it builds anything: the memory plan
(``dockyard.memory``) against the memory the device has free now. What is counted is what the
engine will allocate at start-up: on a CPU the weights, the activation peak and the KV pool,
which is allocated whole from its byte budget (for N tensor-parallel processes on one host: N
pools and N - 1 more interpreters); on a GPU, per rank, the weight shard, the activation peak and
one KV block, the least the engine starts with (the KV pool takes what is left). A speculative
draft model (``speculative_config`` method draft_model) is counted too: its weights and its own KV cache,
which has as many blocks as the target's (on a CPU the two caches share the KV budget). The refusal
gives the plan's numbers and what would fit, naming the draft model when there is one;
``skip_memory_check`` (``--skip-memory-check``) loads anyway.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dockyard.errors import InsufficientMemoryError
from dockyard.memory import MemoryPlan, WeightStorage, plan_memory
from dockyard.ops.fp8_kv import resolve_kv_cache_dtype
from dockyard.spec import ModelSpec

if TYPE_CHECKING:
    from dockyard.engine.llm_engine import EngineConfig

logger = logging.getLogger(__name__)

GiB = 1024**3


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (empty where it does not exist)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    out[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    except OSError:
        pass
    return out


def _cgroup_room() -> tuple[int, int] | None:
    """(limit, room left) of this process's cgroup v2 memory limit; None where there is no limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        current = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
    except (OSError, ValueError):
        return None
    if not limit.isdigit():  # "max": no limit
        return None
    return int(limit), max(0, int(limit) - current)


def ram_bytes() -> tuple[int, int]:
    """(total, available) RAM in bytes: MemTotal and MemAvailable, within the cgroup's limit if it has one."""
    info = _meminfo()
    total = info.get("MemTotal")
    if total is None:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = 8 * GiB
    available = info.get("MemAvailable", total // 2)
    room = _cgroup_room()
    if room is not None:
        total, available = min(total, room[0]), min(available, room[1])
    return total, available


@dataclass(frozen=True)
class StartupNeed:
    """Bytes the engine allocates at start-up, by part, against the bytes the device has free."""

    weights: int
    activations: int
    kv_cache: int
    other_processes: int  # interpreters of spawned tensor-parallel workers (CPU)
    available: int
    where: str  # the device and where ``available`` comes from
    draft_weights: int = 0  # a speculative draft model's weights
    draft_kv_cache: int = 0  # and its KV cache

    @property
    def total(self) -> int:
        return (self.weights + self.activations + self.kv_cache + self.other_processes + self.draft_weights
                + self.draft_kv_cache)

    @property
    def fits(self) -> bool:
        return self.total <= self.available


def kv_blocks_in_budget(budget: int, block_bytes: int, draft_block_bytes: int = 0) -> int:
    """KV blocks a byte budget holds when each block of the target's cache comes with one of the draft's."""
    return budget // (block_bytes + draft_block_bytes)


def startup_need(plan: MemoryPlan, device: torch.device, config: EngineConfig, tensor_parallel_size: int = 1,
                 draft: MemoryPlan | None = None) -> StartupNeed:
    """What starting the engine with ``plan`` on ``device`` needs (the KV pool: ``config.num_kv_blocks``
    when given; else on a CPU its byte budget, on a GPU one block), and a draft model's (``draft``: its plan)."""
    tp = tensor_parallel_size
    block_bytes = plan.kv_bytes_per_token * config.block_size
    draft_block_bytes = draft.kv_bytes_per_token * config.block_size if draft is not None else 0
    draft_weights = draft.weight_bytes if draft is not None else 0
    activations = max(plan.activation_peak_bytes, draft.activation_peak_bytes if draft is not None else 0)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = int(total * config.gpu_memory_utilization) - (total - free)
        blocks = config.num_kv_blocks or 1
        return StartupNeed(weights=-(-plan.weight_bytes // tp), activations=activations,
                           kv_cache=blocks * block_bytes, other_processes=0, available=budget,
                           where=f"{device} ({config.gpu_memory_utilization:g} of {total / GiB:.1f} GiB, less "
                                 f"{(total - free) / GiB:.1f} GiB in use)",
                           draft_weights=draft_weights, draft_kv_cache=blocks * draft_block_bytes)
    _, available = ram_bytes()
    blocks = config.num_kv_blocks or kv_blocks_in_budget(config.kv_cache_memory_bytes, block_bytes, draft_block_bytes)
    # The pool is allocated whole from its budget; with a draft model the budget holds both caches.
    kv = blocks * block_bytes if config.num_kv_blocks or draft is not None else config.kv_cache_memory_bytes
    # This process's interpreter and torch are already resident (outside MemAvailable); each spawned
    # worker adds its own.
    return StartupNeed(weights=plan.weight_bytes, activations=tp * activations, kv_cache=tp * kv,
                       other_processes=(tp - 1) * plan.overhead_bytes, available=available,
                       where="RAM (MemAvailable)", draft_weights=draft_weights,
                       draft_kv_cache=blocks * draft_block_bytes)


def check_memory_fits(spec: ModelSpec, dtype: torch.dtype, device: torch.device, config: EngineConfig,
                      tensor_parallel_size: int = 1, storage: WeightStorage | None = None,
                      draft: ModelSpec | None = None) -> MemoryPlan:
    """The memory plan, or :class:`InsufficientMemoryError` with its numbers and what would fit. ``storage``: what
    the checkpoint stores, where the run holds part of it as stored (GGUF blocks, int4 or MXFP4 kept quantized);
    None: every parameter at ``dtype``. ``draft``: a speculative draft model's spec (it runs at ``dtype``, its KV
    cache in its own dtype)."""
    def need_at(d: torch.dtype, batched: int) -> tuple[MemoryPlan, StartupNeed]:
        plan = plan_memory(spec, d, kv_cache_dtype=resolve_kv_cache_dtype(config.kv_cache_dtype, d),
                           max_num_batched_tokens=batched, max_num_seqs=config.max_num_seqs, device_type=device.type,
                           storage=storage)
        draft_plan = None if draft is None else plan_memory(
            draft, d, max_num_batched_tokens=batched, max_num_seqs=config.max_num_seqs, device_type=device.type)
        return plan, startup_need(plan, device, config, tensor_parallel_size, draft_plan)

    batched = config.max_num_batched_tokens
    plan, need = need_at(dtype, batched)
    logger.info("memory plan: %.2f GiB needed at start-up (weights %.2f, activations %.2f, KV cache %.2f, workers "
                "%.2f, draft model %.2f) of %.2f GiB free in %s", need.total / GiB, need.weights / GiB,
                need.activations / GiB, need.kv_cache / GiB, need.other_processes / GiB,
                (need.draft_weights + need.draft_kv_cache) / GiB, need.available / GiB, need.where)
    if need.fits:
        return plan
    ways = []
    if dtype.itemsize > 2:
        half = need_at(torch.bfloat16, batched)[1]
        ways.append(f"--dtype bfloat16 needs {half.total / GiB:.2f} GiB" + (" (fits)" if half.fits else ""))
    if batched > 256 and need_at(dtype, 256)[1].fits:
        ways.append("--max-num-batched-tokens 256 fits (a smaller activation peak)")
    if device.type == "cpu" and not config.num_kv_blocks:
        ways.append("a smaller KV pool (LLM(kv_cache_memory_bytes=...))")
    if draft is not None:
        ways.append(f"a smaller draft model than {draft.name}, or speculative_config method 'ngram' (no model)")
    ways.append(f"a device with {need.total / GiB:.1f} GiB free")
    ways.append("--skip-memory-check (skip_memory_check=True) to load anyway")
    raise InsufficientMemoryError(
        f"{spec.name}" + (f" with its draft model {draft.name}" if draft is not None else "") + " does not fit: "
        f"{need.total / GiB:.2f} GiB needed at start-up at {plan.dtype} (weights "
        f"{need.weights / GiB:.2f} GiB for {plan.num_parameters:,} parameters, activations "
        f"{need.activations / GiB:.2f} GiB, KV cache {need.kv_cache / GiB:.2f} GiB"
        + (f", worker processes {need.other_processes / GiB:.2f} GiB" if need.other_processes else "")
        + (f", draft model {draft.name} {need.draft_weights / GiB:.2f} GiB of weights and "
           f"{need.draft_kv_cache / GiB:.2f} GiB of KV cache" if draft is not None else "")
        + f"), {need.available / GiB:.2f} GiB free in {need.where}; what would help: " + "; ".join(ways))
