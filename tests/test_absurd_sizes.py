"""Absurd configs and models that cannot fit are refused from the memory plan, before anything loads.

The parameter count comes from one layer of each kind (``dockyard.memory.layer_kinds``); here it is
checked against the whole model built on the meta device, and refusals against the config's own
numbers, through the ``dockyard`` command as a user runs it.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from dockyard import LLM
from dockyard.cli import main
from dockyard.engine import memory_check
from dockyard.errors import InsufficientMemoryError
from dockyard.memory import plan_memory
from dockyard.registry import build_model
from dockyard.spec import ModelSpec
from tests.helpers import llama_parameters
from tests.shared_configs import shared_config

GiB = 1024**3


def _write(tmp_path: Path, config: dict, name: str = "m") -> Path:
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps(config))
    return path


def _full_build_count(spec: ModelSpec, dtype: torch.dtype) -> tuple[int, dict[str, int]]:
    """Parameters of the whole model built on meta: every layer instantiated."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = build_model(spec)
    finally:
        torch.set_default_dtype(previous)
    by_dtype: Counter[str] = Counter()
    numel = 0
    for p in model.parameters():
        numel += p.numel()
        by_dtype[str(p.dtype).removeprefix("torch.")] += p.numel() * p.element_size()
    return numel, dict(by_dtype)


# Real configs with more than one kind of layer (attention kind × dense/MoE), fused projections and
# tied embeddings; the expert counts of the MoE ones cut to 4 so the full build stays quick.
_KIND_CASES = {
    "gemma-3 sliding/full": ("google--gemma-3-1b-it", {}),
    "gpt-oss sliding/full + sinks": ("openai--gpt-oss-20b", {"num_local_experts": 4}),
    "deepseek dense then MoE, MLA": ("deepseek-ai--DeepSeek-V2-Lite", {"n_routed_experts": 4}),
    "qwen2-moe shared expert": ("Qwen--Qwen1.5-MoE-A2.7B-Chat", {"num_experts": 4}),
    "qwen3-moe interleaved dense": ("Qwen--Qwen3-30B-A3B", {"num_experts": 4, "decoder_sparse_step": 2,
                                                             "mlp_only_layers": [0, 5]}),
    "phi-3 fused": ("microsoft--Phi-3-mini-4k-instruct", {}),
    "llama tied": ("meta-llama--Llama-3.2-1B", {}),
}


@pytest.mark.parametrize("case", sorted(_KIND_CASES))
def test_count_from_one_layer_per_kind_equals_the_whole_model(case):
    name, changes = _KIND_CASES[case]
    config = {**shared_config(name), **changes}
    config["num_experts_per_tok"] = min(config.get("num_experts_per_tok", 1), 4)
    spec = ModelSpec.from_hf_config(config, name=name)
    plan = plan_memory(spec, torch.bfloat16)
    numel, by_dtype = _full_build_count(spec, torch.bfloat16)
    assert plan.num_parameters == numel
    assert plan.weight_bytes_by_dtype == by_dtype


def test_inspect_refuses_a_billion_layers_at_once(tmp_path, capsys):
    for name in ("meta-llama--Llama-3.1-8B", "google--gemma-3-1b-it"):  # gemma: per-layer kinds too
        path = _write(tmp_path, {**shared_config(name), "num_hidden_layers": 10**9}, name)
        t0 = time.perf_counter()
        assert main(["inspect", str(path)]) == 2
        assert time.perf_counter() - t0 < 10  # it answers instead of building layers
        err = capsys.readouterr().err
        assert "num_hidden_layers=1,000,000,000 is absurd" in err and "Traceback" not in err


def test_inspect_refuses_a_billion_layers_without_importing_torch(tmp_path):
    # The refusal comes from reading the config: the ~2 s torch import must not stand before it.
    path = _write(tmp_path, {**shared_config("google--gemma-3-1b-it"), "num_hidden_layers": 10**9})
    probe = ("import sys; from dockyard.cli import main; rc = main(['inspect', sys.argv[1]]); "
             "sys.exit(10 if 'torch' in sys.modules else rc)")
    proc = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr  # 10: torch was imported on the way
    assert "num_hidden_layers=1,000,000,000 is absurd" in proc.stderr and "Traceback" not in proc.stderr


