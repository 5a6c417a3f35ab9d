"""The dockyard command as a user runs it: output on stdout only, clear errors, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dockyard.cli import main
from dockyard.model_path import bundled_model_path
from tests.onboard.test_inspect_keys import STARCODER2

CONFIGS = Path(__file__).resolve().parents[1].parent / "shared" / "configs"


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "dockyard.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _bundled_or_skip() -> Path:
    try:
        return bundled_model_path()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"bundled model not installed: {exc}")


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == ""
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def test_generate_chat_prints_only_text():
    _bundled_or_skip()
    proc = run_cli("generate", "--chat", "--max-tokens", "24", "What is the capital of France?")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert proc.stdout.count("\n") <= 3  # the answer only, no logs


def test_inspect_config_json_and_json_output():
    cfg = CONFIGS / "meta-llama--Llama-3.1-8B" / "config.json"
    if not cfg.exists():
        pytest.skip("../shared/configs is not present")
    proc = run_cli("inspect", str(cfg))
    assert proc.returncode == 0, proc.stderr
    assert "LlamaForCausalLM" in proc.stdout and "KV cache / token" in proc.stdout
    assert "family       llama (LlamaForCausalLM)" in proc.stdout and "unrecognised none" in proc.stdout
    proc = run_cli("inspect", str(cfg), "--json", "--device-memory", "80")
    data = json.loads(proc.stdout)
    assert data["unrecognised_keys"] == [] and data["nearest_family"]["missing"] == []
    assert data["spec"]["num_hidden_layers"] == 32
    assert data["memory_plan"]["kv_bytes_per_token"] == 131072
    assert data["fit"]["fits"] is True


def test_relative_gguf_path_with_a_directory(tmp_path):
    gguf = _bundled_or_skip()
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.gguf").symlink_to(gguf)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "dockyard.cli", "generate", "--model", "m/model.gguf",
                           "--max-tokens", "8", "The capital of France is"], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_missing_model_path(tmp_path):
    assert_clean_error(run_cli("generate", "--model", str(tmp_path / "nope.gguf"), "hi"), "nope.gguf", "not found")


@pytest.mark.parametrize("content", [b"", b"\x00" * 64, b"GGUF" + os.urandom(200)])
def test_not_a_gguf(tmp_path, content):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(content)
    assert_clean_error(run_cli("generate", "--model", str(bad), "hi"), "broken.gguf")


def test_unsupported_architecture(tmp_path):
    cfg = CONFIGS / "internlm--internlm2-7b" / "config.json"
    if not cfg.exists():
        pytest.skip("../shared/configs is not present")
    proc = run_cli("generate", "--model", str(cfg), "hi")
    assert_clean_error(proc, "InternLM2ForCausalLM", "LlamaForCausalLM", "Qwen3MoeForCausalLM")


def test_inspect_of_an_unsupported_architecture_names_features_family_and_unknown_keys(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(STARCODER2))
    # in process: the same code path, no start-up; no native family, so the generic path runs it and says why
    assert main(["inspect", str(tmp_path / "config.json")]) == 0
    out, err = capsys.readouterr()
    assert "path         transformers: generic path" in out and "Starcoder2ForCausalLM" in out
    assert main(["inspect", str(tmp_path / "config.json"), "--model-impl", "dockyard"]) == 2
    out, err = capsys.readouterr()
    assert "Starcoder2ForCausalLM" in err and err.count("\n") == 1
    assert "plain_mlp" in out and "layernorm" in out
    assert "family       llama (LlamaForCausalLM)" in out and "missing: " in out
    assert "unrecognised norm_epsilon" in out
    # --json: the refusal is one JSON object on stdout (a script is not left with nothing), the error on stderr
    assert main(["inspect", str(tmp_path / "config.json"), "--model-impl", "dockyard", "--json"]) == 2
    out, err = capsys.readouterr()
    refusal = json.loads(out)
    assert refusal["error"]["type"] == "UnsupportedArchitectureError" and "Starcoder2ForCausalLM" in err
    assert refusal["error"]["message"] in err and "norm_epsilon" in refusal["unrecognised_keys"]
    assert {"plain_mlp", "layernorm"} <= {f["key"] for f in refusal["features"]}


def test_prompt_longer_than_max_length():
    _bundled_or_skip()
    proc = run_cli("generate", "word " * 9000)
    assert_clean_error(proc, "8192")
    assert "9000" in proc.stderr or "900" in proc.stderr


@pytest.mark.parametrize(("flag", "value", "param"), [("--temperature", "-1", "temperature"),
                                                      ("--top-p", "1.5", "top_p"),
                                                      ("--max-tokens", "0", "max_tokens"),
                                                      ("--min-p", "2", "min_p")])
def test_invalid_sampling_values(flag, value, param):
    proc = run_cli("generate", flag, value, "hi")
    assert_clean_error(proc, param)
