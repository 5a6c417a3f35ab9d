"""The flags of ``dockyard bench latency`` and ``bench throughput`` (the engine's ``EngineArgs`` plus the workload's),
and the step both share after parsing them: run, print, draw ``--plot`` (:func:`run_and_report`).

Kept free of torch so the CLI parser builds before any command runs: a workload default that differs between
CPU and GPU is left None here and filled by :func:`fill_defaults` once the device is known.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dockyard.engine_args import EngineArgs
from dockyard.errors import DockyardError

PLOT_SUFFIXES = (".png", ".svg", ".pdf")

# (CPU default, GPU default): the CPU's are scaled down to finish in seconds.
LATENCY_DEFAULTS: dict[str, tuple[Any, Any]] = {
    "batch_sizes": ([1, 4], [1, 8, 32, 128]),
    "output_len": (16, 256),
    "input_lens": ([128, 512], [128, 1024, 8192, 32768]),
}
THROUGHPUT_DEFAULTS: dict[str, tuple[Any, Any]] = {
    "num_prompts": (32, 256),
    "input_len": ((32, 256), (100, 1024)),
    "output_len": ((16, 128), (100, 1024)),
    "max_num_seqs": (64, 256),
    "max_num_batched_tokens": (2048, 8192),
}


def _report_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--plot", default=None, metavar="PATH", help=f"draw {what} into PATH (.png, .svg or .pdf)")


def add_latency_args(p: argparse.ArgumentParser) -> None:
    """``bench latency``'s flags (``--max-num-seqs`` is the largest batch size)."""
    EngineArgs.add_cli_args(p, skip=("max_num_seqs",))
    p.set_defaults(max_num_batched_tokens=8192)
    sweep = p.add_argument_group("the sweep", "defaults scaled down on CPU")
    sweep.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="decode batch sizes "
                       f"(default {LATENCY_DEFAULTS['batch_sizes'][1]}; CPU {LATENCY_DEFAULTS['batch_sizes'][0]})")
    sweep.add_argument("--decode-input-len", type=int, default=128, help="prompt tokens of the decode runs")
    sweep.add_argument("--output-len", type=int, default=None, help="decode steps timed per batch size "
                       f"(default {LATENCY_DEFAULTS['output_len'][1]}; CPU {LATENCY_DEFAULTS['output_len'][0]})")
    sweep.add_argument("--input-lens", type=int, nargs="+", default=None, help="prompt lengths of the TTFT runs "
                       f"(default {LATENCY_DEFAULTS['input_lens'][1]}; CPU {LATENCY_DEFAULTS['input_lens'][0]})")
    sweep.add_argument("--check-eager", action="store_true", help="compare batch-1 greedy tokens with eager mode")
    sweep.add_argument("--hf-baseline", action="store_true", help="time HF transformers generate at batch 1")
    _report_args(p, "ms per decode step vs batch size and TTFT vs prompt length, with their rooflines,")


def add_throughput_args(p: argparse.ArgumentParser) -> None:
    """``bench throughput``'s flags."""
    EngineArgs.add_cli_args(p)
    p.set_defaults(max_num_seqs=None, max_num_batched_tokens=None)
    work = p.add_argument_group("the workload", "defaults scaled down on CPU")
    work.add_argument("--num-prompts", type=int, default=None, help="requests "
                      f"(default {THROUGHPUT_DEFAULTS['num_prompts'][1]}; CPU {THROUGHPUT_DEFAULTS['num_prompts'][0]})")
    work.add_argument("--input-len", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                      help="prompt tokens drawn uniformly in [MIN, MAX]")
    work.add_argument("--output-len", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                      help="generated tokens drawn uniformly in [MIN, MAX]")
    work.add_argument("--hf-baseline", action="store_true", help="time HF transformers generate on the same config")
    work.add_argument("--hf-batch-sizes", type=int, nargs="+", default=[64, 128, 256])
    work.add_argument("--profile", action="store_true", help="time the engine's step phases (syncs the device)")
    _report_args(p, "output tokens/s against the roofline")


def fill_defaults(args: argparse.Namespace, defaults: dict[str, tuple[Any, Any]], gpu: bool) -> None:
    """Set each flag left at None to its CPU or GPU default."""
    for name, (cpu, on_gpu) in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, on_gpu if gpu else cpu)


def run_and_report(args: argparse.Namespace, run: Callable[[argparse.Namespace], dict],
                   show: Callable[[dict, bool], None], plot: Callable[[dict, str], None]) -> dict:
    """``run(args)``, ``show`` its result (JSON with ``--json``), ``plot`` it into ``--plot``; the result."""
    if args.plot:
        check_plot_path(args.plot)
    result = run(args)
    show(result, args.json)
    if args.plot:
        plot(result, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    return result


def check_plot_path(path: str | Path) -> None:
    """Refuse a ``--plot`` path that cannot take the figure, before minutes of measuring (the file is created)."""
    path = Path(path)
    if importlib.util.find_spec("matplotlib") is None:
        raise DockyardError(f"--plot {path}: matplotlib is not installed; pip install matplotlib (or dockyard[plot])")
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise DockyardError(f"--plot {path}: give a file name ending in {', '.join(PLOT_SUFFIXES)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    except OSError as exc:
        raise DockyardError(f"--plot {path}: cannot write it ({exc.strerror}); give a writable path") from None
