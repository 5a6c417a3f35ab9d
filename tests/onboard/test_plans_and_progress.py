"""The fit gate's plan and advice on real configs, inspect agreeing with it, and a report that survives a
SIGKILL in the middle of the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dockyard.cli import main
from dockyard.onboard import OnboardOptions, run_onboard
from dockyard.onboard.context import GATE_NAMES
from tests.shared_configs import CONFIGS_DIR

GiB = 1024**3


def _config_dir(name: str):
    path = CONFIGS_DIR / name
    if not (path / "config.json").exists():
        pytest.skip(f"{path} is not present")
    return path


def _fit(tmp_path, name: str, **options):
    run = run_onboard(OnboardOptions(model=str(_config_dir(name)), out=tmp_path / "out", weights="dummy",
                                     skip=tuple(g for g in GATE_NAMES if g not in ("inspect", "fit")), **options))
    return run.gate("fit")


def test_fp8_plan_for_a_gpu_agrees_with_inspect(tmp_path, capsys):
    fit = _fit(tmp_path, "Qwen--Qwen3-8B-FP8", device_memory_gib=80)
    ev = fit.evidence
    # --device-memory means a GPU of that size: bf16 (the checkpoint's dtype), FP8 projections kept FP8.
    assert fit.status == "pass" and ev["device"] == "cuda" and ev["dtype"] == "bfloat16"
    assert "native FP8" in ev["weight_format"] and "assuming a GPU with FP8 tensor cores" in ev["fp8_path"]
    assert ev["weight_bytes"] == ev["checkpoint_bytes"] < 10 * GiB  # stored FP8 + bf16 embeddings, ~8.8 GiB
    assert main(["inspect", str(_config_dir("Qwen--Qwen3-8B-FP8")), "--json", "--device-memory", "80"]) == 0
    plan = json.loads(capsys.readouterr().out)["memory_plan"]
    for key in ("dtype", "weight_bytes", "checkpoint_bytes", "kv_bytes_per_token", "activation_peak_bytes",
                "overhead_bytes"):
        assert plan[key] == ev[key], key


def test_tensor_parallel_advice_only_at_accepted_sizes(tmp_path):
    # Mixtral-8x7B: 46.7B parameters, 87 GiB in bf16: half (43.5 GiB) does not fit 40 GiB, a quarter does.
    ev = _fit(tmp_path / "mixtral", "mistralai--Mixtral-8x7B-v0.1", device_memory_gib=40).evidence
    assert ev["dtype"] == "bfloat16" and not ev["fits"]
    assert ev["smallest_tensor_parallel_size"] == 4 and not ev["tensor_parallel_sizes"]["2"]["fits"]
    # DeepSeek-V2-Lite (MLA): the engine refuses tensor parallelism, so none is advised.
    fit = _fit(tmp_path / "dsv2", "deepseek-ai--DeepSeek-V2-Lite", device_memory_gib=10)
    assert fit.evidence["smallest_tensor_parallel_size"] is None
    assert all(v.startswith("refused: ") and "multi-head latent attention" in v
               for v in fit.evidence["tensor_parallel_sizes"].values())
    assert "no tensor-parallel size the engine accepts" in fit.summary


def test_no_tensor_parallel_advice_on_a_cpu(tmp_path):
    fit = _fit(tmp_path, "meta-llama--Llama-3.1-70B", device="cpu",
               dummy_memory_gib=1)  # no --device-memory: this machine's RAM
    if fit.evidence["fits"]:
        pytest.skip("this machine has the RAM for Llama-3.1-70B in float32")
    assert fit.evidence["device"] == "cpu" and fit.evidence["smallest_tensor_parallel_size"] is None
    assert "share the same RAM" in fit.summary and "would fit" not in fit.summary


def test_sigkill_mid_run_leaves_a_valid_report_naming_the_gate(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    from dockyard.onboard.report import load_schema

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "dockyard.cli", "onboard",
                             str(_config_dir("HuggingFaceTB--SmolLM2-360M-Instruct")), "--out", str(out),
                             "--device", "cpu", "--skip", "equivalence"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    report, deadline = None, time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                report = json.loads((out / "report.json").read_text())
            except (OSError, ValueError):
                report = None
            if report and report["overall"]["current_gate"] == "dummy":
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it was caught in the dummy gate"
    report = json.loads((out / "report.json").read_text())
    jsonschema.validate(report, load_schema())
    overall = report["overall"]
    assert overall["state"] == "running" and overall["verdict"] == "INCOMPLETE" and overall["current_gate"] == "dummy"
    status = {g["name"]: g["status"] for g in report["gates"]}
    assert status == {"inspect": "pass", "fit": "pass", "equivalence": "skip", "dummy": "running", "real": "pending",
                      "features": "pending", "capacity": "pending", "performance": "pending", "serve-smoke": "pending"}
    assert "it was in gate `dummy`" in (out / "report.md").read_text()


def test_onboard_dtype_reaches_the_plan_and_the_runs(tmp_path):
    from tests.onboard.test_units import TINY

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(TINY))
    run = run_onboard(OnboardOptions(model=str(tmp_path / "m"), out=tmp_path / "out", device="cpu", dtype="bfloat16",
                                     skip=("equivalence", "features", "performance", "serve-smoke")))
    assert run.gate("fit").evidence["dtype"] == "bfloat16"  # on a CPU, auto would be float32
    assert run.gate("dummy").status == "pass" and run.gate("dummy").evidence["dtype"] == "bfloat16"
    assert run.report["options"]["dtype"] == "bfloat16"
    with pytest.raises(SystemExit):
        main(["onboard", "--dtype", "float8"])
