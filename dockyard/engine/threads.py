"""How many threads torch's CPU ops use.

torch starts one intra-op thread per core of the machine, whether or not this process may run
on all of them: under ``taskset``, a container's CPU quota or beside other busy processes, the
extra threads wait on each other at every parallel op and a CPU decode step becomes many times
slower. The default here is the cores this process may actually use: the CPUs of its affinity
mask (``os.sched_getaffinity``), counted as physical cores where the kernel tells which logical
CPUs share one (hyper-threads add little to matmuls), capped by a cgroup v2 CPU quota.
``OMP_NUM_THREADS``, when set, is left in force; ``num_threads`` (``--num-threads``) overrides all.
The choice is made once per process (the first ``LLM``, or a command's ``--num-threads``); later
calls without a number keep it.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

from dockyard.errors import DockyardError

logger = logging.getLogger(__name__)

_CPU_SYSFS = Path("/sys/devices/system/cpu")
_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
_chosen: int | None = None  # threads set by configure_threads in this process


def usable_cpus() -> set[int]:
    """The logical CPUs this process may run on."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return set(range(os.cpu_count() or 1))


def physical_cores(cpus: set[int]) -> int:
    """Distinct physical cores among ``cpus`` (``len(cpus)`` where the topology is not readable)."""
    cores = set()
    for cpu in cpus:
        topology = _CPU_SYSFS / f"cpu{cpu}" / "topology"
        try:
            cores.add((topology.joinpath("physical_package_id").read_text().strip(),
                       topology.joinpath("core_id").read_text().strip()))
        except OSError:
            return len(cpus)
    return len(cores)


def cgroup_cpu_limit() -> int | None:
    """CPUs a cgroup v2 quota allows (rounded up), or None without a quota."""
    try:
        quota, period = _CGROUP_CPU_MAX.read_text().split()
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def default_num_threads() -> tuple[int, str]:
    """(threads, why): the physical cores this process may use, within any cgroup CPU quota."""
    cpus = usable_cpus()
    threads = physical_cores(cpus)
    why = f"physical cores among the {len(cpus)} CPUs this process may use"
    limit = cgroup_cpu_limit()
    if limit is not None and limit < threads:
        threads, why = limit, "the cgroup CPU quota"
    return max(1, threads), why


def configure_threads(num_threads: int | None = None) -> int:
    """Set torch's intra-op threads (``None``: :func:`default_num_threads`, unless ``OMP_NUM_THREADS``
    is set) and log the choice; returns the number in force. Without a number, an earlier choice stays."""
    global _chosen
    if num_threads is None and _chosen is not None:
        return _chosen
    if num_threads is not None:
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
            raise DockyardError(f"num_threads={num_threads!r} must be a positive integer (--num-threads N)")
        threads, why = num_threads, "asked for (num_threads / --num-threads)"
    elif os.environ.get("OMP_NUM_THREADS"):
        threads, why = torch.get_num_threads(), f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    else:
        threads, why = default_num_threads()
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    logger.info("torch CPU threads: %d (%s; --num-threads N to change)", threads, why)
    _chosen = threads
    return threads
