"""Find what MODEL names: a local path, or a Hugging Face repo id in the local HF cache.

vLLM users write ``dockyard serve Qwen/Qwen3-8B``. A MODEL that is not an existing path but reads as
a repo id (``name`` or ``org/name``) is looked up through ``huggingface_hub``: first in the local
cache only (``HF_HUB_CACHE``, by default under ``HF_HOME``; ``--download-dir`` replaces it), at
``--revision`` (a branch or tag through ``refs/``, or a commit hash; default ``main``); when it is not
there and the hub is not switched off (``HF_HUB_OFFLINE=1``), the config, tokenizer and safetensors
files are downloaded into that cache. The cache is read before the network, so a cached model starts
without a connection (a newer upstream commit is not looked for).

Only ``huggingface_hub`` is imported here (no torch): the CLI resolves MODEL before anything heavy.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

from dockyard.errors import ModelNotFoundError

# What the hub accepts as a repo id: one optional namespace, letters, digits, '-', '_', '.'.
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
# Files a download fetches: enough to build the spec, load safetensors weights and tokenize.
DOWNLOAD_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken")
PATH_HINT = "give a directory with config.json, a config.json file, a .gguf file, or a Hugging Face repo id"


@dataclass(frozen=True)
class ModelLocation:
    """Where MODEL's files are: ``path`` on disk, and the repo id they came from (None for a path)."""

    path: Path
    repo_id: str | None = None
    revision: str | None = None


def looks_like_repo_id(model: str) -> bool:
    """Whether ``model`` could be a hub repo id rather than a path (``org/name`` or ``name``)."""
    if model.startswith((".", "~", "/")) or model.endswith((".gguf", ".json")):
        return False
    return bool(_REPO_ID.match(model)) and "--" not in model and ".." not in model


def hub_cache_dir(download_dir: str | Path | None = None) -> Path:
    """The HF hub cache that lookups and downloads use: ``download_dir``, else ``HF_HUB_CACHE``/``HF_HOME``."""
    if download_dir is not None:
        return Path(download_dir).expanduser()
    # Read from the environment at call time (huggingface_hub's constants are fixed at its import).
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` set to a true value: never reach the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def locate_model(model: str | Path, revision: str | None = None,
                 download_dir: str | Path | None = None) -> ModelLocation:
    """Where ``model``'s files are: the path itself when it exists, else the HF cache snapshot of the repo id
    (downloaded when missing and the hub is reachable). ModelNotFoundError says everywhere it looked."""
    path = Path(model).expanduser()
    if path.exists():
        if revision is not None:
            raise ModelNotFoundError(f"--revision {revision} applies to a Hugging Face repo id, but {path} is a "
                                     "local path; leave out --revision or give the repo id")
        return ModelLocation(path)
    text = str(model)
    if not looks_like_repo_id(text):
        raise ModelNotFoundError(f"model path not found: {path}; {PATH_HINT}")
    cache = hub_cache_dir(download_dir)
    at = f" at revision {revision!r}" if revision else ""
    try:
        snapshot = snapshot_download(text, revision=revision, cache_dir=cache, local_files_only=True)
        return ModelLocation(Path(snapshot), text, revision)
    except (LocalEntryNotFoundError, FileNotFoundError):
        pass
    except HFValidationError as exc:
        raise ModelNotFoundError(f"model path not found: {path}, and {text!r} is not a valid repo id ({exc}); "
                                 f"{PATH_HINT}") from None
    looked = (f"not a local path ({path.resolve()}), and {text}{at} is not in the Hugging Face cache {cache} "
              f"(no {cache / ('models--' + text.replace('/', '--'))} snapshot)")
    if hub_offline():
        raise ModelNotFoundError(f"model {text!r} not found: {looked}; HF_HUB_OFFLINE is set, so nothing was "
                                 f"downloaded. Download it first (`hf download {text}`), set HF_HOME/HF_HUB_CACHE or "
                                 "--download-dir to the cache that holds it, or give a local path")
    try:
        snapshot = snapshot_download(text, revision=revision, cache_dir=cache, allow_patterns=list(DOWNLOAD_PATTERNS))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelNotFoundError(f"model {text!r} not found: {looked}, and downloading it failed ({reason}); "
                                 "check the repo id and your network or HF_TOKEN, or give a local path") from None
    return ModelLocation(Path(snapshot), text, revision)
