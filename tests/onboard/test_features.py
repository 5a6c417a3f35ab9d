"""The features gate's trials on tiny models: TP=2 and EP=2 against one process (gloo, one worker process
each), FP8 quantized and loaded back, the engine's refusals word for word, and the rendered matrix.

The torch.compile trial is replaced by a stub row in the gate runs here (it has its own tests in
test_units.py and test_bundled.py); everything else runs as ``dockyard onboard`` runs it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dockyard.onboard import OnboardOptions, run_onboard
from dockyard.onboard.config_surgery import trial_config
from dockyard.onboard.context import GateContext, RealRun
from dockyard.onboard.gates import inspect as inspect_gate
from dockyard.onboard.gates.features import cuda_graph, fp8, parallel, torch_compile, trial_model
from dockyard.onboard.machine import detect_machine
from dockyard.spec import ModelSpec
from dockyard.weights.fp8_quantize import FP8_LOGITS_BOUND, fp8_quantization_config, quantize_fp8_blocks
from tests.onboard.test_units import LLAMA, TINY
from tests.shared_configs import shared_config

QWEN3_MOE = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 512,
             "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
             "rope_theta": 10000.0, "tie_word_embeddings": False, "moe_intermediate_size": 32, "num_experts": 8,
             "num_experts_per_tok": 2, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []}
ON_CPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU rows (a GPU is present)")


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: rank 0 and its worker share the CI machine's two cores."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _model_dir(tmp_path: Path, config: dict, name: str = "m") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _matrix(tmp_path: Path, config: dict, monkeypatch) -> tuple[dict[str, dict], Path]:
    """Onboard ``config`` (dummy weights, CPU) through inspect, fit and features; the rows by feature."""
    monkeypatch.setattr(torch_compile, "trial_row",
                        lambda ctx: trial_model.row("torch.compile", "not-run", "stubbed out in this test"))
    out = tmp_path / "out"
    run = run_onboard(OnboardOptions(model=str(_model_dir(tmp_path, config)), out=out, weights="dummy",
                                     device="cpu", skip=("equivalence", "dummy", "real", "capacity",
                                                         "serve-smoke")))
    assert run.gate("features").status == "pass", run.gate("features").summary
    return {row["feature"]: row for row in run.report["feature_matrix"]}, out


def _workdir(tmp_path: Path) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


def _context(tmp_path: Path, model: Path) -> GateContext:
    """A context as the inspect gate leaves it, for calling one trial directly."""
    from dockyard.onboard.gates.fit import serving_dtype

    ctx = GateContext(options=OnboardOptions(model=str(model), device="cpu"), machine=detect_machine("cpu", None),
                      out_dir=tmp_path / "out")
    assert inspect_gate.run(ctx).status == "pass"
    ctx.dtype = serving_dtype(ctx)
    return ctx


def _assert_identical_tokens(row: dict) -> None:
    ev = row["evidence"]
    assert ev["tokens_equal"] is True and ev["backend"] == "gloo" and ev["size"] == 2
    reference, parallel = ev["one_process"]["tokens"], ev["parallel"]["tokens"]
    assert parallel == reference and [len(t) for t in reference] == [trial_model.TRIAL_TOKENS] * 2
    assert len({tuple(t) for t in reference}) == 2  # two prompts, two different continuations


@ON_CPU
def test_dense_llama_rows(tmp_path, monkeypatch):
    matrix, out = _matrix(tmp_path, TINY, monkeypatch)
    tp = matrix["tensor parallel"]
    assert tp["status"] == "supported", tp["why"]
    assert tp["why"].startswith("TP=2 over gloo (cpu): 2 prompts × 8 greedy tokens identical to one process")
    _assert_identical_tokens(tp)
    assert tp["evidence"]["trial_model"]["kv_heads"] == 2  # as the real 4/2: KV heads split, not replicated
    assert matrix["expert parallel"]["status"] == "not-applicable"
    assert matrix["CUDA graph"]["status"] == "not-run" and matrix["CUDA graph"]["why"].startswith("needs a GPU")
    fp8 = matrix["FP8"]
    trial = fp8["evidence"]["trial"]
    assert fp8["status"] == "supported", fp8["why"]
    assert trial["path"] == "dequantized on load" and trial["fp8_tensors_in_memory"] == 0
    assert trial["quantized_weights"] == 2 * 7 and trial["weight_block_size"] == [128, 128]
    # This 2-layer Llama is as tolerant as the FP8 tests' one: their bound applies as it is.
    assert 0 < trial["rmse_ratio"] < FP8_LOGITS_BOUND <= trial["bound"]
    assert fp8["why"].endswith("the checkpoint itself is not FP8") and fp8["evidence"]["checkpoint"] is None
    md = (out / "report.md").read_text()
    assert "| tensor parallel | supported | TP=2 over gloo (cpu)" in md and "| FP8 | supported | FP8 trial" in md
    jsonschema = pytest.importorskip("jsonschema")
    from dockyard.onboard.report import load_schema

    jsonschema.validate(json.loads((out / "report.json").read_text()), load_schema())


@ON_CPU
def test_moe_rows_tp_and_ep(tmp_path, monkeypatch):
    """One KV head (replicated over both ranks) and 8 experts: 4 per rank under EP."""
    matrix, _ = _matrix(tmp_path, QWEN3_MOE, monkeypatch)
    for feature, mode in (("tensor parallel", "TP=2"), ("expert parallel", "EP=2")):
        row = matrix[feature]
        assert row["status"] == "supported", row["why"]
        assert row["why"].startswith(f"{mode} over gloo (cpu)")
        _assert_identical_tokens(row)
        assert row["evidence"]["expert_parallel"] is (feature == "expert parallel")
        assert row["evidence"]["trial_model"]["kv_heads"] == 1 and row["evidence"]["trial_model"]["experts"] == 4
    # Both compare with the same single-process run.
    assert matrix["tensor parallel"]["evidence"]["one_process"] == matrix["expert parallel"]["evidence"]["one_process"]
    assert matrix["FP8"]["status"] == "supported", matrix["FP8"]["why"]
    assert matrix["FP8"]["evidence"]["trial"]["rmse_ratio"] < matrix["FP8"]["evidence"]["trial"]["bound"]


def test_heads_that_do_not_split_are_unsupported_with_the_engines_words(tmp_path, monkeypatch):
    config = {**TINY, "num_attention_heads": 3, "num_key_value_heads": 3, "hidden_size": 48}
    matrix, _ = _matrix(tmp_path, config, monkeypatch)
    tp = matrix["tensor parallel"]
    assert tp["status"] == "unsupported"
    assert tp["why"].startswith("the engine cannot split this model over 2 ranks: num_attention_heads=3 is not "
                                "divisible by tensor_parallel_size=2")
    assert "one_process" not in tp["evidence"]  # refused before anything ran
    assert matrix["FP8"]["status"] == "supported"  # the other trials still ran


def test_moe_whose_experts_do_not_split(tmp_path):
    """3 experts cannot be placed over 2 ranks: refused by the engine's check, before anything runs."""
    ctx = _context(tmp_path, _model_dir(tmp_path, {**QWEN3_MOE, "num_experts": 3}))
    row = parallel.trial_row(ctx, None, "not needed", expert_parallel=True)
    assert row["status"] == "unsupported" and "num_experts=3 is not divisible" in row["why"], row["why"]


