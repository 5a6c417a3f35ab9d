"""The equivalence gate notices each feature broken on purpose (the mutation check), by a wide margin.

The full table (every architecture, every claimed feature) is rendered into docs/supported-models.md and
checked by tests/test_supported_models.py; here the two cases the gate once missed, with their margins,
and the check's own ability to report an ablation it does not notice.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

import dockyard.onboard.gates.equivalence as equivalence_gate
from dockyard.onboard import OnboardOptions, run_onboard
from dockyard.onboard.ablations import ABLATIONS, Ablation
from dockyard.onboard.config_surgery import SEQ_LEN, shrink_config
from dockyard.onboard.equivalence import TOLERANCES, build_reference, check_equivalence
from tests.shared_configs import shared_config

pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)


def _mutations(name: str, ablations: list[Ablation]):
    result = check_equivalence(shared_config(name), ablations=ablations)
    assert result.status == "pass", result.reason  # the intact model agrees before anything is broken
    return {m.feature: m for m in result.mutations}


def test_grouped_routing_keeping_the_worst_groups_fails_by_far():
    config = shared_config("deepseek-ai--DeepSeek-V3")
    small, _ = shrink_config(config)
    assert small["n_group"] >= 2 and small["topk_group"] < small["n_group"]
    m = _mutations("deepseek-ai--DeepSeek-V3", [ABLATIONS["moe_grouped_routing"]])["moe_grouped_routing"]
    assert m.caught and m.caught_by.block.startswith("mlp") and "MoE" in m.caught_by.block
    assert m.margin() >= 10, m.caught_by


def test_gemma2_attention_softcap_removed_fails_by_far():
    found = _mutations("google--gemma-2-2b", [ABLATIONS["attn_softcap"], ABLATIONS["final_softcap"]])
    attn, final = found["attn_softcap"], found["final_softcap"]
    assert attn.caught and attn.caught_by.block.startswith("attention"), attn.caught_by
    assert attn.margin() >= 10 and attn.caught_by.tolerance == TOLERANCES["float32"]["attention"]
    assert final.caught and final.caught_by.block == "prefill logits" and final.margin() >= 10


def test_an_ablation_that_changes_nothing_is_reported_as_not_caught():
    unchanged = Ablation("gqa", "nothing changed", spec=lambda spec: spec)
    m = _mutations("Qwen--Qwen3-0.6B", [unchanged])["gqa"]
    assert not m.caught and m.margin() is None


TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "hidden_act": "silu", "attention_bias": True,
              "tie_word_embeddings": True}
_LATER_GATES = ("dummy", "real", "features", "capacity", "performance", "serve-smoke")


def _onboard_equivalence(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(TINY_LLAMA))
    run = run_onboard(OnboardOptions(model=str(tmp_path / "m"), out=tmp_path / "out", weights="dummy",
                                     device="cpu", skip=_LATER_GATES))
    return run.gate("equivalence")


def test_onboarding_gate_runs_the_mutation_check_for_the_models_features(tmp_path):
    gate = _onboard_equivalence(tmp_path)
    assert gate.status == "pass", gate.summary
    found = {m["feature"]: m for m in gate.evidence["mutations"]}
    assert set(found) == {"gqa", "attention_bias", "rope:default", "activation:silu", "tied_embeddings"}
    assert all(m["caught"] for m in found.values()), found
    assert found["attention_bias"]["caught_by"].startswith("block 'attention'")
    assert "covered features, ablated, fails it" in gate.summary
    md = (tmp_path / "out" / "report.md").read_text()  # the reviewer's page: each ablation, its level and margin
    for m in found.values():
        factor = f"×{m['rel_err'] / m['tolerance']:,.0f}" if m["rel_err"] is not None else "—"
        assert f"| `{m['feature']}` | {m['what']} | {m['caught_by']} | " in md and f" | {factor} |" in md, m


def test_an_ablation_the_gate_misses_fails_it_softly(tmp_path, monkeypatch):
    monkeypatch.setattr(equivalence_gate, "ablations_for",
                        lambda keys: [Ablation("gqa", "nothing changed", spec=lambda spec: spec)])
    gate = _onboard_equivalence(tmp_path)
    assert gate.status == "fail" and not gate.hard
    assert "with gqa ablated it still passes" in gate.summary


@pytest.mark.parametrize("name", ["Qwen--Qwen3-30B-A3B", "deepseek-ai--DeepSeek-V3"])
def test_shrunken_moe_routes_to_many_experts_with_unequal_loads(name):
    # The routers of the HF reference (its own weights), on the comparison's kind of input: unit-scale hidden states.
    cfg, _ = shrink_config(shared_config(name))
    model = build_reference(cfg)
    gate = next(p for n, p in model.named_parameters() if n.endswith("mlp.gate.weight"))
    top_k = cfg["num_experts_per_tok"]
    assert gate.shape[0] > top_k
    hidden = torch.randn(SEQ_LEN, gate.shape[1], generator=torch.Generator().manual_seed(1))
    loads = torch.bincount((hidden @ gate.T).topk(top_k, dim=-1).indices.flatten(), minlength=gate.shape[0])
    assert (loads > 0).sum() > top_k and loads.max() > loads.min(), loads
