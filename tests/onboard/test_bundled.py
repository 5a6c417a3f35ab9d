"""`dockyard onboard` on the bundled model (CPU), run as a user runs it: every applicable gate passes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

jsonschema = pytest.importorskip("jsonschema")


@pytest.fixture(scope="module")
def onboarded(bundled_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("onboard-bundled")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "dockyard.cli", "onboard", "--out", str(out), "--device", "cpu"],
                          capture_output=True, text=True, timeout=900, env=env)
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else None
    return proc, out, report


def test_every_applicable_gate_passes(onboarded):
    proc, out, report = onboarded
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    gates = {g["name"]: g for g in report["gates"]}
    for name in ("inspect", "fit", "equivalence", "dummy", "real", "features", "capacity", "performance"):
        assert gates[name]["status"] == "pass", (name, gates[name]["summary"])
    smoke = gates["serve-smoke"]
    assert smoke["status"] == "pass" or smoke["summary"].startswith("server not available"), smoke["summary"]
    # The summary table is on stdout, progress on stderr.
    assert "verdict: PASS: 9 passed" in proc.stdout and "equivalence" in proc.stdout
    assert report["overall"]["verdict"] == "PASS" and report["overall"]["not_proven"] == []
    assert "[3/9] equivalence" in proc.stderr


def test_real_gate_matches_hf_token_for_token(onboarded):
    _, _, report = onboarded
    real = next(g for g in report["gates"] if g["name"] == "real")["evidence"]
    assert real["missing"] == [] and real["unexpected"] == [] and real["tensors_loaded"] > 0
    assert real["method"].startswith("token-for-token")
    assert len(real["prompts"]) == 3 and all(p["equal"] for p in real["prompts"])
    assert real["prefill_logits_rel_err"] < 1e-4
    # Stored texts end where the server's answer ends: at EOS, no special tokens.
    assert not any("<|im_end|>" in p["text"] or "<|endoftext|>" in p["text"] for p in real["prompts"])
    smoke = next(g for g in report["gates"] if g["name"] == "serve-smoke")
    chat = next(p for p in real["prompts"] if p["prompt"].startswith("[chat]"))
    if smoke["status"] == "pass":  # the same greedy answer, through the HTTP server
        assert chat["text"].strip() == smoke["evidence"]["chat"]["answer"]


def test_equivalence_levels_and_dummy_true_shapes(onboarded):
    _, _, report = onboarded
    gates = {g["name"]: g for g in report["gates"]}
    levels = gates["equivalence"]["evidence"]["levels"]
    assert [lv["block"] for lv in levels[:3]] == ["norm", "attention", "mlp"]
    assert {lv["level"] for lv in levels} == {"block", "layer", "model", "decode"}
    assert all(lv["rel_err"] < 1e-5 for lv in levels)
    dummy = gates["dummy"]["evidence"]
    assert dummy["true_shapes"] and dummy["layers"] == dummy["total_layers"] == 30
    assert dummy["first_request"]["logits_finite"]


def test_feature_matrix_rows(onboarded):
    _, _, report = onboarded
    matrix = {row["feature"]: row for row in report["feature_matrix"]}
    assert matrix["CUDA graph"]["status"] == "not-run" and "GPU" in matrix["CUDA graph"]["why"]
    assert matrix["torch.compile"]["status"] in ("supported", "unsupported")  # it was tried, either way
    # SmolLM2-135M has 9 query heads: the engine's own refusal, before any worker starts.
    assert matrix["tensor parallel"]["status"] == "unsupported"
    assert "num_attention_heads=9 is not divisible by tensor_parallel_size=2" in matrix["tensor parallel"]["why"]
    assert matrix["expert parallel"]["status"] == "not-applicable"
    assert matrix["multimodal"]["status"] == "not-applicable"
    fp8 = matrix["FP8"]  # tried on a quantized copy of the shrunken model; the checkpoint is a GGUF
    assert fp8["status"] == "supported" and fp8["why"].endswith("the checkpoint itself is not FP8"), fp8["why"]
    assert fp8["evidence"]["trial"]["rmse_ratio"] < fp8["evidence"]["trial"]["bound"]
    assert matrix["MTP"]["status"] == "checkpoint-missing"
    quant = matrix["quantization (GGUF Q4_1 (Q4_1, Q8_0, F32))"]  # llama.cpp's file type, then its block types
    assert quant["status"] == "supported" and quant["evidence"]["handling"] == "dequantized", quant["why"]
    assert report["fallback_ladder"]["needed"] is False or report["fallback_ladder"]["entries"]


def test_artifacts(onboarded):
    from dockyard.onboard.report import load_schema

    _, out, report = onboarded
    jsonschema.validate(report, load_schema())
    # The accuracy numbers come from a real 20-question `dockyard eval` run, labelled as such.
    import yaml

    accuracy = yaml.safe_load((out / "accuracy.yaml").read_text())
    assert report["accuracy"]["evaluated"] is True, report["accuracy"]["note"]
    assert accuracy == report["accuracy"]["results"] and accuracy["limit"] == 20 and accuracy["device"] == "cpu"
    (task,) = accuracy["tasks"]
    assert task["name"] == "arc_easy" and task["samples"] == 20
    assert {m["name"] for m in task["metrics"]} == {"acc,none", "acc_norm,none"}
    assert "20-question subset" in accuracy["note"] and "CPU" in accuracy["note"]
    md = (out / "report.md").read_text()
    for heading in ("## Architecture", "## Gates", "## Feature matrix", "## Max length and capacity",
                    "## Fallback ladder", "## What dummy weights proved", "## What only real weights proved"):
        assert heading in md
    tutorial = (out / "tutorial.md").read_text()
    for heading in ("## Introduction", "## Supported Features", "## Environment Preparation", "## Deployment",
                    "## Functional Verification", "## Accuracy Evaluation", "## Performance"):
        assert heading in tutorial
    assert "dockyard serve" in tutorial
    if report["serve_example"]:
        # The tutorial's commands are the deploy port's, and serve-smoke ran exactly those (the port aside,
        # only when 8000 was taken on this machine).
        example = report["serve_example"]
        assert example["command"] == "dockyard serve --port 8000"
        assert "```bash\ndockyard serve --port 8000\n```" in tutorial
        assert "curl -s http://127.0.0.1:8000/v1/chat/completions" in tutorial and example["chat"]["answer"] in tutorial
        ran = example["chat"]["curl_run"]
        assert ran == example["chat"]["curl"] if example["port_note"] is None else \
            ran == example["chat"]["curl"].replace(":8000/", f":{example['ran_on_port']}/")
    for gate in report["gates"]:
        if gate["status"] != "skip":
            assert (out / "logs").is_dir() and os.path.exists(gate["log_path"]), gate["name"]


def test_report_md_is_prose_and_tables_with_every_reason_in_full(onboarded):
    proc, out, report = onboarded
    md = (out / "report.md").read_text()
    # No JSON: no braces, no quoted keys, no clipped values pointing at report.json.
    assert not re.search(r'[{}]|": |…', md), re.search(r'.*([{}]|": |…).*', md).group(0)
    table = " ".join(proc.stdout.split())  # the summary table printed at the end, its wrapping undone
    for gate in report["gates"]:
        summary = gate["summary"]
        assert f"| {gate['name']} | **{gate['status']}** |" in md and summary.replace("|", "\\|") in md
        assert " ".join(summary.split()) in table, gate["name"]
    sections = dict(re.findall(r"\n### ([\w-]+): \w+\n\n(.*?)(?=\n### |\n## )", md, flags=re.S))
    assert set(sections) == {g["name"] for g in report["gates"]}
    assert "no unrecognised keys" in sections["inspect"]
    assert "| quantity | value |" in sections["fit"] and "| parameters | 134,515,008 |" in sections["fit"]
    levels = next(g for g in report["gates"] if g["name"] == "equivalence")["evidence"]["levels"]
    assert sections["equivalence"].count("\n| block |") + sections["equivalence"].count("\n| layer |") + \
        sections["equivalence"].count("\n| model |") + sections["equivalence"].count("\n| decode |") == len(levels)
    mutations = next(g for g in report["gates"] if g["name"] == "equivalence")["evidence"]["mutations"]
    assert mutations and f"{len(mutations)} of {len(mutations)} ablations fail it" in sections["equivalence"]
    for m in mutations:  # each ablation, where it was caught and by how much over that level's tolerance
        factor = f"×{m['rel_err'] / m['tolerance']:,.0f}" if m["rel_err"] is not None else "—"
        assert f"| `{m['feature']}` | {m['what']} | {m['caught_by']} |" in sections["equivalence"]
        assert factor in sections["equivalence"], m
    assert "token for token" in sections["real"] and "The chat request answered HTTP 200" in sections["serve-smoke"]
