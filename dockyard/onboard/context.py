"""Shared state of one onboarding run: its options, the machine, what earlier gates learned.

A gate is a function ``(GateContext) -> Outcome``. It reads what earlier gates stored on the
context (the raw config, the spec, the memory plan, ...) and returns its status, a one-line
summary and its evidence; the runner adds timing and the log path to make a :class:`GateResult`.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from dockyard.dtypes import DTYPE_CHOICES
from dockyard.engine_args import KV_CACHE_DTYPES
from dockyard.errors import DockyardError
from dockyard.model_path import locate_model
from dockyard.spec import read_config_json
from dockyard.weights.gguf_metadata import GGUFFile

if TYPE_CHECKING:  # annotations only: this module stays importable without torch (the CLI reads its choices)
    import torch

    from dockyard.memory import MemoryPlan
    from dockyard.model_source import ModelSource
    from dockyard.onboard.config_features import Feature
    from dockyard.onboard.machine import Machine
    from dockyard.spec import ModelSpec

GATE_NAMES = ("inspect", "fit", "equivalence", "dummy", "real", "features", "capacity", "performance",
              "serve-smoke")
# Verdict of a finished run → exit status of `dockyard onboard` (2 is a usage error: no run, no report).
EXIT_CODES = {"PASS": 0, "FAIL": 1, "PASS-PARTIAL": 3}
WEIGHTS_CHOICES = ("auto", "dummy", "real")


@dataclass
class OnboardOptions:
    """What ``dockyard onboard`` was asked to do (the CLI flags, as a value)."""

    model: str | None = None  # directory, config.json or .gguf; None = the bundled model
    out: str | Path | None = None  # default reports/<model-name>/
    weights: str = "auto"  # auto | dummy | real
    device: str = "auto"  # auto | cpu | cuda
    device_memory_gib: float | None = None  # plan against a GPU of this much memory
    dtype: str = "auto"  # dtype of the runs (auto: float32 on CPU, the checkpoint's on a GPU)
    num_layers: int | None = None  # layer count of the dummy gate (default: all that fit)
    dummy_memory_gib: float | None = None  # memory the dummy gate may use (default: most of what is free)
    skip: tuple[str, ...] = ()  # gates not to run
    compile_backend: str | None = None  # torch.compile backend of the features gate (default inductor)
    serve_timeout_s: float = 300.0
    seed: int = 0
    model_impl: str = "auto"  # auto | dockyard | transformers (dockyard.model_impl)
    trust_remote_code: bool = False  # run the modeling code the config's auto_map names
    kv_cache_dtype: str = "auto"  # the plan's KV cache (fit, capacity): auto | fp8 | fp8_e4m3 (1 byte per element)
    # Where MODEL's files come from (dockyard.hub; the engine's flags of the same names): every gate that reads the
    # model, and the server serve-smoke starts, use them.
    revision: str | None = None
    download_dir: str | None = None
    tokenizer: str | None = None
    generation_config: str = "auto"

    def validate(self) -> None:
        if self.weights not in WEIGHTS_CHOICES:
            raise DockyardError(f"--weights {self.weights!r} is not one of {', '.join(WEIGHTS_CHOICES)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise DockyardError(f"--device {self.device!r} is not one of auto, cpu, cuda")
        if self.model_impl not in ("auto", "dockyard", "transformers"):
            raise DockyardError(f"--model-impl {self.model_impl!r} is not one of auto, dockyard, transformers")
        if self.dtype not in DTYPE_CHOICES:
            raise DockyardError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPE_CHOICES)}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise DockyardError(f"--kv-cache-dtype {self.kv_cache_dtype!r} is not one of {', '.join(KV_CACHE_DTYPES)}")
        unknown = [g for g in self.skip if g not in GATE_NAMES]
        if unknown:
            raise DockyardError(f"--skip {', '.join(unknown)}: no such gate; gates: {', '.join(GATE_NAMES)}")
        if self.num_layers is not None and self.num_layers < 1:
            raise DockyardError(f"--num-layers {self.num_layers} must be at least 1")
        for name in ("device_memory_gib", "dummy_memory_gib"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise DockyardError(f"--{name.removesuffix('_gib').replace('_', '-')} {value} must be a positive "
                                    "number of GiB")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["out"] = None if self.out is None else str(self.out)
        out["skip"] = list(self.skip)
        return out


@dataclass
class Outcome:
    """What a gate function returns. ``hard``: a failure stops the gates after it."""

    status: str
    summary: str
    evidence: dict[str, Any] = field(default_factory=dict)
    hard: bool = True


@dataclass
class GateResult:
    """One gate's record in the report."""

    name: str
    status: str  # pass | fail | skip
    summary: str
    evidence: dict[str, Any]
    duration_s: float
    log_path: str | None
    hard: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RawModel:
    """The MODEL argument resolved to a name, a path and its raw config dict (nothing validated)."""

    name: str
    path: Path
    kind: str  # gguf | dir | config
    config: dict[str, Any]


