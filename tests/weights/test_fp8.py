"""FP8 checkpoints dequantized on load: block / per-tensor / per-channel scales, strict pairing, refusals.

The FP8 checkpoints are made here from a bf16 HF Llama checkpoint (quantized block by block with a
Python loop over blocks, ``weights.fp8_quantize``, independent of dockyard's tiled dequantization)
and loaded through ``LLM``.
Dims: hidden 256, intermediate 320, so gate/up rows and down_proj columns end in a ragged 64-wide
block; k/v have 128 rows (one block).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from dockyard.engine.llm import LLM
from dockyard.errors import WeightsError
from dockyard.model_source import resolve_model
from dockyard.weights.fp8 import dequantize, dequantize_fp8
from dockyard.weights.fp8_quantize import (
    E4M3_MAX,
    FP8_LOGITS_BOUND,
    fp8_quantization_config,
    quantize_fp8_blocks,
)
from dockyard.weights.quant_config import FP8Config
from tests.helpers import rel_rmse, save_tiny_hf_model, unit_scale_llama

BLOCK = 128
FP8_QUANT = fp8_quantization_config((BLOCK, BLOCK))
PROMPTS = [[1, 17, 300, 42, 7, 511, 256, 3], [5, 9, 2, 88, 101, 400, 33, 12, 64, 128, 200, 6], [9, 8, 7]]
LOGITS_BOUND = FP8_LOGITS_BOUND  # why 0.1: dockyard/weights/fp8_quantize.py


def _is_quantized(name: str, tensor: torch.Tensor) -> bool:
    return tensor.dim() == 2 and name.startswith("model.layers.") and name.endswith("_proj.weight")


def _quantize_rows(w: torch.Tensor, per_tensor: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale for the whole tensor (shape ()) or one per output row (shape (rows, 1))."""
    w = w.float()
    amax = w.abs().max() if per_tensor else w.abs().amax(dim=1, keepdim=True)
    scale = amax.clamp(min=1e-12) / E4M3_MAX
    return (w / scale).to(torch.float8_e4m3fn), scale


def _reference(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float64 dequantization: q × scale repeated over its blocks (or broadcast), cropped to q's shape."""
    rows, cols = q.shape
    if scale.dim() == 2 and scale.shape[1] > 1:
        expanded = scale.double().repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:rows, :cols]
    else:
        expanded = scale.double()
    return q.double() * expanded


