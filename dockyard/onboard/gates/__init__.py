"""The onboarding gates, in the order they run. Each is ``run(ctx: GateContext) -> Outcome``."""

from __future__ import annotations

from collections.abc import Callable

from dockyard.onboard.context import GateContext, Outcome
from dockyard.onboard.gates import capacity, dummy, equivalence, features, fit, inspect, performance, real, serve_smoke

Gate = Callable[[GateContext], Outcome]

GATES: tuple[tuple[str, Gate, str], ...] = (
    ("inspect", inspect.run, "config parses and validates; architecture found in the registry"),
    ("fit", fit.run, "memory plan against the target device"),
    ("equivalence", equivalence.run, "block → layer → model → decode against HF transformers (shrunken config)"),
    ("dummy", dummy.run, "engine starts with dummy weights at true shapes and answers a first request"),
    ("real", real.run, "real weights load completely; greedy output equals the HF reference"),
    ("features", features.run, "CUDA graph, torch.compile, TP, EP, FP8, MTP, multimodal"),
    ("capacity", capacity.run, "max model length from the config vs practical on the device"),
    ("performance", performance.run, "decode tokens/s and time to first token as fractions of the measured roofline"),
    ("serve-smoke", serve_smoke.run, "HTTP server answers a chat and a completion request"),
)