def test_trial_config_meets_the_real_split_case():
    """The shrunken head counts keep what matters for 2 ranks: KV heads fewer than the ranks or a multiple
    of them, query heads divisible, q width tied to hidden or not, the q/kv ratio."""
    for heads, kv, head_dim in ((32, 8, None), (14, 2, None), (32, 4, 128), (8, 1, None), (4, 1, None),
                                (16, 16, None), (64, 8, 64)):
        real = {**LLAMA, "num_attention_heads": heads, "num_key_value_heads": kv, "hidden_size": heads * 64}
        if head_dim is not None:  # q width (heads × head_dim) unlike the hidden size, as in Qwen3
            real.update(head_dim=head_dim, hidden_size=2048)
        cfg, notes = trial_config(real)
        small, big = ModelSpec.from_hf_config(cfg), ModelSpec.from_hf_config(real)
        assert cfg["architectures"] == LLAMA["architectures"] and small.vocab_size < big.vocab_size
        assert (small.num_key_value_heads < 2) == (kv < 2), (heads, kv, cfg)
        assert small.num_attention_heads % 2 == 0 and small.num_key_value_heads in (1, 2), (heads, kv, cfg)
        assert small.num_attention_heads // small.num_key_value_heads == heads // kv
        tied = big.num_attention_heads * big.head_dim == big.hidden_size
        assert (small.num_attention_heads * small.head_dim == small.hidden_size) == tied, (heads, kv, cfg)


