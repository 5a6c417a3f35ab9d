"""MXFP4 (gpt-oss's published layout) loads, dequantized: a shrunken gpt-oss written in the test.

The packer here follows the format's definition in float64/integer math (e2m1 values from their sign,
exponent and mantissa bits; e8m0 scales as 2^(s - 127); two nibbles per byte, the low one first; each
expert bank stored [E, out, in] with the blocks along ``in``). The expert weights are drawn on the
MXFP4 grid, so the float64 weights the HF model holds are exactly what the checkpoint stores; HF
transformers' own MXFP4 loader (dequantizing on CPU) reads the same files as a second reference.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dockyard import LLM
from dockyard.errors import WeightsError
from dockyard.onboard.config_surgery import shrink_config
from dockyard.onboard.equivalence import build_reference
from dockyard.testing import paged_logits, rel_rmse
from dockyard.weights.mxfp4 import dequantize_mxfp4
from tests.shared_configs import shared_config

transformers = pytest.importorskip("transformers")


def e2m1(code: int) -> float:
    """An FP4 nibble's value: sign bit, 2 exponent bits (bias 1), 1 mantissa bit; exponent 0 subnormal."""
    sign = -1.0 if code & 8 else 1.0
    exponent, mantissa = (code >> 1) & 3, code & 1
    return sign * (mantissa / 2 if exponent == 0 else (1 + mantissa / 2) * 2.0 ** (exponent - 1))


E2M1 = torch.tensor([e2m1(c) for c in range(16)], dtype=torch.float64)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Nibble codes [..., K] → bytes [..., K / 32, 16], element 2j in the low nibble of byte j."""
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.reshape(*codes.shape[:-1], codes.shape[-1] // 32, 16).contiguous()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(folder of the MXFP4 checkpoint, the HF model holding the same weights, its config)."""
    config = shared_config("openai--gpt-oss-20b")
    small, _ = shrink_config(config)
    small["architectures"] = config["architectures"]
    ref = build_reference(small)
    gen = torch.Generator().manual_seed(0)
    packed = {}
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                experts, k, n = p.shape  # the model's [E, in, out]; stored [E, out, in]
                codes = torch.randint(0, 16, (experts, n, k), generator=gen, dtype=torch.uint8)
                scales = torch.randint(123, 129, (experts, n, k // 32), generator=gen, dtype=torch.uint8)
                weight = E2M1[codes.long()] * torch.pow(2.0, scales.double() - 127).repeat_interleave(32, dim=-1)
                p.copy_(weight.transpose(1, 2))
                packed[name + "_blocks"], packed[name + "_scales"] = pack(codes), scales
    folder = tmp_path_factory.mktemp("gpt-oss-mxfp4")
    ref.save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    tensors = {k: v for k, v in tensors.items() if not k.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    save_file({**tensors, **packed}, folder / "model.safetensors", metadata={"format": "pt"})
    saved = json.loads((folder / "config.json").read_text())
    saved["quantization_config"] = config["quantization_config"]  # the published one, modules_to_not_convert too
    (folder / "config.json").write_text(json.dumps(saved))
    return folder, ref, small


def test_mxfp4_checkpoint_loads_and_equals_hf(checkpoint):
    folder, ref, small = checkpoint
    ids = torch.randint(0, small["vocab_size"], (24,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids[None]).logits[0]
    llm = LLM(str(folder), dtype="float32", device="cpu", kv_cache_memory_bytes=1 << 24)
    assert llm.source.quantization == "mxfp4"
    got = paged_logits(llm.model, ids.tolist(), [24])  # the loaded weights, not chunking (tests/models)
    assert rel_rmse(got, expected) <= 1e-5
    # HF transformers' MXFP4 loader on the same files (it dequantizes on CPU) agrees with the weights.
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32,
        attn_implementation="eager")
    with torch.no_grad():
        assert rel_rmse(hf(ids[None]).logits[0], expected) <= 1e-5


def test_unpaired_or_misshapen_blocks_are_named(checkpoint):
    folder = checkpoint[0]
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.0.mlp.experts.down_proj"
    without_scales = [(k, v) for k, v in tensors.items() if k != name + "_scales"]
    with pytest.raises(WeightsError, match=rf"{name}_scales"):
        list(dequantize_mxfp4(without_scales, torch.float32))
    wrong = [(name + "_blocks", tensors[name + "_blocks"]), (name + "_scales", tensors[name + "_scales"][..., :1])]
    with pytest.raises(WeightsError, match="do not form MXFP4 blocks"):
        list(dequantize_mxfp4(wrong, torch.float32))

