"""A deliberately broken model fails the equivalence gate at the right level, and the report names the block."""

from __future__ import annotations

import dataclasses
import json

import pytest

import dockyard.models.llama as llama
import dockyard.weights.checkpoint as checkpoint
from dockyard.onboard import OnboardOptions, run_onboard

pytest.importorskip("transformers")

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": True,
    "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
}


def _onboard(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(CONFIG))
    return run_onboard(OnboardOptions(model=str(tmp_path / "model"), out=tmp_path / "out", weights="dummy",
                                      device="cpu", skip=("features", "performance", "serve-smoke")))


def _check_failure(run, block: str, tmp_path) -> None:
    gates = {r.name: r for r in run.results}
    assert gates["inspect"].status == "pass"
    equivalence = gates["equivalence"]
    assert equivalence.status == "fail"
    first = equivalence.evidence["first_failure"]
    assert first["level"] == "block" and first["block"] == block, first
    assert f"block '{block}'" in equivalence.summary
    # Every block before the broken one agrees; the failure is not a crash.
    levels = equivalence.evidence["levels"]
    before = levels[: next(i for i, lv in enumerate(levels) if not lv["passed"])]
    assert before and all(lv["passed"] for lv in before)
    assert first["rel_err"] is not None and first["rel_err"] > first["tolerance"]
    # A hard failure: the gates after it do not run, and say why.
    assert gates["dummy"].status == "skip" and "equivalence" in gates["dummy"].summary
    assert run.exit_code == 1
    assert f"block '{block}'" in (tmp_path / "out" / "report.md").read_text()


def test_wrong_rope_theta_fails_at_attention(tmp_path, monkeypatch):
    original = llama.get_rope

    def wrong_theta(rope, *args, **kwargs):
        return original(dataclasses.replace(rope, theta=rope.theta * 2), *args, **kwargs)

    monkeypatch.setattr(llama, "get_rope", wrong_theta)
    _check_failure(_onboard(tmp_path), "attention", tmp_path)


def test_swapped_gate_and_up_projections_fail_at_mlp(tmp_path, monkeypatch):
    original = checkpoint.iter_safetensors  # the name the checkpoint reader calls

    def swapped(model_dir, **kwargs):
        for name, tensor in original(model_dir, **kwargs):
            if ".mlp.gate_proj." in name:
                name = name.replace(".gate_proj.", ".up_proj.")
            elif ".mlp.up_proj." in name:
                name = name.replace(".up_proj.", ".gate_proj.")
            yield name, tensor

    monkeypatch.setattr(checkpoint, "iter_safetensors", swapped)
    _check_failure(_onboard(tmp_path), "mlp", tmp_path)
