"""docs/supported-models.md is what ``dockyard models`` renders now (regenerate it when this fails)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dockyard.cli import main
from dockyard.supported_models import render
from tests.shared_configs import CONFIGS_DIR

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "supported-models.md"
REGENERATE = ("dockyard models --write docs/supported-models.md --configs ../shared/configs "
              "--configs tests/data/configs")


def test_supported_models_page_is_current():
    pytest.importorskip("transformers")
    if not CONFIGS_DIR.is_dir():
        pytest.skip("../shared/configs is not present: the page lists configs from it")
    fresh = render([CONFIGS_DIR, ROOT / "tests" / "data" / "configs"])
    assert PAGE.read_text() == fresh, f"docs/supported-models.md is stale; run: {REGENERATE}"
    # Every real config of a registered architecture passes; every claimed feature was broken on purpose
    # and the gate noticed (a claim no config exercises, or an ablation the gate passes, is listed as NOT ...).
    assert "fail" not in fresh.split("## Mutation check")[0].replace("failure", "")
    assert "NOT CHECKED" not in fresh and "NOT CAUGHT" not in fresh
    # Only structural features may be caught by the strict loader (a tensor missing or left over) rather than by
    # a numerical level: an untied LM head has no checkpoint tensor, a dense layer turned MoE has no experts.
    caught_at_load = {row.split("|")[2].strip(" `") for row in fresh.splitlines() if "| load '" in row}
    assert caught_at_load <= {"tied_embeddings", "moe_dense_layers"}, caught_at_load


def test_catches_needs_configs_to_run_the_mutation_check_on(capsys):
    assert main(["models", "--catches"]) == 2
    assert "--catches runs the mutation check on real configs: give --configs DIR" in capsys.readouterr().err
