"""Speculative decoding with DeepSeek-V3's MTP layer, on the real V3 config shrunk (MLA, grouped MoE routing,
one MTP layer kept) with dummy weights in float32.

* The layer computes what the checkpoint means: its logits equal a float64 computation built from
  transformers' own ``DeepseekV3DecoderLayer`` (given the MTP layer's weights) plus enorm / hnorm / eh_proj /
  shared_head written here with torch ops; and the proposer's guesses inside the engine (paged cache, hidden
  states handed over from the target's forwards, recursion for k > 1, rolled back after rejections) are that
  computation's argmax on the target's own hidden states.
* Greedy output with MTP (k = 1 and k = 3) is token-for-token that of plain decoding, on 20 prompts x 128
  tokens at batch 16 (prefills and sequences at their length limit mixed with verify rows) and on 3 of them
  at batch 1;
  EOS, stop token ids, stop strings and max_tokens end where they do without it.
* Loading: the MTP tensors of a safetensors checkpoint go to the MTP layer (the target ignores them), a
  missing one is named; a model without MTP layers is refused by name.
"""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from dockyard import LLM, SamplingParams
from dockyard.engine.llm_engine import EngineConfig, LLMEngine
from dockyard.engine.mtp import MTPProposer
from dockyard.engine.outputs import RequestOutput
from dockyard.engine.speculative_config import SpeculativeConfig
from dockyard.errors import ConfigError, WeightsError
from dockyard.model_loader import load_mtp
from dockyard.onboard.config_surgery import shrink_config, with_layers
from dockyard.onboard.mtp_reference import MTPReference
from dockyard.ops.mla import MLAAttention
from dockyard.ops.moe import SparseMoeBlock
from tests.helpers import rel_rmse
from tests.shared_configs import shared_config

NUM_PROMPTS, MAX_TOKENS = 20, 128
# Batch 1 costs a target step and k MTP steps per emitted token, one sequence at a time: three of the prompts.
BATCH_1_PROMPTS = 3
NUM_BLOCKS, BLOCK_SIZE = 512, 16


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    """The shrunken DeepSeek-V3 (its config.json in a folder), the target loaded with dummy weights, 20 prompts."""
    # Two decoder layers (one dense, one MoE) keep every kind of layer the shrunken config has, at half the cost.
    cfg, _ = shrink_config(shared_config("deepseek-ai--DeepSeek-V3"))
    cfg = with_layers({**cfg, "architectures": ["DeepseekV3ForCausalLM"]}, 2)
    assert cfg["num_nextn_predict_layers"] == 1 and cfg["kv_lora_rank"] and cfg["n_routed_experts"]
    folder = tmp_path_factory.mktemp("v3") / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    llm = LLM(str(folder), load_format="dummy", dtype="float32", device="cpu", model_impl="dockyard",
              num_kv_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, max_model_len=512)
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 60, (NUM_PROMPTS,), generator=gen).tolist()
    prompts = [torch.randint(2, cfg["vocab_size"], (n,), generator=gen).tolist() for n in lengths]
    return SimpleNamespace(cfg=cfg, folder=folder, llm=llm, spec=llm.spec, prompts=prompts)


def make_engine(v3, k: int | None, max_num_seqs: int = 16, tokenizer=None, spec=None,
                num_blocks: int = NUM_BLOCKS, llm: LLM | None = None) -> LLMEngine:
    """An engine on the shared target (or ``llm``'s): plain (k None) or with an MTP proposer of its own."""
    llm = llm or v3.llm
    proposer = None
    if k is not None:
        mtp = load_mtp(llm.source, llm.model, llm.device, llm.dtype)
        proposer = MTPProposer(mtp, num_blocks, BLOCK_SIZE, llm.device, llm.dtype, max_num_seqs, 512)
    config = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=128, block_size=BLOCK_SIZE,
                          speculative_config=None if k is None else SpeculativeConfig("mtp", k))
    return LLMEngine(llm.model, spec or v3.spec, tokenizer, config, llm.device, llm.dtype, num_blocks,
                     proposer=proposer)


