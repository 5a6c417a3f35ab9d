"""Tensor and expert parallelism on the CPU with gloo: the same greedy tokens as one process.

Each parallel LLM is rank 0 in this process plus one spawned worker; dummy weights are drawn at
the full shapes and sliced, so TP = 1 and TP = 2 run the same model. float32 throughout.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import save_file

from dockyard import LLM, SamplingParams
from dockyard.distributed.parallel_state import destroy_parallel, init_parallel
from dockyard.distributed.sharding import check_parallel_config, shard_model, shard_weights
from dockyard.errors import ConfigError, DockyardError
from dockyard.ports import free_port
from dockyard.registry import build_model
from dockyard.spec import ModelSpec
from dockyard.weights.loader import load_weights

VOCAB = 301  # odd: the last vocabulary slice is padded
BASE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": VOCAB, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float32"}
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **BASE}
QWEN3_MOE = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", **BASE,
             "moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": True,
             "decoder_sparse_step": 1, "mlp_only_layers": []}
QWEN2_MOE = {**QWEN3_MOE, "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
             "shared_expert_intermediate_size": 64, "norm_topk_prob": False}


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread per process: rank 0 and its worker share the few CPU cores (with two
    threads each, oversubscribed cores make every small matmul ~100× slower)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _write(tmp_path, config: dict, name: str = "m") -> str:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    return str(d / "config.json")


def _greedy(model: str, tp: int = 1, ep: bool = False, save_to: Path | None = None) -> list[list[int]]:
    """Greedy tokens of 3 prompts × 16; ``save_to``: also write the model's weights there as safetensors."""
    rng = random.Random(0)
    prompts = [[rng.randrange(VOCAB) for _ in range(n)] for n in (5, 11, 3)]
    llm = LLM(model, load_format="auto" if save_to is None and Path(model).is_dir() else "dummy", dtype="float32",
              device="cpu", seed=1, num_kv_blocks=32, max_num_seqs=4, tensor_parallel_size=tp,
              enable_expert_parallel=ep)
    try:
        assert llm.source.kind == ("safetensors" if Path(model).is_dir() else "dummy")
        if save_to is not None:
            save_file({n: p.detach().contiguous() for n, p in llm.model.named_parameters()},
                      str(save_to / "model.safetensors"))
        params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        llm.shutdown()


def test_llama_tp2_equals_tp1(tmp_path):
    """Tied embeddings: the vocab-parallel embedding and LM head share one slice."""
    model = _write(tmp_path, {**LLAMA, "tie_word_embeddings": True})
    reference = _greedy(model)
    assert all(len(t) == 16 for t in reference) and len({tuple(t) for t in reference}) == 3
    assert _greedy(model, tp=2) == reference


def test_llama_fewer_kv_heads_than_ranks_from_safetensors(tmp_path):
    """num_key_value_heads=1 over 2 ranks (the KV head replicated), weights read lazily from safetensors
    (each rank takes its slices through get_slice)."""
    model = _write(tmp_path, {**LLAMA, "num_key_value_heads": 1})
    checkpoint = Path(model).parent
    reference = _greedy(model, save_to=checkpoint)
    assert _greedy(str(checkpoint), tp=2) == reference


