"""The generic path (dockyard.models.generic): transformers' own classes on dockyard's engine.

Every architecture of ``dockyard.generic_architectures`` against HF's eager reference (prefill logits and
chunked prefill + decode through the paged KV cache, fp32, ≤ 1e-5); the bundled SmolLM2 on both paths
(identical greedy tokens) and the engine's batching features on the generic one; remote code; refusals;
the path chosen for every published config of ../shared/configs; CUDA graphs: no host synchronization in the
generic decode forward (CPU, every architecture), capture and eager tokens, a failed capture's fallback (GPU).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from dockyard import LLM, SamplingParams
from dockyard.errors import DockyardError, UnsupportedArchitectureError, WeightsError
from dockyard.generic_architectures import GENERIC_EXAMPLES, TINY_SIZES, tiny_config
from dockyard.model_impl import RemoteCodeError, choose_model_impl
from dockyard.models.generic import TransformersForCausalLM
from dockyard.onboard.equivalence import check_equivalence
from dockyard.ops.attention import Attention
from tests.engine.test_engine import make_engine, prompts_of_varied_length, run
from tests.shared_configs import CONFIGS_DIR

REMOTE_CODE = Path(__file__).parent.parent / "data" / "remote_code"


@pytest.mark.parametrize("model_type", sorted(GENERIC_EXAMPLES))
def test_architecture_matches_hf_on_the_generic_path(model_type):
    config = tiny_config(model_type)
    config["architectures"] = None  # as a bare config class gives it: the path must not need it
    result = check_equivalence(config, model_impl="transformers")
    assert result.status == "pass", result.reason
    assert result.path == "transformers"
    assert [lv.level for lv in result.levels] == ["model", "decode", "decode"]
    assert all(lv.rel_err is not None and lv.rel_err <= 1e-5 for lv in result.levels)


@pytest.fixture(scope="module")
def generic_llm():
    return LLM(device="cpu", model_impl="transformers")


GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


def test_bundled_model_gives_the_native_paths_greedy_tokens(bundled_llm, generic_llm):
    assert type(generic_llm.model).__name__ == "TransformersForCausalLM"
    assert generic_llm.spec.model_impl == "transformers" and bundled_llm.spec.model_impl == "dockyard"
    prompts = prompts_of_varied_length(bundled_llm, 3)
    native = run(make_engine(bundled_llm, max_num_seqs=3), prompts, GREEDY)
    assert run(make_engine(generic_llm, max_num_seqs=3), prompts, GREEDY) == native


@pytest.fixture(scope="module")
def tiny_generic(tmp_path_factory):
    """A tiny GPT-NeoX (no dockyard family) on the generic path, and its HF reference."""
    directory = tmp_path_factory.mktemp("gpt-neox")
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt_neox", **TINY_SIZES)).eval()
    reference.save_pretrained(directory)
    return LLM(directory, device="cpu", num_kv_blocks=256), reference


def test_generic_path_under_batching_chunked_prefill_preemption_and_prefix_caching(tiny_generic):
    llm, reference = tiny_generic
    assert llm.spec.model_impl == "transformers"
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (70, 23, 41, 88, 9, 56)]
    alone = [_greedy_hf(reference, p, GREEDY.max_tokens) for p in prompts]
    assert run(make_engine(llm, max_num_seqs=6), prompts, GREEDY) == alone
    chunked = make_engine(llm, max_num_batched_tokens=24, max_num_seqs=3)
    assert run(chunked, prompts, GREEDY) == alone
    need = sum(len(p) + GREEDY.max_tokens for p in prompts)
    small = make_engine(llm, num_blocks=need // 16 // 3, enable_prefix_caching=False)
    assert run(small, prompts, GREEDY) == alone
    assert small.scheduler.num_preemptions > 0
    cached = make_engine(llm)
    run(cached, [prompts[3]], GREEDY)
    shared = prompts[3][:64] + prompts[0][:8]
    assert run(cached, [shared], GREEDY) == [_greedy_hf(reference, shared, GREEDY.max_tokens)]
    assert cached.block_manager.prefix_hits >= 48


def _save_tiny_llama(directory: Path) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(**TINY_SIZES, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(directory)
    return model


def _greedy_hf(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        return model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)[0, len(prompt):].tolist()


def test_remote_code_runs_with_the_flag_and_its_file_and_is_refused_otherwise(tmp_path):
    model_dir = tmp_path / "tiny-remote"
    reference = _save_tiny_llama(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config.update(model_type="tiny_remote", architectures=["TinyRemoteForCausalLM"], auto_map={
        "AutoConfig": "configuration_tiny_remote.TinyRemoteConfig",
        "AutoModelForCausalLM": "modeling_tiny_remote.TinyRemoteForCausalLM"})
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(RemoteCodeError, match=r"modeling_tiny_remote\.py.*--trust-remote-code"):
        LLM(model_dir, device="cpu")
    with pytest.raises(RemoteCodeError, match=r"modeling_tiny_remote\.py is not in"):
        LLM(model_dir, device="cpu", trust_remote_code=True)  # its files are not there yet
    for f in REMOTE_CODE.glob("*.py"):
        shutil.copy(f, model_dir)
    llm = LLM(model_dir, device="cpu", trust_remote_code=True, num_kv_blocks=32)
    assert "remote code" in llm.source.impl_reason
    assert type(llm.model.hf).__name__ == "TinyRemoteForCausalLM"
    prompt = list(range(5, 25))
    out = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    assert out[0].outputs[0].token_ids == _greedy_hf(reference, prompt, 8)
    with pytest.raises(RemoteCodeError, match=r"modeling_tiny_remote\.py is not in .*config\.json alone"):
        LLM(model_dir / "config.json", device="cpu", trust_remote_code=True)


def test_refusals_name_what_the_generic_path_cannot_do(tmp_path):
    stablelm = AutoConfig.for_model("stablelm", **TINY_SIZES)
    AutoModelForCausalLM.from_config(stablelm).save_pretrained(tmp_path / "stablelm")
    with pytest.raises(UnsupportedArchitectureError, match="StableLmForCausalLM.*attention interface"):
        LLM(tmp_path / "stablelm", device="cpu", model_impl="transformers")
    # (its class's default token ids lie outside the tiny vocabulary, which generation_config.json would carry)
    olmoe = AutoConfig.for_model("olmoe", **TINY_SIZES, num_experts=4, num_experts_per_tok=2, eos_token_id=2,
                                 pad_token_id=1)
    AutoModelForCausalLM.from_config(olmoe).save_pretrained(tmp_path / "olmoe")  # per-expert tensors on disk
    with pytest.raises(WeightsError, match="experts.0.down_proj.weight needs transformers' conversion"):
        LLM(tmp_path / "olmoe", device="cpu")
    _save_tiny_llama(tmp_path / "llama")
    with pytest.raises(DockyardError, match="generic .*no tensor or expert parallelism"):
        LLM(tmp_path / "llama", device="cpu", model_impl="transformers", tensor_parallel_size=2)
    with pytest.raises(DockyardError, match="model_impl='vllm' is not one of auto, dockyard, transformers"):
        LLM(tmp_path / "llama", device="cpu", model_impl="vllm")


# Where the path decision is not simply "native": published configs worth naming.
EXPECTED_PATHS = {
    "microsoft--Phi-3.5-MoE-instruct": "transformers",  # PhiMoE: no dockyard family, transformers has one
    "internlm--internlm2-7b": "modeling_internlm2.py",  # remote code, modeling file not shipped here
    "THUDM--glm-4-9b": "modeling_chatglm.py",
    "microsoft--Phi-3-small-8k-instruct": "modeling_phi3_small.py",
    "meta-llama--Llama-3.1-8B": "dockyard",
    "openai--gpt-oss-20b": "dockyard",
}


def test_every_published_config_gets_a_path_or_a_refusal_that_says_what_to_do():
    decisions = {}
    for directory in sorted(p for p in CONFIGS_DIR.iterdir() if (p / "config.json").exists()):
        config = json.loads((directory / "config.json").read_text())
        try:
            decisions[directory.name] = choose_model_impl(config, "auto", directory).impl
        except RemoteCodeError as exc:
            assert "--trust-remote-code" in str(exc)
            decisions[directory.name] = str(exc).split(" runs ")[1].split()[0]
        except UnsupportedArchitectureError as exc:  # neither a family, transformers, nor code to run
            assert "model_type" in str(exc) and "auto_map" in str(exc)
            decisions[directory.name] = "refused"
    assert len(decisions) == 51
    assert {k: decisions[k] for k in EXPECTED_PATHS} == EXPECTED_PATHS
    assert decisions["openbmb--MiniCPM-2B-sft-bf16"] == "refused"  # this copy of its config has no auto_map


def test_onboarding_runs_its_gates_on_the_generic_path(tiny_generic, tmp_path):
    from dockyard.onboard import OnboardOptions, run_onboard

    llm, _ = tiny_generic
    run = run_onboard(OnboardOptions(model=str(llm.source.path), out=tmp_path / "out", weights="dummy",
                                     device="cpu", skip=("features", "performance")))
    assert run.report["path"]["impl"] == "transformers"
    assert "GPTNeoXForCausalLM" in run.report["path"]["reason"]
    inspect, equivalence = run.gate("inspect"), run.gate("equivalence")
    assert inspect.status == "pass" and "generic path" in inspect.summary
    assert inspect.evidence["missing_features"]  # what a native family would still need is listed
    assert equivalence.status == "pass" and equivalence.evidence["path"] == "transformers"
    assert run.gate("dummy").status == "pass" and run.gate("capacity").status == "pass"
    assert run.report["overall"]["verdict"] == "PASS-PARTIAL"  # real and features not run: named, not claimed
    jsonschema = pytest.importorskip("jsonschema")
    from dockyard.onboard.report import load_schema

    jsonschema.validate(run.report, load_schema())


@pytest.mark.skipif(not CONFIGS_DIR.is_dir(), reason="../shared/configs is not present")
def test_onboarding_remote_code_without_its_file_ends_in_a_report_naming_file_and_flag(tmp_path):
    from dockyard.onboard import OnboardOptions, run_onboard

    model = str(CONFIGS_DIR / "internlm--internlm2-7b")
    for trust, needle in ((False, "pass --trust-remote-code"), (True, "modeling_internlm2.py is not in")):
        run = run_onboard(OnboardOptions(model=model, out=tmp_path / str(trust), weights="dummy", device="cpu",
                                         trust_remote_code=trust))
        inspect = run.gate("inspect")
        assert inspect.status == "fail" and "modeling_internlm2.py" in inspect.summary and needle in inspect.summary
        assert run.report["path"]["impl"] is None and run.report["overall"]["verdict"] == "FAIL"


def test_sizes_under_a_config_class_own_names_are_read_and_resized_through_transformers():
    from dockyard.model_impl import with_standard_names
    from dockyard.models.generic import build_transformers_config, generic_spec

    config = tiny_config("gpt2")  # GPT-2 keeps n_layer, n_embd, n_head, n_positions, n_inner
    config.pop("n_inner")  # None: 4 × hidden, whatever a stray intermediate_size says
    assert {"n_layer", "n_embd"} <= set(config) and "num_hidden_layers" not in config
    standard = with_standard_names(config)
    assert standard["num_hidden_layers"] == config["n_layer"] and "n_layer" not in standard
    assert AutoConfig.for_model("gpt2", **{k: v for k, v in standard.items() if k != "model_type"}).n_layer == 2
    spec = generic_spec(config, "gpt2-tiny")
    assert (spec.num_hidden_layers, spec.hidden_size, spec.head_dim, spec.intermediate_size) == (2, 64, 16, 256)
    reduced = build_transformers_config(spec.replace(num_hidden_layers=1, vocab_size=500, intermediate_size=96))
    assert (reduced.n_layer, reduced.vocab_size, reduced.n_inner) == (1, 500, 96)


# Operators that make the host wait for the device (on CUDA they fail a graph capture); on a CPU torch still
# dispatches them, so a decode forward that would synchronize shows it here. (``tolist`` and ``.cpu()`` dispatch
# nothing on a CPU: those only the GPU test's capture finds.)
_HOST_SYNC_OPS = ("aten::item", "aten::is_nonzero", "aten::_local_scalar_dense", "aten::nonzero",
                  "aten::masked_select", "aten::_unique2", "aten::unique_consecutive")


class _HostSyncs(TorchDispatchMode):
    """Records the host-synchronizing operators dispatched while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in _HOST_SYNC_OPS:
            self.seen.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def _decode_host_syncs(llm: LLM) -> tuple[int, list[str]]:
    """(decode-only forwards run, host-synchronizing operators they dispatched) over a short batched generation."""
    mode, calls = _HostSyncs(), [0]
    forward = llm.model.forward

    def watched(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        metadata = Attention.current_metadata()
        if metadata is None or not metadata.is_decode_only:
            return forward(input_ids, positions)
        calls[0] += 1
        with mode:
            return forward(input_ids, positions)

    llm.model.forward = watched
    try:
        llm.generate([[1, 2, 3, 4, 5], [7, 8, 9]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                     use_tqdm=False)
    finally:
        del llm.model.forward
    return calls[0], mode.seen


def _tiny_config_file(model_type: str, directory: Path) -> Path:
    """config.json of a tiny ``model_type`` in ``directory`` (Llama too: it runs on the generic path when asked)."""
    config = (AutoConfig.for_model("llama", **TINY_SIZES, num_key_value_heads=2).to_dict() if model_type == "llama"
              else tiny_config(model_type))
    config["architectures"] = None
    (directory / "config.json").write_text(json.dumps(config))
    return directory / "config.json"


@pytest.mark.parametrize("model_type", ["llama", *sorted(GENERIC_EXAMPLES)])
def test_generic_decode_forward_makes_no_host_synchronization(model_type, tmp_path):
    """What CUDA graph capture needs of the HF modules, checked on the CPU for every architecture shown on the
    generic path (the GPU tests capture some of them)."""
    llm = LLM(_tiny_config_file(model_type, tmp_path), load_format="dummy", device="cpu", num_kv_blocks=32,
              model_impl="transformers")
    assert getattr(llm.model, "capture_by_trial", False) and getattr(llm.model, "cuda_graph_blocker", None) is None
    calls, seen = _decode_host_syncs(llm)
    assert calls == 3 and seen == []
    if model_type == "llama":  # the check sees a synchronization where there is one
        norm = llm.model.hf.model.norm
        norm.forward = lambda x, _f=norm.forward: _f(x) * (1.0 if x.abs().max().item() >= 0 else 0.0)
        assert len(_decode_host_syncs(llm)[1]) == 3


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
GPU_KWARGS = dict(load_format="dummy", device="cuda", dtype="float32", max_num_seqs=8, seed=3, num_kv_blocks=256,
                  model_impl="transformers")


def _greedy_tokens_equal(a: LLM, b: LLM) -> None:
    """Greedy tokens of a padded batch (5 sequences replay the graph of 8) and of a lone sequence: a == b."""
    rng = random.Random(0)
    prompts = [[rng.randrange(a.spec.vocab_size) for _ in range(n)] for n in (5, 17, 40, 3, 90)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    for batch in (prompts, prompts[2:3]):
        assert ([o.outputs[0].token_ids for o in a.generate(batch, params, use_tqdm=False)]
                == [o.outputs[0].token_ids for o in b.generate(batch, params, use_tqdm=False)])


@needs_cuda
@pytest.mark.parametrize("model_type", ["llama", "gpt_neox", "gpt2", "cohere2", "gemma", "granitemoe"])
def test_generic_graphs_give_the_eager_tokens(model_type, tmp_path):
    """The generic path captures its decode steps (HF's modules in the graph) and replays eager mode's tokens."""
    path = _tiny_config_file(model_type, tmp_path)
    graphs = LLM(path, **GPU_KWARGS)
    runner = graphs.engine.runner
    if model_type == "granitemoe" and runner.graphs is None:  # HF's expert code may synchronize: said, not hidden
        assert runner.eager_reason.startswith("capturing the decode forward of TransformersForCausalLM failed")
    else:
        assert runner.graphs is not None, runner.eager_reason
    _greedy_tokens_equal(graphs, LLM(path, enforce_eager=True, **GPU_KWARGS))


@needs_cuda
def test_generic_capture_that_fails_leaves_decode_eager_with_its_reason(tmp_path, monkeypatch):
    """A forward that reads a device value on the host (as dynamic rotary reads the largest position) cannot be
    captured: the engine decodes eagerly, says why, and gives eager mode's tokens."""
    path = _tiny_config_file("llama", tmp_path)
    forward = TransformersForCausalLM.forward

    def synchronizing(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if int(positions.max()) >= 1 << 40:
            raise AssertionError("unreachable")
        return forward(self, input_ids, positions)

    monkeypatch.setattr(TransformersForCausalLM, "forward", synchronizing)
    llm = LLM(path, **GPU_KWARGS)
    runner = llm.engine.runner
    assert runner.graphs is None
    assert runner.eager_reason.startswith("capturing the decode forward of TransformersForCausalLM failed")
    _greedy_tokens_equal(llm, LLM(path, enforce_eager=True, **GPU_KWARGS))
