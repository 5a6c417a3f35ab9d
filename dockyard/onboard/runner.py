"""Run the gates in order, one log file each, and write the artifacts.

The runner stops at the first hard failure (the gates after it are recorded as skipped, with the
reason), keeps the terminal to one progress line per gate (everything libraries print goes to the
gate's log), and turns any exception a gate raises into that gate's failure: a user never sees a
traceback from ``dockyard onboard``, the log file keeps it.

report.json and report.md are rewritten (atomically) as each gate starts and ends, so a run that is
killed, even by SIGKILL, leaves the gates finished so far and names the gate it was in ("running"),
with the verdict INCOMPLETE. The other artifacts are written once the run has finished.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import textwrap
import time
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from dockyard.errors import DockyardError
from dockyard.model_path import check_model_path
from dockyard.onboard.context import (
    GateContext,
    GateResult,
    OnboardOptions,
    Outcome,
    jsonable,
    read_raw_model,
)
from dockyard.onboard.gates import GATES
from dockyard.onboard.machine import detect_machine
from dockyard.onboard.report import build_report, write_artifacts, write_progress

logger = logging.getLogger(__name__)


@dataclass
class OnboardRun:
    """The outcome of ``dockyard onboard``: every gate's result, the report, where it was written."""

    results: list[GateResult]
    report: dict[str, Any]
    out_dir: Path
    exit_code: int

    def gate(self, name: str) -> GateResult:
        return next(r for r in self.results if r.name == name)


def default_out_dir(model: str | None, revision: str | None = None, download_dir: str | None = None) -> Path:
    """reports/<model-name>/ under the current directory."""
    try:
        name = read_raw_model(model, revision, download_dir).name
    except Exception:  # noqa: BLE001 - inspect reports the problem; the folder only needs a name
        name = Path(str(model)).name if model else "model"
    return Path("reports") / (name or "model")


def _stream_handlers() -> Iterator[logging.StreamHandler]:
    loggers = [logging.getLogger()] + [lg for lg in list(logging.Logger.manager.loggerDict.values())
                                       if isinstance(lg, logging.Logger)]
    for lg in loggers:
        for h in lg.handlers:
            if type(h) is logging.StreamHandler or type(h).__name__ == "_ColorStreamHandler":
                yield h


@contextlib.contextmanager
def _gate_logging(log_file: TextIO) -> Iterator[None]:
    """Send logging, warnings, stdout and stderr of a gate to its log file, and nothing to the terminal.

    Libraries that log through their own stderr handlers (torch, transformers) are pointed at the log
    file too, and pointed back afterwards.
    """
    terminal = (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)
    swapped = [(h, h.setStream(log_file)) for h in _stream_handlers() if h.stream in terminal]
    root = logging.getLogger()
    previous_level = root.level
    handler = logging.StreamHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    saved_levels = [(h, h.level) for h in root.handlers]
    for h in root.handlers:  # already writing to the file: keep one copy of each record
        h.setLevel(logging.CRITICAL + 1)
    root.addHandler(handler)
    root.setLevel(min(previous_level or logging.WARNING, logging.INFO))
    logging.captureWarnings(True)
    try:
        with contextlib.redirect_stdout(log_file), contextlib.redirect_stderr(log_file), warnings.catch_warnings():
            warnings.simplefilter("default")
            yield
    finally:
        logging.captureWarnings(False)
        root.removeHandler(handler)
        root.setLevel(previous_level)
        for h, level in saved_levels:
            h.setLevel(level)
        for h, stream in swapped:
            h.setStream(stream)
        for h in _stream_handlers():  # created during the gate, bound to the redirected stderr
            if h.stream is log_file:
                h.setStream(sys.__stderr__)