def _prompt_logprobs(model: str, tp: int) -> list[tuple[list[int], list, list]]:
    """Sampled tokens, sample logprobs and prompt logprobs of 2 prompts (the longer one computed in two
    chunked-prefill steps)."""
    rng = random.Random(1)
    prompts = [[rng.randrange(VOCAB) for _ in range(n)] for n in (9, 40)]
    llm = LLM(model, load_format="dummy", dtype="float32", device="cpu", seed=1, num_kv_blocks=32, max_num_seqs=4,
              max_num_batched_tokens=32, tensor_parallel_size=tp)
    try:
        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=2, prompt_logprobs=3)
        return [(o.outputs[0].token_ids, o.outputs[0].logprobs, o.prompt_logprobs)
                for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        llm.shutdown()


def test_prompt_logprobs_tp2_equal_tp1(tmp_path):
    """Prompt-logprob rows go through the same broadcast step as the sampled rows: every rank computes
    their logits (an all-gather of the vocabulary slices); rank 0's log-softmax and top-k match one process."""
    model = _write(tmp_path, LLAMA)
    reference, got = _prompt_logprobs(model, 1), _prompt_logprobs(model, 2)
    for (ref_ids, ref_lps, ref_prompt), (ids, lps, prompt) in zip(reference, got, strict=True):
        assert ids == ref_ids
        assert len(prompt) == len(ref_prompt) and prompt[0] is None and ref_prompt[0] is None
        for entry, ref_entry in zip(prompt[1:] + lps, ref_prompt[1:] + ref_lps, strict=True):
            assert len(ref_entry) >= 2 and entry.keys() == ref_entry.keys()
            torch.testing.assert_close(torch.tensor([entry[t] for t in ref_entry]),
                                       torch.tensor(list(ref_entry.values())), rtol=1e-4, atol=1e-5)


def test_moe_tp2_and_ep2_equal_tp1(tmp_path):
    model = _write(tmp_path, QWEN3_MOE)
    reference = _greedy(model)
    assert _greedy(model, tp=2) == reference
    assert _greedy(model, tp=2, ep=True) == reference


def _block_rank(rank: int, world: int, port: int, configs: list[dict]) -> None:
    """On each rank: a full MoE block's output, then the same block expert-parallel and tensor-parallel
    (weights sliced from the full ones by the sharding loader) must give it again."""
    torch.set_num_threads(1)
    init_parallel(rank, world, "cpu", f"tcp://127.0.0.1:{port}")
    try:
        for config in configs:
            for expert_parallel in (True, False):
                torch.manual_seed(0)  # the same full model on every rank
                model = build_model(ModelSpec.from_hf_config(config))
                full = {n: p.detach().clone() for n, p in model.named_parameters()}
                x = torch.randn(40, config["hidden_size"])
                with torch.inference_mode():
                    expected = model.model.layers[0].mlp(x)
                shard_model(model, rank, world, expert_parallel=expert_parallel)
                load_weights(model, shard_weights(model, full.items()))
                block = model.model.layers[0].mlp
                if expert_parallel:
                    assert block.experts.num_experts == 4 // world
                else:
                    assert block.experts[0].gate_proj.out_features == 32 // world
                with torch.inference_mode():
                    got = block(x)
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    finally:
        destroy_parallel()


def test_ep2_and_tp2_moe_block_equal_single_process():
    """Qwen3-MoE's block and Qwen2-MoE's (with its gated shared expert, split in both modes)."""
    mp.spawn(_block_rank, args=(2, free_port(), [QWEN3_MOE, QWEN2_MOE]), nprocs=2)


def test_kv_head_mapping_keeps_q_heads_with_their_kv_head():
    """Every rank's q heads attend with the KV head the rank holds (H=8, K=2 over N=4; K=2 over N=2)."""
    for heads, kv, n in ((8, 2, 4), (8, 2, 2), (4, 1, 2), (8, 8, 4)):
        spec = ModelSpec.from_hf_config({**LLAMA, "num_attention_heads": heads, "num_key_value_heads": kv,
                                      "hidden_size": 128})
        for r in range(n):
            model = build_model(spec)
            plan = shard_model(model, r, n)
            q = plan.slices["model.layers.0.self_attn.q_proj.weight"]
            k = plan.slices["model.layers.0.self_attn.k_proj.weight"]
            q_heads = range(q.start // 16, q.stop // 16)
            kv_heads = range(k.start // 16, k.stop // 16)
            assert all(h // (heads // kv) in kv_heads for h in q_heads), (heads, kv, n, r)
            assert model.model.layers[0].self_attn.attn.num_kv_heads == len(kv_heads)


@pytest.mark.parametrize(("heads", "kv", "tp", "words"), [
    (6, 2, 4, "num_attention_heads=6 is not divisible by tensor_parallel_size=4"),
    (6, 3, 2, "num_key_value_heads=3 is not divisible by tensor_parallel_size=2"),
    (6, 2, 3, "tensor_parallel_size=3 is not a multiple of num_key_value_heads=2"),
])
def test_indivisible_heads_rejected(tmp_path, heads, kv, tp, words):
    config = {**LLAMA, "num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": 132}
    with pytest.raises(ConfigError, match=words):
        check_parallel_config(ModelSpec.from_hf_config(config), tp)
    if tp == 4:  # through the LLM: refused before any worker starts
        with pytest.raises(ConfigError, match=words):
            LLM(_write(tmp_path, config), load_format="dummy", device="cpu", tensor_parallel_size=tp)


def test_serve_passes_parallel_flags(monkeypatch):
    """`dockyard serve --tensor-parallel-size 2 --enable-expert-parallel` reaches LLM(...)."""
    import dockyard.server.app as app
    from dockyard.cli import build_parser

    seen = {}

    def fake_llm(model, **kwargs):
        seen.update(kwargs)
        raise ConfigError("stop here")

    monkeypatch.setattr(app, "LLM", fake_llm)
    args = build_parser().parse_args(["serve", "--model", "x", "--port", "0", "--tensor-parallel-size", "2",
                                      "--enable-expert-parallel"])
    with pytest.raises(ConfigError, match="stop here"):
        app.serve(args)
    assert seen["tensor_parallel_size"] == 2 and seen["enable_expert_parallel"] is True


def test_torchrun_ranks_take_the_servers_engine_args(monkeypatch):
    """Under torchrun, ranks ≥ 1 of `dockyard serve` build their shard from the same EngineArgs as rank 0: the
    model-source flags (a repo id's --revision) reach the worker's model resolution."""
    import dockyard.distributed.worker as worker
    import dockyard.server.app as app
    from dockyard.cli import build_parser

    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    resolved = {}

    def fake_resolve(model, load_format, **kwargs):
        resolved.update(model=model, load_format=load_format, **kwargs)
        raise ConfigError("stop here")

    monkeypatch.setattr(worker, "init_parallel", lambda *a, **k: None)
    monkeypatch.setattr(worker, "destroy_parallel", lambda: None)
    monkeypatch.setattr(worker, "resolve_model", fake_resolve)
    args = build_parser().parse_args(["serve", "org/model", "--revision", "abc123", "--download-dir", "/cache",
                                      "--load-format", "dummy", "--device", "cpu", "-tp", "2"])
    with pytest.raises(ConfigError, match="stop here"):
        app.serve(args)
    assert resolved == {"model": "org/model", "load_format": "dummy", "revision": "abc123", "download_dir": "/cache",
                        "tokenizer": None, "generation_config": "auto", "trust_remote_code": False,
                        "model_impl": "dockyard"}


def test_worker_failing_at_start_up_fails_the_llm_at_once(tmp_path, monkeypatch):
    """A worker that dies loading (here: its model path is wrong) is reported by name and exit code,
    instead of rank 0 waiting out the collective's timeout."""
    import dockyard.distributed.executor as executor

    start = executor.WorkerGroup.__init__
    monkeypatch.setattr(executor.WorkerGroup, "__init__", lambda self, configs: start(
        self, [dataclasses.replace(c, engine_args=dataclasses.replace(c.engine_args, model=str(tmp_path / "missing")))
               for c in configs]))
    model = _write(tmp_path, LLAMA)
    with pytest.raises(DockyardError, match=r"worker dockyard-tp1 exited \(code 1\)"):
        LLM(model, load_format="dummy", device="cpu", num_kv_blocks=8, tensor_parallel_size=2)
    monkeypatch.undo()
    # The group is gone: a new parallel LLM can form its own.
    assert [len(t) for t in _greedy(model, tp=2)] == [16, 16, 16]


def _worker_failing_slowly(cfg) -> None:
    """A rank that joins the group, leaves it (rank 0's next collective fails) and takes seconds to exit."""
    import sys
    import time

    init_parallel(cfg.rank, cfg.world_size, torch.device("cpu"), cfg.init_method)
    destroy_parallel()
    time.sleep(6)  # longer than the fixed wait rank 0 used to allow
    sys.exit(1)


def test_worker_dying_slowly_is_still_named(tmp_path, monkeypatch):
    """The collective fails on rank 0 well before the worker's process has exited: rank 0 still names it
    (it waits for the exit, not a fixed time)."""
    import dockyard.distributed.worker as worker

    monkeypatch.setattr(worker, "worker_main", _worker_failing_slowly)
    model = _write(tmp_path, LLAMA)
    with pytest.raises(DockyardError, match=r"worker dockyard-tp1 exited \(code 1\)"):
        LLM(model, load_format="dummy", device="cpu", num_kv_blocks=8, tensor_parallel_size=2)


_STDIN_SCRIPT = """
import json, random, sys, torch
from dockyard import LLM, SamplingParams
torch.set_num_threads(1)
rng = random.Random(0)
prompts = [[rng.randrange(VOCAB) for _ in range(n)] for n in (5, 11, 3)]
out = {}
for tp in (1, 2):  # no __main__ guard: the workers must not run this script again
    llm = LLM(MODEL, load_format="dummy", dtype="float32", device="cpu", seed=1, num_kv_blocks=32,
              max_num_seqs=4, tensor_parallel_size=tp)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    out[tp] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    llm.shutdown()
print(json.dumps(out))
"""


def test_tensor_parallel_from_a_script_read_on_stdin(tmp_path):
    """``python - <<EOF``: the main module is no file, and spawned workers must not try to re-run it."""
    import os
    import subprocess
    import sys

    model = _write(tmp_path, LLAMA)
    script = f"VOCAB = {VOCAB}\nMODEL = {model!r}\n" + _STDIN_SCRIPT
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True, timeout=300,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["2"] == out["1"] and [len(t) for t in out["1"]] == [16, 16, 16]
