"""Pieces of the onboarding pipeline on their own: feature detection, config shrinking, the runner's edges."""

from __future__ import annotations

import json

import pytest

from dockyard.onboard import OnboardOptions, run_onboard
from dockyard.onboard.config_features import detect_features, nearest_family
from dockyard.onboard.config_surgery import SEQ_LEN, SHRUNK_WINDOW, shrink_config

LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "hidden_act": "silu", "rope_theta": 500000.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128009],
}
TINY = {**LLAMA, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "bos_token_id": 1,
        "eos_token_id": 2}


def _keys(config):
    return {f.key for f in detect_features(config)}


def test_feature_detection_names_what_each_family_needs():
    assert {"gqa", "rope:default", "activation:silu"} <= _keys(LLAMA)
    qwen3 = {**LLAMA, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 128}
    assert "qk_norm" in _keys(qwen3)
    deepseek = {**LLAMA, "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
                "kv_lora_rank": 512, "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
                "num_nextn_predict_layers": 1, "quantization_config": {"quant_method": "fp8"}}
    keys = _keys(deepseek)
    assert {"mla", "moe", "moe_shared_experts", "mtp", "quantized:fp8"} <= keys
    near = nearest_family(detect_features(deepseek), "deepseek_v3")
    # No DeepSeek config run by the mutation check uses plain rope (all are yarn): not claimed, so missing.
    assert near.family == "deepseek" and [f.key for f in near.missing] == ["rope:default"]
    assert "mtp" not in {f.key for f in near.covered}  # a checkpoint feature, not an architecture gap
    # A config no family covers: the nearest one and the missing features by name.
    phimoe = {**LLAMA, "architectures": ["PhiMoEForCausalLM"], "model_type": "phimoe", "num_local_experts": 16,
              "num_experts_per_tok": 2, "lm_head_bias": True}
    near = nearest_family(detect_features(phimoe), "phimoe")
    assert {"LayerNorm (not RMSNorm)", "bias on the LM head"} <= {f.label for f in near.missing}
    gemma = {**LLAMA, "model_type": "gemma2", "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
             "sliding_window": 4096}
    assert {"attn_softcap", "final_softcap", "interleaved_sliding_window", "post_norms"} <= _keys(gemma)
    assert "rope:longrope" in _keys({**LLAMA, "rope_scaling": {"type": "su", "short_factor": [1.0]}})
    assert detect_features({"weird": True}) == [] or all(f.key for f in detect_features({"weird": True}))
    assert detect_features("not a dict") == []  # type: ignore[arg-type]


def test_shrink_keeps_flags_and_ratio():
    cfg = {**LLAMA, "sliding_window": 4096, "attention_bias": True,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}}
    small, notes = shrink_config(cfg)
    assert small["num_attention_heads"] // small["num_key_value_heads"] == 4
    assert small["hidden_size"] == small["num_attention_heads"] * 16 and small.get("head_dim", 16) == 16
    assert small["sliding_window"] == SHRUNK_WINDOW and small["attention_bias"] is True
    # The llama3 scaling kept, its original context moved below the test length so that it matters.
    assert small["rope_scaling"] == {**cfg["rope_scaling"], "original_max_position_embeddings": 16}
    assert small["rope_theta"] == 500000.0
    assert small["max_position_embeddings"] == 1024 and small["vocab_size"] == 1000  # llama3 does not read it
    assert small["bos_token_id"] < 1000 and all(e < 1000 for e in small["eos_token_id"])
    assert small["num_hidden_layers"] in (2, 3, 4) and notes
    decoupled, _ = shrink_config({**LLAMA, "head_dim": 256, "hidden_size": 2048, "num_attention_heads": 16})
    assert decoupled["head_dim"] * decoupled["num_attention_heads"] != decoupled["hidden_size"]


