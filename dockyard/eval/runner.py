"""Run lm-eval tasks on a dockyard model, write accuracy.yaml, check a run against one.

:func:`run_eval` loads the model once and runs each task through ``lm_eval.simple_evaluate``
(one call per task, so each gets its own time); :func:`accuracy_yaml` renders the result in the
shape vllm-ascend's accuracy configs use (``model_name``, ``hardware``, ``tasks: [{name,
metrics: [{name, value}]}]``, ``num_fewshot``, ``apply_chat_template``, ``fewshot_as_multiturn``,
``batch_size``) plus ``limit``, versions and the date; :func:`run_check` re-runs a YAML's tasks
with its settings and compares every metric within a relative tolerance.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from dockyard import __version__
from dockyard.dtypes import dtype_name
from dockyard.eval.tasks import TASKS, EvalError, parse_task_list, require_data, task_available, task_manager
from dockyard.onboard.machine import detect_machine
from dockyard.spec import is_number

logger = logging.getLogger(__name__)

DEFAULT_RTOL = 0.05
# MMLU's category groups are shown on the terminal under the group; only the group goes to the YAML.
_SUBGROUPS = {"mmlu": ("mmlu_humanities", "mmlu_other", "mmlu_social_sciences", "mmlu_stem")}


@dataclass
class EvalOptions:
    """What ``dockyard eval`` was asked to run (the CLI flags, as a value)."""

    tasks: list[str]
    model: str | None = None  # as LLM takes it; None = the bundled model
    limit: int | float | None = None  # documents per task (per subject for mmlu); < 1 = a fraction
    num_fewshot: int | None = None  # None = each task's own default (gsm8k: 8, others: 0)
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool = False
    batch_size: int = 64  # sequences the engine runs at once
    dtype: str = "auto"
    device: str = "auto"
    # Further engine settings of the model loaded here (EngineArgs fields as LLM keywords: the CLI's engine flags).
    engine: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        self.tasks = parse_task_list(self.tasks)
        if self.limit is not None and not (self.limit > 0 and math.isfinite(self.limit)):
            raise EvalError(f"--limit {self.limit} must be a positive number of documents (or a fraction < 1)")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise EvalError(f"--num-fewshot {self.num_fewshot} must be >= 0")
        if self.batch_size < 1:
            raise EvalError(f"--batch-size {self.batch_size} must be >= 1")
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise EvalError("--fewshot-as-multiturn needs --apply-chat-template")


@dataclass
class Metric:
    """One reported number: lm-eval's result key ("metric,filter"), its value and standard error."""

    name: str
    value: float
    stderr: float | None = None


@dataclass
class TaskResult:
    """One user-facing task's measured metrics and how they were measured."""

    name: str
    metrics: list[Metric]
    num_fewshot: int | None
    samples: int  # documents evaluated
    seconds: float
    split: str
    groups: list[tuple[str, list[Metric]]] = field(default_factory=list)  # sub-groups, for display only


@dataclass
class EvalRun:
    """A finished ``dockyard eval`` run."""

    options: EvalOptions
    model_name: str
    model_path: str
    hardware: str
    dtype: str
    device: str
    tasks: list[TaskResult]
    date: str
    load_seconds: float
    versions: dict[str, str]


@contextlib.contextmanager
def _quiet_libraries(verbose: bool) -> Iterator[None]:
    """lm-eval and datasets log every step at INFO/WARNING; keep the terminal to dockyard's lines."""
    names = ("lm_eval", "datasets", "evaluate")
    saved = {n: logging.getLogger(n).level for n in names}
    if not verbose:
        for n in names:
            logging.getLogger(n).setLevel(logging.ERROR)
    try:
        import datasets

        bars = datasets.utils.logging.is_progress_bar_enabled()
        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover - lm-eval depends on datasets
        bars = False
    try:
        yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def _versions(names: list[str]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"dockyard": __version__}
    packages = ["lm-eval"] + sorted({TASKS[n].package.pip_name for n in names})
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def _metric(results: dict[str, Any], key: str) -> Metric | None:
    if key not in results or not isinstance(results[key], (int, float)):
        return None
    metric, _, filt = key.partition(",")
    stderr = results.get(f"{metric}_stderr,{filt}")
    return Metric(key, float(results[key]), float(stderr) if isinstance(stderr, (int, float)) else None)


