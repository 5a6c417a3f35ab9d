"""Command-line flags that several subcommands share, each defined once.

Kept free of heavy imports: parsers are built before any command runs.
"""

from __future__ import annotations

import argparse


def add_num_threads_arg(p: argparse.ArgumentParser) -> None:
    """``--num-threads N``: torch's CPU threads (``dockyard.engine.threads``)."""
    p.add_argument("--num-threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: the physical cores this process may use, or $OMP_NUM_THREADS)")


def add_skip_memory_check_arg(p: argparse.ArgumentParser) -> None:
    """``--skip-memory-check``: load even when the memory plan says the model does not fit."""
    p.add_argument("--skip-memory-check", action="store_true",
                   help="load even when the memory plan says the model does not fit the device's free memory")
