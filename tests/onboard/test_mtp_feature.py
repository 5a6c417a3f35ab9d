"""The features gate's MTP row: on DeepSeek-V3's config (one MTP layer) the trial model speculates with its MTP
layer and decodes exactly the plain tokens; tokens that differ make the row unsupported, naming where; a
checkpoint without MTP layers is checkpoint-missing."""

from __future__ import annotations

import pytest
import torch

from dockyard.onboard.gates.features import mtp, trial_model
from tests.onboard.test_features import _context, _model_dir, _workdir
from tests.onboard.test_units import TINY
from tests.shared_configs import shared_config


@pytest.fixture
def v3(tmp_path):
    ctx = _context(tmp_path, _model_dir(tmp_path, shared_config("deepseek-ai--DeepSeek-V3")))
    return ctx, trial_model.Trials(ctx, _workdir(tmp_path))


def test_mtp_row_is_a_real_trial(v3):
    ctx, trials = v3
    assert trials.spec.num_nextn_predict_layers == 1  # the shrunken trial config keeps the MTP layer
    row = mtp.trial_row(ctx, trials, None)
    ev = row["evidence"]
    assert row["status"] == "supported", row["why"]
    assert ev["tokens"] == ev["reference_tokens"] and ev["first_difference"] is None
    assert [len(t) for t in ev["tokens"]] == [trial_model.TRIAL_TOKENS] * len(trials.prompts)
    assert ev["spec_decode_num_drafts"] > 0
    assert ev["spec_decode_num_draft_tokens"] >= ev["spec_decode_num_drafts"]
    assert 0 <= ev["spec_decode_acceptance_rate"] <= 1 and "acceptance rate" in row["why"]
    assert ev["head"]["compared"] and ev["head"]["logits_rmse_ratio"] < mtp.MTP_HEAD_BOUND


def test_mtp_layer_off_the_reference_is_unsupported(v3, monkeypatch):
    """A layer that feeds the embedding and the hidden state the wrong way round fails the head check."""
    ctx, trials = v3
    real = mtp.DeepseekMTP

    class Swapped(real):
        def forward(self, input_ids, positions, previous_hidden):
            layer = self.layer
            x = layer.eh_proj(torch.cat([layer.hnorm(previous_hidden), layer.enorm(self.shared[0](input_ids))], -1))
            return super(type(layer), layer).forward(positions, x)

    monkeypatch.setattr(mtp, "DeepseekMTP", Swapped)
    row = mtp.trial_row(ctx, trials, None)
    assert row["status"] == "unsupported" and "float64 reference" in row["why"], row["why"]


def test_mtp_tokens_that_differ_are_unsupported_naming_where(v3, monkeypatch):
    ctx, trials = v3
    real_greedy = trials.greedy

    def greedy(device, dtype, observe=None, **engine):
        out = real_greedy(device, dtype, observe, **engine)
        if "speculative_config" in engine:
            out["tokens"][0][3] = (out["tokens"][0][3] + 1) % trials.spec.vocab_size
        return out

    monkeypatch.setattr(trials, "greedy", greedy)
    row = mtp.trial_row(ctx, trials, None)
    assert row["status"] == "unsupported" and "prompt 0, token 3" in row["why"], row["why"]


def test_no_mtp_layers_is_checkpoint_missing(tmp_path):
    ctx = _context(tmp_path, _model_dir(tmp_path, TINY))
    row = mtp.trial_row(ctx, None, "not needed")
    assert row["status"] == "checkpoint-missing" and "num_nextn_predict_layers" in row["why"]
