"""Which implementation runs a config: a native dockyard family, or transformers' own classes (the generic path).

``--model-impl`` / ``LLM(model_impl=...)``: ``dockyard`` insists on the native family (its errors as
they are), ``transformers`` insists on the generic path (:mod:`dockyard.models.generic`), and ``auto`` (the
default) takes the native family when the registry has the architecture, it covers every architectural
feature the config asks for and no config key is unrecognised (the inspect gate's test), else the generic
path. Remote code (``auto_map`` with a model_type transformers does not ship) runs only with
``trust_remote_code`` and its modeling file in the model directory; otherwise the refusal names both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dockyard.errors import AbsurdConfigError, ConfigError, DockyardError, UnsupportedArchitectureError
from dockyard.onboard.config_features import coverage, detect_features, unrecognised_keys
from dockyard.registry import MODEL_REGISTRY, supported_architectures
from dockyard.spec import ModelSpec

MODEL_IMPLS = ("auto", "dockyard", "transformers")


class RemoteCodeError(UnsupportedArchitectureError):
    """The config's architecture is remote code (``auto_map``) that may not, or cannot, run here."""


@dataclass(frozen=True)
class ImplChoice:
    """The implementation that runs a config, and why (the inspect gate and the report show ``reason``)."""

    impl: str  # "dockyard" | "transformers"
    reason: str
    remote_code_dir: str | None = None  # the generic path runs the modeling code found there
    native_gaps: tuple[str, ...] = ()  # what keeps the native family from running it (empty: nothing)


def native_gaps(config: dict[str, Any]) -> list[str]:
    """Why no native family runs ``config`` (empty: one does): architecture not registered, features its
    family lacks, unrecognised keys, or a config the spec refuses."""
    archs = config.get("architectures")
    arch = str(archs[0]) if isinstance(archs, list) and archs else None
    if arch not in MODEL_REGISTRY:
        return [f"no dockyard family for architecture {arch!r}"]
    gaps = []
    missing = coverage(detect_features(config), arch).missing
    if missing:
        gaps.append("its family lacks " + ", ".join(f.label for f in missing))
    unknown = unrecognised_keys(config)
    if unknown:
        gaps.append("unrecognised config keys " + ", ".join(unknown))
    try:
        ModelSpec.from_hf_config(config)
    except AbsurdConfigError:
        raise  # no path runs it: the refusal is the answer
    except ConfigError as exc:
        gaps.append(f"the spec refuses the config ({exc})")
    return gaps


def transformers_ships(model_type: str) -> bool:
    """Whether the installed transformers implements ``model_type`` itself (no remote code needed)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return model_type in CONFIG_MAPPING_NAMES


def with_standard_names(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the sizes its transformers config class keeps under its own names (GPT-2's ``n_layer``,
    ``n_embd``, ...) renamed to the standard ones (``num_hidden_layers``, ``hidden_size``, ...), which that
    class also accepts: what code that resizes a config dict reads and edits."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = str(config.get("model_type") or "")
    if model_type not in CONFIG_MAPPING:
        return config
    out = dict(config)
    for standard, own in CONFIG_MAPPING[model_type].attribute_map.items():
        if standard not in out and own in out:
            out[standard] = out.pop(own)
    return out


def remote_code_file(config: dict[str, Any]) -> str | None:
    """The modeling file a config's ``auto_map`` names for ``AutoModelForCausalLM`` (None: no remote code)."""
    auto_map = config.get("auto_map")
    ref = auto_map.get("AutoModelForCausalLM") if isinstance(auto_map, dict) else None
    if not isinstance(ref, str) or "." not in ref:
        return None
    module = ref.split("--")[-1].rsplit(".", 1)[0]
    return module.replace(".", "/") + ".py"


def _generic_source(config: dict[str, Any], model_dir: Path | None, trust_remote_code: bool) -> str | None:
    """The remote-code directory the generic path needs for ``config`` (None: transformers' own class), or a
    RemoteCodeError / UnsupportedArchitectureError saying why it cannot run."""
    model_type = str(config.get("model_type") or "")
    if transformers_ships(model_type):
        return None
    file = remote_code_file(config)
    if file is None:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is neither a dockyard family nor implemented by the installed transformers, "
            "and config.json has no auto_map naming modeling code; upgrade transformers or use a supported model")
    where = model_dir / file if model_dir is not None else None
    if not trust_remote_code:
        raise RemoteCodeError(
            f"model_type {model_type!r} is remote code: config.json's auto_map runs {file} from the model "
            "directory; pass --trust-remote-code (LLM(trust_remote_code=True)) to run it, after reading it")
    if where is None or not where.exists():
        raise RemoteCodeError(
            f"model_type {model_type!r} is remote code whose modeling file {file} is not in "
            f"{model_dir if model_dir is not None else 'the model directory (a config.json alone was given)'}; "
            f"put {file} beside config.json (dockyard never downloads code)")
    return str(model_dir)


def choose_model_impl(config: dict[str, Any], requested: str = "auto", model_dir: Path | None = None,
                      trust_remote_code: bool = False) -> ImplChoice:
    """The implementation that runs ``config`` under ``requested`` (auto | dockyard | transformers)."""
    if requested not in MODEL_IMPLS:
        raise DockyardError(f"model_impl={requested!r} is not one of {', '.join(MODEL_IMPLS)}")
    gaps = tuple(native_gaps(config))
    if requested == "dockyard":
        return ImplChoice("dockyard", "asked for (--model-impl dockyard)", native_gaps=gaps)
    if requested == "auto" and not gaps:
        return ImplChoice("dockyard", "a native dockyard family covers every feature of the config")
    try:
        remote = _generic_source(config, model_dir, trust_remote_code)
    except UnsupportedArchitectureError as exc:
        if requested == "auto" and gaps:
            raise type(exc)(f"{exc} (native path: {'; '.join(gaps)}; dockyard families run "
                            f"{', '.join(supported_architectures())})") from None
        raise
    why = "asked for (--model-impl transformers)" if requested == "transformers" else "; ".join(gaps)
    where = f"remote code from {remote}" if remote else "the installed transformers' own classes"
    return ImplChoice("transformers", f"generic path ({where}): {why}", remote, gaps)
