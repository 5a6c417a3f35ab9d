"""The real published configs in ``../shared/configs`` (skipped cleanly where the folder is absent)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

CONFIGS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "configs"
SHARED_CONFIGS = sorted(p.parent.name for p in CONFIGS_DIR.glob("*/config.json")) if CONFIGS_DIR.is_dir() else []


def shared_config(name: str) -> dict[str, Any]:
    """The config.json of ``name`` (e.g. 'meta-llama--Llama-3.1-8B'); skips the test if it is absent."""
    path = CONFIGS_DIR / name / "config.json"
    if not path.exists():
        pytest.skip(f"{path} is not present")
    return json.loads(path.read_text())