def test_trial_config_of_qwen3_moe_splits_kv_heads_as_the_real_one():
    """Qwen3-30B-A3B: 32/4 heads (head_dim 128 over hidden 2048); the equivalence gate's shrink alone
    gives 8/1, which would replicate its one KV head instead of splitting four."""
    cfg, notes = trial_config(shared_config("Qwen--Qwen3-30B-A3B"))
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (16, 2)
    assert cfg["hidden_size"] != cfg["num_attention_heads"] * cfg["head_dim"]  # still decoupled
    assert any("KV heads split over 2 ranks, as the real 32/4 would be" in n for n in notes)


def test_fp8_with_misapplied_scales_fails_the_bound(tmp_path, monkeypatch):
    """Scales stored twice too large (every weight loads doubled): the logits leave the bound."""
    import dockyard.weights.fp8_quantize as fp8_quantize

    def doubled(weight, block):
        q, scale = quantize_fp8_blocks(weight, block)
        return q, scale * 2

    monkeypatch.setattr(fp8_quantize, "quantize_fp8_blocks", doubled)
    ctx = _context(tmp_path, _model_dir(tmp_path, TINY))
    trials = trial_model.Trials(ctx, _workdir(tmp_path))
    row = fp8.trial_row(ctx, trials, None)
    trial = row["evidence"]["trial"]
    assert row["status"] == "unsupported" and "NOT < bound" in row["why"], row["why"]
    assert trial["rmse_ratio"] > trial["bound"] and not trial["passed"]
    assert trial["bound"] < fp8.FP8_MAX_BOUND  # the noise control does not follow the broken quantizer


def _fp8_checkpoint(tmp_path: Path) -> Path:
    """TINY's dummy weights with every decoder projection stored as e4m3 with 128x128 block scales."""
    from dockyard import LLM

    llm = LLM(str(_model_dir(tmp_path, TINY, "dense") / "config.json"), load_format="dummy", dtype="float32",
              device="cpu", num_kv_blocks=8)
    tensors = {}
    for name, param in llm.model.named_parameters():
        if name.startswith("model.layers.") and name.endswith("_proj.weight"):
            tensors[name], tensors[name + "_scale_inv"] = quantize_fp8_blocks(param.detach())
        else:
            tensors[name] = param.detach().contiguous()
    folder = _model_dir(tmp_path, {**TINY, "quantization_config": fp8_quantization_config()}, "fp8")
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def test_fp8_checkpoint_adds_what_the_real_gate_showed(tmp_path):
    ctx = _context(tmp_path, _fp8_checkpoint(tmp_path))
    assert ctx.source.fp8 is not None and ctx.source.fp8.block == (128, 128)
    trials = trial_model.Trials(ctx, _workdir(tmp_path))
    ctx.real = RealRun(passed=True)
    row = fp8.trial_row(ctx, trials, None)
    assert row["status"] == "supported" and row["why"].startswith("FP8 trial (dequantized on load, float32)")
    assert row["why"].endswith("the real gate loaded this FP8 checkpoint (every weight paired with its scale) and "
                               "checked its output")
    assert row["evidence"]["checkpoint"] == {"weight_block_size": [128, 128], "loaded_and_checked": True}
    # Without the real gate's word, the trial alone speaks, and the row says the checkpoint was not checked.
    ctx.real = RealRun()
    row = fp8.trial_row(ctx, None, "no trial model")
    assert row["status"] == "not-run"
    assert row["why"] == ("FP8 trial could not be set up: no trial model; the real gate did not load and check this "
                          "FP8 checkpoint on this run (see its row)")


