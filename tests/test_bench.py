"""`dockyard bench latency|throughput` on a tiny dummy model (CPU): the figures agree with their rooflines as the
docs define them, and --plot writes a readable image (read back with matplotlib)."""

from __future__ import annotations

import json
import math

import matplotlib.image
import pytest

from dockyard.cli import main as cli_main

from .onboard.test_units import TINY


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "config.json"
    path.write_text(json.dumps(TINY))
    return str(path)


def _bench(kind: str, tiny: str, plot, capsys, *flags: str) -> dict:
    """``dockyard bench KIND`` on the tiny model with --json and --plot: its printed result."""
    assert cli_main(["bench", kind, "--model", tiny, "--load-format", "dummy", "--device", "cpu", *flags, "--json",
                     "--plot", str(plot)]) == 0
    return json.loads(capsys.readouterr().out)


def test_bench_latency_and_its_plot(tiny, tmp_path, capsys):
    plot = tmp_path / "latency.png"
    result = _bench("latency", tiny, plot, capsys, "--batch-sizes", "1", "3", "--output-len", "6", "--input-lens",
                    "16", "64")
    assert [r["batch"] for r in result["decode"]] == [1, 3] and [r["input_len"] for r in result["ttft"]] == [16, 64]
    bandwidth = result["copy_GB_per_s"] * 1e9
    for r in result["decode"]:
        # roofline = batch tokens per (bytes read in a step / copy bandwidth); the rounding of the GB/s figure aside
        assert r["roofline_tokens_per_s"] == pytest.approx(r["batch"] * bandwidth / r["bytes_per_step"], rel=1e-2)
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * r["decode_steps"] / r["seconds"], rel=2e-2)
        assert 0 < r["fraction_of_roofline"] < math.inf
    for r in result["ttft"]:  # the forward's host time is part of the whole (on a CPU, nearly all of it)
        assert 0 < r["forward_host_seconds"] <= r["seconds"]
    image = matplotlib.image.imread(plot)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400


def test_bench_throughput_and_its_plot(tiny, tmp_path, capsys):
    plot = tmp_path / "throughput.png"
    result = _bench("throughput", tiny, plot, capsys, "--num-prompts", "6", "--input-len", "8", "24",
                    "--output-len", "2", "6")
    assert result["num_prompts"] == 6 and 6 * 2 <= result["output_tokens"] <= 6 * 6
    roof = result["roofline"]
    # fraction = floor / elapsed and roofline tokens/s = output tokens / floor: their product is the measured rate
    assert roof["fraction_of_roofline"] == pytest.approx(
        result["output_tokens_per_s"] / roof["roofline_output_tokens_per_s"], rel=0.05, abs=2e-3)
    assert roof["model_flops"] > 0 and roof["steps"] >= 2  # a prefill step and a decode step at least
    assert matplotlib.image.imread(plot).shape[0] > 200


def test_bench_plot_path_that_cannot_be_written_is_a_clear_error(tiny, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = cli_main(["bench", "latency", "--model", tiny, "--load-format", "dummy", "--device", "cpu",
                     "--batch-sizes", "1", "--output-len", "2", "--input-lens", "16", "--plot",
                     str(blocker / "x.png")])
    assert code != 0 and f"--plot {blocker / 'x.png'}: cannot write it" in capsys.readouterr().err
    code = cli_main(["bench", "latency", "--model", tiny, "--plot", str(tmp_path / "plot.txt")])
    assert code != 0 and "give a file name ending in .png, .svg, .pdf" in capsys.readouterr().err