def test_shrink_keeps_every_feature_in_the_regime_where_it_matters():
    deepseek = {**LLAMA, "model_type": "deepseek_v3", "n_routed_experts": 256, "num_experts_per_tok": 8,
                "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc", "first_k_dense_replace": 3,
                "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096}}
    small, _ = shrink_config(deepseek)
    experts, groups = small["n_routed_experts"], small["n_group"]
    assert groups >= 2 and small["topk_group"] < groups and experts % groups == 0
    # The chosen groups hold more experts than top_k picks, and top_k is more than one group's worth.
    assert experts // groups < small["num_experts_per_tok"] <= small["topk_group"] * experts // groups < experts
    assert small["rope_scaling"]["original_max_position_embeddings"] < SEQ_LEN // 2  # the first chunk runs past it
    assert small["max_position_embeddings"] == 40 * small["rope_scaling"]["original_max_position_embeddings"]
    gemma = {**LLAMA, "model_type": "gemma2", "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 4096,
             "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}
    small, _ = shrink_config(gemma)
    assert small["attn_logit_softcapping"] <= 2 and small["final_logit_softcapping"] <= 2  # at the scores' size
    assert small["sliding_window"] < SEQ_LEN and small["query_pre_attn_scalar"] != small["head_dim"]
    granite = {**LLAMA, "model_type": "granite", "residual_multiplier": 1.0, "logits_scaling": 1.0}
    small, _ = shrink_config(granite)
    assert small["residual_multiplier"] != 1.0 and small["logits_scaling"] != 1.0


def test_missing_model_fails_at_once_without_a_report(tmp_path):
    import subprocess
    import sys
    import time

    from dockyard.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="model path not found"):
        run_onboard(OnboardOptions(model=str(tmp_path / "nope"), out=tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    # As a user types it: one line, exit status 2, no reports/<typo>/ folder, before torch is even imported.
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dockyard.cli", "onboard", str(tmp_path / "typo")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 2 and "model path not found" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "reports").exists()
    assert elapsed < 5, elapsed  # well under a second when the machine is idle; a loaded CI runner gets slack


def test_compile_failure_walks_the_fallback_ladder(tmp_path, monkeypatch):
    import torch._dynamo

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(TINY))

    def broken_compile(model, **kwargs):
        def call(*args):
            if torch._dynamo.config.disable:  # what TORCHDYNAMO_DISABLE=1 does to a compiled callable
                return model(*args)
            raise RuntimeError("simulated inductor failure")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    run = run_onboard(OnboardOptions(model=str(tmp_path / "m"), out=tmp_path / "out", weights="dummy",
                                     device="cpu", skip=("performance", "serve-smoke")))
    assert run.exit_code == 3, [(r.name, r.summary) for r in run.results]  # PASS-PARTIAL: real, serve-smoke skipped
    matrix = {row["feature"]: row for row in run.report["feature_matrix"]}
    assert matrix["torch.compile"]["status"] == "unsupported"
    ladder = run.report["fallback_ladder"]
    assert ladder["needed"] is True
    rungs = ladder["entries"][0]["rungs"]
    assert [r["mode"].split("(")[0] for r in rungs] == ["torch.compile", "eager", "TORCHDYNAMO_DISABLE=1"]
    assert [r["status"] for r in rungs] == ["fail", "pass", "pass"]
    assert "TORCHDYNAMO_DISABLE=1" in (tmp_path / "out" / "report.md").read_text()


def test_server_missing_is_a_skip(tmp_path, monkeypatch):
    import importlib.util

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(TINY))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "dockyard.server" else real_find_spec(name, *a))
    run = run_onboard(OnboardOptions(model=str(tmp_path / "m"), out=tmp_path / "out", weights="dummy",
                                     device="cpu", skip=("features", "performance")))
    assert run.gate("serve-smoke").status == "skip"
    assert run.gate("serve-smoke").summary.startswith("server not available")
    assert run.exit_code == 3 and run.report["overall"]["verdict"] == "PASS-PARTIAL"


def test_cli_rejects_unknown_gate():
    from dockyard.cli import main

    with pytest.raises(SystemExit):
        main(["onboard", "--skip", "nope"])


def test_model_without_tokenizer_skips_serve_smoke(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(TINY))
    run = run_onboard(OnboardOptions(model=str(tmp_path / "m"), out=tmp_path / "out", weights="dummy",
                                     device="cpu", skip=("features", "performance")))
    smoke = run.gate("serve-smoke")
    assert smoke.status == "skip" and "no tokenizer" in smoke.summary, smoke.summary
    assert run.gate("real").status == "skip" and "--weights dummy" in run.gate("real").summary
    overall = run.report["overall"]
    assert run.exit_code == 3 and overall["verdict"] == "PASS-PARTIAL" and overall["state"] == "finished"
    assert any(item.startswith("gate serve-smoke: ") and "no tokenizer" in item for item in overall["not_proven"])
    assert any(item.startswith("gate real: ") for item in overall["not_proven"])
    assert "**Verdict: PASS-PARTIAL** (exit status 3)" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is present")
def test_cli_cuda_without_gpu_is_a_clean_error(capsys, tmp_path):
    from dockyard.cli import main

    assert main(["onboard", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_onboard_dtype_choices_are_the_engines():
    from dockyard.model_loader import _DTYPES
    from dockyard.onboard.context import DTYPE_CHOICES

    assert set(DTYPE_CHOICES) == {"auto", *_DTYPES}  # context.py stays torch-free, so it names them itself


def test_vision_tower_makes_a_clean_run_pass_partial(tmp_path):
    from dockyard.onboard.context import GateContext, GateResult
    from dockyard.onboard.machine import detect_machine
    from dockyard.onboard.report import verdict

    config = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
              "text_config": {"model_type": "gemma3_text", "hidden_size": 64},
              "vision_config": {"model_type": "siglip"}}
    ctx = GateContext(options=OnboardOptions(), machine=detect_machine("cpu", None), out_dir=tmp_path)
    passed = [GateResult(name, "pass", "ok", {}, 0.0, None) for name in ("inspect", "fit", "real")]
    assert verdict(ctx, passed)["verdict"] == "PASS"
    ctx.features = detect_features(config)
    out = verdict(ctx, passed)
    assert (out["verdict"], out["exit_code"]) == ("PASS-PARTIAL", 3)
    assert out["not_proven"] == ["model part: the vision/audio tower (dockyard runs the language model only)"]
    failed = [*passed, GateResult("dummy", "fail", "boom", {}, 0.0, None)]
    assert verdict(ctx, failed)["verdict"] == "FAIL" and verdict(ctx, failed)["exit_code"] == 1