def _write_checkpoint(directory: Path, src: Path, tensors: dict[str, torch.Tensor], quant: dict | None) -> Path:
    directory.mkdir()
    config = json.loads((src / "config.json").read_text())
    if quant is not None:
        config["quantization_config"] = quant
    (directory / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """bf16 reference checkpoint, its block-FP8 twin, and a per-tensor / per-channel FP8 twin."""
    root = tmp_path_factory.mktemp("fp8")
    hf = unit_scale_llama(intermediate_size=320)
    bf16_dir = save_tiny_hf_model(hf.to(torch.bfloat16), root / "bf16")
    state = load_file(str(bf16_dir / "model.safetensors"))
    block, rows = dict(state), dict(state)
    quantized = {}
    for name, w in state.items():
        if _is_quantized(name, w):
            q, s = quantize_fp8_blocks(w)
            block[name], block[name + "_scale_inv"] = q, s
            quantized[name] = (q, s)
            # attention: one per-tensor `weight_scale_inv` scalar; MLP: per-channel `weight_scale` rows
            per_tensor = ".self_attn." in name
            q, s = _quantize_rows(w, per_tensor)
            rows[name], rows[name + ("_scale_inv" if per_tensor else "_scale")] = q, s
    row_quant = {k: v for k, v in FP8_QUANT.items() if k != "weight_block_size"}
    return SimpleNamespace(
        state=state, quantized=quantized, block_state=block, bf16=bf16_dir,
        block=_write_checkpoint(root / "block", bf16_dir, block, FP8_QUANT),
        rows=_write_checkpoint(root / "rows", bf16_dir, rows, row_quant),
    )


def _logits(llm: LLM) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([llm.model.compute_logits(llm.model(torch.tensor(ids), torch.arange(len(ids)))).float()
                          for ids in PROMPTS])


def _llm(path: Path, dtype: str = "float32") -> LLM:
    return LLM(path, dtype=dtype, device="cpu", num_kv_blocks=16, max_num_seqs=4)


def test_block_dequantization_is_exact_against_float64(checkpoints):
    # Ragged in rows (gate 320x256), in columns (down 256x320) and whole blocks (k 128x256).
    for name in ("model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.down_proj.weight",
                 "model.layers.0.self_attn.k_proj.weight"):
        q, s = checkpoints.quantized[name]
        ref = _reference(q, s)
        out = dequantize(q, s, (BLOCK, BLOCK), torch.float32)
        assert out.dtype == torch.float32 and out.shape == q.shape
        # fp32 product of an e4m3 value (4 significant bits) and an fp32 scale is the exact product rounded once.
        assert torch.equal(out, ref.float()), name
        # bf16: that float32 value rounded to bf16 (at most half a bf16 ulp from it).
        assert torch.equal(dequantize(q, s, (BLOCK, BLOCK), torch.bfloat16), ref.float().bfloat16())


def test_block_fp8_checkpoint_matches_bf16_within_fp8_error(checkpoints):
    source = resolve_model(checkpoints.block)
    assert source.kind == "safetensors" and source.fp8 == FP8Config((BLOCK, BLOCK), "e4m3")
    ref, fp8 = _llm(checkpoints.bf16), _llm(checkpoints.block)
    assert fp8.load_report.missing == fp8.load_report.unexpected == []
    params = dict(fp8.model.named_parameters())
    for name, (q, s) in checkpoints.quantized.items():  # every loaded weight is the float64 reference, rounded
        assert torch.equal(params[name].detach(), _reference(q, s).float()), name
        w = checkpoints.state[name].double()  # and within e4m3's rounding of the bf16 original
        scale = s.double().repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:w.shape[0], :w.shape[1]]
        assert ((params[name].double() - w).abs() <= w.abs() * 2 ** -4 + scale * 2 ** -10 + 1e-12).all(), name
    ratio = rel_rmse(_logits(fp8), _logits(ref))
    print(f"block FP8 vs bf16 logits: rmse ratio {ratio:.4f} (bound {LOGITS_BOUND})")
    assert 0 < ratio < LOGITS_BOUND
    # Served in bf16: the same FP8 error, plus bf16's own rounding.
    ratio_bf16 = rel_rmse(_logits(_llm(checkpoints.block, "bfloat16")), _logits(ref))
    print(f"block FP8 loaded as bfloat16 vs bf16 weights in float32: rmse ratio {ratio_bf16:.4f}")
    assert ratio_bf16 < LOGITS_BOUND


def test_per_tensor_and_per_channel_scales(checkpoints):
    source = resolve_model(checkpoints.rows)
    assert source.fp8 == FP8Config(None, "e4m3")
    llm = _llm(checkpoints.rows)
    stored = load_file(str(checkpoints.rows / "model.safetensors"))
    params = dict(llm.model.named_parameters())
    kinds = set()
    for name in checkpoints.quantized:
        scale_name = next(n for n in (name + "_scale_inv", name + "_scale") if n in stored)
        q, s = stored[name], stored[scale_name]
        kinds.add((scale_name.rsplit(".", 1)[1], tuple(s.shape)[1:]))
        assert torch.equal(params[name].detach(), (q.double() * s.double()).float()), name
    assert kinds == {("weight_scale_inv", ()), ("weight_scale", (1,))}  # per-tensor and per-channel both ran
    ratio = rel_rmse(_logits(llm), _logits(_llm(checkpoints.bf16)))
    print(f"per-tensor/per-channel FP8 vs bf16 logits: rmse ratio {ratio:.4f}")
    assert 0 < ratio < LOGITS_BOUND


def _broken(checkpoints, tmp_path: Path, edit) -> Path:
    tensors = dict(checkpoints.block_state)
    edit(tensors)
    return _write_checkpoint(tmp_path / "broken", checkpoints.bf16, tensors, FP8_QUANT)


