"""Command-line flags that several subcommands share, each defined once.

Kept free of heavy imports: parsers are built before any command runs.
"""

from __future__ import annotations

import argparse


def add_num_threads_arg(p: argparse.ArgumentParser) -> None:
    """``--num-threads N``: torch's CPU threads (``dockyard.engine.threads``)."""
    p.add_argument("--num-threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: the physical cores this process may use, or $OMP_NUM_THREADS)")


def add_model_impl_args(p: argparse.ArgumentParser) -> None:
    """``--model-impl auto|dockyard|transformers`` and ``--trust-remote-code`` (vLLM's names): which
    implementation runs the model (``dockyard.model_impl``)."""
    p.add_argument("--model-impl", choices=("auto", "dockyard", "transformers"), default="auto",
                   help="auto: the native dockyard family when one covers the config, else transformers' own classes "
                        "(the generic path); dockyard / transformers: insist on one")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the modeling code a config's auto_map names from the model directory (never downloaded)")


def add_skip_memory_check_arg(p: argparse.ArgumentParser) -> None:
    """``--skip-memory-check``: load even when the memory plan says the model does not fit."""
    p.add_argument("--skip-memory-check", action="store_true",
                   help="load even when the memory plan says the model does not fit the device's free memory")
