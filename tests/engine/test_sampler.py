"""Sampler: filters against a float64 numpy brute force, draw frequencies, seeding, penalties, logprobs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dockyard.engine.sampler import (
    Sampler,
    SamplerOutput,
    SamplingBatch,
    apply_penalties,
    argmax_suffices,
    filter_logits,
    make_generator,
)
from dockyard.engine.sampling_params import SamplingParams
from dockyard.engine.sequence import Sequence

CPU = torch.device("cpu")
DEVICES = [CPU] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
on_devices = pytest.mark.parametrize("device", DEVICES, ids=[d.type for d in DEVICES])


def batch_of(params: list[SamplingParams], generators: list | None = None,
             device: torch.device = CPU) -> SamplingBatch:
    return SamplingBatch.build(params, generators or [None] * len(params), device)


# ---------------------------------------------------------------- reference (float64, numpy)
def reference_distribution(logits: np.ndarray, p: SamplingParams) -> tuple[np.ndarray, float]:
    """Renormalized filtered distribution of one row, and the smallest gap between top_p and a
    cumulative sum of the top-k survivors (a test whose gap is tiny would hinge on rounding)."""
    z = logits.astype(np.float64) / p.temperature
    allowed = np.ones(z.shape, dtype=bool)
    if 0 < p.top_k < len(z):
        kth = sorted(z, reverse=True)[p.top_k - 1]
        allowed &= z >= kth  # ties with the k-th value survive
    probs = np.where(allowed, np.exp(z - z.max()), 0.0)
    probs /= probs.sum()
    gap = np.inf
    if p.top_p < 1:
        total, last = 0.0, None
        for value in sorted(probs[allowed], reverse=True):
            total += value
            gap = min(gap, abs(total - p.top_p))
            last = value
            if total >= p.top_p:
                break
        allowed &= probs >= last  # ties with the last kept token survive
    if p.min_p > 0:
        allowed &= probs >= p.min_p * probs.max()
    out = np.where(allowed, probs, 0.0)
    return out / out.sum(), gap


def random_logits(rows: int, vocab: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(0, scale, (rows, vocab))).float()


FILTER_CASES = [
    SamplingParams(),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=0.9, min_p=0.1),
    SamplingParams(temperature=0.5, top_k=20, top_p=0.9, min_p=0.05),
    SamplingParams(top_k=1),
    SamplingParams(top_p=1e-6),
    SamplingParams(min_p=1.0),
    SamplingParams(top_k=-1, top_p=0.5),
    SamplingParams(top_k=10_000),  # larger than the vocabulary: off
    SamplingParams(temperature=2.0, top_k=3, min_p=0.5),
]


@on_devices
def test_filters_match_reference_exactly(device: torch.device) -> None:
    vocab = 64
    logits = random_logits(len(FILTER_CASES), vocab, seed=0)
    x = filter_logits(logits.to(device), batch_of(FILTER_CASES, device=device)).cpu()
    for row, p in enumerate(FILTER_CASES):
        ref, gap = reference_distribution(logits[row].double().numpy(), p)
        assert gap > 1e-4, f"row {row}: pick another seed, top_p sits on a boundary"
        kept = torch.isfinite(x[row]).numpy()
        np.testing.assert_array_equal(kept, ref > 0, err_msg=f"row {row}: {p}")
        # Survivors keep their temperature-scaled values.
        scaled = (logits[row] / p.temperature)[kept].numpy()
        np.testing.assert_allclose(x[row][kept].numpy(), scaled, rtol=1e-6)


def test_ties_at_the_boundary_are_kept_and_order_independent() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0], [2.0, 2.0, 3.0, 1.0, 0.0]])
    # top_k=2: the 2nd largest value (2.0) is tied, so both 2.0 tokens survive.
    x = filter_logits(logits, batch_of([SamplingParams(top_k=2)] * 2))
    assert torch.isfinite(x).tolist() == [[True, False, True, True, False], [True, True, True, False, False]]
    # top_p just above the top token's mass needs one 2.0 token, so both are kept.
    top_mass = torch.softmax(logits[0], -1).max().item()
    x = filter_logits(logits, batch_of([SamplingParams(top_p=top_mass + 1e-3)] * 2))
    assert torch.isfinite(x).tolist() == [[True, False, True, True, False], [True, True, True, False, False]]
    # min_p=1 keeps only the maximum, with its ties.
    flat = torch.tensor([[1.0, 5.0, 5.0, 2.0]])
    assert torch.isfinite(filter_logits(flat, batch_of([SamplingParams(min_p=1.0)]))).tolist() == [
        [False, True, True, False]]


@on_devices
def test_draws_stay_in_allowed_set_and_match_frequencies(device: torch.device) -> None:
    vocab, draws = 16, 20_000
    cases = [
        SamplingParams(temperature=0.8),
        SamplingParams(temperature=1.2, top_k=6),
        SamplingParams(temperature=1.0, top_p=0.75),
        SamplingParams(temperature=0.6, top_k=10, top_p=0.9, min_p=0.02),
        SamplingParams(temperature=1.5, min_p=0.2),
    ]
    base = random_logits(len(cases), vocab, seed=3, scale=1.0)
    refs = [reference_distribution(base[i].double().numpy(), p) for i, p in enumerate(cases)]
    assert min(gap for _, gap in refs) > 1e-3
    # Every case repeated `draws` times in one batch: 100k rows, one call, default RNG.
    logits = base.repeat_interleave(draws, dim=0).to(device)
    batch = batch_of([p for p in cases for _ in range(draws)], device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(1234)
        tokens = Sampler()(logits, batch).token_ids.view(len(cases), draws).cpu()
    for i, (ref, _) in enumerate(refs):
        counts = np.bincount(tokens[i].numpy(), minlength=vocab)
        assert counts[ref == 0].sum() == 0, f"case {i} drew a filtered token"
        freq = counts / draws
        # Binomial std <= sqrt(0.25 / 20000) = 0.0035; at a fixed seed 0.015 (> 4 std) is safe.
        assert np.abs(freq - ref).max() < 0.015, (i, freq, ref)
        support = ref > 0
        chi2 = (((counts - draws * ref) ** 2)[support] / (draws * ref[support])).sum()
        dof = max(int(support.sum()) - 1, 1)
        assert chi2 < dof + 6 * np.sqrt(2 * dof) + 10, (i, chi2, dof)


@on_devices
def test_seeded_rows_match_frequencies_and_allowed_set(device: torch.device) -> None:
    vocab, draws = 8, 2_000
    p = SamplingParams(temperature=1.0, top_k=5, seed=0)
    base = random_logits(1, vocab, seed=11, scale=1.0)
    ref, _ = reference_distribution(base[0].double().numpy(), p)
    gens = [make_generator(1000 + i, device) for i in range(draws)]
    logits = base.expand(draws, vocab).to(device)
    tokens = Sampler()(logits, batch_of([p] * draws, gens, device)).token_ids
    counts = np.bincount(tokens.cpu().numpy(), minlength=vocab)
    assert counts[ref == 0].sum() == 0
    assert np.abs(counts / draws - ref).max() < 0.05


@on_devices
def test_greedy_rows_are_argmax(device: torch.device) -> None:
    logits = random_logits(6, 50, seed=5)
    logits[3, [7, 9]] = 100.0  # a tie: the lowest id wins
    logits = logits.to(device)
    params = [SamplingParams(temperature=0.0, top_k=3, top_p=0.5, min_p=0.3), SamplingParams(temperature=1.0),
              SamplingParams(temperature=1e-6), SamplingParams(temperature=0.0), SamplingParams(top_k=2),
              SamplingParams(temperature=0.0, seed=4)]
    gens = [None, None, None, None, None, make_generator(4, device)]
    out = Sampler()(logits, batch_of(params, gens, device))
    argmax = logits.argmax(-1)
    for row in (0, 2, 3, 5):
        assert out.token_ids[row] == argmax[row]
    assert out.token_ids[3] == 7
    # All-greedy batches take the fast path and agree.
    all_greedy = Sampler()(logits, batch_of([SamplingParams(temperature=0)] * 6, device=device))
    assert torch.equal(all_greedy.token_ids, argmax)


def test_top_k_one_and_tiny_top_p_are_argmax_when_sampling() -> None:
    logits = random_logits(4, 100, seed=6)
    params = [SamplingParams(top_k=1), SamplingParams(top_p=1e-6), SamplingParams(min_p=1.0),
              SamplingParams(temperature=5.0, top_k=1)]
    for _ in range(5):
        assert torch.equal(Sampler()(logits, batch_of(params)).token_ids, logits.argmax(-1))


def _run_steps(step_logits: list[torch.Tensor], params: list[SamplingParams],
               device: torch.device) -> list[list[int]]:
    """Sample several steps with generators made once per row, as the engine does."""
    gens = [make_generator(p.seed, device) for p in params]
    sampler = Sampler()
    out = []
    for logits in step_logits:
        out.append(sampler(logits.to(device), batch_of(params, gens, device)).token_ids.tolist())
    return [list(col) for col in zip(*out, strict=True)]  # per row


@on_devices
def test_seed_reproducible_across_batch_composition(device: torch.device) -> None:
    vocab, steps = 1000, 6
    target = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    row_logits = [random_logits(1, vocab, seed=100 + s, scale=0.5) for s in range(steps)]
    # Batch A: target first, one unseeded neighbour.
    neighbour_logits = [random_logits(3, vocab, seed=200 + s) for s in range(steps)]
    a = _run_steps([torch.cat([row_logits[s], neighbour_logits[s][:1]]) for s in range(steps)],
                   [target, SamplingParams(temperature=0.5)], device)
    # Batch B: target third, after a seeded and a greedy neighbour, before another seeded one.
    b = _run_steps(
        [torch.cat([neighbour_logits[s][:2], row_logits[s], neighbour_logits[s][2:]]) for s in range(steps)],
        [SamplingParams(seed=7, top_k=4), SamplingParams(temperature=0), target, SamplingParams(seed=1234)],
        device,
    )
    # Alone, with the global RNG disturbed in between.
    torch.manual_seed(99)
    alone = _run_steps(row_logits, [target], device)
    assert a[0] == b[2] == alone[0]
    # The same seed at another row with other logits is still its own stream; a new seed differs.
    other = _run_steps(row_logits, [SamplingParams(temperature=1.0, top_p=0.95, seed=1235)], device)
    assert other[0] != a[0]


def test_make_generator() -> None:
    assert make_generator(None, CPU) is None
    g1, g2 = make_generator(5, CPU), make_generator(5, CPU)
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))
    # Seeds outside torch's range (seed + sample index past 2**64) still work.
    assert make_generator(2**64 + 3, CPU) is not None
    assert make_generator(-5, CPU) is not None


# ---------------------------------------------------------------- penalties
@on_devices
def test_penalties_match_hand_computation(device: torch.device) -> None:
    logits = torch.tensor([[1.0, -2.0, 3.0, -0.5, 0.25, 2.0, -1.0, 0.0],
                           [0.5, 1.5, -2.5, 3.5, -0.5, 0.0, 1.0, -1.0],
                           [2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]])
    prompts = [[1, 2, 2, 7], [0, 0], [1, 2, 3]]
    outputs = [[2, 3, 3, 5], [3, 3, 3, 4, 6], [4]]
    params = [SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25),
              SamplingParams(presence_penalty=-1.0, frequency_penalty=1.5),  # output only, no repetition
              SamplingParams()]  # no penalty: untouched
    got = apply_penalties(logits.to(device), prompts, outputs, batch_of(params, device=device)).cpu()
    expected = logits.double().numpy().copy()
    for row, p in enumerate(params):
        counts = np.bincount(outputs[row], minlength=8)
        for tok in range(8):
            v = expected[row, tok]
            if tok in prompts[row] or counts[tok]:
                v = v / p.repetition_penalty if v > 0 else v * p.repetition_penalty
            v -= p.frequency_penalty * counts[tok] + p.presence_penalty * (counts[tok] > 0)
            expected[row, tok] = v
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-6, atol=1e-6)
    # Spot checks of the hand computation itself (row 0): token 1 is in the prompt only.
    assert expected[0, 1] == pytest.approx(-2.0 * 1.3)
    assert expected[0, 3] == pytest.approx(-0.5 * 1.3 - 0.25 * 2 - 0.5)
    assert expected[1, 0] == pytest.approx(0.5)  # prompt tokens ignored by presence/frequency
    assert logits[0, 1] == -2.0  # input not modified


def test_penalties_fast_path_and_empty_histories() -> None:
    logits = random_logits(2, 10, seed=8)
    batch = batch_of([SamplingParams(), SamplingParams(temperature=0)])
    assert apply_penalties(logits, [[1], [2]], [[3], [4]], batch) is logits
    batch = batch_of([SamplingParams(repetition_penalty=2.0, presence_penalty=1.0)] * 2)
    got = apply_penalties(logits, [[], []], [[], []], batch)
    assert torch.equal(got, logits)


# ---------------------------------------------------------------- logprobs
@on_devices
def test_logprobs_are_raw_log_softmax(device: torch.device) -> None:
    logits = random_logits(4, 30, seed=9, scale=3.0)
    params = [SamplingParams(temperature=0.5, top_k=3, logprobs=2), SamplingParams(temperature=0),
              SamplingParams(top_p=0.5, temperature=2.0), SamplingParams(min_p=0.5, seed=1)]
    gens = [None, None, None, make_generator(1, device)]
    out = Sampler()(logits.to(device), batch_of(params, gens, device), num_logprobs=5)
    fields = (out.token_ids, out.logprobs, out.top_logprobs, out.top_token_ids)
    out = SamplerOutput(*(t.cpu() for t in fields))
    ref = torch.log_softmax(logits.double(), dim=-1)
    rows = torch.arange(4)
    torch.testing.assert_close(out.logprobs.double(), ref[rows, out.token_ids], rtol=0, atol=1e-5)
    assert out.top_logprobs.shape == out.top_token_ids.shape == (4, 5)
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()
    ref_vals, ref_ids = ref.topk(5, dim=-1)
    assert torch.equal(out.top_token_ids, ref_ids)
    torch.testing.assert_close(out.top_logprobs.double(), ref_vals, rtol=0, atol=1e-5)
    # Without num_logprobs: the sampled token's logprob only.
    out = Sampler()(logits, batch_of(params))
    assert out.logprobs is not None and out.top_logprobs is None and out.top_token_ids is None


def test_build_records_what_stages_run() -> None:
    batch = batch_of([SamplingParams(temperature=0, top_k=5, top_p=0.5), SamplingParams(top_k=-1)])
    assert batch.max_top_k == 0 and not batch.any_top_p and not batch.any_min_p  # greedy rows don't count
    assert batch.greedy.tolist() == [True, False] and batch.top_k.tolist() == [5, 0]
    batch = batch_of([SamplingParams(top_k=7, min_p=0.1), SamplingParams(top_p=0.9, repetition_penalty=1.1)])
    assert batch.max_top_k == 7 and batch.any_top_p and batch.any_min_p
    assert batch.penalty_rows == [1] and batch.repetition_rows == [1]
    # Derived from the tensors when built by hand.
    manual = SamplingBatch(batch.temperature, batch.top_p, batch.top_k, batch.min_p, batch.presence_penalty,
                           batch.frequency_penalty, batch.repetition_penalty, [None, None], batch.greedy)
    assert (manual.max_top_k, manual.any_top_p, manual.any_min_p) == (7, True, True)
    assert manual.penalty_rows == [1] and manual.greedy_rows == [False, False]
    with pytest.raises(ValueError):
        SamplingBatch.build([SamplingParams()], [], CPU)


# ---------------------------------------------------------------- the step's batch: bans, histories, hooks
def _seq(params: SamplingParams, prompt: list[int], output: list[int]) -> Sequence:
    return Sequence(0, "r", 0, list(prompt), params, max_total_len=100, output_token_ids=list(output))


def test_step_batch_applies_min_tokens_bans_and_penalties() -> None:
    """Rows from sequences: stop tokens banned until min_tokens outputs exist, penalties from their
    histories; the logprobs are log_softmax of the reference logits (float64, by hand)."""
    vocab, eos = 12, [0, 11]
    logits = random_logits(4, vocab, seed=21, scale=3.0)
    seqs = [_seq(SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[5], logprobs=3), [1, 2], [7, 8]),
            _seq(SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[5]), [1], [4, 4]),  # reached
            _seq(SamplingParams(temperature=0, min_tokens=4, ignore_eos=True, stop_token_ids=[6]), [3], []),
            _seq(SamplingParams(temperature=0, repetition_penalty=2.0, frequency_penalty=0.5), [9], [3, 3])]
    batch = SamplingBatch.for_sequences(seqs, eos, CPU)
    assert batch.banned_token_ids == [[5, 0, 11], [], [6], []] and batch.num_logprobs == 3
    ref = logits.double().numpy().copy()
    ref[0, [5, 0, 11]] = -np.inf
    ref[2, 6] = -np.inf
    for tok in (9, 3):  # row 3: repetition penalty over prompt and output, frequency over the output
        ref[3, tok] = ref[3, tok] / 2.0 if ref[3, tok] > 0 else ref[3, tok] * 2.0
    ref[3, 3] -= 0.5 * 2
    out = Sampler()(logits, batch)
    ref_lp = ref - np.log(np.exp(ref - ref.max(-1, keepdims=True)).sum(-1, keepdims=True)) - ref.max(-1, keepdims=True)
    assert out.token_ids.tolist() == ref.argmax(-1).tolist()
    np.testing.assert_allclose(out.logprobs.double().numpy(), ref_lp[np.arange(4), ref.argmax(-1)], atol=1e-5)
    np.testing.assert_allclose(out.top_logprobs.double().numpy(), -np.sort(-ref_lp, axis=-1)[:, :3], atol=1e-5)
    assert logits[0, 5] != float("-inf")  # the input is not modified


def test_step_batch_hooks_mask_and_bias() -> None:
    """The structured-output hooks: only allowed tokens are sampled, the bias shifts the logits."""
    vocab = 16
    logits = random_logits(3, vocab, seed=22)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=3), SamplingParams(temperature=0)]
    batch = batch_of(params, [None, make_generator(3, CPU), None])
    allowed = torch.zeros(3, vocab, dtype=torch.bool)
    allowed[0, [2, 7]] = True
    allowed[1, [1, 4, 9]] = True
    allowed[2] = True
    bias = torch.zeros(3, vocab)
    bias[2, 13] = 100.0
    batch.allowed_token_mask, batch.logit_bias = allowed, bias
    for _ in range(5):
        tokens = Sampler()(logits, batch).token_ids.tolist()
        ref = np.where(allowed.numpy(), logits.double().numpy() + bias.double().numpy(), -np.inf)
        assert tokens[0] == ref[0].argmax() and tokens[1] in (1, 4, 9) and tokens[2] == 13


def test_argmax_suffices_follows_needs_host_tokens() -> None:
    plain = SamplingParams(temperature=0)
    assert argmax_suffices([_seq(plain, [1], [])])
    assert not argmax_suffices([_seq(plain, [1], []), _seq(SamplingParams(temperature=0.5), [1], [])])
    assert not argmax_suffices([_seq(SamplingParams(temperature=0, logprobs=0), [1], [])])
    assert not argmax_suffices([_seq(SamplingParams(temperature=0, presence_penalty=0.1), [1], [])])
    with_min = SamplingParams(temperature=0, min_tokens=2)
    assert not argmax_suffices([_seq(with_min, [1], [4])]) and argmax_suffices([_seq(with_min, [1], [4, 5])])