def test_weights_no_deployment_holds_are_refused_with_the_plan(tmp_path, capsys):
    config = {**shared_config("meta-llama--Llama-3.1-405B"), "num_hidden_layers": 65_536}
    path = _write(tmp_path, config)
    assert main(["inspect", str(path), "--dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err
    expected = llama_parameters(config)
    assert f"{expected:,} parameters" in err, err
    assert f"{expected * 2 / 1024**4:,.0f} TiB at bfloat16" in err and "num_hidden_layers=65536" in err


def test_generate_refuses_before_allocating(tmp_path, capsys):
    path = _write(tmp_path, {**shared_config("meta-llama--Llama-3.1-8B"), "num_hidden_layers": 10**9})
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert main(["generate", "--model", str(path), "hi"]) == 2
    assert "num_hidden_layers=1,000,000,000" in capsys.readouterr().err
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 200 * 1024  # KiB: nothing was built


def test_a_model_larger_than_ram_is_refused_with_what_would_fit(tmp_path, capsys):
    # 405B parameters in float32 (the CPU's default dtype): 1.5 TiB, more than this machine's RAM.
    config = shared_config("meta-llama--Llama-3.1-405B")
    path = _write(tmp_path, config)
    t0 = time.perf_counter()
    assert main(["generate", "--model", str(path), "--device", "cpu", "hi"]) == 2
    assert time.perf_counter() - t0 < 30
    err = capsys.readouterr().err
    weights = llama_parameters(config) * 4 / GiB
    assert f"weights {weights:.2f} GiB" in err and "at float32" in err, err
    assert "--dtype bfloat16 needs" in err and "--skip-memory-check" in err and "MemAvailable" in err
    assert main(["serve", "--model", str(path), "--device", "cpu", "--port", "0"]) == 2
    assert "does not fit" in capsys.readouterr().err


def test_memory_check_counts_the_kv_pool_and_can_be_skipped(tmp_path, monkeypatch):
    path = _write(tmp_path, {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256,
                             "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                             "num_attention_heads": 2, "max_position_embeddings": 64})
    total, available = memory_check.ram_bytes()
    budget = available + GiB  # a KV pool larger than the free RAM
    with pytest.raises(InsufficientMemoryError, match="KV cache") as info:
        LLM(str(path), device="cpu", kv_cache_memory_bytes=budget)
    assert "kv_cache_memory_bytes" in str(info.value)
    # Forced past the check: a machine reporting 1 MiB free still loads a model that fits.
    monkeypatch.setattr(memory_check, "ram_bytes", lambda: (total, 1 << 20))
    with pytest.raises(InsufficientMemoryError):
        LLM(str(path), device="cpu", num_kv_blocks=4)
    llm = LLM(str(path), device="cpu", num_kv_blocks=4, skip_memory_check=True)
    assert len(llm.generate([[1, 2, 3]], use_tqdm=False)[0].outputs[0].token_ids) > 0


def test_a_draft_model_is_counted_and_one_that_does_not_fit_is_refused_by_name(tmp_path):
    """speculative_config draft_model: the draft's weights and its own KV cache count in the start-up check, so
    a draft too large for the machine is refused by name before anything loads; a small one shares the KV
    budget with the target (one block of each cache per block of the pool)."""
    tiny = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 256}
    target = _write(tmp_path, tiny, "target")
    big = _write(tmp_path, shared_config("meta-llama--Llama-3.1-405B"), "llama-405b-draft")
    kwargs = dict(load_format="dummy", device="cpu", dtype="bfloat16", kv_cache_memory_bytes=1 << 20)
    with pytest.raises(InsufficientMemoryError, match="draft model llama-405b-draft") as info:
        LLM(str(target), speculative_config={"method": "draft_model", "model": str(big), "num_speculative_tokens": 3},
            **kwargs)
    assert "a smaller draft model" in str(info.value) and "'ngram'" in str(info.value)
    alone = LLM(str(target), **kwargs)
    with_draft = LLM(str(target), speculative_config={"method": "draft_model", "model": str(target),
                                                      "num_speculative_tokens": 2}, **kwargs)
    blocks = with_draft.engine.block_manager.num_blocks
    assert blocks == alone.engine.block_manager.num_blocks // 2 > 0
    assert with_draft.engine.proposer.block_manager.num_blocks == blocks
