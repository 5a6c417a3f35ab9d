"""The equivalence gate notices each feature broken on purpose (the mutation check), by a wide margin.

The full table (every architecture, every claimed feature) is rendered into docs/supported-models.md and
checked by tests/test_supported_models.py; here the two cases the gate once missed, with their margins,
and the check's own ability to report an ablation it does not notice.
"""

from __future__ import annotations

import logging

import pytest

from dockyard.onboard.ablations import ABLATIONS, Ablation
from dockyard.onboard.equivalence import TOLERANCES, check_equivalence, shrink_config
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
