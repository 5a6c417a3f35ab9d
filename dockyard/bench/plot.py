"""``--plot``: the benchmarks' results drawn against their roofline (matplotlib, no display needed).

- latency: milliseconds per decode step against batch size, measured, and the roofline's floor (the
  bytes a step reads over the copy bandwidth measured in the same run); a second panel has time to
  first token against prompt length with the floor of its FLOPs over the measured matmul rate;
- throughput: output tokens/s of the run against the roofline's (generated tokens over the larger
  of the compute and memory floors);
- serve: median and p99 TTFT, TPOT and end-to-end latency against the request rate of each run (an
  endpoint's roofline is not known to the client, so none is drawn).

Each figure names the model, device and dtype, so a committed plot says what it measured. matplotlib is an
optional dependency (the ``plot`` extra): it is imported when a figure is drawn, and ``--plot`` is refused up
front without it (``bench.args.check_plot_path``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dockyard.errors import DockyardError


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (no display on servers and CI)."""
    import matplotlib  # an optional dependency (the plot extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
    except (OSError, ValueError) as exc:
        raise DockyardError(f"--plot {path}: cannot write it ({exc}); give a writable path ending in .png, .svg "
                            "or .pdf") from None
    finally:
        _pyplot().close(fig)


def _title(result: dict[str, Any]) -> str:
    return f"{result.get('model')} · {result.get('device')} · {result.get('dtype')}"


def plot_latency(result: dict[str, Any], path: str | Path) -> None:
    """Decode ms/step vs batch size and TTFT vs prompt length, each with its roofline floor."""
    decode, ttft = result.get("decode") or [], result.get("ttft") or []
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    batches = [r["batch"] for r in decode]
    ax.plot(batches, [r["ms_per_step"] for r in decode], "o-", label="measured")
    ax.plot(batches, [1e3 * r["batch"] / r["roofline_tokens_per_s"] for r in decode], "--",
            label=f"roofline (bytes / {result.get('copy_GB_per_s')} GB/s)")
    for r in decode:
        ax.annotate(f"{r['fraction_of_roofline']:.2f}", (r["batch"], r["ms_per_step"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (sequences)")
    ax.set_ylabel("ms per decode step")
    ax.set_title("decode (labels: fraction of roofline)")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax = axes[1]
    lens = [r["input_len"] for r in ttft]
    ax.plot(lens, [1e3 * r["seconds"] for r in ttft], "o-", label="measured")
    ax.plot(lens, [1e3 * r["seconds"] * r["mfu"] for r in ttft], "--",  # FLOPs over the unrounded matmul rate
            label=f"roofline (FLOPs / {result.get('matmul_TFLOP_per_s')} TFLOP/s)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("time to first token (ms)")
    ax.set_title("prefill")
    ax.legend()
    fig.suptitle(_title(result))
    _save(fig, path)


def plot_throughput(result: dict[str, Any], path: str | Path) -> None:
    """Output tokens/s measured, HF's best when measured, and the roofline's."""
    roof = result["roofline"]
    bars = [("dockyard", result["output_tokens_per_s"])]
    if "hf" in result:
        bars.append(("HF generate (best batch)", result["hf"]["best_output_tokens_per_s"]))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.bar([b[0] for b in bars], [b[1] for b in bars])
    ax.axhline(roof["roofline_output_tokens_per_s"], linestyle="--", color="k",
               label=f"roofline: {roof['roofline_output_tokens_per_s']:,.0f} tok/s "
                     f"(fraction {roof['fraction_of_roofline']:.2f})")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"{result['num_prompts']} requests, input {result['input_len']}, output {result['output_len']}")
    ax.legend(loc="lower right")
    fig.suptitle(_title(result))
    _save(fig, path)


def plot_serve(summaries: list[dict[str, Any]], path: str | Path) -> None:
    """Median and p99 latencies of each ``bench serve`` run against its request rate (inf drawn rightmost)."""
    finite = [s["request_rate"] for s in summaries if math.isfinite(s["request_rate"])]
    inf_at = 2 * max(finite) if finite else 1.0
    xs = [s["request_rate"] if math.isfinite(s["request_rate"]) else inf_at for s in summaries]
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, key, title in zip(axes, ("ttft", "tpot", "e2el"), ("TTFT", "TPOT", "end-to-end")):
        for stat in ("median", "p99"):
            ax.plot(xs, [s[f"{stat}_{key}_ms"] for s in summaries], "o-", label=stat)
        ax.set_xlabel("request rate (req/s)" + ("; rightmost: all at once" if len(finite) < len(xs) else ""))
        ax.set_ylabel(f"{title} (ms)")
        ax.set_ylim(bottom=0)
        ax.legend()
    fig.suptitle(f"{summaries[0].get('model_id')} at {summaries[0].get('base_url')}: no roofline (the endpoint's "
                 "device is not measured by the client)")
    _save(fig, path)
