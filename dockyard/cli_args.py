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


def add_hub_args(p: argparse.ArgumentParser) -> None:
    """vLLM's ``--revision`` and ``--download-dir``: which snapshot of a repo id, in which HF cache (dockyard.hub)."""
    p.add_argument("--revision", default=None,
                   help="of a Hugging Face repo id: the branch, tag or commit to use (default: main)")
    p.add_argument("--download-dir", default=None, metavar="DIR",
                   help="the Hugging Face cache to find (or download) repo ids in (default: $HF_HUB_CACHE, else "
                        "$HF_HOME/hub)")


def add_model_source_args(p: argparse.ArgumentParser) -> None:
    """:func:`add_hub_args` plus vLLM's ``--tokenizer`` and ``--generation-config`` (``dockyard.generation_config``)."""
    add_hub_args(p)
    p.add_argument("--tokenizer", default=None,
                   help="take the tokenizer from this path or repo id instead of the model's")
    p.add_argument("--generation-config", default="auto", metavar="auto|vllm|PATH",
                   help="request defaults and end-of-sequence ids: auto = the model's generation_config.json; "
                        "vllm = vLLM's defaults (the file's end-of-sequence ids still apply); PATH = a folder "
                        "holding a generation_config.json")


def model_source_kwargs(args: argparse.Namespace) -> dict[str, str | None]:
    """The ``LLM`` keyword arguments of :func:`add_model_source_args`'s flags."""
    return {"revision": args.revision, "download_dir": args.download_dir, "tokenizer": args.tokenizer,
            "generation_config": args.generation_config}