def _task_result(name: str, res: dict[str, Any], seconds: float) -> TaskResult:
    task = TASKS[name]
    per_task = res["results"].get(name)
    if per_task is None:
        raise EvalError(f"lm-eval returned no result for task {name!r}")
    metrics = [m for key in task.metrics if (m := _metric(per_task, key)) is not None]
    missing = [key for key in task.metrics if _metric(per_task, key) is None]
    if missing:
        raise EvalError(f"lm-eval's result for {name!r} lacks {', '.join(missing)} (has {sorted(per_task)})")
    n_shot = res.get("n-shot", {})
    shots = n_shot.get(name)
    if shots is None and n_shot:  # a group: its subtasks' (all equal)
        shots = next(iter(n_shot.values()))
    n_samples = res.get("n-samples", {})
    samples = sum(int(v.get("effective", 0)) for v in n_samples.values())
    groups = []
    for sub in _SUBGROUPS.get(name, ()):
        if sub in res["results"]:
            groups.append((sub, [m for key in task.metrics if (m := _metric(res["results"][sub], key)) is not None]))
    return TaskResult(name, metrics, shots, samples, round(seconds, 3), task.split, groups)


def _evaluate_task(lm: Any, manager: Any, name: str, options: EvalOptions) -> dict[str, Any]:
    """One task through ``lm_eval.evaluator.evaluate``, set up as ``simple_evaluate`` sets it up.

    ``simple_evaluate`` itself is not used: after evaluating it collects environment details (it runs
    ``git`` and torch's ``collect_env``, seconds per call, with noise on stderr) that dockyard does not use.
    The seeds, the few-shot override (never of a task that pins 0) and the few-shot sampler seed are the same.
    """
    import random

    import numpy as np
    import torch
    from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED
    from lm_eval.evaluator import evaluate

    random.seed(DEFAULT_RANDOM_SEED)
    np.random.seed(DEFAULT_OTHER_SEED)
    torch.manual_seed(DEFAULT_OTHER_SEED)
    loaded = manager.load([name])
    for task in loaded["tasks"].values():
        default = task.get_config("num_fewshot")
        if options.num_fewshot is not None and default != 0:
            task.set_config(key="num_fewshot", value=options.num_fewshot)
        elif default is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
    res = evaluate(lm=lm, task_dict=loaded, limit=options.limit, bootstrap_iters=1000, log_samples=False,
                   apply_chat_template=options.apply_chat_template,
                   fewshot_as_multiturn=options.fewshot_as_multiturn, verbosity="ERROR")
    if res is None:  # only on a non-zero rank, which a single process never is
        raise EvalError(f"lm-eval returned no result for {name!r}")
    return dict(res)


def run_eval(options: EvalOptions, llm: Any = None, progress: TextIO | None = sys.stderr,
             verbose: bool = False) -> EvalRun:
    """Run ``options.tasks`` on the model (``llm`` when given, else loaded from ``options``)."""
    options.validate()
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise EvalError("lm-eval is not installed; `pip install lm-eval` (dockyard eval runs on "
                        "lm-eval-harness)") from None
    for name in options.tasks:  # every missing package named before anything is loaded
        require_data(TASKS[name])
    with _quiet_libraries(verbose):
        manager = task_manager(options.tasks)

        from dockyard.eval.lm import DockyardLM  # lm-eval is an optional dependency (the eval extra)

        t0 = time.perf_counter()
        lm = DockyardLM(options.model, llm=llm, dtype=options.dtype, device=options.device,
                        batch_size=options.batch_size, engine=options.engine)
        load_s = time.perf_counter() - t0
        # Record what the engine really runs with (a model handed in keeps its own limit).
        options.batch_size = lm.llm.engine.config.max_num_seqs
        dtype = dtype_name(lm.llm.dtype)
        _say(progress, f"model {lm.name} ({dtype}, {lm.llm.device}) ready in {load_s:.1f}s")
        results = []
        for i, name in enumerate(options.tasks, 1):
            lm.progress_label = name
            t0 = time.perf_counter()
            res = _evaluate_task(lm, manager, name, options)
            result = _task_result(name, res, time.perf_counter() - t0)
            results.append(result)
            values = ", ".join(f"{m.name} {m.value:.4f}" for m in result.metrics)
            _say(progress, f"[{i}/{len(options.tasks)}] {name}: {result.samples} docs, {result.num_fewshot}-shot, "
                           f"{result.seconds:.1f}s: {values}")

    device = lm.llm.device.type
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return EvalRun(options=options, model_name=lm.name, model_path=str(lm.llm.source.path),
                   hardware=detect_machine(device).hardware_line, dtype=dtype,
                   device=device, tasks=results, date=date, load_seconds=round(load_s, 3),
                   versions=_versions(options.tasks))


