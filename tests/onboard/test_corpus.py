"""Every real config in ../shared/configs onboards with dummy weights, or fails inspect saying what is missing.

Run in-process with the dummy gate's layer count and memory reduced so the whole corpus stays fast;
the real, features and serve-smoke gates are skipped (the bundled-model test runs them).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dockyard.onboard import OnboardOptions, run_onboard
from dockyard.onboard.report import load_schema
from dockyard.registry import MODEL_REGISTRY

CONFIGS = Path(__file__).resolve().parents[2].parent / "shared" / "configs"
NAMES = sorted(p.parent.name for p in CONFIGS.glob("*/config.json")) if CONFIGS.is_dir() else []


@pytest.mark.skipif(not NAMES, reason="../shared/configs is not present")
@pytest.mark.parametrize("name", NAMES)
def test_config_onboards_or_names_what_is_missing(name, tmp_path):
    run = run_onboard(OnboardOptions(model=str(CONFIGS / name), out=tmp_path, weights="dummy", device="cpu",
                                     num_layers=2, dummy_memory_gib=1.0,
                                     skip=("real", "features", "performance", "serve-smoke")))
    gates = {r.name: r for r in run.results}
    for r in run.results:
        assert "internal error" not in r.summary, (r.name, r.summary)
    inspect = gates["inspect"]
    assert isinstance(inspect.evidence["unrecognised_keys"], list)  # every key accounted for, or named here
    if inspect.status == "pass":
        assert inspect.evidence["unrecognised_keys"] == []
        assert gates["equivalence"].status in ("pass", "skip"), gates["equivalence"].summary
        if gates["equivalence"].status == "skip":
            assert "transformers" in gates["equivalence"].summary
        assert gates["dummy"].status == "pass", gates["dummy"].summary
        assert gates["dummy"].evidence["first_request"]["logits_finite"]
    else:
        assert inspect.status == "fail"
        missing = inspect.evidence["missing_features"]
        assert missing or inspect.evidence["spec_error"] or inspect.evidence["unrecognised_keys"] or (
            "checkpoint layout" in inspect.summary), inspect.summary
        assert any(s in inspect.summary for s in ("missing: ", "does not validate", "checkpoint layout",
                                                  "unrecognised config keys"))
        assert inspect.evidence["nearest_family"]["family"] in {e.family for e in MODEL_REGISTRY.values()}
        assert all(r.status == "skip" and "inspect" in r.summary for r in run.results[1:] if r.name not in
                   ("real", "features", "serve-smoke"))
        assert run.exit_code == 1
    assert (tmp_path / "report.md").exists()
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(json.loads((tmp_path / "report.json").read_text()), load_schema())