def run(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams] | SamplingParams
        ) -> list[RequestOutput]:
    """Every request's final output in prompt order; all KV blocks (the MTP layer's too) free afterwards."""
    per_request = params if isinstance(params, list) else [params] * len(prompts)
    first = engine.metrics.requests_added
    for i, (prompt, p) in enumerate(zip(prompts, per_request, strict=True)):
        engine.add_request(f"s{first + i}", prompt, p)
    done: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        done.update((out.request_id, out) for out in engine.step(report_unfinished=False))
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    if isinstance(engine.proposer, MTPProposer):
        assert not engine.proposer.shadows and not engine.proposer.hidden
        assert engine.proposer.block_manager.num_free_blocks == engine.proposer.block_manager.num_blocks
    return [done[f"s{first + i}"] for i in range(len(prompts))]


def tokens_of(outputs: list[RequestOutput]) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Weights randn·fan_in^-½; norm weights and the routing bias 1 + 0.1·randn (not the dummy weights' ones)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if p.dim() == 1 else noise * p.shape[1] ** -0.5)


def target_hidden(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    """The target's pre-norm hidden states of ``tokens`` (one causal forward without a cache)."""
    captured = {}
    handle = model.model.norm.register_forward_hook(
        lambda m, args, out: captured.update(h=out[1] if isinstance(out, tuple) else args[0]))
    try:
        with torch.no_grad():
            model(torch.tensor(tokens), torch.arange(len(tokens)))
    finally:
        handle.remove()
    return captured["h"]


def test_mtp_layer_matches_transformers_in_float64(v3):
    llm = v3.llm
    mtp = load_mtp(llm.source, llm.model, llm.device, llm.dtype)
    randomize(mtp, 1)
    ref = MTPReference(v3.cfg, mtp)
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, v3.spec.vocab_size, (24,), generator=gen)
    hidden = torch.randn(24, v3.spec.hidden_size, generator=gen)
    with torch.no_grad():
        out = mtp(tokens, torch.arange(24), hidden)  # outside a forward context: causal over the rows
        logits = mtp.compute_logits(out)
    ref_logits, ref_out = ref(tokens.tolist(), hidden)
    assert rel_rmse(out.double(), ref_out) < 1e-5
    assert rel_rmse(logits.double(), ref_logits) < 1e-5
    # enorm and hnorm are not interchangeable: the reference tells them apart.
    swapped = copy.deepcopy(mtp)
    with torch.no_grad():
        swapped.layer.enorm.weight.copy_(mtp.layer.hnorm.weight)
        swapped.layer.hnorm.weight.copy_(mtp.layer.enorm.weight)
        assert rel_rmse(swapped.compute_logits(swapped(tokens, torch.arange(24), hidden)).double(), ref_logits) > 1e-3


def check_guesses(engine: LLMEngine, cfg: dict, prompts: list[list[int]], max_tokens: int) -> LLMEngine:
    """Run ``prompts`` greedily and check that every third proposal is the reference's greedy guesses from the
    target's own hidden states (the proposer's k, capped near the length limit)."""
    proposer = engine.proposer
    reference = MTPReference(cfg, proposer.mtp)
    seen = []
    propose = proposer.propose

    def recording(seqs, limits):
        proposals = propose(seqs, limits)
        seen.extend((list(s.token_ids), p.token_ids, k) for s, p, k in zip(seqs, proposals, limits))
        return proposals

    proposer.propose = recording
    run(engine, prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    assert len(seen) >= 20
    assert {k for _, _, k in seen} >= {1, 3}  # the length limit caps the last proposals
    for tokens, guesses, k in seen[::3]:
        assert len(guesses) == k
        expected = reference.guesses(tokens, target_hidden(engine.runner.model, tokens)[:-1], k)
        assert guesses == expected, (len(tokens), guesses, expected)
    return engine


def test_engine_guesses_are_the_reference_argmax(v3):
    """Inside the engine (paged cache, hidden states from the target's forwards, k = 3, guesses rejected and
    rolled back), each proposal is the reference's greedy guess from the target's own hidden states."""
    engine = make_engine(v3, 3, max_num_seqs=4)
    randomize(engine.proposer.mtp, 3)
    check_guesses(engine, v3.cfg, v3.prompts[:3], 12)


def zero_block_outputs(layer: torch.nn.Module) -> None:
    """A decoder block that adds nothing to the residual stream: its attention and MLP outputs zeroed."""
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        for name, p in layer.mlp.named_parameters():
            if "down_proj" in name:
                p.zero_()


def test_accepted_runs_with_a_guessable_target(v3, tmp_path):
    """Acceptance > 0: a target whose decoder blocks add nothing (its next token depends on its current one only)
    and an MTP layer wired to the same rule, nudged by the target's hidden state (eh_proj = [I, 0.3 I], a block
    that adds nothing, the target's head), so that most guesses stand and some fall. The output is still
    plain decoding's, and every proposal is still the reference's guess: the hidden states of accepted
    proposals' rows are handed over right."""
    (tmp_path / "config.json").write_text(json.dumps(v3.cfg))
    llm = LLM(str(tmp_path), load_format="dummy", dtype="float32", device="cpu", model_impl="dockyard",
              num_kv_blocks=64, block_size=BLOCK_SIZE, max_model_len=512)
    for layer in llm.model.model.layers:
        zero_block_outputs(layer)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    plain = tokens_of(run(make_engine(v3, None, llm=llm), v3.prompts[:4], params))
    engine = make_engine(v3, 3, max_num_seqs=4, llm=llm)
    mtp = engine.proposer.mtp
    zero_block_outputs(mtp.layer)
    hidden = v3.spec.hidden_size
    with torch.no_grad():
        mtp.layer.eh_proj.weight.copy_(torch.cat([torch.eye(hidden), 0.3 * torch.eye(hidden)], dim=1))
    check_guesses(engine, v3.cfg, v3.prompts[4:7], 24)
    spec = tokens_of(run(engine, v3.prompts[:4], params))
    assert spec == plain
    stats = engine.stats()
    assert 0.3 < stats["spec_decode_acceptance_rate"] < 0.95, stats
    assert stats["spec_decode_mean_acceptance_length"] > 2


@pytest.fixture(scope="module")
def greedy_runs(v3):
    """20 prompts x 128 greedy tokens: plain, and with MTP k = 1 and k = 3 at batch 16 and at batch 1."""
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    base = tokens_of(run(make_engine(v3, None), v3.prompts, params))
    runs = {}
    for k in (1, 3):
        engine = make_engine(v3, k)
        mixed = []
        step = engine.runner.step

        def recording(batch, pending=None, step=step, mixed=mixed):
            # A step that verifies proposals beside rows that propose nothing (prefills, sequences at their limit).
            mixed.append(any(item.spec_token_ids for item in batch) and not all(item.spec_token_ids for item in batch))
            return step(batch, pending)

        engine.runner.step = recording
        runs[k, 16] = (tokens_of(run(engine, v3.prompts, params)), engine.stats(), sum(mixed))
        single = make_engine(v3, k, max_num_seqs=1)
        runs[k, 1] = (tokens_of(run(single, v3.prompts[:BATCH_1_PROMPTS], params)), single.stats(), 0)
    return base, runs


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("batch", [16, 1])
def test_greedy_mtp_is_exact(greedy_runs, k, batch):
    base, runs = greedy_runs
    tokens, stats, mixed = runs[k, batch]
    assert tokens == base[:len(tokens)]
    assert all(len(t) == MAX_TOKENS for t in tokens)
    # Each decode step verified proposals (k of them but near the length limit); dummy weights guess badly, so
    # nearly each emitted token but the first took a step.
    assert stats["spec_decode_num_drafts"] >= len(tokens) * (MAX_TOKENS - 1) * 0.9
    assert stats["spec_decode_num_draft_tokens"] >= (k - 0.1) * stats["spec_decode_num_drafts"]
    if batch == 16:
        assert mixed > 0


def test_preempted_sequences_recompute_and_stay_exact(v3, greedy_runs):
    """A KV pool too small for the batch: sequences are preempted and recomputed (the MTP layer's rows and held
    hidden states are dropped and rebuilt from the recomputed prefill); the output is still the reference's."""
    base = greedy_runs[0]
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    engine = make_engine(v3, 2, max_num_seqs=8, num_blocks=20)
    out = tokens_of(run(engine, v3.prompts[:8], params))
    assert out == [t[:48] for t in base[:8]]
    assert engine.stats()["num_preemptions"] > 0 and engine.stats()["spec_decode_num_drafts"] > 0


def test_sampled_requests_are_reproducible_with_mtp(v3):
    """Sampled requests verify the MTP layer's drawn guesses by rejection sampling (their distribution q comes
    with the proposal); a seeded request gives the same tokens twice."""
    params = [SamplingParams(temperature=1.0, top_p=0.9, max_tokens=24, seed=s, ignore_eos=True) for s in range(4)]
    first = make_engine(v3, 3, max_num_seqs=4)
    runs = [tokens_of(run(make_engine(v3, 3, max_num_seqs=4) if i else first, v3.prompts[:4], params))
            for i in range(2)]
    assert runs[0] == runs[1] and len({tuple(t) for t in runs[0]}) == 4
    assert first.stats()["spec_decode_num_draft_tokens"] > 0


def test_stops_end_where_they_do_without_mtp(v3, greedy_runs, bundled_llm):
    """EOS (a token the reference emits, made the model's EOS), stop token ids, stop strings (with the bundled
    tokenizer, whose first 1000 tokens decode the shrunken vocabulary) and max_tokens cut inside runs."""
    base = greedy_runs[0]
    tok = bundled_llm.get_tokenizer()
    prompts, cases = [], []
    for i in range(3):
        out = base[i]
        cut = 17 + 9 * i
        text = tok.decode(out[:cut + 1])
        cases += [SamplingParams(temperature=0.0, max_tokens=64, stop_token_ids=[out[cut]]),
                  SamplingParams(temperature=0.0, max_tokens=64, stop=[text[-2:]]),
                  SamplingParams(temperature=0.0, max_tokens=cut + 1),
                  SamplingParams(temperature=0.0, max_tokens=64, logprobs=2, repetition_penalty=1.3)]
        prompts += [v3.prompts[i]] * 4
    eos = base[0][23]
    spec = v3.spec.replace(eos_token_ids=(eos,))
    prompts.append(v3.prompts[0])
    cases.append(SamplingParams(temperature=0.0, max_tokens=64))
    plain = run(make_engine(v3, None, tokenizer=tok, spec=spec), prompts, cases)
    for k in (1, 3):
        spec_out = run(make_engine(v3, k, tokenizer=tok, spec=spec), prompts, cases)
        for a, b in zip(plain, spec_out, strict=True):
            x, y = a.outputs[0], b.outputs[0]
            assert (x.token_ids, x.text, x.finish_reason, x.stop_reason) == (y.token_ids, y.text, y.finish_reason,
                                                                              y.stop_reason)
            if x.logprobs:
                for la, lb in zip(x.logprobs, y.logprobs, strict=True):
                    assert la.keys() == lb.keys()
                    assert torch.allclose(torch.tensor(list(la.values())), torch.tensor(list(lb.values())),
                                          atol=1e-4)
    assert plain[-1].outputs[0].token_ids[-1] == eos and plain[-1].outputs[0].finish_reason == "stop"
    assert any(isinstance(o.outputs[0].stop_reason, str) for o in plain)


def test_llm_loads_mtp_from_a_safetensors_checkpoint(v3, tmp_path):
    """The user's path: the checkpoint holds the decoder and the MTP layer (with V3's copy of the embedding
    and its own head); the target ignores the MTP tensors, the MTP layer gets every one of them."""
    llm = v3.llm
    mtp = load_mtp(llm.source, llm.model, llm.device, llm.dtype)
    randomize(mtp, 4)
    index = v3.spec.num_hidden_layers
    head = torch.randn(v3.spec.vocab_size, v3.spec.hidden_size) * 0.1
    tensors = {n: p.detach().clone() for n, p in llm.model.named_parameters()}
    tensors.update({n: p.detach().clone() for n, p in mtp.named_parameters()})
    tensors[f"model.layers.{index}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors[f"model.layers.{index}.shared_head.head.weight"] = head
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(v3.cfg))
    save_file(tensors, str(folder / "model.safetensors"))
    loaded = LLM(str(folder), dtype="float32", device="cpu", model_impl="dockyard", num_kv_blocks=64,
                 speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    layer = loaded.engine.proposer.mtp.layer
    assert torch.equal(layer.shared_head.head.weight, head)
    assert torch.equal(layer.eh_proj.weight, mtp.layer.eh_proj.weight)
    assert f"model.layers.{index}.eh_proj.weight" in loaded.load_report.ignored
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    plain = LLM(str(folder), dtype="float32", device="cpu", model_impl="dockyard", num_kv_blocks=64)
    assert tokens_of(loaded.generate(v3.prompts[:2], params, use_tqdm=False)) == tokens_of(
        plain.generate(v3.prompts[:2], params, use_tqdm=False))

    del tensors[f"model.layers.{index}.enorm.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(WeightsError, match=rf"model\.layers\.{index}\.enorm\.weight"):
        LLM(str(folder), dtype="float32", device="cpu", model_impl="dockyard", num_kv_blocks=64,
            speculative_config={"method": "mtp", "num_speculative_tokens": 2})


def test_mtp_on_a_model_without_mtp_layers_is_refused_by_name(v3, tmp_path):
    """Refused before any weight is read, naming the config field and what to use instead."""
    (tmp_path / "config.json").write_text(json.dumps({**v3.cfg, "num_nextn_predict_layers": 0}))
    with pytest.raises(ConfigError, match=r"num_nextn_predict_layers=0.*'ngram'"):
        LLM(str(tmp_path), load_format="dummy", dtype="float32", device="cpu", model_impl="dockyard",
            speculative_config='{"method": "mtp", "num_speculative_tokens": 2}')
    assert SpeculativeConfig.parse({"method": "mtp", "num_speculative_tokens": 2}).method == "mtp"


def test_the_mtp_layer_mlp_follows_the_config(v3):
    """The MTP layer's MLP is an MoE past first_k_dense_replace, as the checkpoint's layer is."""
    assert v3.spec.num_nextn_predict_layers == 1 and v3.spec.nextn_moe_layers == (True,)
    mtp = load_mtp(v3.llm.source, v3.llm.model, v3.llm.device, v3.llm.dtype)
    assert isinstance(mtp.layer.mlp, SparseMoeBlock) and isinstance(mtp.layer.self_attn, MLAAttention)


@pytest.mark.manual  # a few minutes of CPU: 20 x 128 tokens one request at a time, for k = 1 and k = 3
@pytest.mark.parametrize("k", [1, 3])
def test_greedy_mtp_is_exact_at_batch_1_on_all_20_prompts(v3, greedy_runs, k):
    """The whole Must show at batch 1 (the default suite's batch-1 case takes 3 of the prompts): each of the 20
    prompts, 128 greedy tokens, one request at a time, is token-for-token the output without speculation."""
    base, _ = greedy_runs
    single = make_engine(v3, k, max_num_seqs=1)
    tokens = tokens_of(run(single, v3.prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                                                                ignore_eos=True)))
    assert len(tokens) == NUM_PROMPTS and tokens == base
    assert single.stats()["spec_decode_num_drafts"] >= NUM_PROMPTS * (MAX_TOKENS - 1) * 0.9
