"""A multimodal checkpoint (Gemma 3 with a vision tower) runs its language model from text_config.

The HF model is saved with ``save_pretrained`` (published layout: ``language_model.model.*``,
``vision_tower.*``, ``multi_modal_projector.*``); dockyard loads the text weights, leaves the towers
out, and its logits on a text-only prompt equal HF's own model on the same input.
"""

from __future__ import annotations

import pytest
import torch

from dockyard import LLM
from dockyard.onboard.config_features import detect_features
from tests.helpers import rel_rmse


def test_gemma3_multimodal_checkpoint_runs_its_language_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    text = dict(model_type="gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=300, sliding_window=8,
                max_position_embeddings=128, sliding_window_pattern=2)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=299, boi_token_index=297, eoi_token_index=298)
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (p.shape[-1] ** -0.5 if p.dim() > 1 else 0.1))
    hf.save_pretrained(tmp_path)

    llm = LLM(str(tmp_path), dtype="float32", device="cpu", num_kv_blocks=16)
    assert llm.spec.architecture == "Gemma3ForConditionalGeneration"
    assert set(llm.spec.layer_types) == {"sliding_attention", "full_attention"}
    ignored = llm.load_report.ignored
    assert ignored and all(n.startswith(("vision_tower.", "multi_modal_projector.")) for n in ignored)

    ids = torch.randint(0, 290, (24,), generator=gen)
    with torch.no_grad():
        ref = hf(input_ids=ids[None]).logits[0].float()
        ours = llm.model.compute_logits(llm.model(ids, torch.arange(24)))
    assert rel_rmse(ours, ref) < 1e-5
    # The features gate's input: multimodal is a checkpoint property, not a missing architecture feature.
    keys = {f.key: f.kind for f in detect_features(config.to_dict())}
    assert keys.get("multimodal") == "checkpoint"