def _say(stream: TextIO | None, line: str) -> None:
    if stream is not None:
        stream.write(line + "\n")
        stream.flush()


# ---------------------------------------------------------------- accuracy.yaml
def command_line(options: EvalOptions) -> str:
    """The ``dockyard eval`` command that reproduces ``options``."""
    import shlex

    args = ["dockyard", "eval"]
    if options.model:
        args += ["--model", str(options.model)]
    for flag, value in (("--revision", options.engine.get("revision")),
                        ("--download-dir", options.engine.get("download_dir"))):
        if value:
            args += [flag, value]
    args += ["--tasks", ",".join(options.tasks)]
    if options.limit is not None:
        args += ["--limit", f"{options.limit:g}"]
    if options.num_fewshot is not None:
        args += ["--num-fewshot", str(options.num_fewshot)]
    if options.apply_chat_template:
        args.append("--apply-chat-template")
    if options.fewshot_as_multiturn:
        args.append("--fewshot-as-multiturn")
    args += ["--batch-size", str(options.batch_size)]
    return " ".join(shlex.quote(a) for a in args)


def accuracy_data(run: EvalRun, note: str | None = None) -> dict[str, Any]:
    """accuracy.yaml's content for ``run``."""
    o = run.options
    limit_note = (f"limit {o.limit:g} documents per task" + (" (per subject for mmlu)" if "mmlu" in o.tasks else "")
                  + ": a subset, not comparable to full-set published numbers") if o.limit else "full task sets"
    return {
        "model_name": run.model_name,
        "model": o.model,
        "hardware": run.hardware,
        "tasks": [{"name": t.name, "metrics": [{"name": m.name, "value": m.value} | (
            {"stderr": m.stderr} if m.stderr is not None else {}) for m in t.metrics],
                   "num_fewshot": t.num_fewshot, "samples": t.samples, "split": t.split, "seconds": t.seconds}
                  for t in run.tasks],
        "num_fewshot": o.num_fewshot,
        "apply_chat_template": o.apply_chat_template,
        "fewshot_as_multiturn": o.fewshot_as_multiturn,
        "batch_size": o.batch_size,
        "limit": o.limit,
        "dtype": run.dtype,
        "device": run.device,
        "evaluated": True,
        "note": note or f"Measured by a real `dockyard eval` run on {run.hardware}; {limit_note}",
        "command": command_line(o),
        "date": run.date,
        "dockyard_version": run.versions.get("dockyard"),
        "lm_eval_version": run.versions.get("lm-eval"),
        "data_packages": {k: v for k, v in run.versions.items() if k not in ("dockyard", "lm-eval")},
    }


def accuracy_yaml(run: EvalRun, note: str | None = None) -> str:
    """accuracy.yaml as text: a comment header, then the data (``yaml.safe_dump``)."""
    import yaml

    data = accuracy_data(run, note)
    header = (f"# Accuracy of {run.model_name}, measured by `dockyard eval` (lm-eval-harness "
              f"{data['lm_eval_version']}) on {run.hardware}, {run.date}.\n"
              f"# {data['note']}.\n# Reproduce / check: {data['command']}   |   dockyard eval --check THIS_FILE\n")
    return header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=1000)


