"""The performance gate on a tiny dummy model (CPU): it runs, every fraction of the roofline is a positive finite
number that agrees with the raw figures, the scaled-down note is there, and report.md / tutorial.md show it."""

from __future__ import annotations

import json
import math

import pytest

from dockyard.onboard import OnboardOptions, run_onboard

from .test_units import TINY

jsonschema = pytest.importorskip("jsonschema")


def test_performance_gate_on_cpu(tmp_path):
    from dockyard.onboard.report import load_schema

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(TINY))
    run = run_onboard(OnboardOptions(model=str(tmp_path / "m"), out=tmp_path / "out", weights="dummy", device="cpu",
                                     skip=("equivalence", "real", "features", "serve-smoke")))
    gate = run.gate("performance")
    assert gate.status == "pass", gate.summary
    ev = gate.evidence
    assert ev["scaled_down"] is True and "scaled down on CPU" in ev["scaled_down_note"]
    assert "CPU, scaled down" in gate.summary and ev["warnings"] == []  # warnings are for GPU runs
    bandwidth, rate = ev["copy_bytes_per_s"], ev["matmul_flops_per_s"]
    assert [r["batch"] for r in ev["decode"]] == [1, 4]
    for r in ev["decode"]:
        assert 0 < r["fraction_of_roofline"] < math.inf
        # The fraction is tokens/s over (batch tokens per floor of bytes / bandwidth), recomputed here.
        floor_s = r["bytes_per_step"] / bandwidth
        assert r["fraction_of_roofline"] == pytest.approx(r["tokens_per_s"] * floor_s / r["batch"], rel=2e-2, abs=6e-4)
        assert r["decode_steps"] >= 8 - 1
    # Bounded by the model's max length (256): 64 and 255 tokens.
    assert [r["input_len"] for r in ev["ttft"]] == [64, 255]
    for r in ev["ttft"]:
        assert 0 < r["mfu"] < math.inf
        assert r["mfu"] == pytest.approx(r["model_flops"] / r["seconds"] / rate, rel=2e-2, abs=6e-5)
    jsonschema.validate(run.report, load_schema())
    md = (tmp_path / "out" / "report.md").read_text()
    assert "### performance: pass" in md and "| decode batch | tokens/s |" in md and "scaled down on CPU" in md
    tutorial = (tmp_path / "out" / "tutorial.md").read_text()
    perf = tutorial.split("## Performance", 1)[1]
    assert "| decode, batch 1 |" in perf and "| time to first token, 255 tokens |" in perf
    assert f"{ev['decode'][0]['tokens_per_s']:,.1f} tokens/s" in perf


def test_a_prefill_that_waited_on_the_host_is_named_by_its_own_figures():
    """A time to first token whose forward took ≥ 0.8 of it to queue is host-bound (the GPU would have waited);
    one whose forward queued in a fraction of it is not: its cause lies elsewhere."""
    from dockyard.onboard.gates.performance import _host_bound

    waited = {"input_len": 1024, "seconds": 0.0470, "forward_host_seconds": 0.0440}
    assert _host_bound(waited) == ["the prefill of 1,024 tokens waited on the host: queueing its eager forward took "
                                   "44.0 of its 47.0 ms"]
    assert _host_bound({"input_len": 8192, "seconds": 0.2394, "forward_host_seconds": 0.0220}) == []