def _run_gate(index: int, name: str, gate: Any, ctx: GateContext) -> GateResult:
    log_path = ctx.out_dir / "logs" / f"{index:02d}-{name}.log"
    t0 = time.perf_counter()
    with open(log_path, "w") as log_file:
        log_file.write(f"# dockyard onboard · gate {name} · {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        log_file.flush()
        with _gate_logging(log_file):
            try:
                outcome: Outcome = gate(ctx)
            except DockyardError as exc:
                outcome = Outcome("fail", str(exc), {"error": str(exc), "error_type": type(exc).__name__})
            except Exception as exc:  # noqa: BLE001 - a bug in a gate fails that gate, with the traceback logged
                traceback.print_exc(file=log_file)
                outcome = Outcome("fail", f"internal error {type(exc).__name__}: {exc} (traceback in {log_path})",
                                  {"error": str(exc), "error_type": type(exc).__name__})
        duration = time.perf_counter() - t0
        evidence = jsonable(outcome.evidence)
        log_file.write(f"\n# status: {outcome.status} ({duration:.2f}s)\n# summary: {outcome.summary}\n")
        log_file.write("# evidence:\n" + json.dumps(evidence, indent=2) + "\n")
    return GateResult(name, outcome.status, outcome.summary, evidence, round(duration, 3), str(log_path),
                      outcome.hard)


def run_onboard(options: OnboardOptions, progress: TextIO | None = None) -> OnboardRun:
    """Run every gate for ``options.model``, write the artifacts, return the results and exit code.

    A MODEL path that does not exist raises ModelNotFoundError before any report folder is made."""
    options.validate()
    check_model_path(options.model, options.revision, options.download_dir)
    machine = detect_machine(options.device, options.device_memory_gib)
    out_dir = Path(options.out) if options.out is not None else default_out_dir(options.model, options.revision,
                                                                                      options.download_dir)
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    ctx = GateContext(options=options, machine=machine, out_dir=out_dir, progress=progress)
    results = [GateResult(name, "pending", "not reached yet", {}, 0.0, None, False) for name, _, _ in GATES]
    stopped_by: GateResult | None = None
    started = time.time()
    for index, (name, gate, _what) in enumerate(GATES, start=1):
        prefix = f"[{index}/{len(GATES)}] {name:<12}"
        if stopped_by is not None or name in options.skip:
            why = (f"not run: gate '{stopped_by.name}' failed" if stopped_by is not None
                   else "skipped on request (--skip)")
            results[index - 1] = GateResult(name, "skip", why, {}, 0.0, None, False)
            _say(progress, f"{prefix} skip  ({why})")
            continue
        results[index - 1] = GateResult(name, "running", "the run was in this gate when the report was written",
                                        {}, 0.0, str(out_dir / "logs" / f"{index:02d}-{name}.log"), False)
        write_progress(ctx, build_report(ctx, results, started))
        _say(progress, f"{prefix} running…", end="")
        ctx.gate_label, ctx.gate_started = prefix.rstrip(), time.perf_counter()
        result = _run_gate(index, name, gate, ctx)
        results[index - 1] = result
        write_progress(ctx, build_report(ctx, results, started))
        back = "\r\033[K" if progress is not None and progress.isatty() else ""
        _say(progress, f"{back}{prefix} {result.status:<5} {result.duration_s:6.1f}s  {_clip(result.summary, 80)}")
        if result.status == "fail" and result.hard:
            stopped_by = result
    report = build_report(ctx, results, started)
    write_artifacts(ctx, report)
    return OnboardRun(results, report, out_dir, report["overall"]["exit_code"])


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _wrap(prefix: str, text: str, width: int = 100) -> str:
    """``prefix`` then ``text`` folded at ``width`` columns, continuation lines under the text; none of it cut."""
    return "\n".join(textwrap.wrap(" ".join(text.split()), width, initial_indent=prefix,
                                   subsequent_indent=" " * len(prefix), break_long_words=False,
                                   break_on_hyphens=False)) or prefix


def _say(stream: TextIO | None, line: str, end: str = "\n") -> None:
    if stream is None:
        return
    if end == "" and not stream.isatty():
        return  # a "running…" line only helps where \r can overwrite it
    stream.write(line + end)
    stream.flush()


def summary_table(run: OnboardRun) -> str:
    """The table printed at the end of a run: every gate's full summary, wrapped, never cut."""
    report = run.report
    lines = [f"dockyard onboard: {report['model']['name']}  ({report['machine']['hardware']})", ""]
    lines.append(f"{'gate':<12} {'status':<6} {'time':>7}  summary")
    lines.append("-" * 100)
    for r in run.results:
        lines.append(_wrap(f"{r.name:<12} {r.status:<6} {r.duration_s:6.1f}s  ", r.summary))
    lines.append("-" * 100)
    matrix = report.get("feature_matrix") or []
    if matrix:
        lines.append(_wrap("features: ", ", ".join(f"{m['feature']} {m['status']}" for m in matrix)))
    overall = report["overall"]
    lines.append(f"verdict: {overall['verdict']}: {overall['counts']['pass']} passed, {overall['counts']['fail']} "
                 f"failed, {overall['counts']['skip']} skipped (exit status {overall['exit_code']})")
    for item in overall["not_proven"]:
        lines.append(_wrap("  not proven: ", item))
    lines.append(f"report: {run.out_dir / 'report.md'}  (json: report.json, accuracy.yaml, tutorial.md, logs/)")
    return "\n".join(lines)
