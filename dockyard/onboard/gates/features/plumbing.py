"""Process plumbing of the features gate's trials: where worker processes print, how many threads rank 0
keeps while they compute, and TorchDynamo switched off for the compile trial's last fallback rung."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import torch
import torch._dynamo


@contextlib.contextmanager
def dynamo_disabled() -> Iterator[None]:
    """TORCHDYNAMO_DISABLE=1 for the duration (the env var and the live config switch it controls)."""
    previous_env = os.environ.get("TORCHDYNAMO_DISABLE")
    previous_cfg = torch._dynamo.config.disable
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    torch._dynamo.config.disable = True
    try:
        yield
    finally:
        torch._dynamo.config.disable = previous_cfg
        if previous_env is None:
            os.environ.pop("TORCHDYNAMO_DISABLE", None)
        else:
            os.environ["TORCHDYNAMO_DISABLE"] = previous_env



@contextlib.contextmanager
def worker_output_to_log() -> Iterator[None]:
    """Point file descriptors 1 and 2 at the gate's log while worker processes start, so that what they
    print lands in the log (the runner redirects only Python's sys.stdout/sys.stderr to it, and spawned
    processes inherit the descriptors, not those objects)."""
    try:
        target = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # not backed by a file: nothing to point at
        target = None
    if target is None or target in (1, 2):
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    try:
        os.dup2(target, 1)
        os.dup2(target, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


@contextlib.contextmanager
def rank0_threads(ranks: int) -> Iterator[None]:
    """This process's share of the cores while ``ranks`` processes compute (the engine gives each worker
    ``threads // ranks``; all of them at once on the same cores make every small matmul crawl)."""
    saved = torch.get_num_threads()
    if ranks > 1:
        torch.set_num_threads(max(1, saved // ranks))
    try:
        yield
    finally:
        torch.set_num_threads(saved)

