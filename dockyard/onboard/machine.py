"""What the machine running the onboarding offers: device, memory, software versions.

The fit and capacity gates plan against ``device_bytes`` (an explicit ``--device-memory``, else the
GPU's total memory, else the machine's RAM); the dummy and real gates size what they load by the
memory available when they start (:func:`available_now`: free GPU memory, or the RAM the kernel reports
as available, which counts what every other process uses, capped by this container's cgroup limit).
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from typing import Any

import torch

from dockyard.engine.memory_check import ram_bytes
from dockyard.errors import DockyardError

GiB = 1024**3


@dataclass(frozen=True)
class Machine:
    """The target device of an onboarding run and the memory it has."""

    device: str  # "cpu" | "cuda"
    device_name: str
    device_bytes: int  # memory the plan is checked against
    device_bytes_source: str  # where device_bytes came from
    available_bytes: int  # memory free right now for what the gates load
    num_gpus: int
    cpu_count: int
    torch_version: str
    transformers_version: str | None
    python_version: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def hardware_line(self) -> str:
        """One line naming the hardware, for the report and accuracy.yaml."""
        return f"{self.device_name} ({self.device_bytes / GiB:.1f} GiB)"


def available_now(device: str) -> int:
    """Memory available on ``device`` right now: free GPU memory, or available RAM (see :func:`ram_bytes`)."""
    if device == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(0)[0])
    return ram_bytes()[1]


def detect_machine(device: str = "auto", device_memory_gib: float | None = None) -> Machine:
    """Describe the target device; ``device`` is auto | cpu | cuda."""
    try:
        import transformers

        tf_version: str | None = transformers.__version__
    except ImportError:
        tf_version = None
    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise DockyardError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if device == "auto":
        device = "cuda" if has_cuda else "cpu"
    num_gpus = torch.cuda.device_count() if has_cuda else 0
    if device == "cuda" and has_cuda:
        free, total = torch.cuda.mem_get_info(0)
        name = torch.cuda.get_device_name(0)
        source = "GPU 0 total memory"
    else:
        total, free = ram_bytes()
        name = f"CPU {platform.processor() or platform.machine()} × {os.cpu_count()} cores"
        source = "machine RAM (MemTotal)"
    if device_memory_gib is not None:
        total = int(device_memory_gib * GiB)
        free = min(free, total)
        source = "--device-memory"
    return Machine(
        device=device, device_name=name, device_bytes=int(total), device_bytes_source=source,
        available_bytes=int(free), num_gpus=num_gpus, cpu_count=os.cpu_count() or 1,
        torch_version=torch.__version__, transformers_version=tf_version,
        python_version=platform.python_version(),
    )
