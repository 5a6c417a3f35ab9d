"""The features gate's FP8 KV cache row: the trial passes on a tiny Llama, fails when the cache's scales are
misapplied on read, and MLA is refused by name."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dockyard.onboard.gates.features import fp8_kv, trial_model
from dockyard.ops import fp8_kv as fp8_kv_ops
from tests.onboard.test_features import _context, _model_dir, _workdir
from tests.onboard.test_units import TINY
from tests.shared_configs import shared_config


@pytest.fixture
def tiny(tmp_path):
    ctx = _context(tmp_path, _model_dir(tmp_path, TINY))
    return ctx, trial_model.Trials(ctx, _workdir(tmp_path))


def test_fp8_kv_row_supported_within_the_e4m3_bound(tiny):
    row = fp8_kv.trial_row(*tiny, None)
    ev = row["evidence"]
    assert row["status"] == "supported", row["why"]
    assert 0 < ev["rmse_ratio"] < fp8_kv.FP8_KV_LOGITS_BOUND and ev["scales"] == ["calibrated"]
    assert fp8_kv.FP8_KV_LOGITS_BOUND == pytest.approx(0.108, abs=1e-3)


def test_fp8_kv_row_fails_when_the_scale_is_lost_on_read(tiny, monkeypatch):
    real = fp8_kv_ops.dequantize
    monkeypatch.setattr(fp8_kv_ops, "dequantize", lambda cache, scale, dtype: real(cache, torch.ones_like(scale)
                                                                                     if scale is not None else None,
                                                                                     dtype))
    row = fp8_kv.trial_row(*tiny, None)
    assert row["status"] == "unsupported" and "NOT < bound" in row["why"], row["why"]


def test_fp8_kv_row_names_mla_as_unsupported(tmp_path):
    ctx = _context(tmp_path, _model_dir(tmp_path, shared_config("deepseek-ai--DeepSeek-V2-Lite")))
    row = fp8_kv.trial_row(ctx, None, "not needed")
    assert row["status"] == "unsupported" and "multi-head latent attention" in row["why"]


def test_fit_and_capacity_plan_an_fp8_kv_cache_at_one_byte(tmp_path):
    from dockyard.onboard.gates import fit

    plans = {}
    for kv in ("auto", "fp8"):
        ctx = _context(tmp_path / kv, _model_dir(tmp_path, TINY, kv))
        ctx.options = dataclasses.replace(ctx.options, kv_cache_dtype=kv)
        fit.ensure_plan(ctx)
        plans[kv] = ctx.plan
    layers, heads, dim = TINY["num_hidden_layers"], TINY["num_key_value_heads"], 64 // 4
    assert plans["auto"].kv_bytes_per_token == layers * 2 * heads * dim * 4  # float32 on the CPU
    assert plans["fp8"].kv_bytes_per_token == layers * 2 * heads * dim * 1
    assert plans["fp8"].kv_cache_dtype == "float8_e4m3fn"