def write_accuracy_yaml(run: EvalRun, path: str | Path, note: str | None = None) -> Path:
    path = Path(path)
    if path.parent != Path(""):
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(accuracy_yaml(run, note))
    return path


# ---------------------------------------------------------------- tables
def results_table(run: EvalRun) -> str:
    """The terminal table: one row per metric (MMLU's categories under it)."""
    rows = [("task", "n-shot", "docs", "metric", "value", "± stderr", "time")]
    for t in run.tasks:
        for i, m in enumerate(t.metrics):
            rows.append((t.name if i == 0 else "", str(t.num_fewshot) if i == 0 else "", str(t.samples) if i == 0
                         else "", m.name, f"{m.value:.4f}", f"{m.stderr:.4f}" if m.stderr is not None else "—",
                         f"{t.seconds:.1f}s" if i == 0 else ""))
        for sub, metrics in t.groups:
            for m in metrics:
                rows.append((f" - {sub.removeprefix(t.name + '_')}", "", "", m.name, f"{m.value:.4f}",
                             f"{m.stderr:.4f}" if m.stderr is not None else "—", ""))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = [f"dockyard eval: {run.model_name} ({run.dtype}, {run.hardware})"
             + (f", limit {run.options.limit:g}" if run.options.limit else ""), ""]
    for n, r in enumerate(rows):
        lines.append("  ".join(cell.rjust(w) if c in (1, 2, 4, 5, 6) else cell.ljust(w)
                               for c, (cell, w) in enumerate(zip(r, widths))).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def tasks_table() -> str:
    """``--list-tasks``: every task, its metrics, split, data package and whether it is installed."""
    rows = [("task", "metrics", "split evaluated", "data package", "installed", "what")]
    for t in TASKS.values():
        rows.append((t.name, " ".join(t.metrics), t.split, t.package.pip_name, "yes" if task_available(t) else "NO",
                     t.description))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------- --check
@dataclass
class CheckRow:
    """One metric compared: expected (from the YAML), measured, relative difference, within tolerance."""

    task: str
    metric: str
    expected: float
    measured: float | None
    rel_diff: float | None
    ok: bool


@dataclass
class CheckResult:
    """``dockyard eval --check``: every metric of the YAML against this run."""

    rows: list[CheckRow]
    rtol: float
    run: EvalRun

    @property
    def passed(self) -> bool:
        return all(r.ok for r in self.rows)

    def table(self) -> str:
        rows = [("task", "metric", "expected", "measured", "rel diff", "")]
        for r in self.rows:
            measured = "missing" if r.measured is None else f"{r.measured:.4f}"
            rows.append((r.task, r.metric, f"{r.expected:.4f}", measured,
                         "—" if r.rel_diff is None else f"{r.rel_diff:.2%}", "ok" if r.ok else "FAIL"))
        widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
        lines = ["  ".join(cell.rjust(w) if 2 <= c <= 4 else cell.ljust(w)
                           for c, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        failed = [f"{r.task} {r.metric}" for r in self.rows if not r.ok]
        lines.append("")
        lines.append(f"check PASSED: {len(self.rows)} metrics within rtol {self.rtol:g}" if not failed else
                     f"check FAILED: {len(failed)} of {len(self.rows)} metrics outside rtol {self.rtol:g}: "
                     + ", ".join(failed))
        return "\n".join(lines)


def _need(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise EvalError(f"{path}: {what}")


def load_accuracy_yaml(path: str | Path) -> dict[str, Any]:
    """Read and validate an accuracy YAML; every problem is one clear EvalError naming the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: no such file; give the accuracy.yaml a run wrote (dockyard eval --out FILE)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise EvalError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    except UnicodeDecodeError:
        raise EvalError(f"{path}: not a text file") from None
    _need(isinstance(data, dict), path, "expected a mapping with model_name and tasks")
    tasks = data.get("tasks")
    if data.get("evaluated") is False or tasks == []:
        raise EvalError(f"{path}: holds no measured metrics (no evaluation ran when it was written); "
                        "write one with `dockyard eval --tasks ... --out FILE`")
    _need(isinstance(tasks, list) and tasks, path, "'tasks' must be a non-empty list of {name, metrics}")
    for i, t in enumerate(tasks):
        _need(isinstance(t, dict) and isinstance(t.get("name"), str), path, f"tasks[{i}] needs a 'name'")
        _need(t["name"] in TASKS, path, f"tasks[{i}]: unknown task {t['name']!r}; known: {', '.join(TASKS)}")
        metrics = t.get("metrics")
        _need(isinstance(metrics, list) and metrics, path, f"task {t['name']}: 'metrics' must be a non-empty list")
        for j, m in enumerate(metrics):
            _need(isinstance(m, dict) and isinstance(m.get("name"), str), path,
                  f"task {t['name']} metrics[{j}] needs a 'name'")
            value = m.get("value")
            _need(is_number(value) and math.isfinite(value), path,
                  f"task {t['name']} metric {m['name']}: 'value' must be a number, got {value!r}")
    for key, kind in (("limit", (int, float)), ("num_fewshot", int), ("batch_size", int)):
        value = data.get(key)
        _need(value is None or (isinstance(value, kind) and not isinstance(value, bool)), path,
              f"'{key}' must be a number or null, got {value!r}")
    for key in ("apply_chat_template", "fewshot_as_multiturn"):
        _need(isinstance(data.get(key, False), bool), path, f"'{key}' must be true or false")
    return data


def rel_diff(expected: float, measured: float) -> float:
    """|measured - expected| / |expected|; 0 when both are 0, infinite when only expected is."""
    if expected == 0:
        return 0.0 if measured == 0 else math.inf
    return abs(measured - expected) / abs(expected)


def options_from_yaml(data: dict[str, Any], model: str | None = None, dtype: str = "auto",
                      device: str = "auto") -> EvalOptions:
    """The settings a YAML was measured with; ``model`` (when given) replaces the YAML's."""
    return EvalOptions(tasks=[t["name"] for t in data["tasks"]],
                       model=model if model is not None else data.get("model"),
                       limit=data.get("limit"), num_fewshot=data.get("num_fewshot"),
                       apply_chat_template=bool(data.get("apply_chat_template", False)),
                       fewshot_as_multiturn=bool(data.get("fewshot_as_multiturn", False)),
                       batch_size=int(data.get("batch_size") or 64), dtype=dtype, device=device)


def compare(data: dict[str, Any], run: EvalRun, rtol: float) -> CheckResult:
    """Every metric of ``data`` against ``run``."""
    measured = {(t.name, m.name): m.value for t in run.tasks for m in t.metrics}
    rows = []
    for t in data["tasks"]:
        for m in t["metrics"]:
            got = measured.get((t["name"], m["name"]))
            diff = None if got is None else rel_diff(float(m["value"]), got)
            rows.append(CheckRow(t["name"], m["name"], float(m["value"]), got, diff,
                                 diff is not None and diff <= rtol))
    return CheckResult(rows, rtol, run)


def run_check(path: str | Path, rtol: float = DEFAULT_RTOL, model: str | None = None, dtype: str = "auto",
              device: str = "auto", llm: Any = None, progress: TextIO | None = sys.stderr,
              verbose: bool = False, engine: dict[str, Any] | None = None) -> CheckResult:
    """Re-run the YAML's tasks with its settings; compare each metric within ``rtol``."""
    if not (rtol >= 0 and math.isfinite(rtol)):
        raise EvalError(f"--rtol {rtol} must be a number >= 0")
    data = load_accuracy_yaml(path)
    options = options_from_yaml(data, model, dtype, device)
    options.engine = dict(engine or {})
    run = run_eval(options, llm=llm, progress=progress, verbose=verbose)
    if data.get("model_name") and data["model_name"] != run.model_name:
        _say(progress, f"note: {path} was written for {data['model_name']!r}; this run measured {run.model_name!r}")
    return compare(data, run, rtol)