def test_parallel_tokens_that_differ_are_unsupported_naming_where(tmp_path, monkeypatch):
    """The row's verdict on a parallel run that decodes differently (the run itself faked: no worker)."""
    ctx = _context(tmp_path, _model_dir(tmp_path, TINY))
    trials = trial_model.Trials(ctx, _workdir(tmp_path))
    real_greedy = trials.greedy

    def greedy(device, dtype, observe=None, **engine):
        if engine.get("tensor_parallel_size", 1) == 1:
            return real_greedy(device, dtype, observe, **engine)
        tokens = [list(t) for t in trials.reference(device, dtype)["tokens"]]
        tokens[1][5] = (tokens[1][5] + 1) % trials.spec.vocab_size
        return {"tokens": tokens, "start_seconds": 0.0, "decode_seconds": 0.0}

    monkeypatch.setattr(trials, "greedy", greedy)
    row = parallel.trial_row(ctx, trials, None, expert_parallel=False)
    expected = trials.reference("cpu", torch.float32)["tokens"][1][5]
    assert row["status"] == "unsupported" and row["evidence"]["tokens_equal"] is False
    assert row["why"] == (f"TP=2 over gloo (cpu) decodes differently from one process: prompt 1, token 5: "
                          f"{expected} in one process, {(expected + 1) % 1000} at TP=2")


@pytest.mark.parametrize("captured", [True, False])
def test_cuda_graph_row_reads_the_runner(tmp_path, monkeypatch, captured):
    """The CUDA-graph row's logic, with the engine runs faked (no GPU here): captured graphs are compared
    with enforce_eager; a model the engine runs eagerly is unsupported with its eager_reason, on the ladder."""
    import dataclasses
    from types import SimpleNamespace

    ctx = _context(tmp_path, _model_dir(tmp_path, TINY))
    ctx.machine = dataclasses.replace(ctx.machine, device="cuda", num_gpus=1)
    trials = trial_model.Trials(ctx, _workdir(tmp_path))
    calls = []

    def greedy(device, dtype, observe=None, **engine):
        calls.append(engine)
        runner = SimpleNamespace(graphs=SimpleNamespace(graphs={4: "g", 1: "g", 2: "g"}) if captured else None,
                                 eager_reason=None if captured else "MoE routing reads per-expert token counts")
        seen = observe(SimpleNamespace(engine=SimpleNamespace(runner=runner))) if observe else {}
        return {"tokens": [[1, 2], [3, 4]], "start_seconds": 0.0, "decode_seconds": 0.0, **seen}

    monkeypatch.setattr(trials, "greedy", greedy)
    row = cuda_graph.trial_row(ctx, trials, None)
    if captured:
        assert calls == [{}, {"enforce_eager": True}]
        assert row["status"] == "supported" and row["why"].startswith("decode graphs captured (batch sizes [1, 2, 4])")
        assert row["evidence"]["tokens_equal"] is True and ctx.ladder == []
    else:
        assert calls == [{}]
        assert row["status"] == "unsupported" and row["why"].endswith("eagerly: MoE routing reads per-expert token "
                                                                      "counts")
        (entry,) = ctx.ladder
        assert entry["check"] == "CUDA graph" and [r["status"] for r in entry["rungs"]] == ["fail", "pass"]
