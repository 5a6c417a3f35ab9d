"""DockyardLM against lm-eval's own HFLM (``--model hf``) on the same GGUF weights, through lm-eval itself."""

from __future__ import annotations

import pytest

from dockyard import SamplingParams

pytest.importorskip("accelerate")

ARC_DOCS = 20
GSM8K_DOCS = [0, 3]  # two problems, in dataset order
GSM8K_MAX_GEN_TOKS = 24


def _run(lm, manager, task, limit, **kwargs):
    from lm_eval.evaluator import evaluate

    return evaluate(lm=lm, task_dict=manager.load([task]), limit=limit, bootstrap_iters=0, log_samples=True, **kwargs)


def test_tokenization_follows_hflm_conventions(ours, reference, bundled_llm):
    chat = bundled_llm.apply_chat_template([{"role": "user", "content": "Hi"}])
    for text in ("Question: What is 2+2?\nAnswer:", chat, " Paris", ""):
        assert ours.tok_encode(text) == reference.tok_encode(text), text
    ids = ours.tok_encode(chat)  # the template carries BOS; the harness must not add a second one
    assert ids[0] == ours.prefix_token_id and ids[1] != ids[0]
    assert ours.prefix_token_id == reference.prefix_token_id and ours.eot_token_id == reference.eot_token_id
    assert ours._encode_pair("Question: Sky?\nAnswer:", " blue") == reference._encode_pair("Question: Sky?\nAnswer:",
                                                                                         " blue")


def test_arc_easy_loglikelihoods_equal_hf(ours, reference, manager):
    mine, ref = _run(ours, manager, "arc_easy", ARC_DOCS), _run(reference, manager, "arc_easy", ARC_DOCS)
    pairs = [(a, b) for da, db in zip(mine["samples"]["arc_easy"], ref["samples"]["arc_easy"], strict=True)
             for a, b in zip(da["resps"], db["resps"], strict=True)]
    assert len(pairs) >= 3 * ARC_DOCS
    for (mine_ll, mine_greedy), (ref_ll, ref_greedy) in ((a[0], b[0]) for a, b in pairs):
        assert mine_ll == pytest.approx(ref_ll, rel=1e-4, abs=1e-6)
        assert mine_greedy == ref_greedy
    for metric in ("acc,none", "acc_norm,none"):
        assert abs(mine["results"]["arc_easy"][metric] - ref["results"]["arc_easy"][metric]) <= 1 / ARC_DOCS + 1e-9


def test_mmlu_one_token_choices_equal_hf(ours, reference, manager, monkeypatch):
    calls = []
    real = type(ours)._prompt_logprobs

    def spy(self, windows, k):
        calls.append((len(windows), k))
        return real(self, windows, k)

    monkeypatch.setattr(type(ours), "_prompt_logprobs", spy)
    mine, ref = _run(ours, manager, "mmlu_anatomy", 5), _run(reference, manager, "mmlu_anatomy", 5)
    assert calls[0] == (5, 20)  # one request per question, the four letters read off its last position
    for da, db in zip(mine["samples"]["mmlu_anatomy"], ref["samples"]["mmlu_anatomy"], strict=True):
        for a, b in zip(da["resps"], db["resps"], strict=True):
            assert a[0][0] == pytest.approx(b[0][0], rel=1e-4, abs=1e-6) and a[0][1] == b[0][1]
    assert mine["results"]["mmlu_anatomy"]["acc,none"] == ref["results"]["mmlu_anatomy"]["acc,none"]


def test_loglikelihood_rolling_equals_hf(ours, reference):
    from lm_eval.api.instance import Instance

    texts = ["The quick brown fox jumps over the lazy dog.", "Water boils at 100 degrees Celsius at sea level."]
    reqs = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=i) for i, t in enumerate(texts)]
    for mine, ref in zip(ours.loglikelihood_rolling(reqs), reference.loglikelihood_rolling(reqs, disable_tqdm=True)):
        assert mine == pytest.approx(ref, rel=1e-4)


def test_gsm8k_generate_until_stops_at_the_task_stop_sequences(ours, manager, bundled_llm):
    task = manager.load(["gsm8k"])["tasks"]["gsm8k"]
    task.set_config(key="generation_kwargs", value={"max_gen_toks": GSM8K_MAX_GEN_TOKS}, update=True)
    # Problem 0's chain of thought runs past max_gen_toks; problem 3's ends within a few tokens, then the
    # model starts the next "Q:" exemplar.
    task.build_all_requests(samples=GSM8K_DOCS, rank=0, world_size=1)
    reqs = list(task.instances)
    assert len(reqs) == len(GSM8K_DOCS) and reqs[0].args[1]["until"] == ["Q:", "</s>", "<|im_end|>"]
    mine = ours.generate_until(reqs)  # (greedy decoding equals HF's token for token: tests/test_real_model.py)
    assert all(not any(s in text for s in ("Q:", "</s>", "<|im_end|>")) for text in mine)
    raw = bundled_llm.generate([ours.tok_encode(r.args[0]) for r in reqs],
                               SamplingParams(max_tokens=GSM8K_MAX_GEN_TOKS, temperature=0.0), use_tqdm=False)
    assert mine[0] == raw[0].outputs[0].text and raw[0].outputs[0].finish_reason == "length"
    stopped, full = mine[1], raw[1].outputs[0].text
    assert "Q:" in full and stopped == full.split("Q:")[0] and stopped.rstrip().endswith("The answer is 20.")