def read_raw_model(model: str | Path | None, revision: str | None = None,
                   download_dir: str | Path | None = None) -> RawModel:
    """Locate MODEL the way ``resolve_model`` does, but stop at the raw config dict (a repo id names it)."""
    location = locate_model(model, revision, download_dir)
    path, repo_id = location.path, location.repo_id
    if path.is_file() and path.suffix == ".gguf":
        return RawModel(repo_id or path.stem, path, "gguf", GGUFFile(path).hf_config())
    if path.is_file():
        return RawModel(repo_id or path.resolve().parent.name, path, "config", read_config_json(path))
    return RawModel(repo_id or path.resolve().name, path, "dir", read_config_json(path / "config.json"))


@dataclass
class DummyRun:
    """What the dummy gate ran: the config after its reductions, and its first request."""

    layers: int
    total_layers: int
    true_shapes: bool  # the layer and embedding shapes that ran are the model's own
    reductions: list[str]
    config: dict[str, Any]
    load_seconds: float | None = None
    first_request: dict[str, Any] | None = None
    num_parameters_run: int | None = None


@dataclass
class RealRun:
    """What the real gate measured on the checkpoint's own weights (``passed``: its verdict)."""

    passed: bool = False
    load_seconds: float | None = None
    tensors_loaded: int | None = None
    generation: dict[str, Any] | None = None
    prompts: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class GateContext:
    """Everything gates share during one run. Each field is filled by the gate named beside it."""

    options: OnboardOptions
    machine: Machine
    out_dir: Path
    raw: RawModel | None = None  # inspect
    source: ModelSource | None = None  # inspect, once the config validated
    features: list[Feature] = field(default_factory=list)  # inspect
    plan: MemoryPlan | None = None  # fit
    dtype: torch.dtype | None = None  # fit: the dtype the engine runs in on this machine
    plan_fp8_path: str = ""  # fit: why the plan's FP8 checkpoint is kept FP8 or dequantized
    fits_device: bool | None = None  # fit
    dummy: DummyRun | None = None  # dummy
    real: RealRun = field(default_factory=RealRun)  # real
    serve_example: dict[str, Any] | None = None  # serve-smoke: the curl actually run, and its answer
    ladder: list[dict[str, Any]] = field(default_factory=list)  # fallback-ladder entries (features)
    feature_matrix: list[dict[str, Any]] = field(default_factory=list)  # features
    capacity: dict[str, Any] | None = None  # capacity
    accuracy: dict[str, Any] | None = None  # real: the accuracy run it made (onboard/accuracy.py)
    progress: TextIO | None = None  # the terminal's stream, for the running gate's sub-steps
    gate_label: str = ""  # "[5/8] real" while a gate runs
    gate_started: float = 0.0  # time.perf_counter() when it started

    def step(self, what: str) -> None:
        """Show the running gate's current sub-step and the time since the gate started on the terminal (a
        line of its own where the terminal cannot overwrite one), and record it in the gate's log."""
        elapsed = time.perf_counter() - self.gate_started
        print(f"# step at {elapsed:.1f}s: {what}", file=sys.stderr, flush=True)  # stderr is the gate's log here
        if self.progress is None:
            return
        line = f"{self.gate_label} … {what} ({elapsed:.0f}s)"
        # A terminal overwrites the line in place (carriage return, clear to end of line).
        self.progress.write(f"\r\033[K{line}" if self.progress.isatty() else line + "\n")
        self.progress.flush()

    @property
    def spec(self) -> ModelSpec | None:
        return None if self.source is None else self.source.spec

    @property
    def impl_kwargs(self) -> dict[str, Any]:
        """``LLM``'s / ``resolve_model``'s implementation keywords: the options' until inspect validated the spec,
        then the path inspect chose on the full config (a reduced copy is never re-decided: its trimmed or
        default-filled keys would read as new)."""
        impl = self.spec.model_impl if self.spec is not None else self.options.model_impl
        return {"model_impl": impl, "trust_remote_code": self.options.trust_remote_code}

    @property
    def source_kwargs(self) -> dict[str, Any]:
        """``LLM``'s / ``resolve_model``'s model-source keywords (revision, download dir, tokenizer, generation
        config): for every load of the user's MODEL, so each gate reads the same snapshot."""
        return {name: getattr(self.options, name) for name in SOURCE_FLAGS}

    @property
    def model_name(self) -> str:
        return self.raw.name if self.raw is not None else str(self.options.model or "model")


# OnboardOptions' model-source fields → the flags ``dockyard serve`` (and every engine command) takes for them.
SOURCE_FLAGS = {"revision": "--revision", "download_dir": "--download-dir", "tokenizer": "--tokenizer",
                "generation_config": "--generation-config"}


def source_flags(options: dict[str, Any]) -> list[str]:
    """The model-source flags of a run's options (``OnboardOptions.to_dict()``), for the commands it prints or runs."""
    out: list[str] = []
    for name, flag in SOURCE_FLAGS.items():
        value = options.get(name)
        if value is not None and not (name == "generation_config" and value == "auto"):
            out += [flag, str(value)]
    return out


def jsonable(value: Any) -> Any:
    """Evidence made JSON-safe: paths, dtypes, tuples and numbers become plain JSON values."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)