def test_missing_scale_fails_loading_naming_the_weight(checkpoints, tmp_path):
    path = _broken(checkpoints, tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight_scale_inv"))
    with pytest.raises(WeightsError, match=r"without a scale \(1\): model\.layers\.1\.mlp\.up_proj\.weight "):
        _llm(path)


def test_orphan_scale_fails_loading_naming_the_scale(checkpoints, tmp_path):
    def edit(t):
        t["model.layers.0.mlp.extra_proj.weight_scale_inv"] = torch.ones(1, 1)
    with pytest.raises(WeightsError, match=r"without an FP8 weight \(1\): model\.layers\.0\.mlp\.extra_proj\."
                                           r"weight_scale_inv \(no model\.layers\.0\.mlp\.extra_proj\.weight"):
        _llm(_broken(checkpoints, tmp_path, edit))


def test_misshapen_scale_fails_naming_both(checkpoints, tmp_path):
    def edit(t):  # gate_proj is 320x256: its grid is (3, 2); a scale computed without the ragged block is (2, 2)
        t["model.layers.0.mlp.gate_proj.weight_scale_inv"] = t["model.layers.0.mlp.gate_proj.weight_scale_inv"][:2]
    with pytest.raises(WeightsError, match=r"scale model\.layers\.0\.mlp\.gate_proj\.weight_scale_inv has shape "
                                           r"\(2, 2\), but FP8 weight model\.layers\.0\.mlp\.gate_proj\.weight of "
                                           r"shape \(320, 256\) needs \(3, 2\)"):
        _llm(_broken(checkpoints, tmp_path, edit))


def _stream(*pairs):
    return list(dequantize_fp8(iter(pairs), FP8Config((BLOCK, BLOCK)), torch.float32))


def test_pairing_in_any_order_and_plain_tensors_pass_through():
    q, s = quantize_fp8_blocks(torch.randn(200, 130))
    norm = torch.ones(130)
    out = _stream(("a.weight_scale_inv", s), ("n.weight", norm), ("a.weight", q))  # scale first, as another shard
    assert [n for n, _ in out] == ["n.weight", "a.weight"]
    assert out[0][1] is norm and torch.equal(out[1][1], _reference(q, s).float())


@pytest.mark.parametrize("pairs, message", [
    ([("a.weight", "q"), ("a.weight_scale_inv", "s"), ("a.weight_scale", "s")],
     r"a\.weight has two scales, a\.weight_scale_inv and a\.weight_scale"),
    ([("a.weight_scale_inv", "s"), ("a.weight_scale", "s"), ("a.weight", "q")],
     r"a\.weight has two scales, a\.weight_scale_inv and a\.weight_scale"),
    ([("a.weight", "bf16"), ("a.weight_scale_inv", "s")], r"scale a\.weight_scale_inv belongs to a\.weight, which "
                                                           r"is stored as torch\.bfloat16, not FP8"),
    ([("a.weight_scale_inv", "s"), ("a.weight", "bf16")], r"scale a\.weight_scale_inv belongs to a\.weight, which "
                                                           r"is stored as torch\.bfloat16, not FP8"),
    ([("a.weight", "e5m2"), ("a.weight_scale_inv", "s")], r"FP8 weight a\.weight is stored as torch\.float8_e5m2"),
    ([("a.weight", "q"), ("a.weight_scale_inv", "s3d")], r"scale a\.weight_scale_inv has shape \(2, 2, 1\)"),
])
def test_pairing_errors_name_the_tensors(pairs, message):
    q, s = quantize_fp8_blocks(torch.randn(200, 130))
    tensors = {"q": q, "s": s, "s3d": s[..., None], "bf16": torch.zeros(200, 130, dtype=torch.bfloat16),
               "e5m2": q.float().to(torch.float8_e5m2)}
    with pytest.raises(WeightsError, match=message):
        _stream(*[(n, tensors[k]) for n, k in pairs])


@pytest.mark.parametrize("change, message", [
    ({"fmt": "e5m2"}, r"quantization_config\.fmt='e5m2' is not supported"),
    ({"activation_scheme": "static"}, r"activation_scheme='static' is not supported"),
    ({"weight_block_size": [128]}, r"weight_block_size=\[128\] must be two positive integers"),
    ({"quant_method": "bitsandbytes"}, r"quant_method='bitsandbytes'\), which dockyard cannot load yet"),
])
def test_config_dockyard_cannot_honour_is_refused(checkpoints, tmp_path, change, message):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy(checkpoints.block / name, tmp_path / name)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {**FP8_QUANT, **change}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=message):
        resolve_model(tmp_path)

