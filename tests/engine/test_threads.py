"""torch's CPU threads: the default follows the CPUs this process may use; --num-threads overrides it."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

from dockyard.engine.threads import configure_threads
from dockyard.errors import DockyardError

_PRINT_DEFAULT = "from dockyard.engine.threads import default_num_threads; print(default_num_threads()[0])"


@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset (util-linux)")
def test_default_follows_the_affinity_mask():
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", _PRINT_DEFAULT], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "1"  # one CPU allowed: one thread, whatever the machine has


def test_num_threads_is_set_logged_and_validated(caplog):
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="dockyard.engine.threads"):
            assert configure_threads(1) == 1
        assert torch.get_num_threads() == 1
        assert "torch CPU threads: 1 (asked for" in caplog.text
        assert configure_threads(None) == 1  # a later LLM without a number keeps the choice
        for bad in (0, -2, 1.5, True):
            with pytest.raises(DockyardError, match="num_threads"):
                configure_threads(bad)
    finally:
        configure_threads(before)
